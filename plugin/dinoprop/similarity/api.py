"""``dinoprop.compute_similarity()`` and finding a run of the backend."""

from __future__ import annotations

from typing import Any

import fiftyone.brain as fob

from dinoprop.similarity import files
from dinoprop.similarity.brain import (
    EXACT_THRESHOLD,
    DinopropSimilarityConfig,
    check_options,
    config_index_path,
)
from dinoprop.similarity.index import PROGRESS, DinopropSimilarityIndex


def compute_similarity(
    samples: Any,
    embeddings: str = "dinoprop_embedding",
    brain_key: str = "dinoprop_similarity",
    index_type: str = "auto",
    metric: str = "cosine",
    patches_field: str | None = None,
    exact_threshold: int = EXACT_THRESHOLD,
    overwrite: bool = True,
    progress: Any = None,
    engine: str = "local",
    ray_address: str | None = None,
    num_workers: int | None = None,
    knn_k: int = 10,
) -> DinopropSimilarityIndex:
    """Builds a faiss similarity index of the embeddings in a field.

    The index is a FiftyOne Brain similarity run stored under ``brain_key``:
    sort by similarity in the App or with ``dataset.sort_by_similarity(query,
    brain_key=brain_key)``, and reload it with
    ``dataset.load_brain_results(brain_key)``. As with every FiftyOne Brain
    similarity run, the index covers all samples (or patches) of the dataset
    that have an embedding; restrict queries with ``results.use_view(view)``.

    Args:
        samples: a FiftyOne dataset or view
        embeddings: the vector field holding the embeddings (for patches, the
            attribute of each label holding its embedding)
        brain_key: the brain key of the run
        index_type: ``"auto"``, ``"flat"``, ``"ivf"`` or ``"hnsw"``
        metric: ``"cosine"`` or ``"euclidean"``
        patches_field: an optional ``Detections``/``Polylines`` field whose
            labels are indexed instead of the samples
        exact_threshold: the largest index that ``"auto"`` keeps exact
        overwrite: whether to replace an existing run with this brain key
        progress: None (FiftyOne's default), a bool, or a progress callback
        engine: ``"local"``, or ``"ray"`` to also search the index's kNN
            graph (:meth:`DinopropSimilarityIndex.knn`, cached in the index
            file, which :func:`dinoprop.propagate_labels` and
            :func:`dinoprop.compute_visualization` reuse) on a Ray
            cluster: the index is built here, then Ray actors search its
            vectors shard by shard
            (:class:`dinoprop.graph_distributed.ShardedSearch`), finding
            the neighbours a search here would. Only an ``"ivf"`` index is
            searched on the cluster; flat and HNSW indexes (small
            collections) search their graph here. The run is registered
            once its graph is cached
        ray_address: with ``engine="ray"``, the cluster's address; None
            uses ``RAY_ADDRESS``, a cluster started on this machine, or a
            new local one
        num_workers: with ``engine="ray"``, the searching actors (default
            one per node), each holding a copy of the index
        knn_k: with ``engine="ray"``, the neighbours per sample of the
            cached graph (propagation's default is 10; it reuses a graph of
            at least its ``k``)

    Returns:
        a :class:`DinopropSimilarityIndex`

    Raises:
        DinopropError: if the input is invalid, or Ray is missing or its
            cluster cannot be reached; nothing is written then
    """
    import time

    from dinoprop.core import check_brain_key, validate_samples

    validate_samples(samples, require_images=False)
    check_options(metric, index_type, exact_threshold)
    replacing = check_brain_key(samples, brain_key, "similarity", overwrite)
    _check_embeddings(samples, embeddings, patches_field)
    search = _graph_search(engine, ray_address, num_workers, knn_k)
    # an existing run is replaced only once its successor is built (with
    # engine="ray", once its graph is searched too)
    register_later = replacing or search is not None
    start = time.perf_counter()
    token = PROGRESS.set(progress)
    try:
        results = fob.compute_similarity(
            samples,
            embeddings=embeddings,
            brain_key=None if register_later else brain_key,
            patches_field=patches_field,
            backend=DinopropSimilarityConfig,
            metric=metric,
            index_type=index_type,
            exact_threshold=exact_threshold,
            progress=progress,
        )
    finally:
        PROGRESS.reset(token)
    if search is not None:
        _search_graph(samples._root_dataset, results, knn_k, search)
    if register_later:
        _replace_run(samples._root_dataset, brain_key, results)
    results._seconds = time.perf_counter() - start
    return results


def _graph_search(engine, ray_address, num_workers, knn_k):
    """The Ray search of ``engine="ray"`` (connected now, so that a missing
    cluster fails before the index is built), or None."""
    from dinoprop import graph_distributed
    from dinoprop.core import check_int
    from dinoprop.ray_cluster import connect

    graph_distributed.check_engine(engine, ray_address, num_workers)
    check_int(knn_k, "knn_k")
    if engine != "ray":
        return None
    return graph_distributed.ShardedSearch(
        connect(ray_address), num_workers, graph_distributed.SHARD_ROWS
    )


def _search_graph(dataset, results, k, search):
    """Caches the kNN graph of the unregistered index ``results``, searched
    with ``search``; on failure its index file is removed."""
    try:
        results.knn(k, search=search)
    except BaseException:
        files.remove_index_file(config_index_path(dataset, results.config))
        raise


def _replace_run(dataset, key, results):
    """Makes the unregistered index ``results`` the run under ``key``.

    A dinoprop run is switched to the new index by one update of its config
    (its stored results, the class name, stay valid), so that a kill leaves
    either run in place; its old file is then deleted. A run of another
    backend is deleted, then the new one registered. Concurrent replacements
    are serialised: the last one wins, and no file is left behind.
    """
    method = results.config.build()
    with files.runs_lock(str(dataset._doc.id)):
        dataset.reload()  # what other processes did meanwhile
        exists = key in dataset.list_brain_runs()
        old = dataset.get_brain_info(key).config if exists else None
        results._key = key
        if isinstance(old, DinopropSimilarityConfig):
            method.update_run_config(dataset, key, results.config)
            method.save_run_results(dataset, key, results)
            files.remove_index_file(config_index_path(dataset, old))
        else:
            if old is not None:
                dataset.delete_brain_run(key)
            method.register_run(dataset, key, overwrite=False)
            method.save_run_results(dataset, key, results)


def _check_embeddings(samples, field, patches_field):
    """Raises DinopropError unless ``samples`` has some usable embeddings."""
    from dinoprop.core import no_embeddings_error, require_embeddings_field

    if require_embeddings_field(samples, field, patches_field) == 0:
        raise no_embeddings_error(field)



def find_similarity_run(
    samples: Any,
    embeddings_field: str,
    patches_field: str | None = None,
    metric: str = "cosine",
) -> str | None:
    """Returns the key of a dinoprop similarity run on ``embeddings_field``.

    Args:
        samples: a sample collection
        embeddings_field: the embeddings field the run must index
        patches_field: the patches field the run must index, if any
        metric: the metric the run must use

    Returns:
        the brain key, or None if there is no such run
    """
    dataset = samples._root_dataset
    for key in dataset.list_brain_runs():
        config = dataset.get_brain_info(key).config
        if (
            getattr(config, "method", None) == "dinoprop"
            and getattr(config, "embeddings_field", None) == embeddings_field
            and getattr(config, "patches_field", None) == patches_field
            and getattr(config, "metric", None) == metric
        ):
            return key
    return None
