"""The store on real SQLite: tensors round-trip bit-exactly, the incarnation visibility rule,
alerts and alert state, and "persist, then acknowledge" across kill -9 of the writing process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass

import pytest
import torch
from deltawatch.sidecar.store import (
    BLOB_STREAM_BYTES,
    CheckCounts,
    StateUpdate,
    Store,
    tensor_from_bytes,
    tensor_to_bytes,
)


@dataclass(frozen=True)
class Entry:
    matrix: str
    shape: tuple[int, int]
    numel: int
    dtype: str = "float32"
    layer: int | None = 0
    module: str = "self_attn.q_proj"
    shard_layout: str = "replicated"
    owner_rank: int = 0


def _counts(numel: int = 12, visible: int = 5) -> CheckCounts:
    return CheckCounts(numel, visible, 2, 1)


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64, torch.bool]
)
def test_engine_store_tensor_bytes_round_trip_bit_exact(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(7, 5, generator=g) * 1e3).to(dtype)
    name, shape, data = tensor_to_bytes(x)
    assert len(data) == x.numel() * x.element_size()
    y = tensor_from_bytes(name, shape, data)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert torch.equal(y.view(torch.uint8), x.view(torch.uint8))


def test_engine_store_refuses_unknown_dtype_and_non_finite_keys(tmp_path):
    with pytest.raises(TypeError):
        tensor_from_bytes("object", [1], b"\0" * 8)
    s = Store(tmp_path)
    s.save_hello("r", 1, None, {}, [Entry("m", (3, 4), 12)])
    with pytest.raises(ValueError, match="non-finite"):
        s.commit_check("r", "m", 1, 1, {"stable_rank": float("nan")}, _counts(), None)
    assert s.history("r") == []


def test_engine_store_wal_mode_and_full_sync(tmp_path):
    s = Store(tmp_path)
    with s.transaction() as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert (tmp_path / "deltawatch.sqlite3").exists()


def test_engine_store_duplicate_is_not_written_twice(tmp_path):
    s = Store(tmp_path)
    s.save_hello("r", 1, None, {}, [Entry("m", (3, 4), 12)])
    assert s.commit_check("r", "m", 10, 1, {"stable_rank": 1.5}, _counts(), None)
    assert not s.commit_check("r", "m", 10, 1, {"stable_rank": 9.0}, _counts(), None)
    (row,) = s.history("r", "m")
    assert row.keys == {"stable_rank": 1.5} and row.step == 10


def test_engine_store_newer_incarnation_hides_history_from_resume_step(tmp_path):
    s = Store(tmp_path)
    s.save_hello("r", 1, None, {}, [Entry("m", (3, 4), 12)])
    for step in (10, 20, 30, 40):
        s.commit_check("r", "m", step, 1, {"x": float(step)}, _counts(), None)
    s.save_hello("r", 2, 30, {}, [Entry("m", (3, 4), 12)])
    assert [h.step for h in s.history("r", "m")] == [10, 20]
    s.commit_check("r", "m", 30, 2, {"x": 300.0}, _counts(), None)
    s.commit_check("r", "m", 35, 2, {"x": 350.0}, _counts(), None)
    rows = s.history("r", "m")
    assert [(h.step, h.incarnation, h.keys["x"]) for h in rows] == [
        (10, 1, 10.0),
        (20, 1, 20.0),
        (30, 2, 300.0),
        (35, 2, 350.0),
    ]
    # without a resume step a newer incarnation still wins step by step
    s.save_hello("r", 3, None, {}, [Entry("m", (3, 4), 12)])
    s.commit_check("r", "m", 20, 3, {"x": 2000.0}, _counts(), None)
    assert [(h.step, h.keys["x"]) for h in s.history("r", "m")] == [
        (10, 10.0),
        (20, 2000.0),
        (30, 300.0),
        (35, 350.0),
    ]
    assert s.latest("r")["m"].step == 35


def test_engine_store_state_lock_refs_and_rewind(tmp_path):
    s = Store(tmp_path)
    s.save_hello("r", 1, None, {"rank": 4}, [Entry("m", (3, 4), 12)])
    v = torch.randn(4, 2)
    snap = torch.randn(4, 2)
    state = StateUpdate({"checks": 3}, {"snap_1": snap, "v_ref": v})
    s.commit_check("r", "m", 5, 1, {}, _counts(), state, lock_ref=(5, v))
    s.commit_check("r", "m", 6, 1, {}, _counts(), StateUpdate({"checks": 4}, {}, ("snap_1",)))
    s.close()
    s = Store(tmp_path)
    inc, last, meta, tensors = s.load_states("r")["m"]
    assert (inc, last, meta) == (1, 6, {"checks": 4})
    assert set(tensors) == {"v_ref"} and torch.equal(tensors["v_ref"], v)
    (lock_step, v_ref) = s.lock_refs("r")["m"]
    assert lock_step == 5 and torch.equal(v_ref, v)
    assert s.rewind("r", 6) == []
    assert s.rewind("r", 5) == ["m"]
    assert s.lock_refs("r") == {}
    assert s.runs()[0]["config"] == {"rank": 4}


def test_big_tensors_are_written_in_pieces_and_read_back_exactly(tmp_path):
    """A state tensor or lock reference of BLOB_STREAM_BYTES or more goes into its row as a
    zeroblob written piece by piece (no bound copy); a smaller one beside it by executemany.
    Both read back bit for bit, a big one replaced by a smaller one and the other way round."""
    n = BLOB_STREAM_BYTES // 4 + 3  # float32: just over the limit, not a whole piece count
    big, small = torch.randn(n, 2), torch.randn(4, 2)
    s = Store(tmp_path)
    s.save_hello("r", 1, None, {}, [Entry("m", (3, n), 3 * n), Entry("k", (3, 4), 12)])
    state = StateUpdate({"checks": 1}, {"base_V": big.double(), "snap": small})
    s.commit_check("r", "m", 1, 1, {}, _counts(), state, lock_ref=(1, big))
    s.commit_check("r", "k", 1, 1, {}, _counts(), StateUpdate({}, {"base_V": big}))
    s.commit_check("r", "k", 2, 1, {}, _counts(), StateUpdate({}, {"base_V": small}))
    s.close()
    s = Store(tmp_path)
    states = s.load_states("r")
    assert torch.equal(states["m"][3]["base_V"], big.double())
    assert torch.equal(states["m"][3]["snap"], small)
    assert torch.equal(states["k"][3]["base_V"], small)
    (lock_step, v_ref) = s.lock_refs("r")["m"]
    assert lock_step == 1 and torch.equal(v_ref, big)
    s.commit_check("r", "k", 3, 1, {}, _counts(), StateUpdate({}, {"base_V": big}))
    assert torch.equal(s.load_states("r", "k")["k"][3]["base_V"], big)


def test_engine_store_alerts_and_alert_state(tmp_path):
    s = Store(tmp_path)
    a = s.save_alert(
        rule="SubspaceDrift",
        run="r",
        matrix="m",
        state="firing",
        severity="warning",
        started_at=100.0,
        value=0.5,
        summary="drift",
    )
    s.save_alert(
        rule="RunStalled",
        run="r",
        matrix=None,
        state="firing",
        severity="critical",
        started_at=50.0,
    )
    assert [x["rule"] for x in s.open_alerts()] == ["SubspaceDrift", "RunStalled"]
    s.save_alert(
        id=a,
        rule="SubspaceDrift",
        run="r",
        matrix="m",
        state="resolved",
        severity="warning",
        started_at=100.0,
        ended_at=200.0,
        value=0.95,
    )
    assert [x["rule"] for x in s.open_alerts()] == ["RunStalled"]
    resolved = s.alerts(state="resolved")
    assert resolved[0]["ended_at"] == 200.0 and resolved[0]["value"] == 0.95
    assert s.alerts(since=300.0) == s.open_alerts()
    s.save_alert_state({"a": '{"streak": 2}', "b": "{}"})
    s.save_alert_state({"a": '{"streak": 3}'})
    s.close()
    assert Store(tmp_path).load_alert_state() == {"a": '{"streak": 3}', "b": "{}"}


_WRITER = textwrap.dedent(
    """
    import sys
    from dataclasses import dataclass
    from deltawatch.sidecar.store import CheckCounts, Store

    @dataclass(frozen=True)
    class E:
        matrix: str; shape: tuple; numel: int; dtype: str; layer: int; module: str
        shard_layout: str; owner_rank: int

    s = Store(sys.argv[1])
    s.save_hello("r", 1, None, {}, [E("m", (3, 4), 12, "float32", 0, "q", "replicated", 0)])
    step = 0
    while True:
        step += 1
        s.commit_check("r", "m", step, 1, {"x": float(step)}, CheckCounts(12, 1, 0, 0), None)
        print(step, flush=True)  # the acknowledgement: only after the commit returned
    """
)


def test_engine_store_acknowledged_checks_survive_kill_9(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked = 0
    try:
        for line in proc.stdout:
            acked = int(line)
            if acked >= 40:
                break
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert acked >= 40
    steps = [h.step for h in Store(tmp_path).history("r", "m")]
    assert steps[:acked] == list(range(1, acked + 1))
