"""Benchmark: compute_embeddings in one process vs engine="ray" on this machine.

Both embed the same real JPEGs (../shared/datasets/clothing-small) with the
same DINOv2-small-shaped model (random weights) into a private database.
The Ray engine runs on a local cluster of ``--cpus`` logical CPUs with
``--workers`` actors; its wall time includes starting the actors (each
imports torch and loads the model), which a long run amortises, so the
steady rate (images after the first written batch, over the time after it)
is reported too.

Usage::

    python benchmarks/ray_embeddings.py --images 300 --workers 1

The last line printed is JSON with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

from private_db import use_private_database


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--workers", type=int, default=1, help="Ray actors")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the Ray cluster")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    use_private_database()

    import fiftyone as fo
    import ray

    import dinoprop.embeddings as de
    from embedding_common import image_paths, save_random_dinov2

    model_dir = tempfile.mkdtemp(prefix="dinoprop-ray-bench-")
    save_random_dinov2(model_dir, "small")
    dataset = fo.Dataset()
    dataset.add_samples([fo.Sample(filepath=p) for p in image_paths(limit=args.images)])
    common = {"model": model_dir, "batch_size": args.batch_size, "precision": "fp32"}

    local = de.compute_embeddings(dataset, embeddings_field="local", **common)
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    first = []
    ray_run = de.compute_embeddings(
        dataset, embeddings_field="ray", engine="ray", num_workers=args.workers,
        progress=lambda pb: first or first.append((time.perf_counter(), pb.progress)),
        **common,
    )
    end = time.perf_counter()
    done_at_first = first[0][1] * len(dataset) if first else 0
    steady = (ray_run.num_embedded - done_at_first) / (end - first[0][0]) if first else 0.0
    numbers = {
        "machine": "%s, %d cores" % (platform.processor() or platform.machine(), _cores()),
        "images": len(dataset),
        "local_images_per_second": round(local.images_per_second, 2),
        "ray_images_per_second": round(ray_run.images_per_second, 2),
        "ray_steady_images_per_second": round(steady, 2),
        "ray_seconds": round(ray_run.seconds, 1),
        "local_seconds": round(local.seconds, 1),
        "ray_workers": args.workers,
        "ray_cpus": args.cpus,
    }
    print(json.dumps(numbers))


def _cores() -> int:
    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
