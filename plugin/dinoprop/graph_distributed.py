"""The kNN graph of a large collection, searched on a Ray cluster.

:func:`ray_graph_search` returns the graph of
:func:`dinoprop.graph.graph_search`, element for element, with its one
costly stage, searching every row in the IVF index, spread over Ray actors
(Ray Core and :class:`ray.util.ActorPool`; no scheduler of our own):

- the driver (the calling process) trains, fills and calibrates the IVF
  index exactly as :func:`dinoprop.graph.graph_index` does in one process,
  serialises it once (``graph.serialize_faiss_index``) into the Ray object store,
  and puts the rows to search there in shards of :data:`SHARD_ROWS`;
- ``num_workers`` actors each deserialise the index once and search the
  shards the pool hands them, probing the driver's number of lists with as
  many faiss threads as CPUs they reserve;
- the driver concatenates the shards' top-k in row order and completes the
  graph as :func:`dinoprop.graph.approximate_knn_search` does (exact
  search of rows whose probed lists were too small, self dropped).

Below :data:`dinoprop.graph.APPROXIMATE_MIN_NODES` vectors the graph is
exact and cheap, and is searched in this process without a cluster.

Memory (``N`` vectors of ``D`` float32): the driver holds the vectors and
the index (each about ``4 N D`` bytes) and the graph; the object store
holds one more copy of each until the search ends; every actor holds a
copy of the index. ``benchmarks/README.md`` measures and projects it.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dinoprop import graph
from dinoprop.core import DinopropError, check_int
from dinoprop.ray_cluster import connect, worker_errors

#: Where the kNN graph can be searched.
ENGINES = ("local", "ray")

#: The most query rows one actor call searches (at 384 dimensions, 100 MB
#: of queries and 7 MB of results per call at k=10).
SHARD_ROWS = 65_536


def check_engine(
    engine: str, ray_address: Optional[str] = None, num_workers: Optional[int] = None
) -> None:
    """Checks the graph engine options of a public function.

    Args:
        engine: ``"local"`` or ``"ray"``
        ray_address: a Ray cluster address (``engine="ray"`` only)
        num_workers: Ray actors (``engine="ray"`` only), at least 1

    Raises:
        DinopropError: for an unknown engine, a bad ``num_workers``, or Ray
            options without ``engine="ray"``
    """
    if engine not in ENGINES:
        raise DinopropError("engine must be one of %s; got %r" % (list(ENGINES), engine))
    if engine == "local" and (ray_address is not None or num_workers is not None):
        raise DinopropError(
            "ray_address and num_workers apply to engine='ray' only; pass "
            "engine='ray' to search the kNN graph on a Ray cluster"
        )
    if num_workers is not None:
        check_int(num_workers, "num_workers")


def engine_graph_search(
    embeddings: np.ndarray,
    k: int,
    engine: str = "local",
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`dinoprop.graph.graph_search` in this process or on Ray.

    Args:
        embeddings: a ``num x dim`` array
        k: the number of neighbours per row, self excluded
        engine: ``"local"`` (:func:`dinoprop.graph.graph_search`) or
            ``"ray"`` (:func:`ray_graph_search`; the same graph)
        ray_address: with ``engine="ray"``, the cluster's address
        num_workers: with ``engine="ray"``, the searching actors

    Returns:
        the ``(neighbors, similarities)`` of :func:`dinoprop.graph.knn_search`

    Raises:
        DinopropError: for bad engine options (see :func:`check_engine`), or
            if Ray is missing or its cluster cannot be reached
    """
    check_engine(engine, ray_address, num_workers)
    if engine == "ray":
        return ray_graph_search(embeddings, k, ray_address, num_workers)
    return graph.graph_search(embeddings, k)


def ray_graph_search(
    embeddings: np.ndarray,
    k: int,
    ray_address: Optional[str] = None,
    num_workers: Optional[int] = None,
    shard_rows: int = SHARD_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The graph of :func:`dinoprop.graph.graph_search`, searched on Ray.

    From :data:`dinoprop.graph.APPROXIMATE_MIN_NODES` vectors, the IVF index
    is trained and calibrated here, once, and the rows are searched in it
    by Ray actors, ``shard_rows`` at a time; the neighbours equal those of
    :func:`dinoprop.graph.graph_search` and the similarities agree to
    float32 rounding. Smaller inputs are searched exactly here, without
    connecting.

    Args:
        embeddings: a ``num x dim`` array
        k: the number of neighbours per row, self excluded
        ray_address: the cluster's address (e.g. ``"ray://head:10001"`` or
            ``"head:6379"``); None uses ``RAY_ADDRESS``, a cluster started
            on this machine, or a new local one; a process already
            connected keeps its connection
        num_workers: the searching actors, each holding a copy of the
            index (default one per node of the cluster); each reserves as
            many CPUs as leave room for all of them, and searches with that
            many faiss threads
        shard_rows: the most rows searched by one actor call

    Returns:
        the ``(neighbors, similarities)`` of :func:`dinoprop.graph.knn_search`

    Raises:
        DinopropError: for a bad ``num_workers`` or ``shard_rows``, more
            workers than the cluster has CPUs, a missing Ray, or a
            cluster that cannot be reached
    """
    if num_workers is not None:
        check_int(num_workers, "num_workers")
    check_int(shard_rows, "shard_rows")
    if len(embeddings) < graph.APPROXIMATE_MIN_NODES:
        return graph.knn_search(embeddings, k)
    search = ShardedSearch(connect(ray_address), num_workers, shard_rows)
    return graph.approximate_knn_search(embeddings, k, search=search)


class ShardSearcher:
    """A Ray actor holding one copy of the IVF index.

    Args:
        index_bytes: the index, as ``faiss.serialize_index`` wrote it
        nprobe: the lists to probe
        num_threads: faiss threads (the CPUs the actor reserved)
    """

    def __init__(self, index_bytes: np.ndarray, nprobe: int, num_threads: int) -> None:
        import faiss

        faiss.omp_set_num_threads(num_threads)
        self.index = faiss.deserialize_index(index_bytes)
        self.nprobe = nprobe

    def search(self, queries: np.ndarray, k: int) -> tuple:
        """The :func:`dinoprop.graph.search_ivf` of a shard of rows."""
        return graph.search_ivf(self.index, queries, k, self.nprobe)


class ShardedSearch:
    """:func:`dinoprop.graph.search_ivf` of every row, on a Ray cluster.

    Args:
        ray: the connected ``ray`` module
        num_workers: the actors, or None for one per alive node
        shard_rows: the most rows per actor call

    Raises:
        DinopropError: if the cluster has fewer CPUs than ``num_workers``
    """

    def __init__(self, ray: Any, num_workers: Optional[int], shard_rows: int) -> None:
        cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]]
        self.ray = ray
        self.num_workers = num_workers or len(cpus)
        self.num_cpus = _cpus_per_worker(self.num_workers, cpus)
        self.shard_rows = shard_rows

    def __call__(self, index: Any, x: np.ndarray, k: int, nprobe: int) -> tuple:
        """Searches every row of ``x`` in ``index``; see
        :func:`dinoprop.graph.search_ivf`."""
        ray = self.ray
        index_ref = ray.put(graph.serialize_faiss_index(index))
        shards = [
            ray.put(x[start : start + self.shard_rows])
            for start in range(0, len(x), self.shard_rows)
        ]
        actor = ray.remote(ShardSearcher).options(
            num_cpus=self.num_cpus, scheduling_strategy="SPREAD"
        )
        actors = [
            actor.remote(index_ref, nprobe, self.num_cpus)
            for _ in range(min(self.num_workers, len(shards)))
        ]
        try:
            with worker_errors():
                parts = list(
                    ray.util.ActorPool(actors).map(
                        lambda worker, shard: worker.search.remote(shard, k), shards
                    )
                )
        finally:
            for worker in actors:
                ray.kill(worker)
        return (
            np.concatenate([sims for sims, _ in parts]),
            np.concatenate([nbrs for _, nbrs in parts]),
        )


def _cpus_per_worker(num_workers: int, node_cpus: list) -> int:
    """The most CPUs per actor with which ``num_workers`` actors fit the
    nodes' CPUs.

    Raises:
        DinopropError: if even one CPU each does not fit
    """
    for cpus in range(int(max(node_cpus, default=0)), 0, -1):
        if sum(int(n // cpus) for n in node_cpus) >= num_workers:
            return cpus
    raise DinopropError(
        "num_workers=%d but the Ray cluster has %d CPUs; pass at most that "
        "many workers" % (num_workers, int(sum(node_cpus)))
    )
