"""What every part of label propagation shares: names, tags, small helpers."""

from __future__ import annotations

import numpy as np

from dinoprop.core import TAG_PREFIX, DinopropError

#: Tag of samples whose propagated label is below the review threshold.
NEEDS_REVIEW_TAG = TAG_PREFIX + "needs_review"

#: Name of the saved view listing samples to review, least confident first.
REVIEW_QUEUE_VIEW = "dinoprop review queue"

#: The run type recorded in the run config (``dataset.list_runs(type=...)``
#: lists runs of any type; this tells dinoprop's apart).
RUN_TYPE = "dinoprop_propagation"

#: Attributes of every propagated Classification: the most likely classes,
#: most likely first (the label itself, then the alternatives), and their
#: calibrated probabilities (rounded to 4 decimals).
TOP_LABELS_ATTRIBUTE = "dinoprop_top_labels"
TOP_CONFIDENCES_ATTRIBUTE = "dinoprop_top_confidences"

#: How many classes those attributes hold.
NUM_TOP_CLASSES = 4

#: A re-run leaves a stored label as it is when its class and alternatives
#: are unchanged and none of its confidences moved by more than this: the
#: run then reports (and thresholds) the stored confidence, so what is
#: stored and what the run says always agree. Adding seeds moves every
#: calibrated confidence a little (the Laplace shrink alone by about 1e-4
#: per 100 seeds at 1,000 seeds), which is no reason to rewrite millions
#: of labels.
CONFIDENCE_TOLERANCE = 1e-3

#: Precision that the recommended threshold aims for by default.
DEFAULT_TARGET_PRECISION = 0.95


def _fol():
    import fiftyone.core.labels as fol

    return fol


def _label_types():
    fol = _fol()
    return fol.Classification, fol.Detections


def _flatten(nested):
    """Flattens per-sample lists of per-label values (None lists skipped)."""
    return [v for values in nested for v in (values or [])]


def _is_seed(label, tags, seed_tag):
    """Whether a label (of a sample or a box) is a seed: labeled, and
    carrying ``seed_tag`` when one is required."""
    return label is not None and (seed_tag is None or seed_tag in (tags or []))


def _check_seeds(labels, has_embedding, what):
    """Raises unless the seeds have embeddings and at least two classes."""
    if len(labels) == 0:
        raise DinopropError(
            "No seeds: no %s. Annotate a few per class first "
            "(dinoprop.suggest_seeds tells you which)" % what
        )
    missing = int(np.sum(~has_embedding))
    if missing:
        raise DinopropError(
            "%d of the %d seeds have no embedding; run "
            "dinoprop.compute_embeddings on them first" % (missing, len(labels))
        )
    distinct = sorted(set(labels))
    if len(distinct) < 2:
        raise DinopropError(
            "All seeds have the same class (%s); label seeds of at least two "
            "classes" % distinct[0]
        )
