"""Feature and score helpers every propagation method shares."""

from __future__ import annotations

import numpy as np

from dinoprop.core import row_norms


_EPS = 1e-12


def center_and_normalize(embeddings: np.ndarray, copy: bool = True) -> np.ndarray:
    """Mean-centres the rows of ``embeddings`` and scales them to unit norm.

    Centring removes the direction all features share (large for networks
    whose features are post-ReLU averages), so cosine similarity reflects
    what distinguishes samples. One ``N x D`` float32 array is allocated
    (none with ``copy=False``), no temporaries of that size.

    Args:
        embeddings: an ``N x D`` array
        copy: False centres and scales a float32 ``embeddings`` in place,
            for callers that no longer need the raw vectors (at 1M 384-d
            rows the copy is 1.5 GB)

    Returns:
        the ``N x D`` float32 unit rows
    """
    if copy:
        x = np.array(embeddings, dtype=np.float32)
    else:
        x = np.asarray(embeddings, dtype=np.float32)
    x -= x.mean(axis=0, keepdims=True)
    _normalize_rows_in_place(x)
    return x


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Returns the ``len(labels) x num_classes`` float32 one-hot matrix."""
    out = np.zeros((len(labels), num_classes), np.float32)
    out[np.arange(len(labels)), labels] = 1.0
    return out


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


def _normalize_rows_in_place(x: np.ndarray) -> None:
    """Scales the rows of ``x`` to unit L2 norm without a copy of ``x``."""
    norms = row_norms(x)
    np.maximum(norms, 1e-12, out=norms)
    x /= norms[:, None]
