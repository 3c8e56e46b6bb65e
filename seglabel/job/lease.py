"""One run at a time on an output: a lease in its scratch space, renewed while the run goes on.

Two runs on one output sweep each other's to-do lists and commit every image twice. A run
takes ``_seglabel/lease.json`` before it touches the output (the sweep of a killed run's files,
``--overwrite``, the commit) and renews it every ``RENEW_EVERY_S`` from a thread of its own, so
that it holds through a long enumeration; a second run refuses with one line naming the first.
A killed run renews nothing: its lease expires after ``TTL_S`` and the next run takes over
(at once where the killed run's process was on the same machine and is gone).

Object stores offer no lock, so taking the lease is write-then-check: a run writes its lease,
waits ``SETTLE_S`` and reads it back; of two runs that wrote at once, the one whose lease is
read back goes on and the other refuses. The clock is the writers' (UTC): ``TTL_S`` is long
enough to cover skew between machines.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterator

from ..core.errors import OutputBusy
from ..core.redaction import get_logger
from ..outputs.contract import SCRATCH_DIR
from ..outputs.store import OutputStore

log = get_logger(__name__)

LEASE_FILE = f"{SCRATCH_DIR}/lease.json"
# A lease not renewed for this long is a killed run's.
TTL_S = 120.0
RENEW_EVERY_S = 20.0
# Between writing a lease and reading it back (two runs that wrote at once: the later wins):
# long enough for a concurrent writer's request to land; a local disk's writes land at once.
SETTLE_S = 1.0
SETTLE_LOCAL_S = 0.2


class Lease:
    """This run's lease on an output: :meth:`take` it, and :meth:`release` it at the end."""

    def __init__(self, store: OutputStore):
        self.store = store
        self.id = uuid.uuid4().hex
        self.holder = {"id": self.id, "host": socket.gethostname(), "pid": os.getpid(),
                       "started": _now().isoformat(timespec="seconds"), **_process_space()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Set by the renewal thread when another run's lease replaced this one's.
        self.lost: dict[str, Any] | None = None

    def take(self) -> Lease:
        """Take the lease, or raise :class:`OutputBusy` naming the run that holds it."""
        other = live_holder(self.store)
        if other is not None:
            raise OutputBusy(_busy(self.store, other))
        try:
            self._write()
            time.sleep(SETTLE_LOCAL_S if self.store.local else SETTLE_S)
            now = self._read()
            if now.get("id") != self.id:
                raise OutputBusy(_busy(self.store, now))
        except BaseException:  # refused, or interrupted (Ctrl-C in the settle): not left behind
            self._remove_if_ours()
            raise
        self._thread = threading.Thread(target=self._renew, name="seglabel-lease", daemon=True)
        self._thread.start()
        return self

    def check(self) -> None:
        """Raise :class:`OutputBusy` if another run has taken the lease (this run stalled past
        its expiry, or wrote at the same instant as another): called before each commit."""
        if self.lost is not None:
            raise OutputBusy(_busy(self.store, self.lost) + "; this run lost its lease and stops here")

    def release(self) -> None:
        """Stop renewing, and remove the lease if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._remove_if_ours()

    def _remove_if_ours(self) -> None:
        try:
            if self._read().get("id") == self.id:
                self.store.remove(LEASE_FILE)
        except Exception as exc:  # the run is over either way; the lease expires by itself
            log.warning("cannot remove the lease on %s: %s", self.store.url, exc)

    def _read(self) -> dict[str, Any]:
        current = self.store.read_json(LEASE_FILE)
        return current if isinstance(current, dict) else {}

    def __enter__(self) -> Lease:
        return self.take()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def _write(self) -> None:
        self.store.write_json(LEASE_FILE, {**self.holder, "renewed": _now().isoformat()})

    def _renew(self) -> None:
        """Renew while this run holds the lease; never take it back from another run."""
        while not self._stop.wait(RENEW_EVERY_S):
            try:
                current = self._read()
                if current.get("id") not in (self.id, None):
                    self.lost = current
                    log.error("%s", _busy(self.store, current) + "; this run lost its lease")
                    return
                self._write()
            except Exception as exc:  # a storage hiccup: the next renewal may succeed
                log.warning("cannot renew the lease on %s: %s", self.store.url, exc)


@contextlib.contextmanager
def hold(store: OutputStore, dry_run: bool = False) -> Iterator[Lease | None]:
    """The output's lease for the ``with`` block: checked writable, taken, renewed, released. A
    dry run writes nothing and takes none (None): it only says that a run holds it (its counts
    may change under it)."""
    if dry_run:
        holder = live_holder(store)
        if holder is not None:
            log.warning("%s", _busy(store, holder))
        yield None
        return
    store.check_writable()
    with Lease(store) as lease:
        yield lease


def live_holder(store: OutputStore) -> dict[str, Any] | None:
    """The run that holds the output's lease now; None where none does (no lease, an expired
    one, one that cannot be read, or one whose process on this machine is gone: a run killed
    here is taken over at once, not after ``TTL_S``)."""
    try:
        holder = store.read_json(LEASE_FILE)
        renewed = datetime.fromisoformat(holder["renewed"])
    except Exception:
        return None
    # Stale: not renewed for TTL_S, or renewed "in the future" past TTL_S (a clock far ahead).
    if renewed.tzinfo is None or abs((_now() - renewed).total_seconds()) > TTL_S:
        return None
    same_space = holder.get("host") == socket.gethostname() and all(
        v != "unknown" and holder.get(k) == v for k, v in _process_space().items())
    if same_space and not _alive(holder.get("pid")):
        log.info("the run that held %s (pid %s) is gone: taking over", store.url, holder.get("pid"))
        return None
    return holder


def _process_space() -> dict[str, str]:
    """What makes a pid name one process: this boot of the machine and the pid namespace
    (containers sharing a host's network, and so its name, each have their own pids)."""
    out = {}
    for key, path in (("boot", "/proc/sys/kernel/random/boot_id"), ("pidns", "/proc/self/ns/pid")):
        try:
            out[key] = os.readlink(path) if key == "pidns" else open(path).read().strip()
        except OSError:
            out[key] = "unknown"  # never taken as the same: no takeover without proof
    return out


def _alive(pid: Any) -> bool:
    """Whether a process of this machine is running (one we may not signal is)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(store: OutputStore, holder: dict[str, Any]) -> str:
    return (f"{store.url} is being labeled by another run (host {holder.get('host', '?')}, pid "
            f"{holder.get('pid', '?')}, since {holder.get('started', '?')}): one run at a time on an output; "
            f"wait for it to end (a killed run's lease expires {TTL_S:.0f} s after its last renewal)")


def _now() -> datetime:
    return datetime.now(timezone.utc)
