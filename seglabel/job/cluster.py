"""Joining Ray: a cluster when one is named, else an embedded single-machine Ray on loopback.

The one place seglabel starts or joins Ray (the job's pipeline and the bench's pipeline phase
both come through here), so that both behave the same: ``--address`` or ``RAY_ADDRESS`` joins
that cluster; without one, a new local Ray starts with every process on 127.0.0.1
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``) and never attaches to some other Ray that happens to
run on the machine (``address="local"``). A Ray that this process had already started (a
notebook, a test session) is used as it is and left running.

Joining a cluster that requires a token (Ray 2.60's default once a token exists on the head)
takes ``RAY_AUTH_MODE=token`` where seglabel runs, as for any Ray driver: Ray sends its token
(``RAY_AUTH_TOKEN``, ``RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``) to an address given
explicitly only when told to, and seglabel keeps that choice; a failed join says so.
"""

from __future__ import annotations

import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from ..core.errors import ClusterError, one_line

AUTH_HINT = (
    "; if the cluster requires a token (Ray 2.60's default), set RAY_AUTH_MODE=token, with the token in "
    "RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token"
)


@dataclass
class Connection:
    """How this process is connected to Ray for one job."""

    #: Whether this connection started Ray (and so stops it at the end).
    started: bool
    #: Whether it is an embedded local Ray started here (it cannot grow: no autoscaler).
    embedded: bool
    #: Seconds spent starting or joining Ray.
    init_s: float
    #: The cluster's CPU, GPU and memory totals.
    resources: dict[str, float] = field(default_factory=dict)


@contextmanager
def connect(address: str | None = None) -> Iterator[Connection]:
    """Be connected to Ray inside the block; stop what this call started when it ends."""
    import ray

    started_at = time.perf_counter()
    started = embedded = False
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            try:
                ray.init(address=address, logging_level=logging.WARNING)
            except ConnectionError as exc:
                hint = "" if os.environ.get("RAY_AUTH_MODE", "").lower() == "token" else AUTH_HINT
                message = f"cannot join the Ray cluster at {address}: {one_line(exc)}{hint}"
                raise ClusterError(message) from exc
        else:
            # Keep every process on loopback (Ray binds the external interface otherwise).
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING)
            embedded = True
        started = True
    resources = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU", "memory")}
    try:
        yield Connection(started, embedded, time.perf_counter() - started_at, resources)
    finally:
        if started:
            ray.shutdown()
