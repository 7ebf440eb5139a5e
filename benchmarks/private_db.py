"""A throwaway FiftyOne database for one benchmark process (or test session).

Each benchmark calls :func:`use_private_database` before importing
FiftyOne, so it runs its own mongod on a temporary directory and never
touches the user's datasets.

The mongod is started here and FiftyOne is given its URI, rather than
letting FiftyOne start one for a private ``FIFTYONE_DATABASE_DIR``: FiftyOne
attaches to any database service another process already runs (whatever
its directory), so a benchmark would otherwise write into a concurrent test
session's database, and fail when that session ends and stops it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

#: The mongod processes this process started, stopped by :func:`stop_database`.
_MONGODS: list = []


def use_private_database(prefix: str = "dinoprop-bench-") -> str:
    """Points FiftyOne at a fresh private mongod; returns its parent directory.

    The parent directory doubles as scratch space for the benchmark. At exit
    the database is stopped first and the directory removed after, so mongod
    never finds its files gone while it is still running.
    """
    root = tempfile.mkdtemp(prefix=prefix)
    start_private_mongod(os.path.join(root, "db"), "dinoprop-bench")
    atexit.register(_stop_and_remove, root)
    return root


def start_private_mongod(db_dir: str, db_name: str, timeout: float = 60.0) -> str:
    """Starts a mongod on ``db_dir`` and points FiftyOne's environment at it.

    Must run before FiftyOne is imported.

    Args:
        db_dir: the database directory (created)
        db_name: the FiftyOne database name
        timeout: seconds to wait for mongod to accept connections

    Returns:
        the database URI
    """
    os.makedirs(db_dir, exist_ok=True)
    port = _free_port()
    process = subprocess.Popen(
        [
            _mongod_path(), "--dbpath", db_dir, "--port", str(port),
            "--bind_ip", "127.0.0.1", "--nounixsocket",
            "--logpath", os.path.join(db_dir, "mongo.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    _MONGODS.append(process)
    _wait_for_port(process, port, timeout)
    uri = "mongodb://127.0.0.1:%d" % port
    os.environ["FIFTYONE_DATABASE_URI"] = uri
    os.environ["FIFTYONE_DATABASE_DIR"] = db_dir
    os.environ["FIFTYONE_DATABASE_NAME"] = db_name
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
    return uri


def _mongod_path() -> str:
    """FiftyOne's bundled mongod, found without importing FiftyOne."""
    spec = importlib.util.find_spec("fiftyone")
    path = os.path.join(os.path.dirname(spec.origin), "db", "bin", "mongod")
    return path if os.path.isfile(path) else shutil.which("mongod") or path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(process, port, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("mongod exited with code %d" % process.returncode)
        with contextlib.suppress(OSError), socket.create_connection(
            ("127.0.0.1", port), timeout=1
        ):
            return
        time.sleep(0.1)
    raise RuntimeError("mongod did not accept connections in %.0f s" % timeout)


def _stop_and_remove(root: str) -> None:
    stop_database()
    shutil.rmtree(root, ignore_errors=True)


def stop_database() -> None:
    """Disconnects this process from FiftyOne's database and stops the
    mongods it started, waiting until each has exited, so that their
    directories can be removed (the test session's cleanup uses it too)."""
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is not None and database._client is not None:
        database._disconnect()
    while _MONGODS:
        process = _MONGODS.pop()
        process.terminate()  # mongod shuts down cleanly on SIGTERM
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
