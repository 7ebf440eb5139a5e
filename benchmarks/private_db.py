"""A throwaway FiftyOne database for one benchmark process.

Each benchmark calls :func:`use_private_database` before importing
FiftyOne, so it runs its own mongod on a temporary directory and never
touches the user's datasets.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import sys
import tempfile


def use_private_database(prefix: str = "dinoprop-bench-") -> str:
    """Points FiftyOne at a fresh database directory; returns its parent.

    The parent directory doubles as scratch space for the benchmark. At exit
    the database is stopped first and the directory removed after, so mongod
    never finds its files gone while it is still running.
    """
    root = tempfile.mkdtemp(prefix=prefix)
    os.environ.pop("FIFTYONE_DATABASE_URI", None)
    os.environ["FIFTYONE_DATABASE_DIR"] = os.path.join(root, "db")
    os.environ["FIFTYONE_DATABASE_NAME"] = "dinoprop-bench"
    os.environ["FIFTYONE_DO_NOT_TRACK"] = "true"
    os.environ["FIFTYONE_SHOW_PROGRESS_BARS"] = "false"
    atexit.register(_stop_and_remove, root)
    return root


def _stop_and_remove(root: str) -> None:
    stop_database()
    shutil.rmtree(root, ignore_errors=True)


def stop_database() -> None:
    """Disconnects this process from FiftyOne's database and stops the mongod
    it started, waiting until mongod has exited, so that its directory can
    be removed (the test session's cleanup uses it too)."""
    database = sys.modules.get("fiftyone.core.odm.database")
    if database is None:
        return
    if database._client is not None:
        database._disconnect()
    if database._db_service is not None:
        # stop() closes the service's stdin; its process then stops mongod,
        # which writes files until it exits: wait for that
        service = database._db_service
        owned_process = None if service.attached else service.child
        service.stop()
        database._db_service = None
        if owned_process is not None:
            import psutil

            with contextlib.suppress(psutil.TimeoutExpired):
                owned_process.wait(timeout=60)
