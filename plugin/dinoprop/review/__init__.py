"""The human half of the loop: review, accept, label, confirm, undo.

After :func:`dinoprop.propagate_labels`, every sample has a propagated label
with a calibrated confidence. This package holds what a reviewer does with
them, one module per concern:

- :mod:`~dinoprop.review.accept`: copy confident propagated labels into the
  seed field (:func:`accept_propagated_labels`) and take that back
  (:func:`undo_accept`);
- :mod:`~dinoprop.review.queue`: the review queues and which sample comes
  next (:func:`review_queue_view`, :func:`queue_view`,
  :func:`next_in_queue`);
- :mod:`~dinoprop.review.triage`: human labels, confirmations, skips and
  their undo (:func:`label_samples`, :func:`confirm_label`,
  :func:`skip_sample`, :func:`undo_labeling`), written without ever
  overwriting a label someone else set meanwhile;
- :mod:`~dinoprop.review.loop`: the state of the whole loop and live
  re-propagation (:func:`loop_status`, :func:`repropagate`);
- :mod:`~dinoprop.review.labelstudio`: review in Label Studio
  (:func:`send_to_annotator`, :func:`load_from_annotator`), bringing back
  only what humans decided;
- :func:`enable_annotation` (in :mod:`dinoprop.label_schema`): the App's
  native Annotate tab for the seed field.

What each label state means is defined in :mod:`dinoprop.label_states`.
"""

from dinoprop.label_schema import enable_annotation
from dinoprop.label_states import ACCEPTED_BATCH_ATTRIBUTE as BATCH_ATTRIBUTE
from dinoprop.label_states import SKIPPED_TAG
from dinoprop.review.accept import (
    ACCEPTED_TAG,
    AcceptResults,
    accept_propagated_labels,
    accepted_batches,
    undo_accept,
)
from dinoprop.review.labelstudio import (
    LoadResults,
    SendResults,
    annotator_runs,
    load_from_annotator,
    send_to_annotator,
)
from dinoprop.review.loop import (
    LoopStatus,
    loop_status,
    repropagate,
    repropagate_if_due,
    threshold_preview,
)
from dinoprop.review.queue import (
    QUEUES,
    next_in_queue,
    queue_view,
    review_queue_view,
)
from dinoprop.review.triage import (
    LabelConflictError,
    LabelingResults,
    confirm_label,
    label_samples,
    label_version,
    labeling_batches,
    sample_triage,
    skip_sample,
    undo_labeling,
)
from dinoprop.propagation import NEEDS_REVIEW_TAG, REVIEW_QUEUE_VIEW

__all__ = [
    "ACCEPTED_TAG",
    "BATCH_ATTRIBUTE",
    "NEEDS_REVIEW_TAG",
    "QUEUES",
    "REVIEW_QUEUE_VIEW",
    "SKIPPED_TAG",
    "AcceptResults",
    "LabelConflictError",
    "LabelingResults",
    "LoadResults",
    "LoopStatus",
    "SendResults",
    "accept_propagated_labels",
    "accepted_batches",
    "annotator_runs",
    "confirm_label",
    "enable_annotation",
    "label_samples",
    "label_version",
    "labeling_batches",
    "load_from_annotator",
    "loop_status",
    "next_in_queue",
    "queue_view",
    "repropagate",
    "repropagate_if_due",
    "review_queue_view",
    "sample_triage",
    "send_to_annotator",
    "skip_sample",
    "threshold_preview",
    "undo_accept",
    "undo_labeling",
]
