"""Benchmark: dinoprop's faiss similarity backend vs fiftyone-brain's sklearn.

For each size, a FiftyOne dataset of synthetic clustered 384-d unit vectors
is created (not timed), then both backends build a similarity run on the
embeddings field and answer 1,000 single-sample "sort by similarity" queries
(``results.sort_by_similarity(id, k=10)``, what the App does per click).
Also measured: recall@10 of dinoprop's automatic index against exact cosine
search, the time to build dinoprop's kNN graph (k=15), and the time both
backends spend reading the embeddings from the database (part of "build").

Usage::

    python benchmarks/similarity.py            # 20k and 100k samples
    python benchmarks/similarity.py --quick    # 20k samples (< 5 minutes)

Prints a markdown table, writes it to benchmarks/results/similarity.md
(not with ``--quick``, which keeps the full table) and
prints a last line of JSON (``ratio`` = sklearn time / dinoprop time, build
+ queries, at the largest size; ``recall_at_10`` at that size).
"""

import argparse
import datetime
import json
import os
import sys
import time

import numpy as np

from private_db import use_private_database

HERE = os.path.dirname(os.path.abspath(__file__))
DIM = 384
NUM_QUERIES = 1000
K = 10
GRAPH_K = 15


def make_vectors(num, dim=DIM, num_clusters=100, seed=0):
    """Synthetic clustered unit vectors (like normalised DINOv2 features)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(num_clusters, dim))
    x = centers[rng.integers(0, num_clusters, num)] + rng.normal(size=(num, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32)


def make_dataset(vectors, field="embedding"):
    """A non-persistent FiftyOne dataset holding ``vectors`` in ``field``."""
    import fiftyone as fo

    dataset = fo.Dataset()
    dataset.add_samples(
        [
            fo.Sample(filepath="/synthetic/%07d.jpg" % i)
            for i in range(len(vectors))
        ],
        progress=False,
    )
    dataset.set_values(field, list(vectors), progress=False)
    return dataset


def _timed_queries(results, query_ids):
    start = time.perf_counter()
    found = [
        list(results.sort_by_similarity(qid, k=K)._stages[-1].sample_ids)
        for qid in query_ids
    ]
    return time.perf_counter() - start, found


def run_size(num, seed=0):
    import fiftyone.brain as fob
    import fiftyone.brain.internal.core.utils as fbu

    import dinoprop as dp
    from dinoprop.core import load_embeddings

    vectors = make_vectors(num, seed=seed)
    dataset = make_dataset(vectors)
    ids = np.array(dataset.values("id"))
    rng = np.random.default_rng(seed + 1)
    query_rows = rng.choice(num, NUM_QUERIES, replace=False)
    query_ids = list(ids[query_rows])
    try:
        start = time.perf_counter()
        fbu.get_embeddings(dataset, embeddings_field="embedding")
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        load_embeddings(dataset, "embedding")
        dp_load_s = time.perf_counter() - start

        start = time.perf_counter()
        ours = dp.compute_similarity(dataset, embeddings="embedding", brain_key="dp")
        dp_build = time.perf_counter() - start
        dp_query, dp_found = _timed_queries(ours, query_ids)
        start = time.perf_counter()
        ours.knn(GRAPH_K)
        graph_s = time.perf_counter() - start

        start = time.perf_counter()
        theirs = fob.compute_similarity(
            dataset, embeddings="embedding", brain_key="sk", backend="sklearn"
        )
        sk_build = time.perf_counter() - start
        sk_query, _ = _timed_queries(theirs, query_ids)

        exact = np.argsort(-(vectors[query_rows] @ vectors.T), axis=1)[:, :K]
        recall = float(
            np.mean(
                [
                    len(set(found) & set(ids[row])) / K
                    for found, row in zip(dp_found, exact)
                ]
            )
        )
        dp_total = dp_build + dp_query
        sk_total = sk_build + sk_query
        return {
            "num_samples": num,
            "index_type": ours.index_type,
            "load_s": load_s,
            "dinoprop_load_s": dp_load_s,
            "dinoprop_build_s": dp_build,
            "dinoprop_queries_s": dp_query,
            "sklearn_build_s": sk_build,
            "sklearn_queries_s": sk_query,
            "ratio": sk_total / dp_total,
            "ratio_excluding_load": (sk_total - load_s)
            / max(dp_total - dp_load_s, 1e-9),
            "queries_ratio": sk_query / dp_query,
            "recall_at_10": recall,
            "knn_graph_s": graph_s,
        }
    finally:
        dataset.delete()


def to_markdown(rows, quick):
    lines = [
        "# Similarity benchmark: dinoprop (faiss) vs fiftyone-brain sklearn",
        "",
        "Measured %s on a 2-core CPU, no GPU (`python benchmarks/similarity.py%s`)."
        % (datetime.date.today().isoformat(), " --quick" if quick else ""),
        "Synthetic clustered 384-d unit vectors in a FiftyOne dataset; build "
        "= `compute_similarity` on the embeddings field (includes reading the "
        "embeddings from the database, shown separately as *load*: FiftyOne "
        "Brain's reader for sklearn, dinoprop's bulk decoder for dinoprop); queries = "
        "%d single-sample `sort_by_similarity(id, k=%d)`." % (NUM_QUERIES, K),
        "",
        "| samples | dinoprop index | load s (sklearn / dinoprop) | dinoprop build s | "
        "dinoprop %d queries s | sklearn build s | sklearn %d queries s | "
        "speed-up (build + queries) | speed-up excl. load | speed-up queries | "
        "recall@10 vs exact | kNN graph k=%d s |" % (NUM_QUERIES, NUM_QUERIES, GRAPH_K),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines.insert(
        4,
        "1-minute load average when the table was written: %.1f (other "
        "processes shared the 2 cores; absolute times are noisy, ratios "
        "come from the same run)." % os.getloadavg()[0],
    )
    for r in rows:
        lines.append(
            "| {num_samples:,} | {index_type} | {load_s:.1f} / {dinoprop_load_s:.1f} | "
            "{dinoprop_build_s:.1f} | {dinoprop_queries_s:.2f} | "
            "{sklearn_build_s:.1f} | {sklearn_queries_s:.1f} | {ratio:.1f}x | "
            "{ratio_excluding_load:.1f}x | {queries_ratio:.0f}x | "
            "{recall_at_10:.3f} | {knn_graph_s:.1f} |".format(**r)
        )
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="20k samples only")
    parser.add_argument("--sizes", type=int, nargs="*", help="override sizes")
    args = parser.parse_args()
    sizes = args.sizes or ([20000] if args.quick else [20000, 100000])

    use_private_database()
    try:
        rows = [run_size(num) for num in sizes]
    finally:
        import fiftyone as fo

        fo.delete_non_persistent_datasets()
    table = to_markdown(rows, args.quick)
    print(table)
    if not args.quick:  # --quick checks the script; keep the full table
        with open(os.path.join(HERE, "results", "similarity.md"), "w") as f:
            f.write(table)
    last = rows[-1]
    print(
        json.dumps(
            {
                "ratio": round(last["ratio"], 2),
                "ratio_excluding_load": round(last["ratio_excluding_load"], 2),
                "queries_ratio": round(last["queries_ratio"], 1),
                "recall_at_10": round(last["recall_at_10"], 4),
                "knn_graph_s": round(last["knn_graph_s"], 2),
                "num_samples": last["num_samples"],
                "index_type": last["index_type"],
            }
        )
    )


if __name__ == "__main__":
    sys.exit(main())
