"""Calibration of class probabilities and thresholds on confidences."""

from __future__ import annotations

import numpy as np

from dinoprop.propagation_methods.features import softmax


def laplace_shrink(num_checked: int) -> float:
    """How far calibrated probabilities are shrunk toward uniform.

    Laplace's rule of succession: ``S`` checked predictions (their
    effective count, when they are weighted) cannot vouch
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


def _temperature_nll(probs: np.ndarray, labels: np.ndarray, weights=None):
    """The (weighted) mean negative log-likelihood of ``labels`` as a
    function of the log-temperature."""
    logp = np.log(np.clip(probs, 1e-6, None)).astype(np.float64)
    rows = np.arange(len(labels))
    share = _weight_shares(weights, len(labels))

    def nll(log_t):
        z = logp / np.exp(log_t)
        z = z - z.max(axis=1, keepdims=True)
        lse = np.log(np.exp(z).sum(axis=1))
        return float((lse - z[rows, labels]) @ share)

    return nll


def _weight_shares(weights, num: int) -> np.ndarray:
    """Weights scaled to sum to 1 (uniform when None)."""
    if weights is None:
        return np.full(num, 1.0 / num)
    weights = np.asarray(weights, np.float64)
    return weights / weights.sum()


def effective_count(weights: np.ndarray) -> float:
    """Kish's effective sample size of weighted observations,
    ``(sum w)^2 / sum w^2``: how many equally weighted ones they are worth."""
    weights = np.asarray(weights, np.float64)
    return float(weights.sum() ** 2 / max(float(weights @ weights), 1e-300))


def fit_temperature(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """The temperature minimising the negative log-likelihood of ``labels``.

    Args:
        probs: ``S x C`` out-of-fold probabilities
        labels: the ``S`` true classes
        weights: optional per-seed weights (how much of the data each
            held-out seed stands for; see :func:`seed_weights`)

    Returns:
        the temperature, in :data:`TEMPERATURE_RANGE`
    """
    from scipy.optimize import minimize_scalar

    best = minimize_scalar(
        _temperature_nll(probs, labels, weights),
        bounds=tuple(np.log(TEMPERATURE_RANGE)),
        method="bounded",
    )
    return float(np.exp(best.x))


def temperature_spread(
    probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """How uncertain a temperature fitted on ``S`` held-out seeds is.

    The posterior of the log-temperature (flat prior over the fitted
    range) is ``exp(-S * nll)``, with ``nll`` the mean negative
    log-likelihood (with ``weights``, the weighted mean, and ``S`` their
    effective count, :func:`effective_count`); it is evaluated on a grid, which also holds where the
    fit ends at a bound of its range (seeds all predicted correctly). A
    few dozen seeds leave the temperature loose, and trusting one point
    estimate then overstates the top confidences; :func:`calibrate`
    averages over this spread.

    Args:
        probs: ``S x C`` out-of-fold probabilities
        labels: the ``S`` true classes
        weights: optional per-seed weights, as for :func:`fit_temperature`

    Returns:
        the posterior standard deviation of the log-temperature
    """
    nll = _temperature_nll(probs, labels, weights)
    count = len(labels) if weights is None else effective_count(weights)
    grid = np.linspace(*np.log(TEMPERATURE_RANGE), 121)
    values = np.array([nll(log_t) for log_t in grid])
    posterior = np.exp(-count * (values - values.min()))
    posterior /= posterior.sum()
    mean = float(posterior @ grid)
    return float(np.sqrt(posterior @ (grid - mean) ** 2))


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
