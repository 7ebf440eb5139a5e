"""kNN graphs as sparse affinities, and diffusion over them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dinoprop.propagation_methods.features import _EPS


def affinity_matrix(neighbors: np.ndarray, sims: np.ndarray, gamma: float = 3.0):
    """The symmetric sparse affinity matrix of a kNN graph.

    Following Iscen et al. (CVPR 2019), similarities are clipped at 0 and
    raised to the power ``gamma`` (which sharpens the graph), then the
    graph is symmetrised with ``W + W^T``.

    Args:
        neighbors: ``N x k`` neighbour indices (-1 for none)
        sims: ``N x k`` cosine similarities
        gamma: the similarity exponent

    Returns:
        an ``N x N`` :class:`scipy.sparse.csr_matrix`, zero diagonal
    """
    import scipy.sparse as sp

    num, k = neighbors.shape
    rows = np.repeat(np.arange(num, dtype=np.int64), k)
    cols = neighbors.ravel()
    vals = np.clip(sims.ravel().astype(np.float32), 0.0, None) ** gamma
    keep = (cols >= 0) & (cols != rows) & (vals > 0)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # W + W^T in one construction (duplicates are summed)
    return sp.csr_matrix(
        (np.concatenate([vals, vals]),
         (np.concatenate([rows, cols]), np.concatenate([cols, rows]))),
        shape=(num, num),
        dtype=np.float32,
    )


def normalized_affinity(w):
    """Returns ``D^-1/2 W D^-1/2`` for a symmetric sparse CSR ``W``."""
    degrees = np.asarray(w.sum(axis=1)).ravel()
    inv_sqrt = (1.0 / np.sqrt(np.maximum(degrees, _EPS))).astype(np.float32)
    w = w.copy()
    row_of_entry = np.repeat(np.arange(w.shape[0]), np.diff(w.indptr))
    w.data *= inv_sqrt[row_of_entry] * inv_sqrt[w.indices]
    return w


def diffuse(
    s_norm,
    y: np.ndarray,
    alpha: float = 0.99,
    tol: float = 1e-6,
    maxiter: int = 20,
) -> np.ndarray:
    """Solves ``(I - alpha S) F = Y`` for all columns of ``Y`` at once.

    This is label spreading (Zhou et al., 2004) solved by conjugate
    gradient as in Iscen et al. (2019). The ``C`` independent systems share
    one matrix, so they are solved as one block-diagonal system with
    :func:`scipy.sparse.linalg.cg`, whose operator multiplies the sparse
    matrix by the whole ``N x C`` block: one pass over the graph per
    iteration instead of one per class.

    Args:
        s_norm: the ``N x N`` normalised affinity (a scipy sparse matrix or
            a :class:`ParallelSparse`)
        y: the ``N x C`` right-hand side
        alpha: the propagation strength in ``(0, 1)``
        tol: the relative residual tolerance
        maxiter: the iteration cap (a truncated solve is already accurate
            for ranking; Iscen et al. use 20)

    Returns:
        the ``N x C`` float32 solution
    """
    import scipy.sparse.linalg as spla

    y = np.asarray(y, dtype=np.float32)
    num, ncols = y.shape

    def matvec(v):
        block = v.reshape(num, ncols)
        out = s_norm @ block
        out *= -alpha
        out += block
        return out.ravel()

    operator = spla.LinearOperator(
        (num * ncols, num * ncols), matvec=matvec, dtype=np.float32
    )
    solution, _ = spla.cg(operator, y.ravel(), rtol=tol, maxiter=maxiter)
    return solution.reshape(num, ncols).astype(np.float32, copy=False)


class ParallelSparse:
    """A sparse ``N x N`` CSR matrix that multiplies dense blocks on every core.

    scipy's sparse-dense product runs on one core. torch's CSR kernel
    splits the rows over its threads and sums each row in order, so the
    product is the same and deterministic: about 2x faster on 2 cores, and
    more with more cores (measured at 1M nodes, 20M entries, 100 columns:
    1.1 s against 2.0 s for scipy on 2 cores).

    Args:
        matrix: a :class:`scipy.sparse.csr_matrix`
    """

    def __init__(self, matrix):
        import warnings

        import torch

        self.shape = matrix.shape
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            self._tensor = torch.sparse_csr_tensor(
                torch.from_numpy(matrix.indptr.astype(np.int64)),
                torch.from_numpy(matrix.indices.astype(np.int64)),
                torch.from_numpy(matrix.data.astype(np.float32)),
                size=matrix.shape,
            )

    def __matmul__(self, block: np.ndarray) -> np.ndarray:
        """Returns the ``N x C`` float32 product with an ``N x C`` block.

        Written straight into the returned array (``addmm`` with
        ``beta=0``): torch's ``@`` holds a second ``N x C`` buffer while it
        runs, 1.5 GB for the graph features at 1M x 384.
        """
        import torch

        dense = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        product = np.empty((self.shape[0], dense.shape[1]), np.float32)
        out = torch.from_numpy(product)
        torch.addmm(out, self._tensor, dense, beta=0, out=out)
        return product


#: From this many nodes graph products run on every core. Below it scipy's
#: one-core product is faster overall: torch's worker threads, spinning
#: between products, take the cores from numpy's and scikit-learn's
#: (measured: clothing-small's 3,781 nodes 0.5 s with scipy against 1.1 s;
#: 20k nodes even; 100k nodes 8.4 s against 6.4 s).
PARALLEL_MIN_NODES = 50_000


@dataclass
class Graph:
    """A kNN graph over ``N`` nodes, with what propagation derives from it.

    Attributes:
        neighbors: ``N x k`` neighbour indices
        sims: ``N x k`` similarities
        s_norm: the normalised symmetric affinity (built on first use): a
            :class:`ParallelSparse` from :data:`PARALLEL_MIN_NODES` nodes,
            a scipy CSR matrix below
    """

    neighbors: np.ndarray
    sims: np.ndarray
    gamma: float = 3.0
    _s_norm: object = field(default=None, repr=False)

    @property
    def num_nodes(self) -> int:
        return self.neighbors.shape[0]

    @property
    def s_norm(self):
        if self._s_norm is None:
            matrix = normalized_affinity(
                affinity_matrix(self.neighbors, self.sims, self.gamma)
            )
            parallel = self.num_nodes >= PARALLEL_MIN_NODES
            self._s_norm = ParallelSparse(matrix) if parallel else matrix
        return self._s_norm


def nearest_seed_counts(graph: Graph, seed_idx: np.ndarray) -> np.ndarray:
    """How many nodes each seed is the nearest seed of, along the graph.

    Every node is assigned to the seed it reaches by the shortest path
    (edge length ``1 - similarity``): the seeds' Voronoi cells in the kNN
    graph, found by one multi-source Dijkstra search (``O(N k log N)``).
    A seed's count (itself included) says how much of the data it stands
    for: seeds picked one by one in a confused region share it, a seed
    alone in a large homogeneous region has a large cell. Nodes no seed
    reaches count for none; duplicate seed indices share their count.

    Args:
        graph: the kNN :class:`Graph`
        seed_idx: seed node indices

    Returns:
        an int64 array of one count per entry of ``seed_idx``
    """
    import scipy.sparse as sp
    from scipy.sparse.csgraph import dijkstra

    seed_idx = np.asarray(seed_idx, np.int64)
    num, k = graph.neighbors.shape
    rows = np.repeat(np.arange(num, dtype=np.int64), k)
    cols = graph.neighbors.ravel()
    keep = (cols >= 0) & (cols != rows)
    # lengths must stay positive: a zero would read as "no edge"
    lengths = np.maximum(1.0 - graph.sims.ravel()[keep].astype(np.float64), 1e-9)
    distances = sp.csr_matrix((lengths, (rows[keep], cols[keep])), shape=(num, num))
    unique_seeds = np.unique(seed_idx)
    _, _, sources = dijkstra(
        distances, directed=False, indices=unique_seeds,
        min_only=True, return_predecessors=True,
    )
    reached = sources[sources >= 0]
    counts = np.bincount(reached, minlength=num)
    return counts[seed_idx].astype(np.int64)
