"""Reading a vector field of every sample fast, as FiftyOne stores it.

FiftyOne stores each vector as a zlib stream of an ``.npy`` blob
(:func:`fiftyone.core.utils.serialize_numpy_array`); dinoprop's writer
leaves that stream uncompressed
(:data:`dinoprop.label_writes.VECTOR_ZLIB_LEVEL`). Projected to ``_id`` and
such a field, every document of a collection of same-shaped vectors has the
same length and the same bytes except its ID, its vector and the stream's
checksum, so a raw BSON batch from the database (about 10k documents) is a
``documents x length`` byte matrix whose columns *are* the IDs and the
vectors: :func:`read_vectors` slices them out without decoding one document
in Python (100k x 384-d: 0.59 s against 0.88 s decoding every document and
3.03 s through FiftyOne's ``values()``, ``benchmarks/vector_reads.py``).

A batch that does not have that layout (compressed streams, lists, missing
or mixed-shaped vectors, nested fields) is decoded document by document,
as FiftyOne's own reader would, so every stored vector reads the same.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from dinoprop.bulk_reads import gc_paused, pick, raw_batches

#: BSON: the type bytes of an ObjectId and of binary data, and the
#: ``_id`` element's head (type byte, name, terminator)
_OBJECT_ID, _BINARY = 0x07, 0x05
_ID_HEAD = bytes([_OBJECT_ID]) + b"_id\x00"
#: a zlib stream: 2 header bytes, a stored block's 5 (its final-block and
#: type bits, then its length and the length's complement), the payload,
#: the 4-byte Adler-32 checksum
_ZLIB_HEAD, _STORED_HEAD, _CHECKSUM = 2, 5, 4


def read_vectors(samples: Any, field: str) -> tuple[np.ndarray, Any]:
    """The IDs and vectors of the samples of ``samples`` with a value in
    the vector field ``field``, in the collection's order.

    Args:
        samples: a FiftyOne dataset or view
        field: a vector field (its database path)

    Returns:
        a tuple ``(sample_ids, vectors)``: a ``num`` array of sample IDs, and
        a ``num x dim`` array in the stored dtype when every vector has the
        same length, else the list of the ``num`` vectors
    """
    id_parts, vector_parts = [], []
    with gc_paused():
        for batch in raw_batches(samples, ["_id", field]):
            ids, vectors = _sliced(batch, field) or _decoded(batch, field)
            id_parts.append(ids)
            vector_parts.append(vectors)
    ids = np.concatenate(id_parts) if id_parts else np.array([], dtype=str)
    return ids, _joined(vector_parts)


def decode_vector(value: Any) -> np.ndarray:
    """One stored vector: FiftyOne's serialized array (how vector fields and
    undeclared label attributes hold them), or a plain list."""
    if isinstance(value, bytes):
        import fiftyone.core.utils as fou

        return fou.deserialize_numpy_array(value)
    return np.asarray(value)


def decode_vectors(stored: list) -> Optional[np.ndarray]:
    """Decodes vectors as FiftyOne stores them, all at once.

    FiftyOne decodes them one ``np.load`` at a time; when every blob holds
    a 1-D array of the same dtype and length they share one header, so the
    payloads are decompressed and joined into a single array instead
    (about 1.5x faster for large views, with no per-vector arrays).

    Args:
        stored: the raw values of a vector field
            (:func:`dinoprop.bulk_reads.raw_values`)

    Returns:
        the ``num x dim`` array, or None when the values are not uniform
        stored arrays (lists, mixed shapes, another encoding)
    """
    import zlib

    try:
        blobs = [zlib.decompress(value) for value in stored]
    except (TypeError, zlib.error):
        return None
    header = _npy_header(blobs[0])
    if header is None:
        return None
    offset, shape, dtype = header
    head, size = blobs[0][:offset], len(blobs[0])
    uniform = all(len(b) == size and b.startswith(head) for b in blobs)
    if not uniform or len(shape) != 1 or dtype.hasobject:
        return None
    payload = bytearray().join(memoryview(b)[offset:] for b in blobs)  # writable
    return np.frombuffer(payload, dtype=dtype).reshape(len(blobs), shape[0])


def _npy_header(blob: bytes) -> Optional[tuple]:
    """``(length, shape, dtype)`` of the ``.npy`` header opening ``blob``,
    or None when it does not open with one numpy can read."""
    import io

    readers = {
        (1, 0): np.lib.format.read_array_header_1_0,
        (2, 0): np.lib.format.read_array_header_2_0,
    }
    with io.BytesIO(blob) as f:
        try:
            reader = readers.get(np.lib.format.read_magic(f))
            if reader is None:
                return None
            shape, _, dtype = reader(f)
        except ValueError:
            return None
        return f.tell(), shape, dtype


def _sliced(batch: bytes, field: str) -> Optional[tuple]:
    """``(ids, vectors)`` sliced out of a raw batch whose documents all
    share the first one's layout (see the module's docstring), or None."""
    if not batch:
        return np.array([], dtype=str), np.zeros((0, 0), np.float32)
    length = int.from_bytes(batch[:4], "little")
    layout = _layout(batch[:length], field) if length > 0 else None
    if layout is None or len(batch) % length:
        return None
    id_at, data_at, data_end, constant, dtype = layout
    rows = np.frombuffer(batch, np.uint8).reshape(-1, length)
    # each row opens with its own length, so equal constant bytes (the
    # length included) mean every row is a whole document of this layout
    fixed = rows[:, constant]
    if not (fixed == fixed[0]).all():
        return None
    ids = np.ascontiguousarray(rows[:, id_at:id_at + 12]).tobytes().hex()
    ids = np.frombuffer(ids.encode(), "S24").astype("U24")
    vectors = np.ascontiguousarray(rows[:, data_at:data_end]).view(dtype)
    return ids, vectors


def _layout(document: bytes, field: str) -> Optional[tuple]:
    """Where the ID and the vector lie in ``document``, a stored
    ``{"_id": ObjectId, field: uncompressed vector}``: ``(ID offset, data
    offset, data end, constant-byte mask, dtype)``, or None when it is
    not such a document."""
    name = field.encode()
    id_at = 4 + len(_ID_HEAD)
    binary_at = id_at + 12
    blob_at = binary_at + 1 + len(name) + 1 + 4 + 1  # type, name, length, subtype
    if (
        "." in field
        or document[4:id_at] != _ID_HEAD
        or document[binary_at:blob_at - 5] != bytes([_BINARY]) + name + b"\x00"
        or document[blob_at - 1] != 0  # generic binary subtype
    ):
        return None
    size = int.from_bytes(document[blob_at - 5:blob_at - 1], "little")
    stream = document[blob_at:blob_at + size]
    if blob_at + size + 1 != len(document) or len(stream) < 11:
        return None
    payload = _stored_payload(stream)
    header = _npy_header(payload) if payload is not None else None
    if header is None:
        return None
    offset, shape, dtype = header
    if len(shape) != 1 or dtype.hasobject or shape[0] * dtype.itemsize != len(payload) - offset:
        return None
    data_at = blob_at + _ZLIB_HEAD + _STORED_HEAD + offset
    data_end = data_at + shape[0] * dtype.itemsize
    constant = np.ones(len(document), bool)
    constant[id_at:id_at + 12] = False
    constant[data_at:data_end] = False
    constant[data_end:data_end + _CHECKSUM] = False
    return id_at, data_at, data_end, constant, dtype


def _stored_payload(stream: bytes) -> Optional[bytes]:
    """The payload of a zlib stream made of one stored (uncompressed)
    block, or None for any other stream."""
    cmf, flags, block = stream[0], stream[1], stream[2]
    length = int.from_bytes(stream[3:5], "little")
    complement = int.from_bytes(stream[5:7], "little")
    if (
        cmf & 0x0F != 8  # deflate
        or (cmf * 256 + flags) % 31
        or flags & 0x20  # a preset dictionary
        or block & 0x07 != 0x01  # the final block, stored
        or length ^ complement != 0xFFFF
        or _ZLIB_HEAD + _STORED_HEAD + length + _CHECKSUM != len(stream)
    ):
        return None
    start = _ZLIB_HEAD + _STORED_HEAD
    return stream[start:start + length]


def _decoded(batch: bytes, field: str) -> tuple:
    """``(ids, vectors)`` of a raw batch, decoded document by document."""
    import bson

    key = field.split(".")
    values = [(doc["_id"], pick(doc, key)) for doc in bson.decode_all(batch)]
    kept = [(i, v) for i, v in values if v is not None]
    ids = np.array([str(i) for i, _ in kept], dtype="U24")
    stored = [v for _, v in kept]
    if not stored:
        return ids, np.zeros((0, 0), np.float32)
    matrix = decode_vectors(stored)
    return ids, matrix if matrix is not None else [decode_vector(v) for v in stored]


def _joined(parts: list) -> Any:
    """One ``num x dim`` array of the batches' vectors when they all have
    one length, else the list of every vector."""
    matrices = [p for p in parts if isinstance(p, np.ndarray) and len(p)]
    lists = [p for p in parts if not isinstance(p, np.ndarray)]
    if not lists and len({m.shape[1] for m in matrices}) <= 1:
        return np.concatenate(matrices) if matrices else np.zeros((0, 0), np.float32)
    return [np.asarray(v) for p in parts for v in p]
