"""One run at a time on an output: the lease a run takes, renews and releases; a second run
refuses; a killed run's lease expires; a lease from another clock or pid space is judged right."""

from __future__ import annotations

import json
import os
import time

import pytest
from readback import read_rows

from helpers import photos, run


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_second_run_on_a_live_output_refuses_and_touches_nothing(checkpoints, tmp_path):
    """Two runs on one output once swept each other's to-do lists or committed every image
    twice. While a run holds the output's lease, a second one refuses in one line naming the
    first, and leaves its files be; the first labels every image once."""
    import threading

    from seglabel.core.errors import OutputBusy
    from seglabel.job.lease import LEASE_FILE

    images = photos(tmp_path / "photos", 40)
    out = tmp_path / "labels"
    done: dict = {}
    first = threading.Thread(target=lambda: done.update(summary=run(checkpoints, images, out, batch_size=1)))
    first.start()
    lease = out / LEASE_FILE
    deadline = time.monotonic() + 120
    while not lease.exists() and first.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    holder = json.loads(lease.read_text())
    with pytest.raises(OutputBusy, match=f"being labeled by another run .*pid {holder['pid']}") as refused:
        run(checkpoints, images, out)
    assert "\n" not in str(refused.value) and refused.value.exit_status == 2
    first.join()
    assert done["summary"].processed == 40
    keys = [r["key"] for r in read_rows(str(out))]
    assert len(keys) == 40 and sorted(set(keys)) == sorted(keys)
    assert not lease.exists()  # released at the end
    assert run(checkpoints, images, out).processed == 0  # and free again


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_killed_runs_lease_expires_and_a_live_one_is_renewed(checkpoints, tmp_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    images = photos(tmp_path / "photos")
    out = tmp_path / "labels"
    store = OutputStore(str(out))
    held = leases.Lease(store).take()
    killed = out / "_seglabel" / "todo-20260101T000000Z-aaaaaa"  # a live run's to-do list
    killed.mkdir(parents=True)
    with pytest.raises(leases.OutputBusy, match="being labeled by another run"):
        run(checkpoints, images, out)
    assert killed.exists() and not (out / "job.json").exists()
    # A lease last renewed past its TTL is a killed run's: the next run takes over and sweeps.
    record = json.loads((out / leases.LEASE_FILE).read_text())
    stale = datetime.now(timezone.utc) - timedelta(seconds=leases.TTL_S + 1)
    held._stop.set()
    (out / leases.LEASE_FILE).write_text(json.dumps({**record, "renewed": stale.isoformat()}))
    assert run(checkpoints, images, out).processed == 3
    assert not killed.exists() and not (out / leases.LEASE_FILE).exists()
    # A live run renews its lease from a thread of its own.
    monkeypatch.setattr(leases, "RENEW_EVERY_S", 0.05)
    with leases.Lease(store):
        first = json.loads((out / leases.LEASE_FILE).read_text())["renewed"]
        time.sleep(0.5)
        assert json.loads((out / leases.LEASE_FILE).read_text())["renewed"] > first
    assert not (out / leases.LEASE_FILE).exists()
    # A fresh lease of a process of this machine that is gone (a SIGKILLed driver): taken over
    # at once; one of a live process (this one) is not.
    import socket

    gone = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process has it (a reaped pid is reused)
    now = datetime.now(timezone.utc).isoformat()
    space = leases._process_space()  # private: what a lease records of its process
    fresh = {"id": "x", "host": socket.gethostname(), "started": "", "renewed": now, **space}
    (out / leases.LEASE_FILE).write_text(json.dumps({**fresh, "pid": gone}))
    assert run(checkpoints, images, out).found == 3
    (out / leases.LEASE_FILE).write_text(json.dumps({**fresh, "pid": os.getpid()}))
    with pytest.raises(leases.OutputBusy):
        run(checkpoints, images, out)


def test_a_lease_lost_to_another_run_stops_the_commit(tmp_path, monkeypatch):
    """A run that stalled past its expiry (or wrote at the instant another did) finds another
    run's lease at its next renewal: it never writes the lease back, and commits nothing more."""
    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    monkeypatch.setattr(leases, "RENEW_EVERY_S", 0.05)
    store = OutputStore(str(tmp_path / "out"))
    mine = leases.Lease(store).take()
    other = {"id": "other", "host": "elsewhere", "pid": 1, "started": "",
             "renewed": leases._now().isoformat()}  # private: a lease as another machine writes it
    (tmp_path / "out" / leases.LEASE_FILE).write_text(json.dumps(other))
    deadline = time.monotonic() + 10
    while mine.lost is None and time.monotonic() < deadline:
        time.sleep(0.02)
    with pytest.raises(leases.OutputBusy, match="lost its lease"):
        mine.check()
    mine.release()
    assert json.loads((tmp_path / "out" / leases.LEASE_FILE).read_text())["id"] == "other"


def test_a_lease_from_the_future_or_another_pid_space_is_judged_right(tmp_path, monkeypatch):
    """A lease "renewed" a year ahead (a clock far off) is stale, not a lock for a year; a gone
    pid is taken over at once only in this pid namespace of this boot (containers sharing a
    host name each have their own pids); an interrupted take leaves no lease behind."""
    import socket
    from datetime import timedelta

    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    store = OutputStore(str(tmp_path / "out"))
    path = tmp_path / "out" / leases.LEASE_FILE
    path.parent.mkdir(parents=True)
    now = leases._now()  # private: the lease's own clock
    gone = int(open("/proc/sys/kernel/pid_max").read()) + 1  # no process has it
    space = leases._process_space()  # private: what a lease records of its process
    base = {"id": "x", "host": socket.gethostname(), "started": "", **space}
    ahead = (now + timedelta(days=365)).isoformat()
    path.write_text(json.dumps({**base, "pid": os.getpid(), "renewed": ahead}))
    assert leases.live_holder(store) is None
    path.write_text(json.dumps({**base, "pid": gone, "pidns": "pid:[1]", "renewed": now.isoformat()}))
    assert leases.live_holder(store) is not None  # another namespace's pid: not known to be gone
    path.write_text(json.dumps({**base, "pid": gone, "renewed": now.isoformat()}))
    assert leases.live_holder(store) is None
    path.unlink()

    def interrupted(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(leases.time, "sleep", interrupted)
    with pytest.raises(KeyboardInterrupt):
        leases.Lease(store).take()
    assert not path.exists()


@pytest.mark.usefixtures("ray_session")  # a job: the shared Ray, not one of its own
def test_a_run_whose_lease_is_taken_mid_run_commits_no_further_part(checkpoints, tmp_path, monkeypatch):
    """The wiring, not the Lease alone: once another run's lease replaces this run's (here
    right after its first part), the run commits nothing more and stops in one line. With the
    pipeline's guard left out (commit_rows' default does nothing) it committed every part."""
    from seglabel.core.errors import OutputBusy
    from seglabel.job import lease as leases
    from seglabel.outputs.store import OutputStore

    monkeypatch.setattr(leases, "RENEW_EVERY_S", 0.05)
    taken: list = []
    take = leases.Lease.take
    monkeypatch.setattr(leases.Lease, "take", lambda self: taken.append(self) or take(self))
    write_part = OutputStore.write_part

    def write_then_lose_the_lease(store, table, name):
        path = write_part(store, table, name)
        if len(taken) == 1 and taken[0].lost is None:
            other = {"id": "other", "host": "elsewhere", "pid": 1, "started": "",
                     "renewed": leases._now().isoformat()}  # private: a lease as another run writes it
            (out / leases.LEASE_FILE).write_text(json.dumps(other))
            deadline = time.monotonic() + 30
            while taken[0].lost is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert taken[0].lost is not None, "the renewal never saw the other lease"
        return path

    monkeypatch.setattr(OutputStore, "write_part", write_then_lose_the_lease)
    images = photos(tmp_path / "photos", 12)
    out = tmp_path / "labels"
    with pytest.raises(OutputBusy, match="lost its lease and stops here"):
        run(checkpoints, images, out, batch_size=1, rows_per_part=1)
    parts = sorted((out / "metadata").glob("part-*.parquet"))
    assert len(parts) == 1, [p.name for p in parts]
    assert len(read_rows(str(out))) == 1
    assert json.loads((out / leases.LEASE_FILE).read_text())["id"] == "other"  # left to its holder
