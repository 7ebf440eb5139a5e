"""UMAP (or PCA) maps of embeddings for the FiftyOne App's Embeddings panel.

``dinoprop.compute_visualization()`` stores a regular FiftyOne Brain
visualization run, so the App's Embeddings panel lists it (colour by any
field, lasso selection) and ``dataset.load_brain_results(brain_key)`` returns
it. UMAP is fed the kNN graph of a dinoprop similarity run on the same
embeddings when one covers the samples (no second neighbour search),
otherwise a faiss kNN graph (exact up to 1,024 points, then IVF calibrated
to recall@k >= 0.97). Above :data:`UMAP_MAX_FIT_POINTS` points, UMAP is
fitted on a random sample and the other points are placed in its map by
UMAP's own ``transform``. numba's compiled UMAP kernels are cached
on disk (``NUMBA_CACHE_DIR``, by default a ``numba-cache`` folder beside
dinoprop's index directory), so only the first run in a fresh environment
pays for JIT compilation.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from typing import Any

import numpy as np

import fiftyone.brain.visualization as fbv

from dinoprop.core import (
    DinopropError,
    check_brain_key,
    check_int,
    check_number,
    l2_normalize,
    progress_bar,
)
from dinoprop.umap_transform import (  # noqa: F401 (public names kept here)
    init_graph_transform,
    parallel_transform_layout,
    vectorized_transform_init,
)

logger = logging.getLogger(__name__)

#: The fewest embedded samples UMAP can map.
UMAP_MIN_POINTS = 4

#: UMAP is fitted on at most this many points by default, a random sample;
#: the others are placed by ``transform`` (see :func:`compute_visualization`).
UMAP_MAX_FIT_POINTS = 200_000

_METHODS = ("umap", "pca")
_NUMBA_CACHE_ENV = "NUMBA_CACHE_DIR"
_numba_cache_enabled = False


def numba_cache_dir() -> str:
    """Where numba caches compiled UMAP kernels.

    ``$NUMBA_CACHE_DIR`` when set, else ``numba-cache`` beside
    :func:`dinoprop.similarity.index_dir`.
    """
    from dinoprop.similarity import index_dir

    return os.environ.get(_NUMBA_CACHE_ENV) or os.path.join(
        os.path.dirname(index_dir()), "numba-cache"
    )


def compute_visualization(
    samples: Any,
    embeddings: str = "dinoprop_embedding",
    brain_key: str = "dinoprop_umap",
    method: str = "umap",
    num_dims: int = 2,
    seed: int | None = 51,
    k: int = 15,
    min_dist: float = 0.1,
    patches_field: str | None = None,
    overwrite: bool = True,
    progress: Any = None,
    max_fit_points: int | None = UMAP_MAX_FIT_POINTS,
):
    """Computes a 2-D or 3-D map of embeddings as a FiftyOne Brain run.

    Args:
        samples: a FiftyOne dataset or view; the map covers its samples (or
            patches) that have an embedding
        embeddings: the vector field holding the embeddings (for patches, the
            attribute of each label holding its embedding)
        brain_key: the brain key of the visualization run
        method: ``"umap"`` or ``"pca"`` (fast, linear)
        num_dims: 2 or 3
        seed: a random seed making the map reproducible (None: fastest,
            multi-threaded, not reproducible)
        k: UMAP's number of neighbours (including the point itself)
        min_dist: UMAP's minimum distance between embedded points
        patches_field: an optional ``Detections``/``Polylines`` field whose
            labels are mapped instead of the samples
        overwrite: whether to replace an existing run with this brain key
        progress: None (FiftyOne's default), a bool, or a progress callback
        max_fit_points: with more points than this, UMAP fits its map on a
            random sample of this many (drawn with ``seed``) and places
            every other point with UMAP's ``transform``: its ``k`` nearest
            sample points (faiss IVF, recall@k >= 0.97) fix its start,
            then 30 optimisation epochs (a fit runs 200) move it with the
            sample held still (``benchmarks/umap_scale.py`` measures the
            time and trustworthiness against a full fit). None always
            fits every point

    Returns:
        a :class:`DinopropVisualizationResults` (a FiftyOne Brain
        ``VisualizationResults``) whose ``points`` are ``num x num_dims``

    Raises:
        DinopropError: if the input is invalid; nothing is written then
    """
    from dinoprop.core import validate_samples

    start = time.perf_counter()
    validate_samples(samples, require_images=False)
    _check_options(samples, brain_key, method, num_dims, k, min_dist, overwrite)
    if max_fit_points is not None:
        check_int(max_fit_points, "max_fit_points", minimum=UMAP_MIN_POINTS + 1)
    vectors, sample_ids, label_ids = _load(samples, embeddings, patches_field)
    if method == "umap" and len(vectors) < UMAP_MIN_POINTS:
        raise DinopropError(
            "UMAP needs at least %d embedded samples; found %d (use "
            "method='pca')" % (UMAP_MIN_POINTS, len(vectors))
        )

    with progress_bar(2, progress=progress, iters_str="steps") as pb:
        if method == "umap":
            k = _effective_k(k, len(vectors))  # what is recorded is what ran
            umap_options = dict(
                num_dims=num_dims, seed=seed, k=k, min_dist=min_dist
            )
            if max_fit_points is not None and len(vectors) > max_fit_points:
                points, knn_source = umap_on_sample(
                    vectors, max_fit_points, **umap_options
                )
            else:
                points, knn_source = _umap(
                    samples, embeddings, patches_field, vectors,
                    label_ids if patches_field else sample_ids, **umap_options
                )
        else:
            points, knn_source = _pca(vectors, num_dims, seed), None
        pb.update()
        results = _save_run(
            samples, brain_key, points, sample_ids, label_ids,
            _run_config(
                method,
                embeddings_field=embeddings,
                patches_field=patches_field,
                num_dims=num_dims,
                k=k,
                min_dist=min_dist,
                seed=seed,
                knn_source=knn_source,
                max_fit_points=max_fit_points,
            ),
        )
        pb.update()
    results._seconds = time.perf_counter() - start
    return results


def _check_options(samples, brain_key, method, num_dims, k, min_dist, overwrite):
    if method not in _METHODS:
        raise DinopropError(
            "Unsupported method '%s'; use one of %s" % (method, _METHODS)
        )
    if num_dims not in (2, 3):
        raise DinopropError("num_dims must be 2 or 3; got %r" % (num_dims,))
    check_int(k, "k", minimum=2)
    check_number(min_dist, "min_dist", 0, 1)
    check_brain_key(samples, brain_key, "visualization", overwrite)


def _load(samples, field, patches_field):
    """Loads ``(vectors, sample_ids, label_ids)`` with clear errors."""
    from dinoprop.core import read_embeddings, require_embeddings_field

    require_embeddings_field(samples, field, patches_field)
    vectors, sample_ids, label_ids = read_embeddings(samples, field, patches_field)
    if not np.isfinite(vectors).all():
        raise DinopropError("Embeddings in '%s' contain NaN or inf" % field)
    return vectors, np.asarray(sample_ids), label_ids


def _knn_with_self(samples, field, patches_field, vectors, ids, k):
    """UMAP's kNN input: each point first (distance 0), then k - 1 others.

    Reuses the graph of a dinoprop similarity run covering exactly these
    points, else computes the exact cosine graph with faiss.
    """
    from dinoprop.graph import approximate_knn_search
    from dinoprop.similarity import cached_knn

    cached = cached_knn(
        samples, field, ids, vectors, k - 1, patches_field=patches_field
    )
    if cached is not None:
        neighbors, sims = cached
        source = "similarity index"
    else:
        neighbors, sims = approximate_knn_search(vectors, k - 1)
        source = "faiss search"
    return (*_with_self(neighbors, sims), source)


def _with_self(neighbors, sims):
    """``(indices, cosine distances)`` with each point first (distance 0)."""
    num = len(neighbors)
    indices = np.hstack([np.arange(num)[:, None], neighbors]).astype(np.int64)
    dists = np.hstack(
        [np.zeros((num, 1), np.float32), np.maximum(1.0 - sims, 0.0)]
    ).astype(np.float32)
    missing = indices < 0  # fewer neighbours than asked: repeat self
    indices[missing] = np.nonzero(missing)[0]
    dists[missing] = 0.0
    return indices, dists


def _effective_k(k, num_points):
    """UMAP's neighbour count: ``k``, or every other point if fewer."""
    return int(min(k, num_points - 1))


def _umap(samples, field, patches_field, vectors, ids, num_dims, seed, k,
          min_dist):
    indices, dists, source = _knn_with_self(
        samples, field, patches_field, vectors, ids, k
    )
    reducer = _reducer(num_dims, seed, k, min_dist, (indices, dists))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no search index / n_jobs notices
        points = reducer.fit_transform(l2_normalize(vectors))
    return np.asarray(points, dtype=np.float32), source


def _reducer(num_dims, seed, k, min_dist, precomputed_knn):
    """A cosine ``umap.UMAP`` on a precomputed kNN graph."""
    enable_numba_cache()
    import umap

    return umap.UMAP(
        n_neighbors=k,
        n_components=num_dims,
        metric="cosine",
        min_dist=min_dist,
        random_state=seed,
        precomputed_knn=precomputed_knn,
        verbose=False,
    )


def umap_on_sample(
    vectors: np.ndarray,
    fit_points: int,
    num_dims: int = 2,
    seed: int | None = 51,
    k: int = 15,
    min_dist: float = 0.1,
) -> tuple[np.ndarray, str]:
    """A UMAP map fitted on a random sample, every other point transformed.

    UMAP is fitted on ``fit_points`` rows drawn at random (``seed``), on
    their own kNN graph (faiss IVF); the other rows are then placed with
    ``UMAP.transform``, which searches their ``k`` nearest sample rows
    through :class:`SampleSearch` and optimises their positions with the
    sample's held still.

    Args:
        vectors: ``num x dim`` embeddings, ``num > fit_points``
        fit_points: the rows the map is fitted on
        num_dims: 2 or 3
        seed: the random seed of the sample and of UMAP
        k: UMAP's number of neighbours (including the point itself)
        min_dist: UMAP's minimum distance between embedded points

    Returns:
        a tuple ``(points, knn_source)``: the ``num x num_dims`` float32
        map and where the kNN graph came from
    """
    from dinoprop.graph import approximate_knn_search

    x = l2_normalize(np.asarray(vectors, np.float32))
    fit = np.sort(np.random.default_rng(seed).choice(len(x), fit_points, replace=False))
    rest = np.setdiff1d(np.arange(len(x)), fit)
    sample = np.ascontiguousarray(x[fit])
    indices, dists = _with_self(*approximate_knn_search(sample, k - 1))
    reducer = _reducer(num_dims, seed, k, min_dist, (indices, dists, SampleSearch(sample)))
    points = np.empty((len(x), num_dims), np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not an NNDescent index / n_jobs notices
        points[fit] = reducer.fit_transform(sample)
        del indices, dists
        with vectorized_transform_init(), parallel_transform_layout():
            points[rest] = reducer.transform(x[rest])
    return points, "faiss search (UMAP fitted on %d sampled points)" % fit_points


class SampleSearch:
    """The nearest-neighbour search ``UMAP.transform`` asks of its index
    (pynndescent's ``query``), answered by faiss over the fitted sample.

    Args:
        sample: the ``num x dim`` unit-norm float32 rows UMAP was fitted on
    """

    #: what UMAP reads to choose pynndescent's search slack (unused here)
    _angular_trees = True

    def __init__(self, sample: np.ndarray):
        self._sample = sample

    def query(self, queries: np.ndarray, k: int, epsilon: float = 0.1):
        """The ``k`` nearest sample rows of each query.

        Returns:
            ``(indices, cosine distances)``, ``num_queries x k`` int32
            and float32 arrays, nearest first
        """
        from dinoprop.graph import approximate_search

        sims, nbrs = approximate_search(self._sample, np.asarray(queries, np.float32), k)
        return nbrs.astype(np.int32), np.maximum(1.0 - sims, 0.0).astype(np.float32)


def _pca(vectors, num_dims, seed):
    from sklearn.decomposition import PCA

    num_dims_fit = min(num_dims, *vectors.shape)
    points = PCA(n_components=num_dims_fit, random_state=seed).fit_transform(
        vectors
    )
    if num_dims_fit < num_dims:
        pad = np.zeros((len(points), num_dims - num_dims_fit))
        points = np.hstack([points, pad])
    return points.astype(np.float32)


def enable_numba_cache() -> None:
    """Makes numba cache UMAP's compiled kernels on disk.

    umap-learn compiles its kernels without numba's ``cache=True``, so every
    new process recompiles them (tens of seconds). This turns caching on for
    them, in :func:`numba_cache_dir`. Safe to call repeatedly.
    """
    global _numba_cache_enabled
    if _numba_cache_enabled:
        return
    cache_dir = numba_cache_dir()
    os.makedirs(cache_dir, exist_ok=True)
    os.environ.setdefault(_NUMBA_CACHE_ENV, cache_dir)
    import numba

    numba.config.CACHE_DIR = os.environ[_NUMBA_CACHE_ENV]
    from numba.core.registry import CPUDispatcher
    import umap.layouts
    import umap.spectral
    import umap.umap_
    import umap.utils

    for module in (umap.umap_, umap.layouts, umap.spectral, umap.utils):
        for obj in list(vars(module).values()):
            if (
                isinstance(obj, CPUDispatcher)
                and type(obj._cache).__name__ == "NullCache"
            ):
                try:
                    obj.enable_caching()
                except Exception:  # uncachable kernel: compile as before
                    logger.debug("Cannot cache %s", obj, exc_info=True)
    _numba_cache_enabled = True


def _save_run(samples, brain_key, points, sample_ids, label_ids, config):
    dataset = samples._root_dataset
    if brain_key in dataset.list_brain_runs():
        dataset.delete_brain_run(brain_key)
    brain_method = config.build()
    brain_method.register_run(samples, brain_key)
    results = DinopropVisualizationResults(
        samples,
        config,
        brain_key,
        points,
        sample_ids=sample_ids,
        label_ids=label_ids,
        backend=brain_method,
    )
    brain_method.save_run_results(samples, brain_key, results)
    return results


def _run_config(method, k, min_dist, knn_source, **kwargs):
    """The FiftyOne Brain config recording how a map was made.

    The run is stored with FiftyOne Brain's own ``UMAPVisualizationConfig``
    or ``PCAVisualizationConfig`` because the App's Embeddings panel lists
    only runs whose config class lives in ``fiftyone.brain.visualization``.
    ``knn_source`` (where UMAP's kNN graph came from) is kept as an extra
    attribute, which those configs store and reload.
    """
    if method == "pca":
        return fbv.PCAVisualizationConfig(knn_source=knn_source, **kwargs)
    return fbv.UMAPVisualizationConfig(
        num_neighbors=k,
        metric="cosine",
        min_dist=min_dist,
        knn_source=knn_source,
        **kwargs,
    )


class DinopropVisualizationResults(fbv.VisualizationResults):
    """FiftyOne Brain visualization results with a :meth:`summary`."""

    _seconds = None

    def summary(self) -> dict:
        """A JSON-serialisable description of the map."""
        return {
            "brain_key": self.key,
            "method": self.config.method,
            "num_points": int(len(self.points)),
            "num_dims": int(self.points.shape[1]),
            "k": getattr(self.config, "num_neighbors", None),
            "knn_source": self.config.knn_source,
            "seconds": (
                None if self._seconds is None else round(self._seconds, 3)
            ),
        }
