"""Where dinoprop's similarity index files live, and how they are written.

Each index is one file, ``<index dir>/<dataset id>/<index id>.npz``, holding
named arrays and a JSON ``meta`` record with their checksum. It is written
to a temporary file and renamed into place while holding a file lock, so a
crash or concurrent writers never leave a half-written index.

The files are private to the user (folders 0700, files 0600, like FiftyOne's
database), and no name read from a run document can reach a path outside
the index directory: dataset IDs must be ObjectIds and index IDs plain names.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import stat
import uuid
from typing import Any, Callable

import numpy as np

#: Environment variable overriding where index files are stored.
INDEX_DIR_ENV = "DINOPROP_INDEX_DIR"
#: Seconds a writer waits for another writer of the same index file.
LOCK_TIMEOUT = 300
#: What an index ID may look like: it names a file in the index directory.
INDEX_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
_OBJECT_ID_PATTERN = re.compile(r"[0-9a-f]{24}")


def index_dir() -> str:
    """Returns the directory under which dinoprop stores its faiss indexes.

    ``$DINOPROP_INDEX_DIR`` when set, else ``dinoprop-<name>/indexes`` beside
    FiftyOne's database directory ``fo.config.database_dir`` (named
    ``<name>``), so each database has its own indexes, e.g.
    ``~/.fiftyone/var/lib/dinoprop-mongo/indexes``.
    """
    import fiftyone as fo

    root = os.environ.get(INDEX_DIR_ENV)
    if root:
        return os.path.abspath(root)
    database_dir = os.path.abspath(fo.config.database_dir)
    return os.path.join(
        os.path.dirname(database_dir),
        "dinoprop-" + os.path.basename(database_dir),
        "indexes",
    )


def check_index_id(index_id: Any) -> str:
    """Returns ``index_id`` if it can name an index file, else raises.

    Raises:
        DinopropError: unless it is 1-64 letters, digits, ``_`` or ``-``
            (not starting with ``_`` or ``-``), so that it cannot name a path
            outside the index directory
    """
    from dinoprop.core import DinopropError

    if not isinstance(index_id, str) or not INDEX_ID_PATTERN.fullmatch(index_id):
        raise DinopropError(
            "Invalid index_id %r: use 1-64 letters, digits, '_' or '-', or "
            "omit it to generate one" % (index_id,)
        )
    return index_id


def index_path(dataset_id: str, index_id: str) -> str:
    """The file of index ``index_id`` of the dataset with ID ``dataset_id``.

    Raises:
        DinopropError: if either name could lead outside the index directory
    """
    from dinoprop.core import DinopropError

    if not isinstance(dataset_id, str) or not _OBJECT_ID_PATTERN.fullmatch(dataset_id):
        raise DinopropError("Invalid dataset ID %r" % (dataset_id,))
    return os.path.join(index_dir(), dataset_id, check_index_id(index_id) + ".npz")


def make_private_dir(path: str) -> None:
    """Creates the folder ``path`` under :func:`index_dir`, private to the user.

    Every folder from dinoprop's own top folder down to ``path`` is created
    (or reset) with mode 0700.

    Raises:
        DinopropError: if dinoprop's top folder is a link or belongs to
            another user (a shared parent such as ``/tmp``)
    """
    from dinoprop.core import DinopropError

    root = index_dir()
    top = root if os.environ.get(INDEX_DIR_ENV) else os.path.dirname(root)
    os.makedirs(top, mode=0o700, exist_ok=True)
    info = os.lstat(top)
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.getuid():
        raise DinopropError(
            "dinoprop's index folder '%s' is a link or belongs to another "
            "user; set $%s to a folder of your own" % (top, INDEX_DIR_ENV)
        )
    os.makedirs(path, mode=0o700, exist_ok=True)
    for folder in [top] + _folders_between(top, path):
        if stat.S_IMODE(os.stat(folder).st_mode) != 0o700:
            os.chmod(folder, 0o700)


def _make_private_file(path):
    """Makes a file written by older versions (mode 0644) private, with its
    folders, if it is this user's."""
    if os.stat(path).st_uid == os.getuid() and stat.S_IMODE(os.stat(path).st_mode) != 0o600:
        make_private_dir(os.path.dirname(path))
        os.chmod(path, 0o600)


def _folders_between(top, path):
    """The folders below ``top`` down to ``path``, outermost first."""
    relative = os.path.relpath(path, top)
    if relative == "." or relative.startswith(".."):
        return []
    parts = relative.split(os.sep)
    return [os.path.join(top, *parts[: i + 1]) for i in range(len(parts))]


def prune_index_files() -> list:
    """Deletes the index files that no similarity run uses any more.

    Deleting a similarity run deletes its index file, but deleting a whole
    dataset (``dataset.delete()``, or a non-persistent dataset going away)
    does not run FiftyOne Brain's cleanup, so its files stay under
    :func:`index_dir`, one folder per dataset. This removes the folders of
    datasets absent from the current FiftyOne database, and in the folders
    of the others what :func:`remove_orphans` removes (files left by killed
    builds). If several databases share one ``$DINOPROP_INDEX_DIR``, run it
    only with that directory pointing at this database's indexes.

    Returns:
        the removed folders and files
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
        if not os.path.isdir(path) or not _OBJECT_ID_PATTERN.fullmatch(name):
            continue
        if name in existing:
            removed.extend(remove_orphans(name))
        else:
            shutil.rmtree(path)
            removed.append(path)
    return removed


def index_lock(path: str):
    """The lock of an index file, held while it is built or written.

    One instance per file and process (so that a build holding it can write
    the file), exclusive between processes and threads. A killed process
    releases it.
    """
    from filelock import FileLock

    make_private_dir(os.path.dirname(path))
    return FileLock(path + ".lock", timeout=LOCK_TIMEOUT, mode=0o600, is_singleton=True)


@contextlib.contextmanager
def unless_locked(path: str):
    """Holds the lock of index file ``path`` for a block, if no one holds it.

    Yields:
        whether the lock was free (and is held for the block); it is not
        when a build or a writer of the index is alive
    """
    from filelock import FileLock, Timeout

    make_private_dir(os.path.dirname(path))
    probe = FileLock(path + ".lock", timeout=0, mode=0o600)  # not reentrant
    try:
        probe.acquire()
    except Timeout:
        yield False
        return
    try:
        yield True
    finally:
        probe.release()


def runs_lock(dataset_id: str):
    """The lock held while a similarity run of the dataset is registered."""
    from filelock import FileLock

    folder = os.path.join(index_dir(), dataset_id)
    make_private_dir(folder)
    path = os.path.join(folder, "runs.lock")
    return FileLock(path, timeout=LOCK_TIMEOUT, mode=0o600, is_singleton=True)


def remove_orphans(dataset_id: str) -> list:
    """Deletes what killed builds and writes left in a dataset's index folder.

    That is the temporary files of writers that died, and the index files
    (with their locks) that no similarity run of the dataset names. An index
    whose lock is held, by a build in progress or a writer, is left alone.

    Args:
        dataset_id: the ID of an existing dataset

    Returns:
        the removed files
    """
    folder = os.path.join(index_dir(), dataset_id)
    if not os.path.isdir(folder):
        return []
    names = os.listdir(folder)
    removed = []
    for index_id in sorted({n.split(".npz")[0] for n in names if ".npz" in n}):
        path = os.path.join(folder, index_id + ".npz")
        with unless_locked(path) as free:
            if not free:
                continue  # a live build or writer
            # read after taking the lock: a build registers its run first
            orphan = index_id not in _run_index_ids(dataset_id)
            doomed = [n for n in names if n.startswith(index_id + ".npz.tmp-")]
            if orphan and index_id + ".npz" in names:
                doomed.append(index_id + ".npz")
            removed.extend(_remove(os.path.join(folder, n)) for n in doomed)
        if orphan:
            _remove(path + ".lock")
    return removed


def _run_index_ids(dataset_id):
    """The index IDs named by the dinoprop runs the dataset lists."""
    from bson import ObjectId

    import fiftyone.core.odm as foo

    db = foo.get_db_conn()
    doc = db.datasets.find_one({"_id": ObjectId(dataset_id)}, {"brain_methods": 1}) or {}
    run_ids = [getattr(r, "id", r) for r in (doc.get("brain_methods") or {}).values()]
    runs = db.runs.find(
        {"_id": {"$in": run_ids}, "config.method": "dinoprop"}, {"config.index_id": 1}
    )
    return {r["config"].get("index_id") for r in runs}


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    return path


def remove_index_file(path: str) -> None:
    """Deletes an index file and its lock file, if they exist."""
    _remove(path)
    _remove(path + ".lock")


def replace_file(path: str, write: Callable[[str], Any]) -> None:
    """Replaces ``path`` atomically, under its lock.

    Args:
        path: the file to replace
        write: ``write(tmp)`` fills a temporary file beside ``path``, which
            then takes its place, so readers see the old file or the new one
    """
    import glob

    make_private_dir(os.path.dirname(path))
    tmp = "%s.tmp-%d-%s" % (path, os.getpid(), uuid.uuid4().hex[:8])
    with index_lock(path):
        for dead in glob.glob(glob.escape(path) + ".tmp-*"):  # of killed writers
            _remove(dead)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            write(tmp)  # into the private file, whose mode it keeps
            os.chmod(tmp, 0o600)
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
    _make_private_file(path)
    meta = json.loads(arrays.pop("meta").tobytes().decode())
    if meta.pop("checksum", None) != _checksum(arrays):
        raise ValueError("checksum mismatch")
    return arrays, meta


def _checksum(arrays):
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode())
        # the array's own bytes, not a copy (the index alone is 1.5 GB at 1M)
        digest.update(np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8))
    return digest.hexdigest()
