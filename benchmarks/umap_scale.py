"""UMAP at scale: a full fit against a fit on a sample with the rest transformed.

Usage::

    python benchmarks/umap_scale.py                        # 200k x 384-d, fit on 50k
    python benchmarks/umap_scale.py --num 100000 --fit 25000

Synthetic clustered vectors (``scale.clustered``: 100 classes) are mapped
to 2-D twice: UMAP fitted on every point (its kNN graph from faiss IVF, as
``compute_visualization`` does), and ``visualization.umap_on_sample``
(fitted on ``--fit`` random points, the others placed by UMAP's
``transform``). Each is timed (wall and this process's CPU seconds) and
scored with ``sklearn.manifold.trustworthiness`` (5 neighbours) on the
same ``--subset`` random points, plus the share of points whose nearest
map neighbour (on that subset) has their class. The last printed line is
JSON.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time

import numpy as np

from scale import clustered


def timed(function):
    """``(result, wall seconds, CPU seconds)`` of ``function()``."""
    start, cpu = time.perf_counter(), time.process_time()
    result = function()
    return result, time.perf_counter() - start, time.process_time() - cpu


def full_fit(x: np.ndarray, k: int = 15, seed: int = 51) -> np.ndarray:
    """UMAP on every row, as ``compute_visualization`` fits below its
    ``max_fit_points``."""
    from dinoprop.graph import approximate_knn_search
    from dinoprop.visualization import _reducer, _with_self

    indices, dists = _with_self(*approximate_knn_search(x, k - 1))
    return _reducer(2, seed, k, 0.1, (indices, dists)).fit_transform(x)


def scores(x, y, points, rows, neighbours=5) -> dict:
    """Trustworthiness and nearest-neighbour class agreement on ``rows``."""
    from sklearn.manifold import trustworthiness
    from sklearn.neighbors import NearestNeighbors

    sub, emb = x[rows], points[rows]
    nearest = NearestNeighbors(n_neighbors=2).fit(emb).kneighbors(emb)[1][:, 1]
    return {
        "trustworthiness": float(trustworthiness(sub, emb, n_neighbors=neighbours, metric="cosine")),
        "same_class_nearest": float(np.mean(y[rows][nearest] == y[rows])),
    }


def main():
    import warnings

    from dinoprop.core import l2_normalize
    from dinoprop.visualization import enable_numba_cache, umap_on_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--fit", type=int, default=50_000, help="points the sample fit uses")
    parser.add_argument("--subset", type=int, default=5_000, help="points scored")
    parser.add_argument("--skip-full", action="store_true", help="only the sample fit")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    enable_numba_cache()
    x, y = clustered(args.num, args.dim)
    x = l2_normalize(x).astype(np.float32)
    rows = np.random.default_rng(7).choice(args.num, args.subset, replace=False)
    result = {
        "date": datetime.date.today().isoformat(),
        "load_average": [round(v, 2) for v in os.getloadavg()],
        "num": args.num, "dim": args.dim, "fit": args.fit, "subset": args.subset,
    }
    runs = {"sample": lambda: umap_on_sample(x, args.fit)[0]}
    if not args.skip_full:
        runs["full"] = lambda: full_fit(x)
    for name, run in runs.items():
        points, wall, cpu = timed(run)
        result[name] = {"seconds": wall, "cpu_seconds": cpu, **scores(x, y, points, rows)}
        print("%-6s %7.1f s (cpu %7.1f s)  trustworthiness %.4f, same-class nearest %.3f"
              % (name, wall, cpu, result[name]["trustworthiness"],
                 result[name]["same_class_nearest"]), flush=True)
    result["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
