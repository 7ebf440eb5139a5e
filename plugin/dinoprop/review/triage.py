"""Human labels from the loop: set, confirm, skip, undo, and what to show.

Every write here is a human decision and goes into the seed field as a
seed (see :mod:`dinoprop.label_states`):

- :func:`label_samples` sets one class on many samples (the App's
  ``label_selected_samples`` operator, the triage panel's buttons);
- :func:`confirm_label` says "yes" to the machine's label of a sample;
- :func:`skip_sample` sends a sample to the end of the queues;
- :func:`undo_labeling` restores what a labeling batch replaced.

Two people may triage one dataset at once. A write never replaces a label
it did not see: each sample is updated only if its seed label is still the
one that was read (or, with ``expected``, the one the reviewer saw), in one
atomic database update per sample, and a sample that changed meanwhile is
reported as a conflict instead of being overwritten. FiftyOne's App does the
same for its own edits (its ETag), so a label set in the Annotate tab and one
set here never silently undo each other.

What a batch replaced is kept in the dataset's execution store
(``dinoprop_labeling``), so :func:`undo_labeling` can put it back; undo
leaves alone any sample whose label changed again since.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timezone
from typing import Any, Optional

from dinoprop.core import DinopropError, dataset_store, validate_samples
from dinoprop.label_states import (
    ACCEPTED,
    CONFIRMED_ATTRIBUTE,
    SEED_STATES,
    SKIPPED_TAG,
    state_of,
)

logger = logging.getLogger(__name__)

#: The execution store holding what each labeling batch replaced.
LABELING_STORE = "dinoprop_labeling"

#: The number of alternative classes the triage panel offers.
NUM_ALTERNATIVES = 3

_ROWS_PER_KEY = 5_000  # undo rows per store entry (an entry is one document)


class LabelConflictError(DinopropError):
    """Raised when a sample's label changed after the reviewer saw it."""


class LabelingResults:
    """What :func:`label_samples` (or :func:`confirm_label`) wrote.

    Attributes:
        batch: the batch ID (pass it to :func:`undo_labeling`)
        label_field: the seed field
        label: the class written
        confirmed: whether the labels are confirmations
        sample_ids: the samples that received the label
        conflicts: ``{sample_id: class now}`` of samples left alone because
            their label changed while the batch was written
    """

    def __init__(self, batch, label_field, label, confirmed, sample_ids, conflicts):
        self.batch = batch
        self.label_field = label_field
        self.label = label
        self.confirmed = confirmed
        self.sample_ids = list(sample_ids)
        self.conflicts = dict(conflicts)

    def summary(self) -> dict:
        """Returns the JSON-serialisable numbers an App result panel shows."""
        return {
            "batch": self.batch,
            "label_field": self.label_field,
            "label": self.label,
            "confirmed": self.confirmed,
            "num_labeled": len(self.sample_ids),
            "num_conflicts": len(self.conflicts),
        }

    def __repr__(self) -> str:
        return "LabelingResults(%s)" % self.summary()


def label_version(label: Any) -> str:
    """A token naming the content of a seed label, for ``expected=``.

    Two reads give the same token exactly when the sample holds the same
    label object with the same class (or no label both times).

    Args:
        label: a :class:`fiftyone.core.labels.Classification`, or None
    """
    if label is None:
        return ""
    return "%s:%s" % (label.id, label.label)


def label_samples(
    samples: Any,
    label_field: str,
    label: str,
    confirmed: bool = False,
    expected: Optional[dict] = None,
    output_field: Optional[str] = None,
) -> LabelingResults:
    """Gives every sample of ``samples`` the human label ``label``.

    The label is a seed from then on (a confirmed one with
    ``confirmed=True``); it replaces whatever the seed field held, which the
    batch remembers for :func:`undo_labeling`. A class the task does not
    have yet is added to the field's label schema (and
    ``dataset.classes``). Skipped samples lose their ``dinoprop:skipped``
    tag.

    Args:
        samples: a FiftyOne dataset or view, e.g. the selected samples
        label_field: the seed field (created if missing)
        label: the class
        confirmed: whether a human confirmed the machine's label (stored
            as the label's ``dinoprop_confirmed`` attribute)
        expected: ``{sample_id: label_version(label seen)}``: refuse, with
            :class:`LabelConflictError`, if any of these samples holds
            another label now (what a reviewer saw is out of date)
        output_field: the propagated field (for the label schema)

    Returns:
        a :class:`LabelingResults`

    Raises:
        DinopropError: for an empty view, an empty class, or a field that
            does not hold Classification labels
        LabelConflictError: see ``expected``; nothing is written then
    """
    import fiftyone.core.labels as fol
    import fiftyone.core.sample as fos
    from bson import ObjectId

    from dinoprop.label_schema import try_enable_annotation
    from dinoprop.label_writes import bulk_set, utc_now

    validate_samples(samples, require_images=False)
    if not isinstance(label, str) or not label.strip():
        raise DinopropError("The class must be a non-empty string; got %r" % (label,))
    label = label.strip()
    dataset = samples._root_dataset
    if label not in (dataset.classes.get(label_field) or []):
        try_enable_annotation(dataset, label_field, classes=[label], output_field=output_field)
    ids, current = samples.values(["id", label_field])
    if expected:
        _check_expected(dict(zip(ids, current)), expected)
    now = utc_now()
    extra = {CONFIRMED_ATTRIBUTE: label} if confirmed else {}
    written, updates = {}, []
    for sample_id, old in zip(ids, current):
        doc = fol.Classification(label=label, **extra).to_mongo()
        written[sample_id] = (str(doc["_id"]), old)
        updates.append((
            dict(_unchanged(label_field, old), _id=ObjectId(sample_id)),
            {label_field: doc},
        ))
    if updates:
        bulk_set(
            dataset._sample_collection, updates,
            extra={"$pull": {"tags": SKIPPED_TAG}}, now=now,
        )
        fos.Sample._reload_docs(dataset._sample_collection_name, sample_ids=ids)
    conflicts = _not_written(dataset, label_field, written)
    for sample_id in conflicts:
        written.pop(sample_id)
    if conflicts:
        logger.warning(
            "%d samples changed while they were being labeled and were left "
            "as they are", len(conflicts)
        )
    batch = _new_batch_id()
    _save_batch(dataset, batch, label_field, label, written, now)
    return LabelingResults(batch, label_field, label, confirmed, list(written), conflicts)


def confirm_label(
    samples: Any,
    sample_id: str,
    label_field: str,
    output_field: Optional[str] = None,
    expected: Optional[str] = None,
) -> LabelingResults:
    """Records that a human agrees with the machine's label of one sample.

    The class confirmed is the sample's accepted label if it has one, else
    its propagated label (:func:`sample_triage`'s ``suggestion``). The
    seed field then holds it as a confirmed label, a seed (see
    :mod:`dinoprop.label_states`).

    Args:
        samples: a FiftyOne dataset or view holding the sample
        sample_id: the sample
        label_field: the seed field
        output_field: the propagated field; defaults to
            ``"<label_field>_propagated"``
        expected: the :func:`label_version` of the seed label the reviewer
            saw; a conflict raises :class:`LabelConflictError`

    Returns:
        a :class:`LabelingResults`

    Raises:
        DinopropError: if the sample has no machine label to confirm
        LabelConflictError: see ``expected``
    """
    label = sample_triage(samples, sample_id, label_field, output_field)["suggestion"]
    if label is None:
        raise DinopropError(
            "Sample %s has no machine label to confirm (none, or a human "
            "already decided); choose its class instead" % sample_id
        )
    return label_samples(
        samples.select(sample_id),
        label_field,
        label,
        confirmed=True,
        expected=None if expected is None else {sample_id: expected},
        output_field=output_field,
    )


def skip_sample(samples: Any, sample_id: str) -> None:
    """Sends a sample to the end of the review queues (tag ``dinoprop:skipped``).

    Args:
        samples: a FiftyOne dataset or view holding the sample
        sample_id: the sample
    """
    samples.select(sample_id).tag_samples(SKIPPED_TAG)


def undo_labeling(samples: Any, batch: Optional[str] = None) -> dict:
    """Restores what a labeling batch replaced.

    Each sample of the batch gets back the seed label it had before, unless
    its label changed again since (then it is kept and counted).

    Args:
        samples: a FiftyOne dataset or view (its dataset is used)
        batch: a :attr:`LabelingResults.batch`; None undoes the newest batch

    Returns:
        a dict with ``batch``, ``num_restored`` and ``num_kept_changed``

    Raises:
        DinopropError: if there is no such batch
    """
    import fiftyone.core.labels as fol
    import fiftyone.core.sample as fos
    from bson import ObjectId

    from dinoprop.label_writes import bulk_set

    dataset = samples._root_dataset
    store = dataset_store(dataset, LABELING_STORE)
    if batch is None:
        batch = next((b["batch"] for b in labeling_batches(dataset)), None)
    header = store.get(batch) if batch else None
    if header is None:
        raise DinopropError("No labeling batch %r to undo on dataset '%s'" % (batch, dataset.name))
    label_field = header["label_field"]
    updates, ids = [], []
    for part in range(header["num_parts"]):
        for sample_id, written_id, previous in store.get("%s/%d" % (batch, part)) or []:
            value = None if previous is None else fol.Classification.from_dict(previous).to_mongo()
            ids.append(sample_id)
            updates.append((
                {"_id": ObjectId(sample_id), label_field + "._id": ObjectId(written_id)},
                {label_field: value},
            ))
    restored = 0
    if updates:
        restored = bulk_set(dataset._sample_collection, updates)
        fos.Sample._reload_docs(dataset._sample_collection_name, sample_ids=ids)
    for part in range(header["num_parts"]):
        store.delete("%s/%d" % (batch, part))
    store.delete(batch)
    return {"batch": batch, "num_restored": restored, "num_kept_changed": len(updates) - restored}


def labeling_batches(samples: Any) -> list:
    """The labeling batches that can be undone, newest first.

    Returns:
        a list of dicts with ``batch``, ``label_field``, ``label``,
        ``num_labeled`` and ``created_at`` (ISO 8601)
    """
    store = dataset_store(samples._root_dataset, LABELING_STORE)
    headers = [
        dict(store.get(key), batch=key) for key in store.list_keys() if "/" not in key
    ]
    return sorted(headers, key=lambda h: h["created_at"], reverse=True)


def sample_triage(
    samples: Any,
    sample_id: str,
    label_field: str,
    output_field: Optional[str] = None,
) -> dict:
    """What the triage panel shows for one sample.

    Args:
        samples: a FiftyOne dataset or view holding the sample
        sample_id: the sample
        label_field: the seed field
        output_field: the propagated field; defaults to
            ``"<label_field>_propagated"``

    Returns:
        a dict with ``sample_id``, ``state`` (see
        :mod:`dinoprop.label_states`), ``label`` (the seed field's class or
        None), ``version`` (its :func:`label_version`), ``propagated`` and
        ``confidence`` (the propagated label, or None), ``suggestion`` and
        ``suggestion_confidence`` (the machine's class a human can confirm:
        the accepted label, else the propagated one; None once a human
        decided), ``alternatives`` (up to :data:`NUM_ALTERNATIVES`
        ``[class, probability]`` pairs of the next most likely classes, as
        :func:`dinoprop.propagate_labels` stored them), ``classes`` (every
        class of the task) and ``tags``

    Raises:
        DinopropError: if the sample is not in ``samples``, or a field
            holds another label type than Classification
    """
    from dinoprop.label_schema import known_classes

    output_field = output_field or label_field + "_propagated"
    _require_classifications(samples, label_field, output_field)
    view = samples.select(sample_id)
    if view.count() == 0:
        raise DinopropError("Sample %s is not in this dataset or view" % sample_id)
    sample = view.first()
    seed = sample[label_field] if sample.has_field(label_field) else None
    propagated = sample[output_field] if sample.has_field(output_field) else None
    state = state_of(seed, propagated)
    ranked = _ranked(propagated)
    suggestion = None
    if state == ACCEPTED:
        suggestion = seed.label
    elif state not in SEED_STATES and propagated is not None:
        suggestion = propagated.label
    current = seed.label if seed is not None else None
    return {
        "sample_id": sample_id,
        "state": state,
        "label": current,
        "version": label_version(seed),
        "propagated": None if propagated is None else propagated.label,
        "confidence": None if propagated is None else propagated.confidence,
        "suggestion": suggestion,
        "suggestion_confidence": dict(map(tuple, ranked)).get(suggestion),
        "alternatives": [
            r for r in ranked if r[0] not in (suggestion, current)
        ][:NUM_ALTERNATIVES],
        "classes": known_classes(samples._root_dataset, label_field),
        "tags": list(sample.tags),
    }


def _require_classifications(samples, *fields):
    """Raises unless each existing field holds Classification labels."""
    import fiftyone.core.labels as fol

    from dinoprop.core import require_label_field

    for field in fields:
        if samples.get_field(field) is not None:
            require_label_field(samples, field, (fol.Classification,))


def _ranked(propagated):
    """``[class, probability]`` pairs, most likely first, of a propagated label."""
    from dinoprop.propagation import TOP_CONFIDENCES_ATTRIBUTE, TOP_LABELS_ATTRIBUTE

    if propagated is None:
        return []
    if propagated.has_field(TOP_LABELS_ATTRIBUTE) and propagated[TOP_LABELS_ATTRIBUTE]:
        return [
            [str(c), float(p)]
            for c, p in zip(
                propagated[TOP_LABELS_ATTRIBUTE], propagated[TOP_CONFIDENCES_ATTRIBUTE]
            )
        ]
    return [[propagated.label, propagated.confidence]]


def _check_expected(current, expected):
    for sample_id, version in expected.items():
        now = label_version(current.get(sample_id))
        if now != version:
            found = current.get(sample_id)
            raise LabelConflictError(
                "Sample %s was changed by someone else since you opened it: "
                "it now holds %s. Nothing was written; look again and choose"
                % (sample_id, "no label" if found is None else "'%s'" % found.label)
            )


def _unchanged(label_field, old):
    """The filter matching a sample whose seed label is still ``old``."""
    if old is None:
        return {label_field: None}
    from bson import ObjectId

    return {label_field + "._id": ObjectId(old.id), label_field + ".label": old.label}


def _not_written(dataset, label_field, written):
    """``{sample_id: class now}`` of samples that did not get their label."""
    if not written:
        return {}
    rows = zip(*dataset.select(list(written)).values(
        ["id", label_field + "._id", label_field + ".label"]
    ))
    return {
        sid: label for sid, label_id, label in rows if str(label_id) != written[sid][0]
    }


def _save_batch(dataset, batch, label_field, label, written, now):
    if not written:
        return
    store = dataset_store(dataset, LABELING_STORE)
    rows = [
        [sid, new_id, None if old is None else old.to_dict()]
        for sid, (new_id, old) in written.items()
    ]
    parts = range(0, len(rows), _ROWS_PER_KEY)
    for number, start in enumerate(parts):
        store.set("%s/%d" % (batch, number), rows[start : start + _ROWS_PER_KEY])
    store.set(
        batch,
        {
            "label_field": label_field,
            "label": label,
            "num_labeled": len(rows),
            "num_parts": len(parts),
            "created_at": now.isoformat(),
        },
    )


def _new_batch_id() -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    return "%s-%s" % (stamp, uuid.uuid4().hex[:6])
