"""One million samples end to end on one machine.

Usage::

    python benchmarks/scale.py            # 1M samples, 384-d
    python benchmarks/scale.py --quick    # 100k samples, 384-d
    python benchmarks/scale.py --quick --writes   # and 5 ways to write 100k labels,
                                                  # accepting them, 100k embeddings
    python benchmarks/scale.py --only-writes      # those write comparisons alone

Synthetic clustered samples (100 classes) are inserted into a private
FiftyOne database (raw inserts in FiftyOne's own document format, read back
through FiftyOne to prove they are valid); then the workflow a user runs is
timed step by step, with the peak resident memory of each step (a psutil
sampling thread): ``compute_similarity`` (IVF), the kNN graph, a UMAP map
(fitted on 50k samples, the rest transformed),
``propagate_labels`` with 10 seeds per class writing every label, and a
re-run after 100 new seeds. Separately, at 100k samples (32-d), the
``propagate_labels`` comparison of the issue: a first run, a re-run after
10 new labels, and the same first run writing through FiftyOne's
``set_values``. The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import threading
import time
from contextlib import contextmanager, nullcontext

import numpy as np

from private_db import use_private_database

NUM_CLASSES = 100
SEEDS_PER_CLASS = 10
BATCH = 10_000
#: UMAP fits its map on this many samples and transforms the rest: at 1M a
#: full fit alone would take most of the 15-minute budget here, and
#: ``benchmarks/umap_scale.py`` measures what a fitted sample keeps.
UMAP_FIT_POINTS = 50_000


# ------------------------------------------------------------------ setup


def clustered(num: int, dim: int, num_classes: int = NUM_CLASSES, seed: int = 0):
    """``num`` float32 vectors around ``num_classes`` centres, and classes."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, num)
    centers = rng.normal(size=(num_classes, dim)).astype(np.float32)
    x = np.empty((num, dim), np.float32)
    for start in range(0, num, BATCH):  # bounded float64 temporaries
        stop = min(start + BATCH, num)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        x[start:stop] = centers[y[start:stop]] + noise
    return x, y


def insert_samples(dataset, x: np.ndarray, labels: dict) -> list:
    """Adds one sample per row of ``x`` (its ``dinoprop_embedding``) with a
    ``label`` Classification where ``labels`` (``{row: class}``) has one.

    The first sample goes through FiftyOne (declaring the schema), the
    others are inserted raw, in the documents FiftyOne writes itself.

    Returns:
        the sample IDs, in row order
    """
    import fiftyone as fo
    import fiftyone.core.fields as fof

    dataset.add_sample_field("dinoprop_embedding", fof.VectorField)
    dataset.add_sample_field(
        "label", fof.EmbeddedDocumentField, embedded_doc_type=fo.Classification
    )
    label = labels.get(0)
    dataset.add_sample(fo.Sample(
        filepath="/synthetic/0.jpg",
        dinoprop_embedding=x[0],
        label=None if label is None else fo.Classification(label=str(label)),
    ))
    first = dataset._sample_collection.find_one()
    ids = [first["_id"]]
    rng = np.random.default_rng(0)
    for start in range(1, len(x), BATCH):
        rows = range(start, min(start + BATCH, len(x)))
        docs = [_document(first, row, x[row], labels.get(row), rng) for row in rows]
        dataset._sample_collection.insert_many(docs, ordered=False)
        ids += [d["_id"] for d in docs]
    return [str(i) for i in ids]


def _document(first, row, vector, label, rng):
    """The document FiftyOne stores for such a sample (``first``: the
    dataset's first sample document, for the dataset and dates)."""
    from bson import ObjectId

    return {
        "_id": ObjectId(),
        "filepath": "/synthetic/%d.jpg" % row,
        "tags": [],
        "_media_type": "image",
        "_rand": float(rng.random()),
        "dinoprop_embedding": _npy_blob(vector),
        "label": None if label is None else {
            "_id": ObjectId(), "_cls": "Classification", "tags": [],
            "label": str(label),
        },
        "_dataset_id": first["_dataset_id"],
        "created_at": first["created_at"],
        "last_modified_at": first["last_modified_at"],
    }


def _npy_blob(vector):
    """``dinoprop.label_writes.serialize_vector(vector)`` (what
    ``compute_embeddings`` stores), with the ``.npy`` header built once
    per shape."""
    import zlib

    from dinoprop.label_writes import VECTOR_ZLIB_LEVEL

    key = (vector.dtype.str, vector.shape)
    if key not in _NPY_HEADERS:
        import io

        with io.BytesIO() as f:
            np.save(f, np.zeros(vector.shape, vector.dtype), allow_pickle=False)
            _NPY_HEADERS[key] = f.getvalue()[: -vector.nbytes]
    return zlib.compress(_NPY_HEADERS[key] + vector.tobytes(), VECTOR_ZLIB_LEVEL)


_NPY_HEADERS: dict = {}


def check_samples(dataset, x: np.ndarray, labels: dict, ids: list) -> None:
    """Reads a spread of samples back through FiftyOne and compares."""
    from dinoprop.label_writes import serialize_vector

    assert len(dataset) == len(x), (len(dataset), len(x))
    assert _npy_blob(x[-1]) == serialize_vector(x[-1])
    rows = np.unique(np.linspace(0, len(x) - 1, 50).astype(int))
    for row in rows:
        sample = dataset[ids[row]]
        assert sample.filepath == "/synthetic/%d.jpg" % row
        assert np.array_equal(sample.dinoprop_embedding, x[row])
        want = labels.get(int(row))
        got = sample.label.label if sample.label is not None else None
        assert got == (None if want is None else str(want)), (row, got, want)
    assert dataset.count("label") == len(labels)


# -------------------------------------------------------------- measuring


class PeakMemory:
    """Samples this process's resident memory (and its mongod's) in a thread.

    Args:
        mongod_pid: the private mongod's process ID, also sampled
        interval: seconds between samples
    """

    def __init__(self, mongod_pid: int | None = None, interval: float = 0.05):
        import psutil

        self._process = psutil.Process()
        self._mongod = psutil.Process(mongod_pid) if mongod_pid else None
        self._interval = interval
        self._peaks = [0, 0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self):
        self._peaks[0] = max(self._peaks[0], self._process.memory_info().rss)
        if self._mongod is not None:
            self._peaks[1] = max(self._peaks[1], self._mongod.memory_info().rss)

    def reset(self) -> None:
        """Starts a new peak from the current memory."""
        self._peaks = [0, 0]
        self._sample()

    def peaks_gb(self) -> tuple[float, float]:
        """The peak RSS (GB) of this process and of mongod since the reset."""
        self._sample()
        return self._peaks[0] / 1e9, self._peaks[1] / 1e9

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Steps:
    """Wall and CPU seconds (this process's and mongod's) and peak memory
    of each named step."""

    def __init__(self, memory: PeakMemory, mongod_pid: int):
        import psutil

        self.memory = memory
        self.mongod = psutil.Process(mongod_pid)
        self.rows: list = []

    @contextmanager
    def step(self, name: str, holds: str = ""):
        """Times the block as step ``name`` (``holds``: what it keeps per
        sample, for the table)."""
        self.memory.reset()
        start, cpu, server = time.perf_counter(), time.process_time(), _cpu(self.mongod)
        yield
        rss, mongod = self.memory.peaks_gb()
        self.rows.append({
            "step": name,
            "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu,
            "mongod_cpu_seconds": _cpu(self.mongod) - server,
            "peak_rss_gb": rss,
            "mongod_rss_gb": mongod,
            "holds": holds,
        })
        print("  %-44s %7.1f s (cpu %6.1f s, mongod cpu %5.1f s)  peak RSS %5.2f GB, mongod %5.2f GB"
              % (name, *[self.rows[-1][k] for k in ("seconds", "cpu_seconds", "mongod_cpu_seconds", "peak_rss_gb", "mongod_rss_gb")]),
              flush=True)

    def seconds(self, name: str) -> float:
        return next(r["seconds"] for r in self.rows if r["step"] == name)


# --------------------------------------------------------------- workflow


def seeds_per_class(y: np.ndarray, per_class: int, seed: int = 1) -> dict:
    """``{row: class}`` for ``per_class`` random rows of every class."""
    rng = np.random.default_rng(seed)
    rows = [rng.choice(np.flatnonzero(y == c), per_class, replace=False)
            for c in np.unique(y)]
    return {int(r): int(y[r]) for r in np.concatenate(rows)}


def add_labels(dataset, ids: list, y: np.ndarray, labels: dict, count: int, seed: int):
    """Labels ``count`` more random samples (as a human would, through
    FiftyOne) and adds them to ``labels``."""
    import fiftyone as fo

    rng = np.random.default_rng(seed)
    new = [int(r) for r in rng.permutation(len(y)) if int(r) not in labels][:count]
    dataset.set_values(  # by ID: select() keeps the dataset's order, not the list's
        "label", {ids[r]: fo.Classification(label=str(y[r])) for r in new},
        key_field="id",
    )
    labels.update({r: int(y[r]) for r in new})


def accuracy(dataset, ids: list, y: np.ndarray, labels: dict) -> float:
    """The accuracy of the propagated labels on the non-seed samples."""
    got = dict(zip(*dataset.values(["id", "label_propagated.label"])))
    rows = [r for r in range(len(y)) if r not in labels]
    return float(np.mean([got[ids[r]] == str(y[r]) for r in rows]))


def workflow(num: int, dim: int, steps: Steps) -> dict:
    """The user's workflow on ``num`` synthetic ``dim``-d samples."""
    import fiftyone as fo

    import dinoprop

    with steps.step("generate %s x %d-d vectors" % (f"{num:,}", dim), "%d float32" % dim):
        x, y = clustered(num, dim)
        labels = seeds_per_class(y, SEEDS_PER_CLASS)
    dataset = fo.Dataset()
    with steps.step("insert samples (raw, FiftyOne's format)", "its document"):
        ids = insert_samples(dataset, x, labels)
    with steps.step("read back through FiftyOne (check)"):
        check_samples(dataset, x, labels, ids)
    del x
    with steps.step("compute_similarity (IVF)", "%d float32 in faiss" % dim):
        index = dinoprop.compute_similarity(
            dataset, embeddings="dinoprop_embedding", brain_key="sim",
            index_type="ivf", progress=False,
        )
    with steps.step("kNN graph (k=10, from the index)", "10 int64 + 10 float32"):
        index.knn(10)
    with steps.step(
        "UMAP map (fit on %s, transform the rest)" % f"{UMAP_FIT_POINTS:,}",
        "2 float32 (+ UMAP's graph of the fitted sample)",
    ):
        dinoprop.compute_visualization(
            dataset, embeddings="dinoprop_embedding", brain_key="umap",
            max_fit_points=min(UMAP_FIT_POINTS, num - 1), progress=False,
        )
    with steps.step("propagate_labels (every label written)", "C float32 probabilities"):
        first = dinoprop.propagate_labels(dataset, "label", progress=False)
    written = dataset.count("label_propagated")
    first_accuracy = accuracy(dataset, ids, y, labels)
    add_labels(dataset, ids, y, labels, 100, seed=2)
    with steps.step("re-run after 100 new seeds"):
        rerun = dinoprop.propagate_labels(dataset, "label", progress=False)
    result = {
        "num_written": written,
        "accuracy": first_accuracy,
        "rerun_accuracy": accuracy(dataset, ids, y, labels),
        "method": first.summary()["method"],
        "rerun_num_flipped": rerun.summary()["num_flipped"],
        "rerun_num_kept": rerun.summary()["num_kept"],
    }
    dataset.delete()
    return result


# ---------------------------------------------- the 100k propagate_labels comparison


@contextmanager
def writing_through_set_values():
    """Makes ``propagate_labels`` write its labels with FiftyOne's
    ``set_values`` (validated, as a user's own code would) instead of
    dinoprop's bulk writer."""
    from dinoprop import label_writes

    bulk = label_writes.write_classifications
    label_writes.write_classifications = _set_values_writer
    try:
        yield
    finally:
        label_writes.write_classifications = bulk


def _set_values_writer(
    samples, field, ids, labels, confidences, attributes, clear_ids=(), vectors=None,
    label_ids=None, now=None,
):
    """``label_writes.write_classifications`` through ``set_values``."""
    import fiftyone as fo

    ids = [str(i) for i in ids]
    values = {
        sid: fo.Classification(
            label=label, confidence=float(confidence),
            **{name: attributes[name][row] for name in attributes},
        )
        for row, (sid, label, confidence) in enumerate(zip(ids, labels, confidences))
    }
    values.update({str(sid): None for sid in clear_ids})
    samples._root_dataset.set_values(field, values, key_field="id")
    return {"num_written": len(ids), "num_cleared": len(clear_ids)}


def propagate_100k(steps: Steps, num: int = 100_000) -> dict:
    """The issue's comparison: 32-d, 100 classes, 10 seeds each; a first
    run, a re-run after 10 new labels, and the first run through
    ``set_values`` on a copy of the samples."""
    import fiftyone as fo

    import dinoprop
    from propagation import synthetic_graph

    x, y, _, _ = synthetic_graph(num)
    labels = seeds_per_class(y, SEEDS_PER_CLASS)
    name = f"{num // 1000}k"
    runs = {}
    for writer in ("bulk", "set_values"):
        dataset = fo.Dataset()
        ids = insert_samples(dataset, x, dict(labels))
        step = "propagate_labels %s, 32-d, %s" % (name, "bulk writer" if writer == "bulk" else "set_values")
        through = writing_through_set_values() if writer == "set_values" else nullcontext()
        with steps.step(step), through:
            dinoprop.propagate_labels(dataset, "label", progress=False)
        runs[writer] = accuracy(dataset, ids, y, labels)
        if writer == "bulk":
            add_labels(dataset, ids, y, dict(labels), 10, seed=3)
            with steps.step("re-run after 10 new labels (%s)" % name):
                dinoprop.propagate_labels(dataset, "label", progress=False)
        dataset.delete()
    return {"accuracy_bulk": runs["bulk"], "accuracy_set_values": runs["set_values"]}


# --------------------------------------------------------- write methods


def write_methods(num: int = 100_000) -> list:
    """Seconds (wall, this process's CPU, mongod's CPU) to write ``num``
    propagated Classifications (label, confidence, 4 top labels and
    confidences) to new fields, each way side by side, twice: dinoprop's
    writer (``label_writes.bulk_set``: unordered ``UpdateOne`` batches of
    10,000), the same built here in batches of 1,000 and 10,000,
    ``$merge`` from a scratch collection, and FiftyOne's ``set_values``."""
    import fiftyone as fo
    import psutil

    import private_db
    from dinoprop.label_writes import write_classifications

    dataset = fo.Dataset()
    ids = insert_samples(dataset, np.zeros((num, 4), np.float32), {})
    rng = np.random.default_rng(0)
    labels = [str(v) for v in rng.integers(0, NUM_CLASSES, num)]
    confidences = rng.random(num)
    attributes = {
        "dinoprop_top_labels": [[lab, "a", "b", "c"] for lab in labels],
        "dinoprop_top_confidences": [[float(c), 0.1, 0.05, 0.01] for c in confidences],
    }
    mongod = psutil.Process(private_db._MONGODS[0].pid)
    me = psutil.Process()

    def set_values(field):
        dataset.set_values(field, {
            sid: fo.Classification(label=lab, confidence=float(c), **{
                name: values[row] for name, values in attributes.items()})
            for row, (sid, lab, c) in enumerate(zip(ids, labels, confidences))
        }, key_field="id")

    methods = {
        "dinoprop writer (bulk_set, batches of 10,000)": lambda field: write_classifications(
            dataset, field, ids, labels, confidences, attributes),
        "UpdateOne batches of 1,000": lambda field: _updates(dataset, field, ids, labels, confidences, attributes, 1000),
        "UpdateOne batches of 10,000": lambda field: _updates(dataset, field, ids, labels, confidences, attributes, 10_000),
        "$merge from a scratch collection": lambda field: _merge(dataset, field, ids, labels, confidences, attributes),
        "FiftyOne set_values": set_values,
    }
    rows = []
    for round_ in range(2):
        for number, (name, write) in enumerate(methods.items()):
            cpu, server = _cpu(me), _cpu(mongod)
            start = time.perf_counter()
            field = "w%d_%d" % (number, round_)
            write(field)
            rows.append({
                "method": name, "round": round_,
                "seconds": time.perf_counter() - start,
                "cpu_seconds": _cpu(me) - cpu,
                "mongod_cpu_seconds": _cpu(mongod) - server,
            })
            assert dataset.count(field) == num, (name, dataset.count(field))
            print("  %-44s %6.1f s (cpu %5.1f s, mongod cpu %5.1f s)" % (
                name, *[rows[-1][k] for k in ("seconds", "cpu_seconds", "mongod_cpu_seconds")]), flush=True)
    dataset.delete()
    return rows


def other_writes(num: int = 100_000, dim: int = 384, chunk: int = 1024) -> list:
    """Seconds (wall, this process's and mongod's CPU) of dinoprop's other
    large writes against the FiftyOne calls they replace, side by side:
    accepting ``num`` propagated labels (``accept_propagated_labels``
    against ``set_values`` of the labels then ``tag_samples``, the code it
    replaced) and writing ``num`` ``dim``-d embeddings in chunks of
    ``chunk`` (``label_writes.write_vectors`` against ``set_values``)."""
    import fiftyone as fo
    import fiftyone.core.fields as fof
    import psutil

    import private_db
    from dinoprop.embeddings.writer import _write_chunk
    from dinoprop.label_writes import write_classifications
    from dinoprop.review import accept

    mongod, me = psutil.Process(private_db._MONGODS[0].pid), psutil.Process()
    rng = np.random.default_rng(0)
    datasets = []
    for _ in range(2):
        dataset = fo.Dataset()
        ids = insert_samples(dataset, np.zeros((num, 4), np.float32), {})
        write_classifications(
            dataset, "label_propagated", ids,
            [str(v) for v in rng.integers(0, NUM_CLASSES, num)], 0.5 + rng.random(num) / 2, {},
        )
        dataset.add_sample_field("emb", fof.VectorField)
        datasets.append((dataset, ids))
    vectors = rng.standard_normal((num, dim), dtype=np.float32)

    def accept_through_set_values(dataset, ids):
        propagated = dataset.values("label_propagated")
        dataset.set_values("label", [
            fo.Classification(label=p.label, confidence=p.confidence, **{
                accept.BATCH_ATTRIBUTE: "b", accept.ACCEPTED_LABEL_ATTRIBUTE: p.label})
            for p in propagated
        ])
        dataset.tag_samples(accept.ACCEPTED_TAG)

    def vectors_through(label_values_writer):
        def write(dataset, ids):
            for start in range(0, num, chunk):
                values = dict(zip(ids[start:start + chunk], vectors[start:start + chunk]))
                label_values_writer(dataset, values)
        return write

    methods = {
        ("accept %s labels" % f"{num:,}", "accept_propagated_labels"):
            lambda dataset, ids: accept.accept_propagated_labels(dataset, "label_propagated", "label"),
        ("accept %s labels" % f"{num:,}", "set_values + tag_samples"): accept_through_set_values,
        ("%s x %d-d embeddings, chunks of %d" % (f"{num:,}", dim, chunk), "write_vectors"):
            vectors_through(lambda d, values: _write_chunk(d, "emb", values, False)),
        ("%s x %d-d embeddings, chunks of %d" % (f"{num:,}", dim, chunk), "set_values"):
            vectors_through(lambda d, values: d.set_values("emb", values, key_field="id")),
    }
    rows = []
    for number, ((what, how), write) in enumerate(methods.items()):
        dataset, ids = datasets[number % 2]
        cpu, server = _cpu(me), _cpu(mongod)
        start = time.perf_counter()
        write(dataset, ids)
        rows.append({
            "write": what, "method": how, "seconds": time.perf_counter() - start,
            "cpu_seconds": _cpu(me) - cpu, "mongod_cpu_seconds": _cpu(mongod) - server,
        })
        field = "label" if what.startswith("accept") else "emb"
        assert dataset.count(field) == num, (how, dataset.count(field))
        print("  %-44s %-26s %6.1f s (cpu %5.1f s, mongod cpu %5.1f s)" % (
            what, how, *[rows[-1][k] for k in ("seconds", "cpu_seconds", "mongod_cpu_seconds")]),
            flush=True)
    for dataset, _ in datasets:
        dataset.delete()
    return rows


def _cpu(process) -> float:
    times = process.cpu_times()
    return times.user + times.system


def _label_docs(ids, labels, confidences, attributes):
    """``(sample ObjectId, label document)`` pairs as dinoprop's writer
    builds them."""
    from bson import ObjectId

    from dinoprop.label_writes import _document

    names = sorted(attributes)
    return [
        (ObjectId(sid), _document(None, lab, float(c), names, [attributes[n][row] for n in names]))
        for row, (sid, lab, c) in enumerate(zip(ids, labels, confidences))
    ]


def _updates(dataset, field, ids, labels, confidences, attributes, batch):
    from pymongo import UpdateOne

    from dinoprop.label_writes import _declare

    _declare(dataset, field, attributes)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    ops = [
        UpdateOne({"_id": sid}, {"$set": {field: doc, "last_modified_at": now}})
        for sid, doc in _label_docs(ids, labels, confidences, attributes)
    ]
    for start in range(0, len(ops), batch):
        dataset._sample_collection.bulk_write(ops[start:start + batch], ordered=False)


def _merge(dataset, field, ids, labels, confidences, attributes):
    from dinoprop.label_writes import _declare

    _declare(dataset, field, attributes)
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    scratch = dataset._sample_collection.database["dinoprop_scratch_" + field]
    rows = [
        {"_id": sid, field: doc, "last_modified_at": now}
        for sid, doc in _label_docs(ids, labels, confidences, attributes)
    ]
    for start in range(0, len(rows), BATCH):
        scratch.insert_many(rows[start:start + BATCH], ordered=False)
    scratch.aggregate([{"$merge": {
        "into": dataset._sample_collection_name, "on": "_id",
        "whenMatched": "merge", "whenNotMatched": "discard",
    }}])
    scratch.drop()


# ------------------------------------------------------------------ main


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="100k samples")
    parser.add_argument("--num", type=int, help="samples of the workflow")
    parser.add_argument(
        "--writes", action="store_true",
        help="also compare ways of writing 100k labels, accepting them and "
        "writing embeddings (about 10 minutes)",
    )
    parser.add_argument(
        "--only-writes", action="store_true",
        help="only the write comparisons of --writes (no workflow)",
    )
    args = parser.parse_args()
    use_private_database()
    import private_db

    if args.only_writes:
        print("writing 100k labels:")
        writes = {"writes": write_methods()}
        print("accepting 100k labels, writing 100k embeddings:")
        writes["other_writes"] = other_writes()
        print(json.dumps(writes))
        return
    num = args.num or (100_000 if args.quick else 1_000_000)
    mongod_pid = private_db._MONGODS[0].pid
    memory = PeakMemory(mongod_pid)
    steps = Steps(memory, mongod_pid)
    start = time.perf_counter()
    print("workflow, %s samples, 384-d:" % f"{num:,}")
    quality = workflow(num, 384, steps)
    seconds_total = time.perf_counter() - start
    rows = list(steps.rows)
    print("propagate_labels at 100k, 32-d:")
    comparison = propagate_100k(steps)
    if args.writes:
        print("writing 100k labels:")
        comparison["writes"] = write_methods()
        print("accepting 100k labels, writing 100k embeddings:")
        comparison["other_writes"] = other_writes()
    memory.stop()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": "%s, %d cores, %.1f GB, load average %s" % (
            platform.machine(), os.cpu_count(), _total_memory_gb(),
            " ".join("%.2f" % v for v in os.getloadavg()),
        ),
        "num_samples": num,
        "dim": 384,
        "seconds_total": seconds_total,
        "peak_rss_gb": max(r["peak_rss_gb"] for r in rows),
        "peak_mongod_rss_gb": max(r["mongod_rss_gb"] for r in rows),
        "rerun_seconds": steps.seconds("re-run after 100 new seeds"),
        "propagate_100k_seconds": steps.seconds("propagate_labels 100k, 32-d, bulk writer"),
        "propagate_100k_rerun_seconds": steps.seconds("re-run after 10 new labels (100k)"),
        "propagate_100k_set_values_seconds": steps.seconds("propagate_labels 100k, 32-d, set_values"),
        **quality,
        **comparison,
        "steps": steps.rows,
    }
    print(report(result))
    print(json.dumps(result))


def _total_memory_gb():
    import psutil

    return psutil.virtual_memory().total / 1e9


def report(r: dict) -> str:
    """The markdown table of the steps."""
    lines = [
        "## %s samples end to end, %s (%s)" % (f"{r['num_samples']:,}", r["date"], r["machine"]),
        "",
        "| step | seconds | CPU seconds | mongod CPU seconds | peak RSS GB | mongod RSS GB | holds per sample |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        "| %s | %.1f | %.1f | %.1f | %.2f | %.2f | %s |" % (
            row["step"], row["seconds"], row["cpu_seconds"], row["mongod_cpu_seconds"],
            row["peak_rss_gb"], row["mongod_rss_gb"], row["holds"],
        )
        for row in r["steps"]
    ]
    lines += [
        "",
        "Workflow total %.0f s, peak RSS %.2f GB (mongod %.2f GB); accuracy %.1f%% "
        "(method %s), after the re-run %.1f%%; 100k comparison accuracy %.1f%% "
        "(bulk) and %.1f%% (set_values)." % (
            r["seconds_total"], r["peak_rss_gb"], r["peak_mongod_rss_gb"],
            100 * r["accuracy"], r["method"], 100 * r["rerun_accuracy"],
            100 * r["accuracy_bulk"], 100 * r["accuracy_set_values"],
        ),
    ]
    if "writes" in r:
        lines += [
            "",
            "| writing 100k labels | round | seconds | CPU seconds | mongod CPU seconds |",
            "|---|---|---|---|---|",
        ] + [
            "| %s | %d | %.1f | %.1f | %.1f |" % (
                w["method"], w["round"] + 1, w["seconds"], w["cpu_seconds"],
                w["mongod_cpu_seconds"],
            )
            for w in r["writes"]
        ] + [
            "",
            "| write | method | seconds | CPU seconds | mongod CPU seconds |",
            "|---|---|---|---|---|",
        ] + [
            "| %s | %s | %.1f | %.1f | %.1f |" % (
                w["write"], w["method"], w["seconds"], w["cpu_seconds"],
                w["mongod_cpu_seconds"],
            )
            for w in r["other_writes"]
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
