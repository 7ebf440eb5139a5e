"""Writing many Classification labels fast, and only those that changed.

FiftyOne's ``set_values`` builds one label object per sample and validates
it, which at 10k+ samples costs more than the propagation itself. The
writer here builds the documents FiftyOne itself stores (``_id``, ``_cls``,
``tags``, ``label``, ``confidence`` and attributes, the same serialisation
as ``Classification.to_mongo()``), declares the field and its attributes in
the dataset's schema first, and sends unordered bulk updates that also set
``last_modified_at``, as FiftyOne does. A label whose class, confidence and
attributes are unchanged is not written at all, so repeating a run with the
same seeds writes nothing, and a rewritten label keeps its ID.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Optional

import numpy as np


def write_classifications(
    samples: Any,
    field: str,
    ids: Iterable[str],
    labels: Iterable[str],
    confidences: Iterable[float],
    attributes: dict,
    clear_ids: Iterable[str] = (),
    vectors: Optional[dict] = None,
) -> dict:
    """Writes ``Classification(label, confidence, **attributes)`` per sample.

    Args:
        samples: the FiftyOne collection the samples belong to
        field: a top-level Classification field (declared if missing)
        ids: the sample IDs to write
        labels: their classes
        confidences: their confidences
        attributes: ``{name: per-sample values}``, each value a list of
            strings or of floats (declared as list fields)
        clear_ids: samples whose ``field`` is set to None
        vectors: ``{name: per-sample 1-D arrays}`` stored as FiftyOne
            vector attributes (e.g. ``logits``); labels are then always
            rewritten

    Returns:
        a dict with ``num_written`` (labels written or rewritten),
        ``num_flipped`` (samples whose class changed from an earlier label)
        and ``num_cleared``
    """
    import fiftyone.core.sample as fos
    import fiftyone.core.utils as fou
    from bson import ObjectId
    from pymongo import UpdateOne

    dataset = samples._root_dataset
    ids = [str(i) for i in ids]
    names = sorted(attributes)
    _declare(dataset, field, {n: attributes[n] for n in names})
    rows = zip(
        ids,
        labels,
        (float(c) for c in confidences),
        *(_plain(attributes[n]) for n in names),
    )
    vectors = vectors or {}
    blobs = [
        {n: fou.serialize_numpy_array(np.asarray(v[i])) for n, v in vectors.items()}
        for i in range(len(ids) if vectors else 0)
    ]
    old = _current(samples, field, names)
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # FiftyOne: naive UTC
    ops, flipped = [], 0
    for row, (sample_id, label, confidence, *values) in enumerate(rows):
        label_id, *before = old.get(sample_id, (None,))
        if tuple(before) == (label, confidence, *values) and not vectors:
            continue
        flipped += bool(before) and before[0] != label
        doc = _document(label_id, label, confidence, names, values)
        doc.update(blobs[row] if vectors else {})
        ops.append(
            UpdateOne(
                {"_id": ObjectId(sample_id)},
                {"$set": {field: doc, "last_modified_at": now}},
            )
        )
    cleared = [sid for sid in clear_ids if str(sid) in old]
    ops += [
        UpdateOne(
            {"_id": ObjectId(sid)}, {"$set": {field: None, "last_modified_at": now}}
        )
        for sid in cleared
    ]
    if ops:
        dataset._sample_collection.bulk_write(ops, ordered=False)
        fos.Sample._reload_docs(dataset._sample_collection_name)
    return {
        "num_written": len(ops) - len(cleared),
        "num_flipped": int(flipped),
        "num_cleared": len(cleared),
    }


def _document(label_id, label, confidence, names, values):
    """The document FiftyOne stores for such a Classification (a new ID
    unless ``label_id`` is given)."""
    from bson import ObjectId

    doc = {
        "_id": label_id or ObjectId(),
        "_cls": "Classification",
        "tags": [],
        "label": label,
        "confidence": confidence,
    }
    doc.update(zip(names, values))
    return doc


def _current(samples, field, names):
    """``{sample_id: (label ID, label, confidence, *attributes)}`` of the
    labels present."""
    if samples.get_field(field) is None:
        return {}
    paths = ["id", field + "._id", field + ".label", field + ".confidence"]
    paths += [field + "." + n for n in names]
    columns = samples.values(paths, _raw=True)  # no per-value conversion
    return {
        str(row[0]): tuple(row[1:])
        for row in zip(*columns)
        if row[2] is not None
    }


def _plain(values):
    """Per-sample values as plain Python lists (what the database returns)."""
    return (
        [float(x) for x in v] if _is_float_list(v) else [str(x) for x in v]
        for v in values
    )


def _is_float_list(value):
    return len(value) > 0 and isinstance(value[0], (float, np.floating))


def _declare(dataset, field, attributes):
    """Declares the label field and its list attributes in the schema."""
    import fiftyone.core.fields as fof
    import fiftyone.core.labels as fol

    if dataset.get_field(field) is None:
        dataset.add_sample_field(
            field, fof.EmbeddedDocumentField, embedded_doc_type=fol.Classification
        )
    for name, values in attributes.items():
        path = field + "." + name
        if dataset.has_field(path):
            continue
        first = next((v for v in values if len(v)), [])
        subfield = fof.FloatField if _is_float_list(first) else fof.StringField
        dataset.add_sample_field(path, fof.ListField, subfield=subfield)


def retag(samples: Any, tag: str, ids: Iterable[str]) -> dict:
    """Makes ``tag`` mark exactly ``ids`` among the samples of ``samples``.

    Only samples whose tags change are written (with ``last_modified_at``,
    as FiftyOne's ``tag_samples`` does), in two bulk updates.

    Args:
        samples: a FiftyOne dataset or view
        tag: the sample tag
        ids: the sample IDs (of ``samples``) that should carry it

    Returns:
        a dict with ``num_tagged`` and ``num_untagged``
    """
    import fiftyone.core.sample as fos
    from bson import ObjectId

    wanted = {str(i) for i in ids}
    tagged = {str(i) for i in samples.match_tags(tag).values("_id", _raw=True)}
    add, remove = wanted - tagged, tagged - wanted
    dataset = samples._root_dataset
    coll = dataset._sample_collection
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    for chosen, update in (
        (add, {"$addToSet": {"tags": tag}}),
        (remove, {"$pull": {"tags": tag}}),
    ):
        if chosen:
            coll.update_many(
                {"_id": {"$in": [ObjectId(i) for i in chosen]}},
                dict(update, **{"$set": {"last_modified_at": now}}),
            )
    if add or remove:
        fos.Sample._reload_docs(dataset._sample_collection_name)
    return {"num_tagged": len(add), "num_untagged": len(remove)}
