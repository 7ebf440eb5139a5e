"""Where dinoprop's similarity index files live, and how they are written.

Each index is one file, ``<index dir>/<dataset id>/<index id>.npz``, holding
named arrays and a JSON ``meta`` record with their checksum. It is written
to a temporary file and renamed into place while holding a file lock, so a
crash or concurrent writers never leave a half-written index.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from typing import Any, Callable

import numpy as np

#: Environment variable overriding where index files are stored.
INDEX_DIR_ENV = "DINOPROP_INDEX_DIR"
#: Seconds a writer waits for another writer of the same index file.
LOCK_TIMEOUT = 300


def index_dir() -> str:
    """Returns the directory under which dinoprop stores its faiss indexes.

    ``$DINOPROP_INDEX_DIR`` when set, else ``dinoprop/indexes`` beside
    ``fo.config.database_dir``.
    """
    import fiftyone as fo

    root = os.environ.get(INDEX_DIR_ENV)
    if root:
        return root
    parent = os.path.dirname(os.path.abspath(fo.config.database_dir))
    return os.path.join(parent, "dinoprop", "indexes")


def index_path(dataset_id: str, index_id: str) -> str:
    """The file of index ``index_id`` of the dataset with ID ``dataset_id``."""
    return os.path.join(index_dir(), dataset_id, index_id + ".npz")


def prune_index_files() -> list:
    """Deletes the index files of datasets that no longer exist.

    Deleting a similarity run deletes its index file, but deleting a whole
    dataset (``dataset.delete()``, or a non-persistent dataset going away)
    does not run FiftyOne Brain's cleanup, so its files stay under
    :func:`index_dir`, one folder per dataset. This removes the folders of
    datasets absent from the current FiftyOne database. If several
    databases share one ``$DINOPROP_INDEX_DIR``, run it only with that
    directory pointing at this database's indexes.

    Returns:
        the removed folders
    """
    import shutil

    import fiftyone.core.odm as foo

    root = index_dir()
    if not os.path.isdir(root):
        return []
    existing = {str(d["_id"]) for d in foo.get_db_conn().datasets.find({}, {"_id": 1})}
    removed = []
    for name in sorted(os.listdir(root)):
        path = os.path.join(root, name)
        if os.path.isdir(path) and _is_object_id(name) and name not in existing:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def _is_object_id(name: str) -> bool:
    return len(name) == 24 and all(c in "0123456789abcdef" for c in name)


def remove_index_file(path: str) -> None:
    """Deletes an index file and its lock file, if they exist."""
    for p in (path, path + ".lock"):
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def replace_file(path: str, write: Callable[[str], Any]) -> None:
    """Replaces ``path`` atomically, under its lock.

    Args:
        path: the file to replace
        write: ``write(tmp)`` fills a temporary file beside ``path``, which
            then takes its place, so readers see the old file or the new one
    """
    from filelock import FileLock

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = "%s.tmp-%d-%s" % (path, os.getpid(), uuid.uuid4().hex[:8])
    with FileLock(path + ".lock", timeout=LOCK_TIMEOUT):
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def write_arrays(path: str, arrays: dict, meta: dict) -> None:
    """Atomically writes named arrays and a JSON record to an ``.npz`` file.

    Args:
        path: the file
        arrays: the arrays by name
        meta: a JSON-serialisable dict, stored with the arrays' checksum
    """
    meta = dict(meta, checksum=_checksum(arrays))
    arrays = dict(arrays, meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))

    def save(tmp):
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())

    replace_file(path, save)


def read_arrays(path: str) -> tuple[dict, dict]:
    """Reads a file written by :func:`write_arrays`.

    Returns:
        a tuple ``(arrays, meta)``

    Raises:
        FileNotFoundError: if the file is missing
        ValueError: if it is corrupt
    """
    with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.pop("checksum", None) != _checksum(arrays):
        raise ValueError("checksum mismatch")
    return arrays, meta


def _checksum(arrays):
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()
