"""A store that cannot write is a retryable fault, visible, and loses nothing acknowledged.

Real parts: a real `deltawatch serve` whose data dir is a real 8 MiB tmpfs (`mount -t tmpfs`,
root only: skipped with the reason elsewhere), fed by a real `Monitor`. A filler file takes the
tmpfs's last byte mid-run; the sidecar refuses reports RESOURCE_EXHAUSTED, `/readyz` answers 503
with the reason, `deltawatch_store_writable` is 0 and the log says so once; the client keeps the
refused reports and resends them. When the filler goes, every report of every step arrives and
nothing is dropped. The same for a database locked by another process (UNAVAILABLE).
A run whose stored rows cannot be loaded is quarantined at start-up, and the other runs serve.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import urllib.error
import urllib.request

import pytest
import torch
from deltawatch.client import Monitor
from support import SidecarProcess, one_thread_fixture, wait_for

SHAPES = {"q": (96, 128), "o": (128, 96)}


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(128, 96, bias=False)
        self.o = torch.nn.Linear(96, 128, bias=False)


class _Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block()])


one_compute_thread = one_thread_fixture()


@pytest.fixture
def tmpfs(tmp_path):
    """An 8 MiB tmpfs at tmp_path/"store", unmounted afterwards."""
    where = tmp_path / "store"
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def _readyz(side: SidecarProcess) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"{side.http_url}/readyz", timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _metric(side: SidecarProcess, name: str) -> float:
    with urllib.request.urlopen(f"{side.http_url}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} not exported")


def _fill(path) -> None:
    """Write zeros into `path` until the file system is full."""
    block = bytes(1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass


def _steps(side: SidecarProcess, run: str, names) -> dict[str, list[int]]:
    return {name: sorted(side.history(run, name)) for name in names}


def test_a_full_disk_is_retried_visible_and_loses_nothing(tmp_path, tmpfs):
    side = SidecarProcess(tmp_path, f"--data-dir={tmpfs}").start()
    try:
        torch.manual_seed(0)
        model = _Toy()
        mon = Monitor(model, run="full-disk", endpoint=side.endpoint, every=1)
        names = [m.name for m in mon.matrices]
        step = 0

        def train(n: int) -> None:
            nonlocal step
            with torch.no_grad():
                for _ in range(n):
                    step += 1
                    for p in model.parameters():
                        p.add_(torch.randn_like(p) * 1e-3)
                    mon.step(step)

        train(3)
        wait_for(lambda: mon.stats()["unacknowledged"] == 0, "the first reports acknowledged")
        _fill(tmpfs / "filler")

        def refused_retryable() -> bool:
            train(1)
            return mon.stats()["retried"] > 0

        wait_for(refused_retryable, "a report refused as retryable", timeout=120)
        status, body = _readyz(side)
        assert status == 503 and "full" in body["reason"], body
        assert _metric(side, "deltawatch_store_writable") == 0.0
        assert mon.stats()["refused"] == 0 and mon.stats()["dropped_reports"] == 0
        (tmpfs / "filler").unlink()
        wait_for(lambda: _readyz(side)[0] == 200, "/readyz back to 200", timeout=60)
        assert _metric(side, "deltawatch_store_writable") == 1.0
        train(2)
        assert mon.close(timeout=90) is True
        stats = mon.stats()
        assert stats["dropped_reports"] == 0 and stats["refused"] == 0, stats
        assert stats["acknowledged"] == len(names) * (step + 1), stats  # + the baselines
        assert _steps(side, "full-disk", names) == {n: list(range(1, step + 1)) for n in names}
        log = side.log_path.read_text()
        assert log.count("cannot write: the store could not write (the disk") == 1, log[-3000:]
    finally:
        side.kill()


def test_a_locked_database_is_retried_and_loses_nothing(tmp_path):
    side = SidecarProcess(tmp_path).start()
    try:
        torch.manual_seed(1)
        model = _Toy()
        mon = Monitor(model, run="locked-db", endpoint=side.endpoint, every=1)
        names = [m.name for m in mon.matrices]
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        mon.step(1)
        wait_for(lambda: mon.stats()["unacknowledged"] == 0, "step 1 acknowledged")
        locker = sqlite3.connect(tmp_path / "deltawatch.sqlite3", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")  # another process holds the write lock
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 1e-3)
        mon.step(2)
        wait_for(lambda: mon.stats()["retried"] > 0, "a report refused as retryable", timeout=60)
        assert "refused_unavailable" not in mon.stats()["errors"]
        assert "retry_unavailable" in mon.stats()["errors"], mon.stats()
        assert _readyz(side)[0] == 503
        locker.execute("ROLLBACK")
        locker.close()
        assert mon.close(timeout=90) is True
        assert mon.stats()["refused"] == 0
        assert _steps(side, "locked-db", names) == {n: [1, 2] for n in names}
        assert _readyz(side)[0] == 200
    finally:
        side.kill()


def test_a_run_that_cannot_be_loaded_is_quarantined_and_the_rest_serve(tmp_path):
    side = SidecarProcess(tmp_path).start()
    try:
        for run in ("good-run", "bad-config", "bad-manifest"):
            torch.manual_seed(2)
            model = _Toy()
            mon = Monitor(model, run=run, endpoint=side.endpoint, every=1)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
            mon.step(1)
            assert mon.close(timeout=60) is True
        good = side.run("good-run")
        side.kill()
        with sqlite3.connect(tmp_path / "deltawatch.sqlite3") as con:  # a damaged row
            con.execute("UPDATE runs SET config = '{\"alpha\": 1e999' WHERE run = 'bad-config'")
            con.execute("UPDATE manifests SET rows = -3 WHERE run = 'bad-manifest'")
        side.restart()
        status, body = _readyz(side)
        assert status == 200 and set(body["quarantined"]) == {"bad-config", "bad-manifest"}, body
        assert "hello.manifest[0].shape" in body["quarantined"]["bad-manifest"], body
        assert _metric(side, "deltawatch_runs_quarantined") == 2.0
        assert side.run("good-run") == good
        assert "run 'bad-config' quarantined" in side.log_path.read_text()
    finally:
        side.kill()
