"""kNN graphs of dataset samples that reuse a similarity run's cached graph.

These sit above both :mod:`dinoprop.graph` (plain faiss searches, and
:mod:`dinoprop.graph_distributed` on a Ray cluster) and the
similarity index, whose cached graph they reuse when it covers the same
samples with the same embeddings.
"""

from __future__ import annotations

import numpy as np

from dinoprop import graph_distributed
from dinoprop.similarity.api import find_similarity_run
from dinoprop.similarity.updates import STALE_PROBES


def sample_knn_graph(
    samples,
    embeddings_field: str,
    k: int,
    loaded: tuple | None = None,
    engine: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
):
    """The kNN graph of the samples of a view that have an embedding.

    When a dinoprop similarity run (:func:`dinoprop.compute_similarity`,
    cosine metric) indexes ``embeddings_field`` for exactly the samples of
    the view that have an embedding, and its vectors match the field, its
    cached graph is reused instead of searching again (approximate, with the
    recall that index was calibrated to, when that index is not exact); the
    run computes that graph in this process the first time, except with
    ``engine="ray"``, which reuses it only once computed.
    Otherwise the graph is searched with :func:`dinoprop.graph.graph_search`
    (exact, or approximate for large views), in this process or, with
    ``engine="ray"``, on a Ray cluster
    (:func:`dinoprop.graph_distributed.ray_graph_search`: the same graph).

    Args:
        samples: a FiftyOne sample collection
        embeddings_field: the vector field holding the embeddings
        k: neighbours per sample
        loaded: the ``(sample_ids, embeddings)`` of
            :func:`dinoprop.core.load_embeddings` for this view and field,
            when the caller already has them
        engine: ``"local"`` (this process) or ``"ray"`` (IVF search of the
            rows on a Ray cluster, for views of at least
            :data:`dinoprop.graph.APPROXIMATE_MIN_NODES` samples; smaller
            ones are searched exactly here)
        ray_address: with ``engine="ray"``, the cluster's address; None
            uses ``RAY_ADDRESS``, a cluster started on this machine, or a
            new local one
        num_workers: with ``engine="ray"``, the searching actors (default
            one per node)

    Returns:
        a tuple ``(sample_ids, embeddings, neighbors, similarities)``: a
        ``num`` array of IDs, the ``num x dim`` float32 embeddings, and the
        ``num x k`` neighbour indices (into ``sample_ids``) and cosine
        similarities of :func:`dinoprop.graph.knn_search`

    Raises:
        DinopropError: for bad engine options, or if Ray is missing or its
            cluster cannot be reached
    """
    from dinoprop.core import load_embeddings

    graph_distributed.check_engine(engine, ray_address, num_workers)
    if loaded is None:
        loaded = load_embeddings(samples, embeddings_field)
    sample_ids, embeddings = loaded
    cached = cached_knn(
        samples, embeddings_field, sample_ids, embeddings, k, compute=engine == "local"
    )
    if cached is not None:
        neighbors, sims = cached
    else:
        neighbors, sims = graph_distributed.engine_graph_search(
            embeddings, k, engine, ray_address, num_workers
        )
    return sample_ids, embeddings, neighbors, sims


def cached_knn(
    samples, embeddings_field, ids, embeddings, k, patches_field=None, compute=True
):
    """The kNN of ``ids`` from a matching similarity run, if any.

    Args:
        samples: a FiftyOne sample collection
        embeddings_field: the embeddings field (for patches, the attribute of
            each label)
        ids: the ``num`` sample IDs (label IDs for patches) whose graph is
            wanted
        embeddings: their ``num x dim`` embeddings
        k: neighbours per sample
        patches_field: the patches field, if the graph is one of labels
        compute: whether the run's graph is computed (in this process) when
            the run has not cached it yet

    Returns:
        a tuple ``(neighbors, similarities)`` as returned by
        :func:`dinoprop.graph.knn_search`, with indices into ``ids``, or None when no
        dinoprop similarity run (cosine) covers exactly these IDs with these
        embeddings (or, without ``compute``, has their graph cached)
    """
    key = find_similarity_run(samples, embeddings_field, patches_field)
    if key is None:
        return None
    index = samples._root_dataset.load_brain_results(key)
    if not compute and not index.has_knn(k):
        return None
    index_ids = index.label_ids if patches_field else index.sample_ids
    if len(index_ids) != len(ids) or set(index_ids) != set(ids):
        return None
    position = {_id: i for i, _id in enumerate(ids)}
    order = np.array([position[_id] for _id in index_ids])
    rng = np.random.default_rng()
    probe = list(index_ids[rng.choice(len(order), min(STALE_PROBES, len(order)), False)])
    if patches_field:
        stored = index.get_embeddings(label_ids=probe)[0]
    else:
        stored = index.get_embeddings(sample_ids=probe)[0]
    wanted = np.asarray(embeddings)[[position[_id] for _id in probe]]
    if not np.allclose(stored, wanted, atol=1e-4):
        return None  # the field changed since the index was built
    neighbors, dists = index.knn(k)
    # Rows follow the index order; map them and their entries to ``ids``
    mapped = np.where(neighbors >= 0, order[np.maximum(neighbors, 0)], -1)
    out_neighbors = np.empty_like(mapped)
    out_sims = np.empty(dists.shape, np.float32)
    out_neighbors[order] = mapped
    out_sims[order] = 1.0 - dists
    return out_neighbors, out_sims
