"""The queues a reviewer works through, and which sample comes next.

Two queues exist once labels were propagated or suggested:

- ``"review"``: the saved view ``"dinoprop review queue"``, the samples
  whose propagated label is below the review threshold and that still have
  no label, least confident first (:func:`dinoprop.propagate_labels`
  writes it);
- ``"suggested"``: the samples :func:`dinoprop.suggest_seeds` tagged
  ``dinoprop:annotate_next`` that still have no label, least confident
  first when labels were propagated.

Samples a reviewer skipped (tag ``dinoprop:skipped``) come after every
other sample of a queue.
"""

from __future__ import annotations

from typing import Any, Optional

from dinoprop.core import DinopropError
from dinoprop.label_states import SKIPPED_TAG
from dinoprop.propagation import NEEDS_REVIEW_TAG, REVIEW_QUEUE_VIEW
from dinoprop.seeds import ANNOTATE_NEXT_TAG

#: The queues :func:`queue_view` knows.
QUEUES = ("review", "suggested")


def review_queue_view(dataset: Any) -> Any:
    """Returns the review queue: the samples propagation marked for review.

    This is the saved view ``"dinoprop review queue"`` that
    :func:`dinoprop.propagate_labels` writes (least confident first); if it
    was deleted, the samples tagged ``dinoprop:needs_review``.

    Args:
        dataset: a FiftyOne dataset (or a view, whose dataset is used)

    Returns:
        a :class:`fiftyone.core.view.DatasetView`

    Raises:
        DinopropError: if no sample needs review, e.g. because labels were
            never propagated
    """
    dataset = dataset._root_dataset
    if dataset.has_saved_view(REVIEW_QUEUE_VIEW):
        return dataset.load_saved_view(REVIEW_QUEUE_VIEW)
    tagged = dataset.match_tags(NEEDS_REVIEW_TAG)
    if tagged.count() == 0:
        raise DinopropError(
            "Dataset '%s' has no review queue: no sample is tagged '%s'. Run "
            "propagate_labels first" % (dataset.name, NEEDS_REVIEW_TAG)
        )
    return tagged


def queue_view(
    dataset: Any,
    queue: str,
    label_field: str,
    output_field: Optional[str] = None,
) -> Any:
    """Returns a queue's samples that still need a human, in review order.

    Args:
        dataset: a FiftyOne dataset (or a view, whose dataset is used)
        queue: ``"review"`` or ``"suggested"`` (see the module docstring)
        label_field: the seed field; samples with a label there are done
        output_field: the propagated field, which orders the suggested
            queue least confident first; defaults to
            ``"<label_field>_propagated"`` when it exists

    Returns:
        a :class:`fiftyone.core.view.DatasetView` (possibly empty)

    Raises:
        DinopropError: for an unknown queue
    """
    from fiftyone import ViewField as F

    dataset = dataset._root_dataset
    if queue == "review":
        if dataset.has_saved_view(REVIEW_QUEUE_VIEW):
            view = dataset.load_saved_view(REVIEW_QUEUE_VIEW)
        else:
            view = dataset.match_tags(NEEDS_REVIEW_TAG)
    elif queue == "suggested":
        view = dataset.match_tags(ANNOTATE_NEXT_TAG)
        output_field = output_field or label_field + "_propagated"
        if dataset.get_field(output_field) is not None:
            view = view.sort_by(F(output_field + ".confidence"))
    else:
        raise DinopropError(
            "Unknown queue %r; choose one of %s" % (queue, ", ".join(QUEUES))
        )
    if dataset.get_field(label_field) is not None:
        view = view.exists(label_field, False)
    return view


def next_in_queue(
    dataset: Any,
    queue: str,
    label_field: str,
    current: Optional[str] = None,
    output_field: Optional[str] = None,
) -> Optional[str]:
    """The ID of the sample to review after ``current``, or None when done.

    Samples not skipped come first, in queue order; skipped ones after
    them. ``current`` itself is never returned.

    Args:
        dataset: a FiftyOne dataset
        queue: ``"review"`` or ``"suggested"``
        label_field: the seed field
        current: the sample shown now, if any
        output_field: see :func:`queue_view`

    Returns:
        a sample ID, or None when the queue holds no other sample
    """
    view = queue_view(dataset, queue, label_field, output_field)
    for part in (
        view.match_tags(SKIPPED_TAG, bool=False),
        view.match_tags(SKIPPED_TAG),
    ):
        for sample_id in part.limit(2).values("id"):
            if sample_id != current:
                return sample_id
    return None
