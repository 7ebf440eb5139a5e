"""The propagated Classifications stored in a field, as columns, kept
in memory between runs and checked against the database.

A re-run of :func:`dinoprop.propagate_labels` compares every new label
with the stored one, keeping those that barely moved. Reading 1M stored
labels costs about 7 s here, however it is done (measured side by side:
2.2 s for mongod to send them, 2.2 s to decode the BSON, the rest to pick
the values out; pymongoarrow took 6.5 s). The labels a run writes are
what the next run reads, so :func:`remember_written` keeps the columns
after each write, and :func:`read_stored_labels` then asks the database
only which samples changed since: FiftyOne indexes ``last_modified_at``
and sets it on every write it makes (the App's edits, ``set_values``,
``save()``, tagging, clearing, deleting or renaming fields), as dinoprop's
own writes do. Those samples are read again; everything else is as
remembered. The columns are only reused for the same view and field,
through views that filter samples but never change their fields or
order (:data:`_FILTERING_STAGES`); samples deleted, or that entered or
left the view, make it a full read again.

What a check trusts: a sample whose ``last_modified_at`` is the moment a
run wrote holds what that run wrote (another writer would have to stamp
the same millisecond), and the clocks of the processes writing the
dataset agree to within :data:`CLOCK_MARGIN`. A write that bypasses
FiftyOne and leaves ``last_modified_at`` alone is not seen;
:func:`forget_stored_labels` drops what is remembered.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from datetime import datetime, timedelta
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from dinoprop.bulk_reads import gc_paused, raw_batches

#: How far back a check looks beyond the moment the columns were read: a
#: write stamped just before then may reach the database just after.
CLOCK_MARGIN = timedelta(seconds=1)

#: The label ID of a row without a label (no ObjectId is all zeros).
NO_ID = bytes(12)

#: Fields whose columns are kept at once (about 170 MB per 1M samples).
REMEMBERED_FIELDS = 4

#: Re-read everything when more than this share of the samples changed.
MAX_CHANGED_SHARE = 0.25

#: View stages that choose samples by their own fields (or IDs) without
#: changing them, and keep the collection's order: the columns of a view
#: made only of these can be kept (a sample enters or leaves it only when
#: it is modified; not so with ``limit``, ``skip``, ``take`` or sorting).
_FILTERING_STAGES = {
    "Exclude", "ExcludeBy", "Exists", "Match", "MatchLabels", "MatchTags",
    "Select", "SelectBy",
}


@dataclass
class StoredLabels:
    """The Classifications stored in a field, one row per sample, in the
    collection's order.

    Attributes:
        sample_ids: the sample IDs (``U24``)
        label_ids: the label IDs' 12 bytes (``V12``; zeros where none)
        classes: the class names the codes below index
        label: each label's class code (-1: no label)
        confidence: its confidence (NaN where none)
        top_labels: ``N x width`` codes of its ranked alternatives
        top_confidences: their probabilities
        comparable: whether the row is one a propagation wrote: a
            confidence and ``width`` alternatives led by its label (the two
            arrays above are only meaningful there)
    """

    sample_ids: np.ndarray
    label_ids: np.ndarray
    classes: list
    label: np.ndarray
    confidence: np.ndarray
    top_labels: np.ndarray
    top_confidences: np.ndarray
    comparable: np.ndarray
    _index: Any = dataclass_field(default=None, init=False, repr=False, compare=False)

    @property
    def width(self) -> int:
        """The number of ranked alternatives per label."""
        return self.top_labels.shape[1]

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """The row of each sample ID (-1 where it has none)."""
        ids = np.asarray(ids).astype("U24")
        if np.array_equal(ids, self.sample_ids):
            return np.arange(len(ids))
        if self._index is None:
            import pandas as pd

            self._index = pd.Index(self.sample_ids)
        return self._index.get_indexer(ids)

    def codes(self, names: Iterable[str]) -> np.ndarray:
        """The class codes of ``names``, new classes appended."""
        index = {name: code for code, name in enumerate(self.classes)}
        codes = []
        for name in names:
            if name not in index:
                index[name] = len(self.classes)
                self.classes.append(name)
            codes.append(index[name])
        return np.asarray(codes, np.int32)

    def assign(self, rows: np.ndarray, other: "StoredLabels") -> None:
        """Sets ``rows`` to the rows of ``other`` (the same width)."""
        translate = self.codes(other.classes)
        translate = np.append(translate, -1)  # code -1 stays -1
        self.label_ids[rows] = other.label_ids
        self.label[rows] = translate[other.label]
        self.confidence[rows] = other.confidence
        self.top_labels[rows] = translate[other.top_labels]
        self.top_confidences[rows] = other.top_confidences
        self.comparable[rows] = other.comparable

    def clear(self, rows: np.ndarray) -> None:
        """Marks ``rows`` as holding no label."""
        self.label_ids[rows] = NO_ID
        self.label[rows] = -1
        self.confidence[rows] = np.nan
        self.top_labels[rows] = -1
        self.top_confidences[rows] = np.nan
        self.comparable[rows] = False


def read_stored_labels(
    samples: Any, field: str, width: int, attributes: Sequence[str]
) -> StoredLabels:
    """The Classifications stored in ``field`` of every sample of
    ``samples``: the columns remembered from the last run on the same view
    and field, with the samples modified since read again, or everything
    read afresh.

    Args:
        samples: a FiftyOne dataset or view
        field: a top-level Classification field
        width: how many ranked alternatives a comparable label has
        attributes: the names of the label's attributes holding its
            ranked class names and their probabilities, in that order

    Returns:
        a :class:`StoredLabels` (a row per sample, without labels where
        the field is missing)
    """
    key = _key(samples, field, width, attributes)
    remembered = _REMEMBERED.pop(key, None) if key else None
    checked_at = _now() - CLOCK_MARGIN
    stored = remembered and _refreshed(samples, field, attributes, remembered)
    if stored is None:
        stored = _read(samples, field, width, attributes)
    if key:  # samples stamped by the last run's write still hold what it wrote
        written_at = remembered.written_at if remembered and stored is remembered.stored else None
        _REMEMBERED[key] = _Remembered(stored, checked_at, written_at)
        while len(_REMEMBERED) > REMEMBERED_FIELDS:
            _REMEMBERED.popitem(last=False)
    return stored


def remember_written(
    stored: StoredLabels,
    written: StoredLabels,
    written_rows: np.ndarray,
    cleared_rows: np.ndarray,
    written_at: datetime,
) -> None:
    """Records in the columns :func:`read_stored_labels` returned what a
    run then wrote, every sample it wrote stamped
    ``last_modified_at=written_at`` (nothing happens if the columns are not
    kept).

    Args:
        stored: what :func:`read_stored_labels` returned (updated in place)
        written: the labels written, as columns of their own
            (:func:`columns_of`)
        written_rows: their rows in ``stored``
        cleared_rows: the rows whose label was removed
        written_at: the ``last_modified_at`` of every sample written
    """
    entry = next((e for e in _REMEMBERED.values() if e.stored is stored), None)
    if entry is None:
        return
    stored.assign(written_rows, written)
    stored.clear(cleared_rows)
    entry.written_at = written_at


def forget_stored_labels() -> None:
    """Drops every remembered column: the next read is a full one."""
    _REMEMBERED.clear()


def columns_of(
    classes: Sequence[str],
    top: np.ndarray,
    top_confidences: np.ndarray,
    confidence: np.ndarray,
    label_ids: np.ndarray,
) -> StoredLabels:
    """Labels about to be written, as :class:`StoredLabels` rows (placed by
    row: no sample IDs).

    Args:
        classes: the class names
        top: ``N x width`` indices into ``classes`` of each label's ranked
            alternatives, its own class first
        top_confidences: their probabilities
        confidence: each label's confidence
        label_ids: each label's ID (``V12``: its 12 bytes)
    """
    return StoredLabels(
        sample_ids=np.array([], "U24"),
        label_ids=np.asarray(label_ids, "V12"),
        classes=list(classes),
        label=np.asarray(top[:, 0], np.int32),
        confidence=np.asarray(confidence, np.float64),
        top_labels=np.asarray(top, np.int32),
        top_confidences=np.asarray(top_confidences, np.float64),
        comparable=np.ones(len(top), bool),
    )


@dataclass
class _Remembered:
    stored: StoredLabels
    #: every change since, but those stamped ``written_at``, is one the
    #: columns do not hold
    since: datetime
    written_at: Optional[datetime]


_REMEMBERED: "OrderedDict[tuple, _Remembered]" = OrderedDict()


def _now() -> datetime:
    from dinoprop.label_writes import utc_now

    return utc_now()


def _key(samples, field, width, attributes) -> Optional[tuple]:
    """What identifies the columns of this view's field, or None when the
    view changes fields (its columns are not kept)."""
    stages = getattr(samples, "_stages", [])
    if any(type(stage).__name__ not in _FILTERING_STAGES for stage in stages):
        return None
    import json

    view = json.dumps([s._serialize() for s in stages], sort_keys=True, default=str)
    return (samples._dataset._sample_collection_name, field, view, width, tuple(attributes))


def _refreshed(samples, field, attributes, remembered) -> Optional[StoredLabels]:
    """The remembered columns with the samples changed since read again,
    or None when too much changed, or samples came into the view or left
    it (a count of the view tells deletions)."""
    stored = remembered.stored
    when = {"$gte": remembered.since}
    if remembered.written_at is not None:
        when["$ne"] = remembered.written_at
    collection = samples._dataset._sample_collection
    changed = [doc["_id"] for doc in collection.find({"last_modified_at": when}, {"_id": 1})]
    if len(changed) > MAX_CHANGED_SHARE * max(len(stored.sample_ids), 1):
        return None
    if not changed:
        return stored if samples.count() == len(stored.sample_ids) else None
    fresh = _read(samples, field, stored.width, attributes, {"_id": {"$in": changed}})
    rows = stored.rows(fresh.sample_ids)
    if (rows < 0).any():
        return None
    left = stored.rows(_hex_ids(changed))
    if np.setdiff1d(left[left >= 0], rows).size or samples.count() != len(stored.sample_ids):
        return None  # samples left the view, or were deleted
    stored.assign(rows, fresh)
    return stored


@gc_paused()
def _read(samples, field, width, attributes, match=None) -> StoredLabels:
    """Reads the columns of every sample of ``samples`` (those matching
    ``match`` only, if given)."""
    import bson

    keys = ["_id", "label", "confidence", *attributes]
    paths = ["_id"] + [field + "." + key for key in keys]
    docs = []
    for batch in raw_batches(samples, paths, match):
        docs.extend(bson.decode_all(batch))
    return _columns(docs, field, width, attributes)


def _columns(docs, field, width, attributes) -> StoredLabels:
    """The columns of decoded sample documents."""
    top_key, confidences_key = attributes
    num = len(docs)
    stored = StoredLabels(
        sample_ids=_hex_ids(doc["_id"] for doc in docs),
        label_ids=np.full(num, NO_ID, "V12"),
        classes=[],
        label=np.full(num, -1, np.int32),
        confidence=np.full(num, np.nan),
        top_labels=np.full((num, width), -1, np.int32),
        top_confidences=np.full((num, width), np.nan),
        comparable=np.zeros(num, bool),
    )
    found = [_label_of(doc.get(field)) for doc in docs]
    rows = [row for row, label in enumerate(found) if label is not None]
    if not rows:
        return stored
    labels = [found[row] for row in rows]
    stored.label_ids[rows] = np.frombuffer(
        b"".join(_binary(label.get("_id")) for label in labels), "V12"
    )
    stored.label[rows] = stored.codes(label["label"] for label in labels)
    stored.confidence[rows] = [_number(label.get("confidence")) for label in labels]
    ok = [i for i, label in enumerate(labels) if _comparable(label, width, top_key, confidences_key)]
    if ok:
        picked = [labels[i] for i in ok]
        at = np.asarray(rows)[ok]
        stored.top_labels[at] = stored.codes(
            name for label in picked for name in label[top_key]
        ).reshape(len(ok), width)
        stored.top_confidences[at] = [label[confidences_key] for label in picked]
        stored.comparable[at] = True
    return stored


def _hex_ids(object_ids) -> np.ndarray:
    """ObjectIds as their ``U24`` hex strings, converted in one pass."""
    raw = b"".join(oid.binary for oid in object_ids)
    return np.frombuffer(raw.hex().encode(), "S24").astype("U24")


def _label_of(value):
    return value if isinstance(value, dict) and isinstance(value.get("label"), str) else None


def _binary(label_id) -> bytes:
    from bson import ObjectId

    return label_id.binary if isinstance(label_id, ObjectId) else NO_ID


def _number(value) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _comparable(label, width, top_key, confidences_key) -> bool:
    """Whether a stored label is one a propagation wrote: a confidence, and
    ``width`` alternatives led by its label, with their probabilities."""
    names, confidences = label.get(top_key), label.get(confidences_key)
    return (
        isinstance(label.get("confidence"), float)
        and isinstance(names, list) and len(names) == width and names[0] == label["label"]
        and all(isinstance(name, str) for name in names)
        and isinstance(confidences, list) and len(confidences) == width
        and all(isinstance(c, float) for c in confidences)
    )
