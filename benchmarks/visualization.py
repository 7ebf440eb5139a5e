"""Benchmark: dinoprop UMAP vs ``fob.compute_visualization(method="umap")``.

A persistent FiftyOne dataset of synthetic clustered 384-d unit vectors is
created (not timed). Each method then runs in its own fresh Python process
with an empty numba cache directory, so JIT compilation is counted for both:

-   fiftyone: ``fob.compute_visualization(ds, embeddings=field,
    method="umap")`` with its defaults
-   dinoprop (cold): ``dinoprop.compute_visualization(ds, embeddings=field)``
    with its defaults (seed 51, k=15, exact faiss kNN graph)
-   dinoprop (warm): the same in another fresh process that finds numba's
    on-disk cache from the cold run (what every later run costs)

Layout quality: scikit-learn's ``trustworthiness`` (10 neighbours) of both
layouts against the embeddings, on the same random 5,000 points.

Usage::

    python benchmarks/visualization.py            # 20k samples
    python benchmarks/visualization.py --quick    # 10k samples (< 5 minutes)

Prints a markdown table, writes it to benchmarks/results/visualization.md
(not with ``--quick``, which keeps the full table) and
a last line of JSON with ``ratio`` (fiftyone seconds / dinoprop cold
seconds), ``ratio_warm``, ``trustworthiness_dinoprop`` and
``trustworthiness_fiftyone``.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

import numpy as np

from private_db import use_private_database

HERE = os.path.dirname(os.path.abspath(__file__))
FIELD = "embedding"
TRUST_POINTS = 5000
TRUST_K = 10


def worker(method, dataset_name, out_path):
    """Runs one method in this (fresh) process; saves points in dataset order."""
    import fiftyone as fo

    dataset = fo.load_dataset(dataset_name)
    start = time.perf_counter()
    if method == "fiftyone":
        import fiftyone.brain as fob

        results = fob.compute_visualization(
            dataset, embeddings=FIELD, method="umap", brain_key="fo_umap"
        )
    else:
        import dinoprop as dp

        results = dp.compute_visualization(
            dataset, embeddings=FIELD, brain_key="dp_umap_" + method
        )
    seconds = time.perf_counter() - start
    order = {sid: i for i, sid in enumerate(results.sample_ids)}
    points = results.points[[order[sid] for sid in dataset.values("id")]]
    np.save(out_path, points)
    print(json.dumps({"seconds": seconds}))


def _run_worker(method, dataset_name, numba_dir, out_path):
    env = dict(os.environ, NUMBA_CACHE_DIR=numba_dir)
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", method, dataset_name, out_path],
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError("%s worker failed:\n%s" % (method, proc.stderr))
    return json.loads(proc.stdout.strip().splitlines()[-1])["seconds"]


def _trustworthiness(vectors, points, rows):
    from sklearn.manifold import trustworthiness

    return float(
        trustworthiness(vectors[rows], points[rows], n_neighbors=TRUST_K)
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="10k samples")
    parser.add_argument("--num", type=int, help="override the sample count")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)

    sys.path.insert(0, HERE)
    import similarity as bench  # the shared synthetic data helpers

    num = args.num or (10000 if args.quick else 20000)
    root = use_private_database()
    import fiftyone as fo

    vectors = bench.make_vectors(num, seed=3)
    dataset = bench.make_dataset(vectors, field=FIELD)
    dataset.persistent = True
    try:
        seconds, points = {}, {}
        for method, cache in (
            ("fiftyone", "fo-cache"),
            ("cold", "dp-cache"),
            ("warm", "dp-cache"),
        ):
            out = os.path.join(root, method + ".npy")
            numba_dir = os.path.join(root, cache)
            seconds[method] = _run_worker(method, dataset.name, numba_dir, out)
            points[method] = np.load(out)
    finally:
        dataset.delete()
        fo.delete_non_persistent_datasets()

    rows = np.random.default_rng(0).choice(num, min(num, TRUST_POINTS), False)
    trust = {m: _trustworthiness(vectors, points[m], rows) for m in points}
    result = {
        "num_samples": num,
        "seconds_fiftyone": round(seconds["fiftyone"], 2),
        "seconds_dinoprop": round(seconds["cold"], 2),
        "seconds_dinoprop_warm": round(seconds["warm"], 2),
        "ratio": round(seconds["fiftyone"] / seconds["cold"], 2),
        "ratio_warm": round(seconds["fiftyone"] / seconds["warm"], 2),
        "trustworthiness_fiftyone": round(trust["fiftyone"], 4),
        "trustworthiness_dinoprop": round(trust["cold"], 4),
        "trustworthiness_dinoprop_warm": round(trust["warm"], 4),
        "warm_layout_identical": bool(
            np.allclose(points["warm"], points["cold"], atol=1e-4)
        ),
    }
    table = to_markdown(result, args.quick)
    print(table)
    if not args.quick:  # --quick checks the script; keep the full table
        with open(os.path.join(HERE, "results", "visualization.md"), "w") as f:
            f.write(table)
    print(json.dumps(result))


def to_markdown(r, quick):
    return "\n".join(
        [
            "# Visualization benchmark: dinoprop UMAP vs fiftyone-brain UMAP",
            "",
            "Measured %s on a 2-core CPU, no GPU "
            "(`python benchmarks/visualization.py%s`). %s synthetic clustered "
            "384-d unit vectors; each run in a fresh process, empty numba "
            "cache (JIT counted) except *dinoprop warm*, which reuses the "
            "on-disk numba cache of the cold run. Trustworthiness: "
            "scikit-learn, %d neighbours, same %d random points."
            % (
                datetime.date.today().isoformat(),
                " --quick" if quick else "",
                "{:,}".format(r["num_samples"]),
                TRUST_K,
                TRUST_POINTS,
            ),
            "",
            "| method | seconds | speed-up vs fiftyone | trustworthiness |",
            "|---|---:|---:|---:|",
            "| fiftyone-brain `compute_visualization(method=\"umap\")` | "
            "{seconds_fiftyone:.1f} | 1.0x | {trustworthiness_fiftyone:.4f} |"
            .format(**r),
            "| dinoprop `compute_visualization()` (cold: JIT) | "
            "{seconds_dinoprop:.1f} | {ratio:.1f}x | "
            "{trustworthiness_dinoprop:.4f} |".format(**r),
            "| dinoprop `compute_visualization()` (warm numba cache) | "
            "{seconds_dinoprop_warm:.1f} | {ratio_warm:.1f}x | "
            "{trustworthiness_dinoprop_warm:.4f} |".format(**r),
            "",
            "Warm layout identical to the cold one (same seed): %s."
            % ("yes" if r["warm_layout_identical"] else "no"),
            "1-minute load average when the table was written: %.1f (other "
            "processes shared the 2 cores; absolute times are noisy)."
            % os.getloadavg()[0],
        ]
    ) + "\n"


if __name__ == "__main__":
    sys.exit(main())
