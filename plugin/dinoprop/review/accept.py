"""Accepting confident propagated labels, and undoing that.

After :func:`dinoprop.propagate_labels`, every sample has a propagated
:class:`fiftyone.core.labels.Classification` with a confidence. This module
turns the confident ones into labels of the seed field
(:func:`accept_propagated_labels`) and takes that back (:func:`undo_accept`).

Accepting never overwrites a human label: only samples whose label field is
empty receive one. Every accepted label carries the attributes
``dinoprop_accepted`` (the ID of the accept batch that wrote it) and
``dinoprop_accepted_label`` (the class it wrote), so an undo removes exactly
the labels a batch wrote and nothing a human made or corrected since, and
:func:`dinoprop.propagate_labels` does not take accepted labels for human
seeds.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from dinoprop.core import (
    TAG_PREFIX,
    DinopropError,
    check_field_name,
    validate_samples,
)
from dinoprop.label_states import (
    ACCEPTED_BATCH_ATTRIBUTE,
    ACCEPTED_LABEL_ATTRIBUTE,
    accepted_unedited_ids,
    is_unedited_accepted,
    label_attribute,
)

#: Tag of samples whose label was accepted from a propagated label.
ACCEPTED_TAG = TAG_PREFIX + "accepted"

#: Label attribute holding the accept batch that wrote an accepted label.
BATCH_ATTRIBUTE = ACCEPTED_BATCH_ATTRIBUTE


class AcceptResults:
    """What :func:`accept_propagated_labels` did.

    Attributes:
        batch: the ID of this accept batch (pass it to :func:`undo_accept`)
        label_field: the field that received the labels
        output_field: the propagated field the labels came from
        min_confidence: the confidence threshold used
        num_accepted: samples that received a label
        num_human_labeled: samples skipped because they have a human label
        num_previously_accepted: samples skipped because an earlier accept
            batch labeled them (and no human has changed that label)
        num_below_threshold: unlabeled samples whose propagated confidence is
            below the threshold (or missing)
        sample_ids: the IDs of the samples that received a label
    """

    def __init__(
        self,
        batch: str,
        label_field: str,
        output_field: str,
        min_confidence: float,
        num_human_labeled: int,
        num_below_threshold: int,
        sample_ids: list,
        num_previously_accepted: int = 0,
    ):
        self.batch = batch
        self.label_field = label_field
        self.output_field = output_field
        self.min_confidence = min_confidence
        self.num_human_labeled = num_human_labeled
        self.num_previously_accepted = num_previously_accepted
        self.num_below_threshold = num_below_threshold
        self.sample_ids = list(sample_ids)

    @property
    def num_accepted(self) -> int:
        """The number of samples that received a label."""
        return len(self.sample_ids)

    def summary(self) -> dict:
        """Returns the JSON-serialisable numbers an App result panel shows."""
        return {
            "batch": self.batch,
            "label_field": self.label_field,
            "output_field": self.output_field,
            "min_confidence": float(self.min_confidence),
            "num_accepted": self.num_accepted,
            "num_human_labeled": self.num_human_labeled,
            "num_previously_accepted": self.num_previously_accepted,
            "num_below_threshold": self.num_below_threshold,
        }

    def __repr__(self) -> str:
        return "AcceptResults(%s)" % self.summary()


def accept_propagated_labels(
    samples: Any,
    output_field: str,
    label_field: str,
    min_confidence: float = 0.0,
) -> AcceptResults:
    """Copies confident propagated labels into the label field.

    Only samples whose ``label_field`` is empty receive a label: human labels
    are never overwritten. Each accepted sample is tagged
    ``dinoprop:accepted`` and its new label records the batch that wrote it
    and the class it wrote (attributes ``dinoprop_accepted`` and
    ``dinoprop_accepted_label``), so :func:`undo_accept` can revert it.
    Accepted samples leave the review queue, which lists only samples
    without a label.

    Args:
        samples: a FiftyOne dataset or view
        output_field: the field holding propagated
            :class:`fiftyone.core.labels.Classification` labels, e.g.
            ``"label_propagated"``
        label_field: the human label field to fill, e.g. ``"label"``; it is
            created if missing and must otherwise hold ``Classification``
        min_confidence: the lowest propagated confidence accepted, in [0, 1]

    Returns:
        an :class:`AcceptResults`

    Raises:
        DinopropError: if the view is empty, a field is missing or has the
            wrong type, the two fields are the same, the threshold is out
            of range, or the propagation run writing ``output_field`` did
            not finish (it is running, or was interrupted); nothing is
            written then
    """
    from fiftyone import ViewField as F

    from dinoprop.propagation.runs import check_run_complete

    _check_fields(samples, output_field, label_field)
    min_confidence = _check_confidence(min_confidence)
    check_run_complete(samples, output_field)

    if samples.get_field(label_field) is None:
        unlabeled, num_labeled, num_machine = samples.exists(output_field), 0, 0
    else:
        unlabeled = samples.exists(label_field, False).exists(output_field)
        num_labeled = samples.exists(label_field).count()
        num_machine = len(accepted_unedited_ids(samples, label_field))
    confident = unlabeled.match(F(output_field + ".confidence") >= min_confidence)
    ids, labels, confidences = confident.values(
        ["id", output_field + ".label", output_field + ".confidence"]
    )
    num_unlabeled = unlabeled.count()
    batch = _new_batch_id()
    if ids:
        _write_accepted(samples._root_dataset, label_field, ids, labels, confidences, batch)
    return AcceptResults(
        batch=batch,
        label_field=label_field,
        output_field=output_field,
        min_confidence=min_confidence,
        num_human_labeled=num_labeled - num_machine,
        num_below_threshold=num_unlabeled - len(ids),
        sample_ids=ids,
        num_previously_accepted=num_machine,
    )


def undo_accept(
    samples: Any, label_field: str, batch: Optional[str] = None
) -> dict:
    """Reverts labels written by :func:`accept_propagated_labels`.

    Only labels that carry the accept marker and still hold the class that
    was accepted are removed. Labels a human wrote are left alone, and so
    are accepted labels a human has since corrected: those lose the accept
    marker and become human labels. The ``dinoprop:accepted`` tag is removed
    from both.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the label field the labels were accepted into
        batch: the accept batch to revert (``AcceptResults.batch``); None
            reverts every accepted label in ``samples``

    Returns:
        a dict with ``num_reverted``, ``num_kept_corrected`` (accepted
        labels kept because a human changed their class), ``label_field``
        and ``batch``

    Raises:
        DinopropError: if the view is empty or ``label_field`` is missing
    """
    from fiftyone import ViewField as F

    validate_samples(samples, require_images=False)
    if samples.get_field(label_field) is None:
        raise DinopropError(
            "Field '%s' does not exist on dataset '%s'; nothing to undo"
            % (label_field, samples._root_dataset.name)
        )
    marker = F("%s.%s" % (label_field, BATCH_ATTRIBUTE))
    condition = marker.exists() if batch is None else marker == batch
    ids, labels = samples.match(condition).values(["id", label_field])
    reverted, corrected = [], {}
    for sample_id, label in zip(ids, labels):
        if _is_unedited(label):
            reverted.append(sample_id)
        else:
            corrected[sample_id] = _without_accept_marker(label)
    if reverted:
        _bulk_set_labels(
            samples._root_dataset, ((sid, {label_field: None}) for sid in reverted),
            reverted, {"$pull": {"tags": ACCEPTED_TAG}},
        )
    if corrected:
        samples.set_values(label_field, corrected, key_field="id")
        samples.select(list(corrected)).untag_samples(ACCEPTED_TAG)
    return {
        "num_reverted": len(reverted),
        "num_kept_corrected": len(corrected),
        "label_field": label_field,
        "batch": batch,
    }


def _write_accepted(dataset, label_field, ids, labels, confidences, batch):
    """Writes the accepted labels, and tags their samples, in one bulk
    update per sample: the documents ``set_values`` of
    ``Classification(label, confidence, **markers)`` would write, and the
    ``dinoprop:accepted`` tag."""
    from dinoprop.label_writes import _declare, _document

    _declare(dataset, label_field, {})
    names = [BATCH_ATTRIBUTE, ACCEPTED_LABEL_ATTRIBUTE]
    _bulk_set_labels(
        dataset,
        (
            (sid, {label_field: _document(None, label, confidence, names, [batch, label])})
            for sid, label, confidence in zip(ids, labels, confidences)
        ),
        ids,
        {"$addToSet": {"tags": ACCEPTED_TAG}},
    )


def _bulk_set_labels(dataset, updates, ids, extra):
    """:func:`dinoprop.label_writes.bulk_set`, then the samples of ``ids``
    in memory are reloaded."""
    import fiftyone.core.sample as fos

    from dinoprop.label_writes import bulk_set

    bulk_set(dataset._sample_collection, updates, extra=extra)
    fos.Sample._reload_docs(dataset._sample_collection_name, sample_ids=ids)


def _is_unedited(label: Any) -> bool:
    """Whether an accepted label still holds the class that was accepted."""
    return is_unedited_accepted(
        label.label,
        label_attribute(label, BATCH_ATTRIBUTE),
        label_attribute(label, ACCEPTED_LABEL_ATTRIBUTE),
    )


def _without_accept_marker(label: Any) -> Any:
    """The label without the attributes that mark it as accepted."""
    for name in (BATCH_ATTRIBUTE, ACCEPTED_LABEL_ATTRIBUTE):
        if label.has_field(name):
            label.clear_field(name)
    return label


def accepted_batches(samples: Any, label_field: str) -> dict:
    """Returns ``{batch: number of labels}`` of accepted labels still present.

    Args:
        samples: a FiftyOne dataset or view
        label_field: the label field labels were accepted into
    """
    if samples.get_field(label_field) is None:
        return {}
    counts = samples.count_values("%s.%s" % (label_field, BATCH_ATTRIBUTE))
    return {k: v for k, v in counts.items() if k is not None}


def _check_fields(samples: Any, output_field: str, label_field: str) -> None:
    import fiftyone.core.labels as fol

    from dinoprop.core import require_label_field

    validate_samples(samples, require_images=False)
    if output_field == label_field:
        raise DinopropError(
            "The propagated field and the label field must differ; both are "
            "'%s'" % label_field
        )
    require_label_field(samples, output_field, (fol.Classification,))
    if samples.get_field(label_field) is not None:
        require_label_field(samples, label_field, (fol.Classification,))
    else:
        check_field_name(label_field, "label_field")


def _check_confidence(value: Any) -> float:
    """``value`` as a float in [0, 1], else a DinopropError."""
    try:
        confidence = float(value)
    except (TypeError, ValueError):
        confidence = float("nan")
    if not 0.0 <= confidence <= 1.0:
        raise DinopropError(
            "min_confidence must be a number between 0 and 1; found %r" % (value,)
        )
    return confidence


def _new_batch_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return "%s-%s" % (stamp, uuid.uuid4().hex[:6])
