"""Benchmark: the kNN graph in one process vs sharded on a local Ray cluster.

Both build the graph of the same synthetic clustered float32 vectors
(``scale.clustered``: 100 classes) with the same IVF index: one process
runs :func:`dinoprop.graph.approximate_knn_search` (what ``graph_search``
runs from 50k vectors); the Ray runs pass it the
:class:`dinoprop.graph_distributed.ShardedSearch` that ``ray_graph_search``
uses, on a local cluster of ``--cpus`` logical CPUs, once with one actor
holding every CPU and once with ``--workers`` actors. Every run's search
stage is timed through the ``search`` hook, so the rest (training, filling
and calibrating the index, completing the graph) is timed too; training
and filling are also timed alone.

Reported per run: wall and CPU seconds (this process, plus the actors'
processes, sampled by a psutil thread every 50 ms), peak RSS of this
process and of the actors, recall@k against exact search on
``--recall-queries`` rows, and whether the graph equals the one-process
graph. On one machine Ray cannot beat one process: the same cores do the
same search, plus serialising the index, copying it into every actor and
moving the shards through the object store.

Usage::

    python benchmarks/ray_graph.py [--num 200000] [--dim 384] [--workers 2] [--cpus 2]
    python benchmarks/ray_graph.py --project results/ray_graph.json [--cores 256]

The last line printed is JSON with the numbers. ``--project`` reads such a
line and prints the cost projected to 1M, 10M and 100M vectors (see
:func:`project`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import threading
import time

import numpy as np


class Monitor:
    """Peak RSS of this process and of the graph actors, and the actors'
    CPU seconds (the last sample of each actor process)."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._psutil = psutil
        self._me = psutil.Process()
        self.interval = interval
        self.reset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def reset(self) -> None:
        self.driver_rss = self._me.memory_info().rss
        self.actor_rss = 0
        self.actor_cpu: dict = {}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.driver_rss = max(self.driver_rss, self._me.memory_info().rss)
            for process in self._psutil.process_iter(["pid", "cmdline"]):
                if "ShardSearcher" not in " ".join(process.info["cmdline"] or []):
                    continue
                try:
                    self.actor_rss = max(self.actor_rss, process.memory_info().rss)
                    times = process.cpu_times()
                except self._psutil.Error:
                    continue
                self.actor_cpu[process.info["pid"]] = times.user + times.system

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Timed:
    """A ``search`` hook that times the search it wraps (wall and this
    process's CPU)."""

    def __init__(self, search):
        self.search = search
        self.seconds = self.cpu_seconds = 0.0
        self.nprobe = None

    def __call__(self, *args):
        self.nprobe = args[3]
        start, cpu = time.perf_counter(), time.process_time()
        found = self.search(*args)
        self.seconds += time.perf_counter() - start
        self.cpu_seconds += time.process_time() - cpu
        return found


def run(name, x, k, search, monitor, truth_rows, truth, reference=None):
    """One graph build; returns its row of numbers and its neighbours."""
    from dinoprop import graph

    timed = Timed(search)
    monitor.reset()
    start, cpu = time.perf_counter(), time.process_time()
    neighbors, sims = graph.approximate_knn_search(x, k, search=timed)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    time.sleep(3 * monitor.interval)  # a last sample of the actors
    actor_cpu = sum(monitor.actor_cpu.values())
    recall = np.mean([
        len(set(neighbors[row]) & set(want)) / k for row, want in zip(truth_rows, truth)
    ])
    row = {
        "run": name,
        "seconds": round(seconds, 1),
        "cpu_seconds": round(cpu_seconds + actor_cpu, 1),
        "search_seconds": round(timed.seconds, 1),
        "search_cpu_seconds": round(timed.cpu_seconds + actor_cpu, 1),
        "rest_seconds": round(seconds - timed.seconds, 1),
        "driver_peak_rss_gb": round(monitor.driver_rss / 1e9, 2),
        "actor_peak_rss_gb": round(monitor.actor_rss / 1e9, 2),
        "nprobe": int(timed.nprobe),
        "recall": round(float(recall), 4),
        "equal_to_one_process": (
            None if reference is None
            else bool(np.array_equal(neighbors, reference[0])
                      and np.allclose(sims, reference[1], atol=1e-5))
        ),
    }
    print("  %-28s %6.1f s, cpu %6.1f s (search %6.1f s, cpu %6.1f s), driver RSS %.2f GB, "
          "actor RSS %.2f GB, recall %.4f" % (
              name, row["seconds"], row["cpu_seconds"], row["search_seconds"],
              row["search_cpu_seconds"], row["driver_peak_rss_gb"],
              row["actor_peak_rss_gb"], row["recall"]), flush=True)
    return row, (neighbors, sims)


#: Query rows per actor call (dinoprop.graph_distributed.SHARD_ROWS).
SHARD_ROWS = 65_536


def project(measured: dict, num: int, cores: int) -> dict:
    """The cost of the graph of ``num`` vectors, scaled from a measured run.

    Time: ``nlist = sqrt(N)`` lists, so training (k-means of ``40 nlist``
    vectors into ``nlist`` centroids) grows as ``N``, filling (each vector
    against every centroid) as ``N^1.5``, calibration (exact search of 256
    queries) as ``N``, and the search (each row against the centroids and
    ``nprobe`` lists of ``N / nlist`` vectors) as ``N^1.5`` with the
    measured ``nprobe`` (a floor: keeping the recall may take more lists
    at larger N). The search's CPU seconds are spread over ``cores`` with
    no loss; the driver's stages are scaled from their wall seconds here.

    Memory (bytes, ``D`` float32 dimensions, ``k`` neighbours): the
    vectors ``4 N D``; the index ``4 N D + 8 N`` (vectors and ids); the
    object store holds the serialised index, the query shards (``4 N D``)
    and the raw results (``12 N (k + 1)``); each actor its own index copy
    plus a shard and its results; the graph ``12 N k`` (int64 + float32).
    The driver holds the field's vectors, their unit-norm copy, the index,
    for a moment its serialised copy, and the raw and final graphs.
    """
    dim, k, base = measured["dim"], measured["k"], measured["num"]
    one = measured["runs"][0]
    ratio = num / base
    scale = ratio ** 1.5
    train = measured["train_seconds"] * ratio
    add = measured["add_seconds"] * scale
    calibrate = max(one["rest_seconds"] - measured["train_seconds"] - measured["add_seconds"], 0) * ratio
    search_cpu = one["search_cpu_seconds"] * scale
    vectors = 4 * num * dim
    index = vectors + 8 * num
    raw, graph_bytes = 12 * num * (k + 1), 12 * num * k
    shard = min(num, SHARD_ROWS)
    return {
        "num": num,
        "nlist": int(min(max(num ** 0.5, 16), 65536)),
        "train_s": train, "add_s": add, "calibrate_s": calibrate,
        "search_cpu_h": search_cpu / 3600, "search_wall_s": search_cpu / cores,
        "vectors_gb": vectors / 1e9, "index_gb": index / 1e9,
        "object_store_gb": (index + vectors + raw) / 1e9,
        "actor_gb": (index + shard * (4 * dim + 12 * (k + 1))) / 1e9,
        "graph_gb": graph_bytes / 1e9,
        "driver_gb": (2 * vectors + 2 * index + raw + graph_bytes) / 1e9,
    }


def print_projection(path: str, cores: int) -> None:
    """Prints the markdown table of :func:`project` at the measured size and
    at 1M, 10M and 100M vectors."""
    with open(path) as f:
        measured = json.loads(f.read().strip().splitlines()[-1])
    print("| N | nlist | train s | add s | calibrate s | search CPU h | search wall s on %d cores "
          "| vectors GB | index GB | object store GB | per actor GB | graph GB | driver peak GB |" % cores)
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for num in (measured["num"], 1_000_000, 10_000_000, 100_000_000):
        p = project(measured, num, cores)
        print("| {:,} | {:,} | {:,.0f} | {:,.0f} | {:,.0f} | {:,.2f} | {:,.0f} | {:,.1f} | {:,.1f} "
              "| {:,.1f} | {:,.1f} | {:,.2f} | {:,.1f} |".format(
                  num, p["nlist"], p["train_s"], p["add_s"], p["calibrate_s"], p["search_cpu_h"],
                  p["search_wall_s"], p["vectors_gb"], p["index_gb"], p["object_store_gb"],
                  p["actor_gb"], p["graph_gb"], p["driver_gb"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--k", type=int, default=10, help="neighbours (propagate_labels' default)")
    parser.add_argument("--workers", type=int, default=2, help="actors of the second Ray run")
    parser.add_argument("--cpus", type=int, default=2, help="logical CPUs of the Ray cluster")
    parser.add_argument("--recall-queries", type=int, default=1000)
    parser.add_argument("--project", metavar="JSON", help="print the projection of a saved run")
    parser.add_argument("--cores", type=int, default=256, help="cluster cores of the projection")
    args = parser.parse_args()
    if args.project:
        print_projection(args.project, args.cores)
        return

    import faiss
    import ray

    from dinoprop import graph
    from dinoprop.graph_distributed import ShardedSearch
    from scale import clustered

    print("load average at start: %.2f %.2f %.2f" % os.getloadavg(), flush=True)
    x = graph.unit_vectors(clustered(args.num, args.dim)[0])
    rng = np.random.default_rng(2)
    rows = rng.choice(args.num, args.recall_queries, replace=False)
    start = time.perf_counter()
    exact = graph.knn_search_queries(x, x[rows], args.k + 1)
    truth = [[j for j in found if j != row][: args.k] for row, found in zip(rows, exact)]
    exact_seconds = time.perf_counter() - start

    start = time.perf_counter()
    index = graph.ivf_index(x, faiss.METRIC_INNER_PRODUCT)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    index.add(x)
    add_seconds = time.perf_counter() - start
    nlist, index_bytes = index.nlist, faiss.serialize_index(index).nbytes
    del index
    print("  exact search of %d queries %.1f s; IVF (%d lists) train %.1f s, add %.1f s, "
          "serialised %.2f GB" % (args.recall_queries, exact_seconds, nlist, train_seconds,
                                  add_seconds, index_bytes / 1e9), flush=True)

    monitor = Monitor()
    one, reference = run("one process", x, args.k, graph.search_ivf, monitor, rows, truth)
    start = time.perf_counter()
    ray.init(num_cpus=args.cpus, include_dashboard=False)
    ray_start_seconds = time.perf_counter() - start
    results = [one]
    for workers in sorted({1, args.workers}):
        search = ShardedSearch(ray, workers, SHARD_ROWS)
        name = "Ray, %d actor%s x %d CPU" % (workers, "s" if workers > 1 else "", search.num_cpus)
        results.append(run(name, x, args.k, search, monitor, rows, truth, reference)[0])
    monitor.stop()
    ray.shutdown()

    print("\n| run | wall s | CPU s | search wall s | search CPU s | rest s "
          "| driver peak RSS GB | actor peak RSS GB | recall@%d | same graph |" % args.k)
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print("| %s | %.1f | %.1f | %.1f | %.1f | %.1f | %.2f | %.2f | %.4f | %s |" % (
            r["run"], r["seconds"], r["cpu_seconds"], r["search_seconds"],
            r["search_cpu_seconds"], r["rest_seconds"], r["driver_peak_rss_gb"],
            r["actor_peak_rss_gb"], r["recall"],
            "n/a" if r["equal_to_one_process"] is None else r["equal_to_one_process"]))
    print("load average at end: %.2f %.2f %.2f" % os.getloadavg())
    print(json.dumps({
        "machine": "%s, %d cores" % (platform.machine(), len(os.sched_getaffinity(0))),
        "num": args.num, "dim": args.dim, "k": args.k, "nlist": nlist,
        "train_seconds": round(train_seconds, 1), "add_seconds": round(add_seconds, 1),
        "index_gb": round(index_bytes / 1e9, 3), "ray_start_seconds": round(ray_start_seconds, 1),
        "runs": results,
    }))


if __name__ == "__main__":
    main()
