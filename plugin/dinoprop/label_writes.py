"""Writing many labels, vectors and tags fast.

FiftyOne's ``set_values`` builds one label object per sample and validates
it, which at 10k+ samples costs more than the propagation itself. The
writer here builds the documents FiftyOne itself stores (``_id``, ``_cls``,
``tags``, ``label``, ``confidence`` and attributes, the same serialisation
as ``Classification.to_mongo()``), declares the field and its attributes in
the dataset's schema first, and sends unordered bulk updates that also set
``last_modified_at``, as FiftyOne does. Which labels to write is the
caller's choice (:mod:`dinoprop.stored_labels` reads what is stored, so
that a re-run writes only what moved, and a rewritten label keeps its ID);
:func:`retag` writes only the tags that change.

Every large write dinoprop makes goes through :func:`bulk_set` (labels,
their scores, embedding vectors, accepted and reverted labels) or
:func:`retag` (tags).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from dinoprop.bulk_reads import gc_paused

#: Updates sent per unordered bulk write. Batches bound the list of update
#: operations held at once (at a million samples one list would hold a
#: million), and write as fast as one ``bulk_write`` of everything
#: (measured at 100k labels: 14.6 to 15.6 s against 12.3 to 17.7 s; mongod
#: spends the same CPU either way).
BULK_BATCH = 10_000

#: Bulk writes sent at once. mongod runs each on one thread, and its CPU
#: per update is what a large write waits for; measured on 2 cores,
#: rewriting 100k labels of 32-d samples took 11.7 to 13.7 s with one in
#: flight, 8.2 to 9.2 s with two and 8.5 to 8.9 s with three (200k labels
#: of 384-d samples: 26.0 to 28.0, 17.4 to 20.3 and 19.0 to 19.6 s), for
#: the same mongod CPU.
WRITES_IN_FLIGHT = 2


def utc_now() -> datetime:
    """The current time as FiftyOne stores ``last_modified_at`` (naive UTC)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def bulk_set(
    collection: Any,
    updates: Iterable[tuple],
    extra: Optional[dict] = None,
    batch_size: int = BULK_BATCH,
    now: Optional[datetime] = None,
) -> int:
    """Sets fields of many documents in unordered bulk writes, with
    ``last_modified_at``, as FiftyOne's own writes do.

    The values must already be serialised as FiftyOne stores them (label
    documents, :func:`serialize_vector` bytes, None); declaring the fields
    in the dataset's schema, and reloading samples in memory
    (``fiftyone.core.sample.Sample._reload_docs``), is the caller's part.

    :data:`WRITES_IN_FLIGHT` batches are in flight at once, sent by other
    threads while this one builds the next (consuming ``updates``), so
    Python's work and mongod's overlap, and mongod runs them on as many of
    its threads. Every update must target a document of its own (batches
    land in any order). Python's cyclic garbage collector is paused
    meanwhile (:func:`dinoprop.bulk_reads.gc_paused`).

    Args:
        collection: a pymongo collection (a dataset's ``_sample_collection``)
        updates: ``(sample ID or filter dict, {path: value})`` pairs, consumed
            ``batch_size`` at a time
        extra: other update operators applied with every ``$set`` (e.g.
            ``{"$pull": {"tags": tag}}``)
        batch_size: updates per bulk write
        now: the ``last_modified_at`` written (default :func:`utc_now`)

    Returns:
        the number of documents modified
    """
    now = now or utc_now()
    with gc_paused():
        return _send_in_flight(collection, _operations(updates, extra or {}, now, batch_size))


def _send_in_flight(collection: Any, batches: Iterable[list]) -> int:
    """Sends each list of write operations as one unordered bulk write,
    :data:`WRITES_IN_FLIGHT` at a time, while the next is built; returns
    the documents modified."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    modified, sending = 0, deque()
    with ThreadPoolExecutor(WRITES_IN_FLIGHT) as senders:
        for ops in batches:
            if len(sending) == WRITES_IN_FLIGHT:
                modified += sending.popleft().result()
            sending.append(senders.submit(_send, collection, ops))
        while sending:
            modified += sending.popleft().result()
    return modified


def _operations(
    updates: Iterable[tuple], extra: dict, now: datetime, batch_size: int
) -> Iterator[list]:
    """Lists of at most ``batch_size`` ``UpdateOne`` of ``updates``."""
    from bson import ObjectId
    from pymongo import UpdateOne

    ops = []
    for target, fields in updates:
        query = target if isinstance(target, dict) else {"_id": ObjectId(str(target))}
        ops.append(UpdateOne(
            query, dict(extra, **{"$set": dict(fields, last_modified_at=now)})
        ))
        if len(ops) == batch_size:
            yield ops
            ops = []
    if ops:
        yield ops


def _send(collection: Any, ops: list) -> int:
    """Sends one unordered bulk write; returns the documents modified."""
    return collection.bulk_write(ops, ordered=False).modified_count


#: The zlib level vectors are stored with: 0 keeps the ``.npy`` bytes in
#: stored (uncompressed) zlib blocks. Float vectors barely compress (384
#: float32 values: 1,556 bytes at FiftyOne's default level 6 against 1,675),
#: while level 6 costs about 88 us per vector to write and 16 us to read
#: here, against 4 us and 2 us: at 1M vectors, minutes of CPU on every
#: write and about 14 s on every read.
VECTOR_ZLIB_LEVEL = 0


def serialize_vector(vector: Any) -> bytes:
    """A vector as FiftyOne stores a ``VectorField``.

    The format of :func:`fiftyone.core.utils.serialize_numpy_array`
    (``np.save``, then a zlib stream), which FiftyOne reads back with
    :func:`fiftyone.core.utils.deserialize_numpy_array`, but with the zlib
    stream left uncompressed (:data:`VECTOR_ZLIB_LEVEL`), and without
    importing FiftyOne (seconds per process, which Ray actors writing
    embeddings avoid); a test checks that FiftyOne reads back the vector.
    """
    import io
    import zlib

    with io.BytesIO() as f:
        np.save(f, np.asarray(vector), allow_pickle=False)
        return zlib.compress(f.getvalue(), VECTOR_ZLIB_LEVEL)


def write_vectors(collection: Any, path: str, ids: Iterable[str], vectors: Any) -> int:
    """Sets ``path`` of each sample to its vector (:func:`bulk_set`).

    Idempotent: writing the same vectors twice leaves the same documents.

    Args:
        collection: the dataset's sample collection (pymongo)
        path: a declared ``VectorField``
        ids: the sample IDs
        vectors: one 1-D array per ID

    Returns:
        the number of documents modified
    """
    return bulk_set(
        collection,
        ((sample_id, {path: serialize_vector(v)}) for sample_id, v in zip(ids, vectors)),
    )


def write_classifications(
    samples: Any,
    field: str,
    ids: Iterable[str],
    labels: Iterable[str],
    confidences: Iterable[float],
    attributes: dict,
    clear_ids: Iterable[str] = (),
    vectors: Optional[dict] = None,
    label_ids: Optional[Iterable] = None,
    now: Optional[datetime] = None,
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
            vector attributes (e.g. ``logits``)
        label_ids: the ID of each label (ObjectIds, or their 12 bytes as
            ``bytes`` or a ``V12`` array; a rewritten label keeps its ID):
            new IDs where None
        now: the ``last_modified_at`` of every sample written (default:
            :func:`utc_now`)

    Returns:
        a dict with ``num_written`` and ``num_cleared``
    """
    import fiftyone.core.sample as fos

    dataset = samples._root_dataset
    ids = [str(i) for i in ids]
    names = sorted(attributes)
    _declare(dataset, field, {n: attributes[n] for n in names})
    rows = zip(
        ids,
        [None] * len(ids) if label_ids is None else label_ids,
        labels,
        (float(c) for c in confidences),
        *(_plain(attributes[n]) for n in names),
    )
    vectors = vectors or {}
    now = now or utc_now()

    def documents():
        for row, (sample_id, label_id, label, confidence, *values) in enumerate(rows):
            doc = _document(label_id, label, confidence, names, values)
            doc.update(
                (n, serialize_vector(np.asarray(v[row]))) for n, v in vectors.items()
            )
            yield sample_id, {field: doc}

    cleared = [str(sid) for sid in clear_ids]
    bulk_set(dataset._sample_collection, documents(), now=now)
    bulk_set(dataset._sample_collection, ((sid, {field: None}) for sid in cleared), now=now)
    if ids or cleared:
        fos.Sample._reload_docs(dataset._sample_collection_name)
    return {"num_written": len(ids), "num_cleared": len(cleared)}


def _document(label_id, label, confidence, names, values):
    """The document FiftyOne stores for such a Classification (a new ID
    unless ``label_id`` is given)."""
    from bson import ObjectId

    doc = {
        "_id": (
            ObjectId() if label_id is None
            else label_id if isinstance(label_id, ObjectId)
            else ObjectId(bytes(label_id))
        ),
        "_cls": "Classification",
        "tags": [],
        "label": label,
        "confidence": confidence,
    }
    doc.update(zip(names, values))
    return doc


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


def retag(
    samples: Any, tag: str, ids: Iterable[str], now: Optional[datetime] = None
) -> dict:
    """Makes ``tag`` mark exactly ``ids`` among the samples of ``samples``.

    Only samples whose tags change are written (with ``last_modified_at``,
    as FiftyOne's ``tag_samples`` does), :data:`BULK_BATCH` samples per
    update, :data:`WRITES_IN_FLIGHT` updates at a time.

    Args:
        samples: a FiftyOne dataset or view
        tag: the sample tag
        ids: the sample IDs (of ``samples``) that should carry it
        now: the ``last_modified_at`` of the samples retagged (default:
            :func:`utc_now`)

    Returns:
        a dict with ``num_tagged`` and ``num_untagged``
    """
    import itertools

    import fiftyone.core.sample as fos

    wanted = {str(i) for i in ids}
    tagged = {str(i) for i in samples.match_tags(tag).values("_id", _raw=True)}
    add, remove = sorted(wanted - tagged), sorted(tagged - wanted)
    dataset = samples._root_dataset
    now = now or utc_now()
    _send_in_flight(dataset._sample_collection, itertools.chain(
        _updates_of_many(add, {"$addToSet": {"tags": tag}}, now),
        _updates_of_many(remove, {"$pull": {"tags": tag}}, now),
    ))
    if add or remove:
        fos.Sample._reload_docs(dataset._sample_collection_name)
    return {"num_tagged": len(add), "num_untagged": len(remove)}


def _updates_of_many(ids: list, update: dict, now: datetime) -> Iterator[list]:
    """``update`` (with ``last_modified_at``) of the samples ``ids``, as one
    ``UpdateMany`` of :data:`BULK_BATCH` samples per bulk write."""
    from bson import ObjectId
    from pymongo import UpdateMany

    update = dict(update, **{"$set": {"last_modified_at": now}})
    for start in range(0, len(ids), BULK_BATCH):
        chunk = [ObjectId(i) for i in ids[start : start + BULK_BATCH]]
        yield [UpdateMany({"_id": {"$in": chunk}}, update)]
