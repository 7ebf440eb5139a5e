"""The propagation methods: kNN vote, diffusion, linear, graph + linear."""

from __future__ import annotations

import numpy as np

from dinoprop.core import row_norms
from dinoprop.propagation_methods.features import (
    _normalize_rows,
    _normalize_rows_in_place,
    one_hot,
    softmax,
)
from dinoprop.propagation_methods.graphs import Graph, diffuse


def knn_scores(
    x: np.ndarray,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.05,
) -> np.ndarray:
    """Similarity-weighted vote of each node's ``k`` nearest seeds.

    Args:
        x: ``N x D`` unit-norm features
        seed_idx: seed node indices
        seed_labels: seed class indices
        num_classes: ``C``
        k: the number of seeds that vote
        temperature: votes are weighted by ``exp(sim / temperature)``

    Returns:
        ``N x C`` class probabilities
    """
    import faiss

    seeds = np.ascontiguousarray(x[seed_idx], dtype=np.float32)
    k = int(min(k, len(seed_idx)))
    index = faiss.IndexFlatIP(seeds.shape[1])
    index.add(seeds)
    sims, nbrs = index.search(np.ascontiguousarray(x, dtype=np.float32), k)
    weights = np.exp((sims - sims[:, :1]) / temperature)
    scores = np.zeros((x.shape[0], num_classes), np.float32)
    np.add.at(
        scores,
        (np.repeat(np.arange(x.shape[0]), k), seed_labels[nbrs].ravel()),
        weights.ravel(),
    )
    return _normalize_rows(scores)


def diffusion_scores(
    graph: Graph,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    num_classes: int,
    alpha: float = 0.99,
    maxiter: int = 20,
) -> np.ndarray:
    """Class-balanced label spreading of the seeds over the graph.

    Each class's seed column is divided by its number of seeds, so a class
    with many seeds does not flood the graph; the diffused scores are
    clipped at 0 and normalised per node (Iscen et al., 2019).

    Returns:
        ``N x C`` class probabilities (uniform where nothing reached)
    """
    y = np.zeros((graph.num_nodes, num_classes), np.float32)
    counts = np.bincount(seed_labels, minlength=num_classes).astype(np.float32)
    y[seed_idx, seed_labels] = 1.0 / counts[seed_labels]
    f = diffuse(graph.s_norm, y, alpha=alpha, maxiter=maxiter)
    return _normalize_rows(np.clip(f, 0.0, None))


def linear_logits(
    x: "np.ndarray | GraphFeatures",
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    num_classes: int,
    c: float = 1.0,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Logits of a multinomial logistic regression fit on the seeds.

    Args:
        x: ``N x D`` unit-norm features: an array, or the
            :class:`GraphFeatures` of a graph-augmented fit
        seed_idx, seed_labels: the training nodes and their classes
        num_classes: ``C``
        c: the inverse L2 regularisation strength
        sample_weight: optional per-training-node weights

    Returns:
        ``N x C`` logits (columns of classes without seeds are ``-inf``-like)
    """
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    present = np.unique(seed_labels)
    logits = np.full((x.shape[0], num_classes), -30.0, np.float32)
    if len(present) == 1:
        logits[:, present[0]] = 0.0
        return logits
    train = x[seed_idx].astype(np.float64)
    # With fewer seeds than dimensions, the L2-regularised solution lies in
    # the span of the seeds (representer theorem): fit in the coordinates
    # of an orthonormal basis of that span, an exact and much smaller
    # problem, then map the weights back.
    basis = np.linalg.qr(train.T)[0] if len(train) < train.shape[1] else None
    model = LogisticRegression(C=c, max_iter=300, class_weight="balanced")
    # The fit's matrices are small (seeds x D x C): BLAS threads only wait
    # on each other there (measured on 2 shared cores, 800 seeds, 64-d,
    # 100 classes: 1.26 CPU s with 2 threads, 0.12 s with one).
    with threadpool_limits(limits=1, user_api="blas"):
        model.fit(
            train if basis is None else train @ basis,
            seed_labels,
            sample_weight=sample_weight,
        )
    weights = model.coef_ if basis is None else model.coef_ @ basis.T
    scores = (x @ weights.T.astype(np.float32)) + model.intercept_.astype(np.float32)
    if scores.shape[1] == 1:  # binary problem: sklearn fits one column
        scores = np.hstack([-scores / 2, scores / 2])
    logits[:, model.classes_] = scores
    return logits


class GraphFeatures:
    """The graph-augmented features, without their ``N x 2D`` copy.

    Row ``i`` stands for ``[x_i, s_i] / ||[x_i, s_i]||``, with ``s`` the
    unit-norm graph-smoothed features (:func:`smoothed_features`). Only
    ``s`` is stored beside ``x`` (which the problem holds anyway), so the
    augmented features cost ``N x D`` floats instead of ``N x 2D`` (1.5 GB
    at 1M x 384). A linear classifier needs no more: its training rows are
    built on demand (``features[rows]``) and its scores come from
    ``features @ weights``, one block of rows at a time.

    Args:
        x: ``N x D`` features
        smoothed: their ``N x D`` smoothed version
    """

    #: Rows per block of :meth:`__matmul__`: its temporaries stay small.
    BLOCK_ROWS = 65_536

    def __init__(self, x: np.ndarray, smoothed: np.ndarray):
        self.x, self.smoothed = x, smoothed
        self.shape = (x.shape[0], 2 * x.shape[1])
        norms = np.sqrt(np.square(row_norms(x)) + np.square(row_norms(smoothed)))
        self.scale = (1.0 / np.maximum(norms, 1e-12)).astype(np.float32)

    def __getitem__(self, rows) -> np.ndarray:
        """The dense augmented features of ``rows``."""
        both = np.hstack([self.x[rows], self.smoothed[rows]])
        both *= self.scale[rows, None]
        return both

    def __matmul__(self, weights: np.ndarray) -> np.ndarray:
        """The ``N x C`` float32 product with ``2D x C`` ``weights``."""
        dim = self.x.shape[1]
        weights = np.asarray(weights, np.float32)
        top, bottom = weights[:dim], weights[dim:]
        out = np.empty((self.shape[0], weights.shape[1]), np.float32)
        for start in range(0, self.shape[0], self.BLOCK_ROWS):
            rows = slice(start, start + self.BLOCK_ROWS)
            block = out[rows]
            np.matmul(self.x[rows], top, out=block)
            block += self.smoothed[rows] @ bottom
            block *= self.scale[rows, None]
        return out

    def toarray(self) -> np.ndarray:
        """The ``N x 2D`` float32 augmented features."""
        return self[slice(None)]


def smoothed_features(x: np.ndarray, graph: Graph, hops: int = 2) -> np.ndarray:
    """Each node's features averaged over its graph neighbourhood.

    ``hops`` lazy random-walk steps (simplified graph convolution, Wu et
    al., 2019), then scaled to unit norm; at most three ``N x D`` arrays
    are alive at once (``x`` and two steps).

    Returns:
        ``N x D`` unit-norm float32 features
    """
    smoothed = x
    for _ in range(hops):
        step = graph.s_norm @ smoothed
        step += smoothed
        step *= 0.5
        smoothed = step
    if smoothed is x:
        smoothed = x.astype(np.float32, copy=True)
    _normalize_rows_in_place(smoothed)
    return smoothed


def graph_features(x: np.ndarray, graph: Graph, hops: int = 2) -> np.ndarray:
    """Features augmented with their graph-smoothed version.

    Each node's features are concatenated with the average of its graph
    neighbourhood over ``hops`` lazy random-walk steps
    (:func:`smoothed_features`), so a linear classifier sees both the
    sample and the region of the data it lies in. This is the dense form
    of :class:`GraphFeatures`, which the propagation uses.

    Returns:
        ``N x 2D`` unit-norm float32 features
    """
    return GraphFeatures(x, smoothed_features(x, graph, hops)).toarray()


#: How strongly ``graph_linear`` smooths the classifier's scores over the
#: graph (``alpha`` of :func:`smooth_scores`). The classifier already sees
#: each node's neighbourhood (graph-augmented features), so strong
#: smoothing mostly lets a seed's label spill into its neighbours whatever
#: they look like; with seeds picked by active learning, which crowd the
#: class boundaries, that spill ranks wrong labels above right ones.
#: Measured over simulated annotation loops on clothing-small and
#: cifar10-test (3 starts each, efficientnet-lite0 features), the
#: labels reachable at 95% dataset accuracy for a given ranking rose at
#: every round from 60 human labels on with 0.5 instead of 0.8 (the
#: cheapest stop, ranked with the truth: 24.8% -> 22.3% of N on
#: clothing-small, 56.0% -> 53.6% on cifar10-test); with few random seeds
#: it costs a little accuracy (clothing-small, 1 seed per class: 62.3% ->
#: 60.3%; cifar10-test within 0.5 points either way).
GRAPH_LINEAR_SMOOTHING = 0.5


#: How close :func:`smooth_scores` gets to the exact smoothed scores,
#: relative to their scale, by the conjugate-gradient error bound.
SMOOTHING_TOLERANCE = 1e-3


def smoothing_iterations(alpha: float, tolerance: float = SMOOTHING_TOLERANCE) -> int:
    """The conjugate-gradient iterations that smooth scores with ``alpha``
    to within ``tolerance``.

    The system ``I - alpha S`` (``S`` the normalised affinity, eigenvalues
    in ``[-1, 1]``) has condition number ``k = (1 + alpha) / (1 - alpha)``,
    and CG's error after ``n`` iterations is at most ``2 q^n`` with
    ``q = (sqrt(k) - 1) / (sqrt(k) + 1)``, whatever the graph. At the
    default ``alpha`` of 0.5 that is 6 iterations; measured on a 300k-node
    graph with 100 classes, they leave the scores within 7e-5 of the
    converged solve (8 iterations: 3e-6), below the 4 decimals confidences
    are stored with, in 1.6 s against 2.4 s for 8.

    Args:
        alpha: the smoothing strength, in ``(0, 1)``
        tolerance: the bound on the relative error

    Returns:
        the number of iterations (at least 1)
    """
    kappa = (1.0 + alpha) / (1.0 - alpha)
    rate = (np.sqrt(kappa) - 1.0) / (np.sqrt(kappa) + 1.0)
    if rate <= 0:
        return 1
    return max(1, int(np.ceil(np.log(tolerance / 2.0) / np.log(rate))))


def smooth_scores(
    graph: Graph,
    probs: np.ndarray,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    alpha: float = GRAPH_LINEAR_SMOOTHING,
    maxiter: int | None = None,
) -> np.ndarray:
    """Spreads class scores over the graph, seeds clamped to their labels.

    This is the "smooth" step of Correct and Smooth (Huang et al., 2021):
    the classifier's scores, with each seed's row replaced by its one-hot
    label, are propagated with label spreading, so neighbouring samples
    agree and the seeds' labels reach their neighbourhoods. With
    ``alpha`` well below 1 the system is well conditioned, so a few
    conjugate-gradient iterations reach the solution (``maxiter``; by
    default :func:`smoothing_iterations` of ``alpha``).

    Returns:
        ``N x C`` class probabilities
    """
    z = probs.astype(np.float32, copy=True)
    z[seed_idx] = one_hot(seed_labels, probs.shape[1])
    if maxiter is None:
        maxiter = smoothing_iterations(alpha)
    f = diffuse(graph.s_norm, z, alpha=alpha, maxiter=maxiter)
    return _normalize_rows(np.clip(f, 0.0, None))


# ------------------------------------------------ candidates and auto

#: The inverse regularisation of the classifier inside ``graph_linear``.
#: Its probabilities are smoothed over the graph with the seeds clamped to
#: one-hot rows; a strongly regularised classifier (C=1 on unit-norm
#: features) gives near-uniform rows that the clamped seeds then dominate,
#: so the confidence mostly measures graph distance to a seed. Weaker
#: regularisation lets the classifier's own evidence rank the samples:
#: measured on clothing-small and cifar10-test it raises accuracy, the
#: coverage reachable at 95% precision, and lowers calibration error.
GRAPH_LINEAR_C = 10.0


class Problem:
    """A propagation problem: features, graph, and cached derived data.

    Args:
        x: ``N x D`` unit-norm (centred) features
        graph: the :class:`Graph` over the same ``N`` nodes
        num_classes: ``C``
        knn_k: the number of seeds that vote in the ``knn`` method
        alpha: the diffusion strength of the ``diffusion`` method
    """

    def __init__(self, x, graph, num_classes, knn_k=10, alpha=0.99):
        self.x = x
        self.graph = graph
        self.num_classes = num_classes
        self.knn_k = knn_k
        self.alpha = alpha
        self._xg = None
        self._linear_cache = {}

    def linear_probs(self, graph_augmented: bool, seed_idx, seed_labels):
        """Logistic-regression probabilities on ``x`` or the graph-augmented
        features; the last fit is kept, so candidates evaluated on the same
        seeds (one cross-validation fold) share it."""
        key = (graph_augmented, np.asarray(seed_idx).tobytes(), np.asarray(seed_labels).tobytes())
        if key not in self._linear_cache:
            x, c = (self.xg, GRAPH_LINEAR_C) if graph_augmented else (self.x, 1.0)
            self._linear_cache = {
                key: softmax(linear_logits(x, seed_idx, seed_labels, self.num_classes, c=c))
            }
        return self._linear_cache[key]

    @property
    def xg(self) -> GraphFeatures:
        """The graph-augmented features (computed once)."""
        if self._xg is None:
            self._xg = GraphFeatures(self.x, smoothed_features(self.x, self.graph))
        return self._xg

    def scores(self, name: str, seed_idx, seed_labels, last: bool = False) -> np.ndarray:
        """The ``N x C`` probabilities of method ``name``.

        Args:
            name: ``"knn"``, ``"diffusion"``, ``"linear"``, or
                ``"graph_linear"`` (optionally ``"graph_linear@<alpha>"``
                for another smoothing strength than
                :data:`GRAPH_LINEAR_SMOOTHING`): logistic
                regression on graph-augmented features, smoothed over the
                graph with the seeds clamped
            seed_idx: seed node indices
            seed_labels: seed class indices
            last: this problem's last use: the graph-augmented features and
                the kept fit are dropped once the classifier has run, before
                the smoothing (3 GB at 1M x 384-d)
        """
        c = self.num_classes
        if name == "knn":
            return knn_scores(self.x, seed_idx, seed_labels, c, k=self.knn_k)
        if name == "diffusion":
            return diffusion_scores(
                self.graph, seed_idx, seed_labels, c, alpha=self.alpha
            )
        if name == "linear":
            return self.linear_probs(False, seed_idx, seed_labels)
        if name.startswith("graph_linear"):
            strength = (
                float(name.rsplit("@", 1)[1]) if "@" in name else GRAPH_LINEAR_SMOOTHING
            )
            probs = self.linear_probs(True, seed_idx, seed_labels)
            if last:
                self._xg, self._linear_cache = None, {}
            return smooth_scores(
                self.graph, probs, seed_idx, seed_labels, alpha=strength
            )
        raise ValueError("Unknown propagation method %r" % name)
