"""Array-level label propagation: kNN vote, graph diffusion, linear, auto.

Everything here works on numpy arrays and scipy sparse matrices, with no
FiftyOne involved, so it can be tested and benchmarked on its own.
:mod:`dinoprop.propagation` is the FiftyOne glue around it.

Notation: ``N`` nodes (samples or patches), ``C`` classes, ``seed_idx`` the
node indices of the labeled seeds and ``seed_labels`` their class indices in
``[0, C)``. Every method returns an ``N x C`` array of class probabilities.

No ``N x N`` dense matrix is ever formed: graphs are sparse ``N x N`` with
``O(N k)`` entries and every score matrix is ``N x C``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from dinoprop.core import l2_normalize

#: The propagation methods, "auto" first.
METHODS = ("auto", "knn", "diffusion", "linear", "graph_linear")

_EPS = 1e-12


# ---------------------------------------------------------------- features


def center_and_normalize(embeddings: np.ndarray) -> np.ndarray:
    """Mean-centres the rows of ``embeddings`` and scales them to unit norm.

    Centring removes the direction all features share (large for networks
    whose features are post-ReLU averages), so cosine similarity reflects
    what distinguishes samples.
    """
    x = np.asarray(embeddings, dtype=np.float32)
    return l2_normalize(x - x.mean(axis=0, keepdims=True)).astype(np.float32)


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns the ``len(labels) x num_classes`` float32 one-hot matrix."""
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


# ------------------------------------------------------------------ graphs


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
        """Returns the ``N x C`` float32 product with an ``N x C`` block."""
        import torch

        dense = torch.from_numpy(np.ascontiguousarray(block, dtype=np.float32))
        return (self._tensor @ dense).numpy()


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


# ----------------------------------------------------------------- methods


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
    x: np.ndarray,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    num_classes: int,
    c: float = 1.0,
    sample_weight: np.ndarray | None = None,
) -> np.ndarray:
    """Logits of a multinomial logistic regression fit on the seeds.

    Args:
        x: ``N x D`` unit-norm features
        seed_idx, seed_labels: the training nodes and their classes
        num_classes: ``C``
        c: the inverse L2 regularisation strength
        sample_weight: optional per-training-node weights

    Returns:
        ``N x C`` logits (columns of classes without seeds are ``-inf``-like)
    """
    from sklearn.linear_model import LogisticRegression

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
    model.fit(train if basis is None else train @ basis, seed_labels, sample_weight=sample_weight)
    weights = model.coef_ if basis is None else model.coef_ @ basis.T
    scores = (x @ weights.T.astype(np.float32)) + model.intercept_.astype(np.float32)
    if scores.shape[1] == 1:  # binary problem: sklearn fits one column
        scores = np.hstack([-scores / 2, scores / 2])
    logits[:, model.classes_] = scores
    return logits


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise softmax of ``logits / temperature``, as float32.

    Computed in one float32 array, in place: at a million rows each
    temporary would be hundreds of megabytes.
    """
    z = np.asarray(logits, np.float32) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def _normalize_rows(scores: np.ndarray) -> np.ndarray:
    totals = scores.sum(axis=1, keepdims=True)
    uniform = np.full_like(scores, 1.0 / scores.shape[1])
    return np.where(totals > _EPS, scores / np.maximum(totals, _EPS), uniform)


# ------------------------------------------------------ graph + linear


def graph_features(x: np.ndarray, graph: Graph, hops: int = 2) -> np.ndarray:
    """Features augmented with their graph-smoothed version.

    Each node's features are concatenated with the average of its graph
    neighbourhood over ``hops`` lazy random-walk steps (simplified graph
    convolution, Wu et al., 2019), so a linear classifier sees both the
    sample and the region of the data it lies in.

    Returns:
        ``N x 2D`` unit-norm float32 features
    """
    dim = x.shape[1]
    smoothed = x
    for _ in range(hops):
        step = graph.s_norm @ smoothed
        step += smoothed
        step *= 0.5
        smoothed = step
    # Built in place: at a million nodes every temporary is gigabytes
    both = np.empty((x.shape[0], 2 * dim), np.float32)
    both[:, :dim] = x
    both[:, dim:] = smoothed
    del smoothed
    _normalize_rows_in_place(both[:, dim:])
    _normalize_rows_in_place(both)
    return both


def _normalize_rows_in_place(x: np.ndarray) -> None:
    """Scales the rows of ``x`` to unit L2 norm without a copy of ``x``."""
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    np.maximum(norms, 1e-12, out=norms)
    x /= norms[:, None]


def smooth_scores(
    graph: Graph,
    probs: np.ndarray,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    alpha: float = 0.8,
    maxiter: int = 8,
) -> np.ndarray:
    """Spreads class scores over the graph, seeds clamped to their labels.

    This is the "smooth" step of Correct and Smooth (Huang et al., 2021):
    the classifier's scores, with each seed's row replaced by its one-hot
    label, are propagated with label spreading, so neighbouring samples
    agree and the seeds' labels reach their neighbourhoods. With
    ``alpha`` well below 1 the system is well conditioned, so a few
    conjugate-gradient iterations reach the solution (``maxiter``).

    Returns:
        ``N x C`` class probabilities
    """
    z = probs.astype(np.float32, copy=True)
    z[seed_idx] = one_hot(seed_labels, probs.shape[1])
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
    def xg(self) -> np.ndarray:
        """The graph-augmented features (computed once)."""
        if self._xg is None:
            self._xg = graph_features(self.x, self.graph)
        return self._xg

    def scores(self, name: str, seed_idx, seed_labels) -> np.ndarray:
        """The ``N x C`` probabilities of method ``name``.

        Args:
            name: ``"knn"``, ``"diffusion"``, ``"linear"``, or
                ``"graph_linear"`` (optionally ``"graph_linear@<alpha>"``
                for another smoothing strength than 0.8): logistic
                regression on graph-augmented features, smoothed over the
                graph with the seeds clamped
            seed_idx: seed node indices
            seed_labels: seed class indices
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
            strength = float(name.rsplit("@", 1)[1]) if "@" in name else 0.8
            probs = self.linear_probs(True, seed_idx, seed_labels)
            return smooth_scores(
                self.graph, probs, seed_idx, seed_labels, alpha=strength
            )
        raise ValueError("Unknown propagation method %r" % name)


#: What ``method="auto"`` chooses from; the first is its default, kept
#: unless cross-validation shows another is better by more than noise.
AUTO_CANDIDATES = ("graph_linear@0.8", "linear", "diffusion", "knn")


@dataclass
class Propagation:
    """The outcome of :func:`propagate`.

    Attributes:
        probs: ``N x C`` calibrated class probabilities
        method: the method that produced them (for ``auto``, the one chosen)
        temperature: the fitted calibration temperature (1 if not fitted)
        temperature_spread: the standard deviation of its logarithm
            (:func:`temperature_spread`; 0 if not fitted)
        oof_probs: calibrated out-of-fold probabilities of the held-out
            seeds (every seed of a class with at least 2), or None when the
            seeds are too few to cross-validate
        oof_labels: the held-out seeds' true classes, aligned with
            ``oof_probs``
        cv_accuracy: the cross-validated seed accuracy of each candidate
        num_folds: the number of cross-validation folds (0 if none)
    """

    probs: np.ndarray
    method: str
    temperature: float = 1.0
    temperature_spread: float = 0.0
    oof_probs: np.ndarray | None = None
    oof_labels: np.ndarray | None = None
    cv_accuracy: dict = field(default_factory=dict)
    num_folds: int = 0


def propagate(
    problem: Problem,
    seed_idx: np.ndarray,
    seed_labels: np.ndarray,
    method: str = "auto",
    max_folds: int = 5,
    cv_max_nodes: int = 20000,
    random_state: int = 0,
) -> Propagation:
    """Propagates seed labels to every node, with calibrated confidence.

    The seeds are cross-validated (stratified k-fold) with each candidate
    method; the out-of-fold predictions choose the method (``auto``), fit
    the calibration temperature and its uncertainty (confidences are
    averaged over it), and estimate accuracy. On graphs larger
    than ``cv_max_nodes``, cross-validation runs on the seeds'
    neighbourhood subgraph, which is what decides their predictions.

    Args:
        problem: the :class:`Problem`
        seed_idx: seed node indices
        seed_labels: seed class indices
        method: ``"auto"`` or one of :data:`METHODS` (``graph_linear``
            variants are also accepted)
        max_folds: the most cross-validation folds
        cv_max_nodes: the node budget of the cross-validation subgraph
        random_state: the fold shuffling seed

    Returns:
        a :class:`Propagation`
    """
    candidates = list(AUTO_CANDIDATES) if method == "auto" else [method]
    seed_idx = np.asarray(seed_idx, np.int64)
    seed_labels = np.asarray(seed_labels, np.int64)
    folds = _seed_folds(seed_labels, max_folds, random_state)
    oof = {}
    if folds:
        cv_problem, cv_seeds = _cv_problem(problem, seed_idx, cv_max_nodes)
        oof = _out_of_fold(cv_problem, cv_seeds, seed_labels, folds, candidates)
    held_out = seed_labels[np.concatenate(folds)] if folds else seed_labels
    chosen = _choose(oof, held_out, candidates)
    probs = problem.scores(chosen, seed_idx, seed_labels)
    result = Propagation(probs=probs, method=chosen, num_folds=len(folds))
    if oof:
        result.cv_accuracy = {
            name: float((p.argmax(1) == held_out).mean())
            for name, p in oof.items()
        }
        result.temperature = fit_temperature(oof[chosen], held_out)
        result.temperature_spread = temperature_spread(oof[chosen], held_out)
        calibration = dict(
            temperature=result.temperature,
            shrink=laplace_shrink(len(held_out)),
            log_spread=result.temperature_spread,
        )
        result.oof_probs = calibrate(oof[chosen], **calibration)
        result.oof_labels = np.asarray(held_out)
        result.probs = calibrate(probs, **calibration)
    return result


def laplace_shrink(num_checked: int) -> float:
    """How far calibrated probabilities are shrunk toward uniform.

    Laplace's rule of succession: ``S`` checked predictions cannot vouch
    for more than ``1 - 1/(S + 2)`` certainty, so probabilities are mixed
    with ``1/(S + 2)`` of the uniform distribution; with ``C`` classes no
    confidence then exceeds ``1 - (1 - 1/C)/(S + 2)``.
    """
    return 1.0 / (num_checked + 2)


#: The range calibration temperatures are fitted (and averaged) in.
TEMPERATURE_RANGE = (0.05, 20.0)


def calibrate(
    probs: np.ndarray,
    temperature: float,
    shrink: float = 0.0,
    log_spread: float = 0.0,
) -> np.ndarray:
    """Applies temperature scaling, then mixes in ``shrink`` of uniform.

    Args:
        probs: ``N x C`` class probabilities
        temperature: the fitted temperature
        shrink: the weight of the uniform distribution mixed in
        log_spread: the standard deviation of the fitted log-temperature
            (see :func:`temperature_spread`); when positive, the scaled
            probabilities are averaged over that uncertainty by 3-point
            Gauss-Hermite quadrature instead of trusting the fit exactly

    Returns:
        ``N x C`` float32 probabilities (argmax unchanged)
    """
    logp = np.log(np.clip(probs, 1e-6, None))
    if log_spread > 0:
        nodes, weights = np.polynomial.hermite_e.hermegauss(3)
        weights = weights / weights.sum()
    else:
        nodes, weights = np.zeros(1), np.ones(1)
    scaled = np.zeros(probs.shape, np.float32)
    for node, weight in zip(nodes, weights):
        spread_temperature = np.clip(
            temperature * np.exp(log_spread * node), *TEMPERATURE_RANGE
        )
        part = softmax(logp, spread_temperature)
        part *= float(weight)
        scaled += part
    scaled *= 1.0 - shrink
    scaled += shrink / probs.shape[1]
    return scaled


def _temperature_nll(probs: np.ndarray, labels: np.ndarray):
    """The mean negative log-likelihood of ``labels`` as a function of the
    log-temperature."""
    logp = np.log(np.clip(probs, 1e-6, None)).astype(np.float64)
    rows = np.arange(len(labels))

    def nll(log_t):
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float((lse - z[rows, labels]).mean())

    return nll


def fit_temperature(probs: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels``.

    Args:
        probs: ``S x C`` out-of-fold probabilities
        labels: the ``S`` true classes

    Returns:
        the temperature, in :data:`TEMPERATURE_RANGE`
    """
    from scipy.optimize import minimize_scalar

    best = minimize_scalar(
        _temperature_nll(probs, labels),
        bounds=tuple(np.log(TEMPERATURE_RANGE)),
        method="bounded",
    )
    return float(np.exp(best.x))


def temperature_spread(probs: np.ndarray, labels: np.ndarray) -> float:
    """How uncertain a temperature fitted on ``S`` held-out seeds is.

    The posterior of the log-temperature (flat prior over the fitted
    range) is ``exp(-S * nll)``, with ``nll`` the mean negative
    log-likelihood; it is evaluated on a grid, which also holds where the
    fit ends at a bound of its range (seeds all predicted correctly). A
    few dozen seeds leave the temperature loose, and trusting one point
    estimate then overstates the top confidences; :func:`calibrate`
    averages over this spread.

    Args:
        probs: ``S x C`` out-of-fold probabilities
        labels: the ``S`` true classes

    Returns:
        the posterior standard deviation of the log-temperature
    """
    nll = _temperature_nll(probs, labels)
    grid = np.linspace(*np.log(TEMPERATURE_RANGE), 121)
    values = np.array([nll(log_t) for log_t in grid])
    weights = np.exp(-len(labels) * (values - values.min()))
    weights /= weights.sum()
    mean = float(weights @ grid)
    return float(np.sqrt(weights @ (grid - mean) ** 2))


def expected_calibration_error(
    confidence: np.ndarray, correct: np.ndarray, num_bins: int = 15
) -> float:
    """The expected calibration error over equal-width confidence bins."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if len(confidence) == 0:
        return 0.0
    bins = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        in_bin = bins == b
        total += in_bin.sum() * abs(confidence[in_bin].mean() - correct[in_bin].mean())
    return float(total / len(confidence))


def threshold_for_precision(
    confidence: np.ndarray, target_precision: float, correct: np.ndarray | None = None
) -> tuple[float, float, float]:
    """The lowest confidence threshold whose accepted set reaches a precision.

    Accepted samples are those with ``confidence >= threshold``. Their
    precision is the fraction of ``correct`` ones when truth is given,
    otherwise the mean calibrated confidence (what calibration promises).

    Args:
        confidence: per-sample confidences
        target_precision: the precision to reach
        correct: optional per-sample booleans

    Returns:
        a tuple ``(threshold, coverage, precision)``; the threshold is 1.0
        with coverage 0 when no threshold reaches the target
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    if len(confidence) == 0:
        return 1.0, 0.0, 0.0
    order = np.argsort(-confidence, kind="stable")
    hits = confidence[order] if correct is None else np.asarray(correct, float)[order]
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    sorted_conf = confidence[order]
    # Only cut between distinct confidences
    last_of_value = np.append(sorted_conf[1:] != sorted_conf[:-1], True)
    ok = np.flatnonzero((precision >= target_precision) & last_of_value)
    if len(ok) == 0:
        return 1.0, 0.0, 0.0
    cut = ok[-1]
    return float(sorted_conf[cut]), float((cut + 1) / len(hits)), float(precision[cut])


def can_cross_validate(seed_labels: np.ndarray) -> bool:
    """Whether the seeds can be cross-validated: 2 classes with 2 seeds."""
    counts = np.bincount(np.asarray(seed_labels, np.int64))
    return int(np.sum(counts >= 2)) >= 2


def _seed_folds(seed_labels, max_folds, random_state):
    """Stratified folds over the seeds of classes with at least 2 seeds.

    A class's only seed is never held out (the other folds would know
    nothing of its class), so it always trains. Returns [] when fewer than
    two classes have 2 seeds.
    """
    import warnings

    from sklearn.model_selection import StratifiedKFold

    if not can_cross_validate(seed_labels):
        return []
    counts = np.bincount(seed_labels)
    eligible = np.flatnonzero(counts[seed_labels] >= 2)
    repeated = counts[counts >= 2]
    num_folds = int(min(max_folds, repeated.min()))
    splitter = StratifiedKFold(num_folds, shuffle=True, random_state=random_state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        splits = splitter.split(np.zeros(len(eligible)), seed_labels[eligible])
        return [eligible[test] for _, test in splits]


def _out_of_fold(problem, seed_idx, seed_labels, folds, candidates):
    """Out-of-fold probabilities of the held-out seeds per candidate.

    Folds run in the outer loop so candidates sharing a classifier reuse
    its fit on the fold.
    """
    oof = {name: [] for name in candidates}
    for test in folds:
        train = np.setdiff1d(np.arange(len(seed_idx)), test)
        for name in candidates:
            probs = problem.scores(name, seed_idx[train], seed_labels[train])
            oof[name].append(probs[seed_idx[test]])
    return {name: np.concatenate(parts) for name, parts in oof.items()}


def _choose(oof, seed_labels, candidates):
    """The default candidate, unless another beats it by over 2 std errors.

    The margin is the paired standard error of the per-seed accuracy
    difference, so ``auto`` only leaves its default on clear evidence and
    stays within noise of the best candidate.
    """
    default = candidates[0]
    if len(candidates) == 1 or not oof:
        return default
    base = oof[default].argmax(1) == seed_labels
    best, best_gain = default, 0.0
    for name in candidates[1:]:
        diff = (oof[name].argmax(1) == seed_labels).astype(float) - base
        gain = diff.mean()
        stderr = diff.std(ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
        if gain > 2 * stderr and gain > best_gain:
            best, best_gain = name, gain
    return best


def _cv_problem(problem, seed_idx, max_nodes):
    """The problem restricted to the seeds' graph neighbourhood if large."""
    if problem.graph.num_nodes <= max_nodes:
        return problem, seed_idx
    nodes = _neighbourhood(problem.graph.neighbors, seed_idx, max_nodes)
    remap = np.full(problem.graph.num_nodes, -1, np.int64)
    remap[nodes] = np.arange(len(nodes))
    nbrs = problem.graph.neighbors[nodes]
    nbrs = np.where(nbrs >= 0, remap[np.maximum(nbrs, 0)], -1)
    sub = Problem(
        problem.x[nodes],
        Graph(nbrs, problem.graph.sims[nodes], problem.graph.gamma),
        problem.num_classes,
        knn_k=problem.knn_k,
        alpha=problem.alpha,
    )
    return sub, remap[seed_idx]


def _neighbourhood(neighbors, start, max_nodes):
    """Breadth-first expansion of ``start`` over the graph, capped."""
    seen = np.zeros(neighbors.shape[0], bool)
    seen[start] = True
    frontier = np.unique(start)
    order = [frontier]
    total = len(frontier)
    while total < max_nodes and len(frontier):
        nxt = neighbors[frontier].ravel()
        nxt = np.unique(nxt[nxt >= 0])
        nxt = nxt[~seen[nxt]]
        nxt = nxt[: max_nodes - total]
        seen[nxt] = True
        order.append(nxt)
        total += len(nxt)
        frontier = nxt
    return np.concatenate(order)
