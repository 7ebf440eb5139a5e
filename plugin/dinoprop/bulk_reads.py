"""Reading a few fields of every sample fast, as FiftyOne stores them.

``samples.values(paths, _raw=True)`` returns stored values without
converting them, yet reading two fields of 100k samples with it cost 1.0
to 1.6 CPU s here. :func:`raw_values` runs the view's own pipeline
followed by one ``$project`` and picks the fields out of the streamed
documents: the same values in the same order (a test compares it with
``values()``), for 0.4 to 0.5 CPU s.

Building or decoding 100k documents allocates millions of small dicts and
lists, none of them cyclic, and each full pass of Python's cyclic garbage
collector rescans every one still alive: :func:`gc_paused` switches it off
for such blocks (measured writing 100k labels: 4.0 CPU s with it, 1.5 s
without; loading 100k vectors 1.2 to 1.6 s against 0.7 to 0.8 s).
Reference counting still frees everything.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Any, Iterator, Optional


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pauses Python's cyclic garbage collector for the block, or for a
    function it decorates (it is switched back on after, if it was on)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def raw_values(samples: Any, paths: list) -> list:
    """The stored values of ``paths`` for every sample of ``samples``.

    The same as ``samples.values(paths, _raw=True)`` for paths that pass
    through embedded documents but no list (``"_id"``, ``"label.label"``,
    ``"label._id"``, a vector field's stored bytes): one list per path, in
    the collection's order, None where a sample lacks the value.

    Args:
        samples: a FiftyOne dataset or view
        paths: database field paths (``"_id"``, not ``"id"``)

    Returns:
        a list of lists, one per path
    """
    keys = [path.split(".") for path in paths]
    columns: list = [[] for _ in paths]
    with gc_paused():
        for doc in raw_documents(samples, paths):
            for column, key in zip(columns, keys):
                column.append(pick(doc, key))
    return columns


def raw_documents(samples: Any, paths: list) -> Iterator[dict]:
    """The stored documents of ``samples``, in the collection's order,
    projected to ``paths`` (database paths; ``_id`` always comes along),
    streamed from the database: for readers that take several values from
    one embedded document, which is cheaper than one column per path."""
    return samples._aggregate(pipeline=[{"$project": _projection(paths)}])


def raw_batches(samples: Any, paths: list, match: Optional[dict] = None) -> Iterator[bytes]:
    """The documents of :func:`raw_documents`, as the database sends them:
    raw BSON batches of whole documents (about 16 MB each), for readers
    that take the values out of the bytes themselves
    (:func:`dinoprop.vector_reads.read_vectors`); only those matching the
    query ``match``, if given."""
    stages = [{"$project": _projection(paths)}]
    if match is not None:
        stages.insert(0, {"$match": match})
    pipeline = samples._pipeline(pipeline=stages)
    collection = samples._dataset._sample_collection
    return collection.aggregate_raw_batches(pipeline, allowDiskUse=True)


def _projection(paths: list) -> dict:
    """An inclusion projection of ``paths`` (a path under another one
    requested is covered by it: MongoDB refuses both)."""
    return {
        path: True
        for path in paths
        if not any(path.startswith(other + ".") for other in paths)
    }


def pick(doc: Any, key: list) -> Any:
    """The value at the path ``key`` (a list of names) of ``doc``, or None."""
    for name in key:
        if not isinstance(doc, dict):
            return None
        doc = doc.get(name)
    return doc
