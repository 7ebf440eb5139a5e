"""UMAP's transform, faster and with the same result.

``UMAP.transform`` places new points on a fitted map: it starts each at
the weighted mean of its fitted neighbours, then optimises its position
with the map held still. At a million points umap-learn spends most of
that time in a Python loop over rows (the start) and on one core (the
layout, when seeded). The context managers here swap those two parts of
umap-learn for versions that give bit-identical maps; everything else in
the transform stays umap-learn's. :mod:`dinoprop.visualization` uses both.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np

from dinoprop.core import usable_cores


def init_graph_transform(graph: Any, embedding: np.ndarray) -> np.ndarray:
    """The start of ``UMAP.transform``'s layout, vectorized.

    Gives exactly what ``umap.umap_.init_graph_transform`` gives (each new
    point at the membership-weighted mean of its fitted neighbours' map
    positions, at the first neighbour of strength 1 when it has one, NaN
    when it has none), with the same float32 operations in the same order,
    but without its Python loop over rows, which took most of the
    transform's time at 1M points. Bit-for-bit equality matters: the
    layout's optimisation amplifies any rounding difference.

    Args:
        graph: the ``num_new x num_fitted`` CSR membership graph
        embedding: the ``num_fitted x num_dims`` fitted map

    Returns:
        the ``num_new x num_dims`` float32 start positions
    """
    degrees = np.diff(graph.indptr)
    row_sums = np.zeros(len(degrees), graph.data.dtype)
    for degree in np.unique(degrees[degrees > 0]):
        rows = np.flatnonzero(degrees == degree)
        entries = graph.indptr[rows, None] + np.arange(degree)
        row_sums[rows] = graph.data[entries].sum(axis=1)  # numpy's pairwise sum, as scipy's
    weights = graph.data / np.repeat(row_sums, degrees)
    result = np.zeros((len(degrees), embedding.shape[1]), np.float32)
    for position in range(degrees.max(initial=0)):  # in each row's order
        rows = np.flatnonzero(degrees > position)
        entries = graph.indptr[rows] + position
        result[rows] += weights[entries, None] * embedding[graph.indices[entries]]
    exact = np.flatnonzero(graph.data == 1)
    exact_rows = np.repeat(np.arange(len(degrees)), degrees)[exact]
    exact_rows, first = np.unique(exact_rows, return_index=True)
    result[exact_rows] = embedding[graph.indices[exact[first]]]
    result[degrees == 0] = np.nan
    return result


@contextlib.contextmanager
def vectorized_transform_init() -> Iterator[None]:
    """Makes ``UMAP.transform`` start from :func:`init_graph_transform`
    while the block runs (umap-learn's own version loops over rows in
    Python); everything else in the transform stays umap-learn's."""
    import umap.umap_

    original = umap.umap_.init_graph_transform
    umap.umap_.init_graph_transform = init_graph_transform
    try:
        yield
    finally:
        umap.umap_.init_graph_transform = original


#: New points per block of :func:`parallel_transform_layout`: blocks are
#: handed to the threads in turn, so they finish together.
LAYOUT_BLOCK_POINTS = 16_384

#: The oldest umap-learn whose transform layout draws each new point's
#: negative samples from that point's own random state (its
#: ``rng_state_per_sample``), so that points can be optimised apart.
_PER_POINT_RNG_UMAP = (0, 5, 12)


def _umap_version() -> tuple:
    import umap

    return tuple(int(part) for part in umap.__version__.split(".")[:3] if part.isdigit())


@contextlib.contextmanager
def parallel_transform_layout(threads: int | None = None) -> Iterator[None]:
    """Runs ``UMAP.transform``'s layout on every core, with the same result.

    With a seed, umap-learn optimises the new points' positions on one
    core (its parallel loop races). Yet in a transform each new point
    moves alone: the fitted map is held still, and the point draws its
    negative samples from its own random state. Optimising blocks of new
    points apart therefore gives, bit for bit, umap-learn's own layout;
    this runs the blocks (:data:`LAYOUT_BLOCK_POINTS` points each) on
    ``threads`` threads (default: every core this process may use), each
    through umap-learn's own ``optimize_layout_euclidean`` with its epoch
    compiled to release the GIL. Seedless, densMAP or fitting layouts
    (or snapshots at several epochs), a single thread, and umap-learn
    older than 0.5.12 run unchanged.

    Args:
        threads: the threads (default :func:`dinoprop.core.usable_cores`)
    """
    import umap.umap_

    original = umap.umap_.optimize_layout_euclidean
    threads = threads or usable_cores()
    if _umap_version() < _PER_POINT_RNG_UMAP or threads == 1:
        yield
        return

    def optimize(head_embedding, tail_embedding, head, tail, n_epochs, n_vertices,
                 epochs_per_sample, a, b, rng_state, gamma=1.0, initial_alpha=1.0,
                 negative_sample_rate=5.0, parallel=False, **options):
        blocks = _layout_blocks(head, len(head_embedding))
        alone = not (parallel or options.get("densmap") or options.get("move_other"))
        if blocks is None or not alone or isinstance(n_epochs, list):
            return original(
                head_embedding, tail_embedding, head, tail, n_epochs, n_vertices,
                epochs_per_sample, a, b, rng_state, gamma, initial_alpha,
                negative_sample_rate, parallel, **options,
            )

        def run(block):
            (first, last), (start, stop) = block
            original(  # moves the block's rows of head_embedding in place
                head_embedding[first:last], tail_embedding, head[start:stop] - first,
                tail[start:stop], n_epochs, n_vertices, epochs_per_sample[start:stop],
                a, b, rng_state, gamma, initial_alpha, negative_sample_rate, False,
                **options,
            )

        with _epochs_without_gil():
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(run, blocks))
        return head_embedding

    umap.umap_.optimize_layout_euclidean = optimize
    try:
        yield
    finally:
        umap.umap_.optimize_layout_euclidean = original


def _layout_blocks(head: np.ndarray, num_points: int):
    """``((first, last), (start, stop))`` point and edge ranges of the
    layout's blocks, or None when its edges are not sorted by point or
    there is only one block."""
    if num_points <= LAYOUT_BLOCK_POINTS or np.any(np.diff(head) < 0):
        return None
    firsts = np.arange(0, num_points, LAYOUT_BLOCK_POINTS)
    lasts = np.minimum(firsts + LAYOUT_BLOCK_POINTS, num_points)
    starts, stops = np.searchsorted(head, firsts), np.searchsorted(head, lasts)
    return list(zip(zip(firsts, lasts), zip(starts, stops)))


_EPOCH_WITHOUT_GIL = None


@contextlib.contextmanager
def _epochs_without_gil() -> Iterator[None]:
    """Makes umap-learn's layout epoch (one-core version) a compiled function
    that releases the GIL while the block runs (compiled on first use)."""
    import numba
    import umap.layouts

    global _EPOCH_WITHOUT_GIL
    if _EPOCH_WITHOUT_GIL is None:
        _EPOCH_WITHOUT_GIL = numba.njit(
            umap.layouts._optimize_layout_euclidean_single_epoch,
            fastmath=True, parallel=False, nogil=True,
        )
    original = umap.layouts._get_optimize_layout_euclidean_single_epoch_fn
    umap.layouts._get_optimize_layout_euclidean_single_epoch_fn = (
        lambda parallel=False: original(True) if parallel else _EPOCH_WITHOUT_GIL
    )
    try:
        yield
    finally:
        umap.layouts._get_optimize_layout_euclidean_single_epoch_fn = original
