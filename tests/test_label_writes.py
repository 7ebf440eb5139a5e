"""dinoprop's bulk writes read back through FiftyOne exactly as what
FiftyOne's own ``set_values`` / ``tag_samples`` would have written."""

import numpy as np
import pytest

import fiftyone as fo

from dinoprop import label_writes
from dinoprop.embeddings.writer import _write_chunk
from dinoprop.review import accept


def _twins(num=12):
    """Two datasets with the same samples (same IDs order), a ``label``
    field on the first half."""
    out = []
    for _ in range(2):
        dataset = fo.Dataset()
        dataset.add_samples([
            fo.Sample(
                filepath="/synthetic/%d.jpg" % i,
                label=fo.Classification(label="c%d" % (i % 3)) if i < num // 2 else None,
            )
            for i in range(num)
        ])
        out.append(dataset)
    return out


def _without_ids(value):
    """A label's dict without its ``_id``s (new labels get new ones)."""
    if isinstance(value, dict):
        return {k: _without_ids(v) for k, v in value.items() if k != "_id"}
    if isinstance(value, list):
        return [_without_ids(v) for v in value]
    return value


def _same(ours, theirs, field):
    """Schema, values (through FiftyOne's API), tags and modification times
    agree between the two datasets."""
    assert _schema(ours) == _schema(theirs)
    for a, b in zip(ours.values(field), theirs.values(field)):
        if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
            assert a.dtype == b.dtype and np.array_equal(a, b)
        elif a is None or b is None:
            assert a is None and b is None
        else:
            assert type(a) is type(b)
            assert _without_ids(a.to_dict()) == _without_ids(b.to_dict())
    assert ours.values("tags") == theirs.values("tags")
    for sample in ours.iter_samples():
        sample.reload()  # a sample FiftyOne validates on load


def _schema(dataset):
    """``{path: (field type, document type, list element type)}``."""
    return {
        path: (type(f), getattr(f, "document_type", None), type(getattr(f, "field", None)))
        for path, f in dataset.get_field_schema(flat=True).items()
    }


def _modified_since(dataset, since):
    return [t >= since for t in dataset.values("last_modified_at")]


def test_classifications_read_back_as_set_values_writes_them():
    ours, theirs = _twins()
    ids = ours.values("id")[3:]
    rng = np.random.default_rng(0)
    labels = ["c%d" % v for v in rng.integers(0, 3, len(ids))]
    confidences = rng.random(len(ids))
    tops = {"top_labels": [[lab, "x"] for lab in labels],
            "top_confidences": [[float(c), 0.1] for c in confidences]}
    logits = rng.normal(size=(len(ids), 3)).astype(np.float32)
    clear = ours.values("id")[:2]
    since = label_writes.utc_now().replace(microsecond=0)
    label_writes.write_classifications(
        ours, "label", ids, labels, confidences, tops, clear_ids=clear,
        vectors={"logits": logits},
    )
    theirs_ids = theirs.values("id")
    for name in tops:
        theirs.add_sample_field("label." + name, fo.ListField,
                                subfield=fo.StringField if name == "top_labels" else fo.FloatField)
    values = {
        theirs_ids[3 + row]: fo.Classification(
            label=lab, confidence=float(c), logits=logits[row],
            **{name: tops[name][row] for name in tops},
        )
        for row, (lab, c) in enumerate(zip(labels, confidences))
    }
    values.update({theirs_ids[i]: None for i in range(2)})
    theirs.set_values("label", values, key_field="id")
    _same(ours, theirs, "label")
    assert _modified_since(ours, since)[:2] == [True, True]
    assert all(_modified_since(ours, since)[3:])


def test_embedding_chunks_read_back_as_set_values_writes_them():
    ours, theirs = _twins()
    vectors = np.random.default_rng(1).normal(size=(12, 5)).astype(np.float32)
    for dataset in (ours, theirs):
        dataset.add_sample_field("emb", fo.VectorField)
    since = label_writes.utc_now().replace(microsecond=0)
    _write_chunk(ours, "emb", dict(zip(ours.values("id"), vectors)), False)
    theirs.set_values("emb", dict(zip(theirs.values("id"), vectors)), key_field="id")
    _same(ours, theirs, "emb")
    assert all(_modified_since(ours, since))


def test_accepted_labels_and_tags_read_back_as_set_values_writes_them():
    ours, theirs = _twins()
    for dataset in (ours, theirs):
        dataset.set_values("label_propagated", [
            fo.Classification(label="c%d" % (i % 2), confidence=0.5 + i / 30)
            for i in range(len(dataset))
        ])
    since = label_writes.utc_now().replace(microsecond=0)
    result = accept.accept_propagated_labels(ours, "label_propagated", "new_field", 0.6)
    ids = theirs.match(fo.ViewField("label_propagated.confidence") >= 0.6).values("id")
    selected = theirs.select(ids)
    selected.set_values("new_field", [
        fo.Classification(label=p.label, confidence=p.confidence, **{
            accept.BATCH_ATTRIBUTE: result.batch,
            accept.ACCEPTED_LABEL_ATTRIBUTE: p.label,
        })
        for p in selected.values("label_propagated")
    ])
    selected.tag_samples(accept.ACCEPTED_TAG)
    _same(ours, theirs, "new_field")
    assert sum(_modified_since(ours, since)) >= len(ids)

    accept.undo_accept(ours, "new_field", result.batch)
    theirs.select(ids).set_values("new_field", [None] * len(ids))
    theirs.select(ids).untag_samples(accept.ACCEPTED_TAG)
    _same(ours, theirs, "new_field")


def test_retag_in_several_batches_tags_as_fiftyone_does(monkeypatch):
    import time

    monkeypatch.setattr(label_writes, "BULK_BATCH", 2)
    ours, theirs = _twins()
    ids = ours.values("id")
    first, second = set(ids[:7]), set(ids[4:11])  # three kept, four added, four removed
    for dataset in (ours, theirs):
        dataset.select([dataset.values("id")[i] for i in range(7)]).tag_samples("review")
    before = ours.values("last_modified_at")
    time.sleep(0.01)
    assert label_writes.retag(ours, "review", second) == {"num_tagged": 4, "num_untagged": 4}
    wanted = [theirs.values("id")[i] for i in range(4, 11)]
    theirs.untag_samples("review")
    theirs.select(wanted).tag_samples("review")
    _same(ours, theirs, "label")
    changed = [b != a for b, a in zip(before, ours.values("last_modified_at"))]
    assert changed == [i in first ^ second for i in ids]


def test_bulk_set_sends_batches_and_counts_what_it_modified():
    dataset, _ = _twins(num=10)
    ids = dataset.values("id")
    modified = label_writes.bulk_set(
        dataset._sample_collection, ((sid, {"n": i}) for i, sid in enumerate(ids)),
        batch_size=3,
    )
    assert modified == 10
    dataset.add_sample_field("n", fo.IntField)
    assert dataset.values("n") == list(range(10))


def test_bulk_set_keeps_two_batches_in_flight(monkeypatch):
    import threading
    import time

    active, most = [0], [0]
    lock = threading.Lock()

    def slow_send(collection, ops):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)  # mongod working on it
        with lock:
            active[0] -= 1
        return len(ops)

    monkeypatch.setattr(label_writes, "_send", slow_send)
    updates = (("%024x" % i, {"n": i}) for i in range(12))
    assert label_writes.bulk_set(None, updates, batch_size=2) == 12
    assert most[0] == label_writes.WRITES_IN_FLIGHT == 2


def test_bulk_set_raises_what_a_batch_sent_by_its_thread_failed_with():
    from pymongo.errors import BulkWriteError

    dataset, _ = _twins(num=6)
    ids = dataset.values("id")
    updates = [(sid, {"n": i}) for i, sid in enumerate(ids)]
    updates[4] = (ids[4], {"_id": "immutable"})  # in the third batch of 2
    with pytest.raises(BulkWriteError):
        label_writes.bulk_set(dataset._sample_collection, iter(updates), batch_size=2)
    dataset.add_sample_field("n", fo.IntField)
    assert dataset.values("n") == [0, 1, 2, 3, None, 5]  # unordered: the rest is written
