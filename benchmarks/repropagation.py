"""Live re-propagation benchmark: the loop panel's re-run after new labels.

Usage::

    python benchmarks/repropagation.py            # 10k samples, 5 rounds
    python benchmarks/repropagation.py --quick    # 10k samples, 2 rounds

A FiftyOne dataset of 10,000 synthetic samples (32-d clustered vectors, 10
classes, 10 seeds per class) is propagated once; then each round a human
labels 10 more samples and the labels are re-propagated, side by side:

- ``propagate_labels(method="auto")``: what a user re-runs by hand (the
  form, or the SDK): the graph is reused, auto cross-validates every
  candidate method;
- ``dinoprop.review.repropagate``: what the panels run every K labels: the
  method auto chose, and only changed labels rewritten;

and the writing of 10,000 propagated labels alone: FiftyOne's
``set_values`` against dinoprop's bulk writer. Everything is timed end to
end, including the reads and writes. The last printed line is JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import numpy as np

from private_db import use_private_database

NUM = 10_000
NEW_LABELS = 10


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    use_private_database()
    rounds = 2 if args.quick else 5
    results = run(rounds)
    print(report(results))
    print(json.dumps(results))


def run(rounds: int) -> dict:
    import fiftyone as fo

    import dinoprop
    from dinoprop import review
    from propagation import seed_draws, synthetic_graph

    x, y, _, _ = synthetic_graph(NUM, num_classes=10, dim=32)
    seeds = set(next(seed_draws(y, 10, 1)).tolist())
    dataset = fo.Dataset()
    dataset.add_samples(
        [
            fo.Sample(
                filepath="/synthetic/%d.jpg" % i,
                dinoprop_embedding=x[i],
                label=fo.Classification(label=str(y[i])) if i in seeds else None,
            )
            for i in range(NUM)
        ],
        progress=False,
    )
    ids = dataset.values("id")
    rng = np.random.default_rng(1)
    first = _timed(lambda: dinoprop.propagate_labels(dataset, "label", progress=False))
    by_hand, live, flipped = [], [], []
    for _ in range(rounds):
        for timings in (by_hand, live):
            new = [i for i in rng.permutation(NUM) if i not in seeds][:NEW_LABELS]
            seeds.update(new)
            dataset.set_values(  # by ID: select() keeps the dataset's order
                "label", {ids[i]: fo.Classification(label=str(y[i])) for i in new},
                key_field="id",
            )
            if timings is by_hand:
                timings.append(_timed(lambda: dinoprop.propagate_labels(
                    dataset, "label", method="auto", progress=False)))
            else:
                start = time.perf_counter()
                change = review.repropagate(dataset, "label")
                timings.append(time.perf_counter() - start)
                flipped.append(change["num_flipped"])
    writes = _writes(dataset)
    dataset.delete()
    return {
        "date": datetime.date.today().isoformat(),
        "machine": "%s, %d cores, %s" % (platform.machine(), os.cpu_count(), platform.python_version()),
        "num": NUM,
        "rounds": rounds,
        "first_run_s": first,
        "rerun_auto_s": by_hand,
        "repropagate_s": live,
        "num_flipped": flipped,
        **writes,
    }


def _writes(dataset):
    """Writing 10k propagated labels: FiftyOne's set_values vs the bulk writer."""
    import fiftyone as fo

    from dinoprop.label_writes import write_classifications

    ids = dataset.values("id")
    rng = np.random.default_rng(2)
    labels = [str(v) for v in rng.integers(0, 10, len(ids))]
    conf = rng.uniform(0.1, 1.0, len(ids))
    start = time.perf_counter()
    dataset.set_values(
        "bench_set_values",
        {i: fo.Classification(label=lab, confidence=float(c)) for i, lab, c in zip(ids, labels, conf)},
        key_field="id",
        validate=False,
    )
    set_values = time.perf_counter() - start
    start = time.perf_counter()
    write_classifications(dataset, "bench_bulk", ids, labels, conf, {})
    bulk = time.perf_counter() - start
    return {"write_set_values_s": set_values, "write_bulk_s": bulk}


def _timed(call):
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


def report(r: dict) -> str:
    auto, live = np.median(r["rerun_auto_s"]), np.median(r["repropagate_s"])
    return "\n".join(
        [
            "## Live re-propagation, %s (%s)" % (r["date"], r["machine"]),
            "",
            "%d synthetic samples (32-d, 10 classes, 100 seeds), %d rounds of "
            "%d new human labels; medians (all rounds in brackets)" % (r["num"], r["rounds"], NEW_LABELS),
            "",
            "| step | baseline | dinoprop | baseline s | dinoprop s | ratio |",
            "|---|---|---|---|---|---|",
            "| re-run after %d new labels, end to end | `propagate_labels(method=\"auto\")` (graph reused) | `review.repropagate` (the panels' re-run) | %.2f %s | %.2f %s | %.2fx |"
            % (NEW_LABELS, auto, _all(r["rerun_auto_s"]), live, _all(r["repropagate_s"]), auto / live),
            "| writing %d propagated labels | FiftyOne `set_values` | `label_writes.write_classifications` | %.2f | %.2f | %.2fx |"
            % (r["num"], r["write_set_values_s"], r["write_bulk_s"], r["write_set_values_s"] / r["write_bulk_s"]),
            "",
            "First run (kNN graph, auto, all labels written): %.2f s; labels flipped per re-run: %s"
            % (r["first_run_s"], r["num_flipped"]),
        ]
    )


def _all(values):
    return "(%s)" % ", ".join("%.2f" % v for v in values)


if __name__ == "__main__":
    main()
