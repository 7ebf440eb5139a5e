"""Connecting to a Ray cluster: what every ``engine="ray"`` path shares.

:func:`dinoprop.compute_embeddings` (:mod:`dinoprop.embeddings.distributed`)
and the kNN graph search (:mod:`dinoprop.graph_distributed`) import Ray
through :func:`import_ray`, connect with :func:`connect` and report their
workers' errors with :func:`worker_errors`. Ray itself is imported only
when one of them runs.
"""

from __future__ import annotations

import contextlib
import socket
from typing import Any, Iterator, Optional

from dinoprop.core import DinopropError

#: How to install what ``engine="ray"`` needs.
INSTALL_HINT = "pip install 'fiftyone-dinoprop[scale]'"


def import_ray() -> Any:
    """Imports Ray (and Ray Data), or says how to install them.

    Raises:
        DinopropError: if Ray is not installed
    """
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise DinopropError(
            "engine='ray' needs Ray with Ray Data (%s); install it with %s"
            % (e, INSTALL_HINT)
        ) from None
    return ray


def connect(address: Optional[str]) -> Any:
    """Connects this process to a Ray cluster; returns the ``ray`` module.

    An already connected process keeps its connection. Otherwise ``None``
    follows Ray's rule (``RAY_ADDRESS``, else a cluster started on this
    machine with ``ray start``, else a new local cluster).

    Raises:
        DinopropError: if Ray is missing or the cluster cannot be reached
    """
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        _check_listening(address)
        ray.init(address=address, include_dashboard=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise DinopropError(
            "Cannot connect to the Ray cluster at %s (%s); start it with "
            "`ray start --head` on the head node, or pass ray_address=None "
            "for a local cluster" % (address, e)
        ) from None
    return ray


def _check_listening(address: Optional[str], timeout: float = 5.0) -> None:
    """Fails fast when nothing listens at a ``host:port`` address (where
    ``ray.init`` would retry for minutes).

    Raises:
        OSError: if the connection is refused or times out
    """
    if not address or address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if host and port.isdigit():
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()


@contextlib.contextmanager
def worker_errors() -> Iterator[None]:
    """Raises a DinopropError from a Ray worker as itself, not wrapped in
    Ray's task errors (other errors propagate unchanged)."""
    try:
        yield
    except Exception as error:
        cause, seen = error, set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, DinopropError):
                raise DinopropError(str(cause)) from None
            seen.add(id(cause))
            cause = getattr(cause, "cause", None) or cause.__cause__
        raise
