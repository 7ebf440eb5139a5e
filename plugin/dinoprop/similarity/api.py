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

    Returns:
        a :class:`DinopropSimilarityIndex`

    Raises:
        DinopropError: if the input is invalid; nothing is written then
    """
    import time

    from dinoprop.core import check_brain_key, validate_samples

    validate_samples(samples, require_images=False)
    check_options(metric, index_type, exact_threshold)
    replacing = check_brain_key(samples, brain_key, "similarity", overwrite)
    _check_embeddings(samples, embeddings, patches_field)
    start = time.perf_counter()
    token = PROGRESS.set(progress)
    try:
        # an existing run is replaced only once its successor is built
        results = fob.compute_similarity(
            samples,
            embeddings=embeddings,
            brain_key=None if replacing else brain_key,
            patches_field=patches_field,
            backend=DinopropSimilarityConfig,
            metric=metric,
            index_type=index_type,
            exact_threshold=exact_threshold,
            progress=progress,
        )
    finally:
        PROGRESS.reset(token)
    if replacing:
        _replace_run(samples._root_dataset, brain_key, results)
    results._seconds = time.perf_counter() - start
    return results


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
