"""The whole path with real parts: Monitor -> gRPC stream -> a real `deltawatch serve` process ->
SQLite -> HTTP API, on ephemeral loopback ports.

Toy model: two blocks, each with a 96x128 and a 128x96 fp32 matrix (above the exact-path size
min(m, n) <= r = 32, so the tracker runs), W0 with a decaying spectrum. Trajectories are applied
to the parameters directly (deterministic): OPD-like W_t = W0 + (t/T)·B·Aᵀ (a fixed rank-16
channel, entries ~1e-3 per step) + faint dense noise.
"""

from __future__ import annotations

import math
import sqlite3
import time
import urllib.parse
import urllib.request

import pytest
import torch
from deltawatch.client import Monitor
from deltawatch.sidecar.exact import exact_counts, exact_keys
from support import (
    SidecarProcess,
    assert_rotation_within_bound,
    free_port,
    one_thread_fixture,
    wait_for,
)

SHAPES = {"q": (96, 128), "o": (128, 96)}


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(128, 96, bias=False)
        self.o = torch.nn.Linear(96, 128, bias=False)


class Toy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([Block(), Block()])


def pretrained_like(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """U diag(s) Vᵀ with s_i = 0.5 / sqrt(i + 1): a decaying spectrum."""
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    k = min(m, n)
    s = 0.5 / torch.sqrt(torch.arange(1, k + 1, dtype=torch.float64))
    return ((U[:, :k] * s) @ V[:, :k].T).float()


def make_toy(seed: int = 0) -> tuple[Toy, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    model = Toy()
    W0 = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(pretrained_like(*p.shape, g))
            W0[name] = p.detach().clone()
    return model, W0


def opd_direction(shape, g: torch.Generator) -> torch.Tensor:
    m, n = shape
    B = torch.randn(m, 16, generator=g, dtype=torch.float64) * 0.25
    A = torch.linalg.qr(torch.randn(n, 16, generator=g, dtype=torch.float64))[0]
    return B @ A.T * 1e-2  # entries ~1e-3: well above bf16's resolution of 0.02-sized weights


def set_weights(model: Toy, W0: dict, directions: dict, t: int, g: torch.Generator) -> dict:
    """W_t = W0 + t·D + faint noise (1% of the step); returns the weights set."""
    out = {}
    with torch.no_grad():
        for name, p in model.named_parameters():
            D = directions[name]
            noise = torch.randn(D.shape, generator=g, dtype=torch.float64) * 1e-5
            Wt = (W0[name].double() + t * D + noise).float()
            p.copy_(Wt)
            out[name] = Wt.clone()
    return out


# ---------------------------------------------------------------------------------------------
# A real sidecar process


one_compute_thread = one_thread_fixture()  # the trainer (this process) beside the sidecar


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One sidecar for the tests that need nothing special (distinct run names)."""
    s = SidecarProcess(tmp_path_factory.mktemp("shared")).start()
    yield s
    assert s.stop() == 0  # SIGTERM: a graceful exit


@pytest.fixture
def sidecars(tmp_path):
    started: list[SidecarProcess] = []

    def start(**kwargs) -> SidecarProcess:
        s = SidecarProcess(tmp_path, **kwargs).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.kill()


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


# ---------------------------------------------------------------------------------------------


def test_numbers_through_the_real_path_equal_the_exact_reference(shared):
    """Issue-2 bounds for an OPD-like run, read back over HTTP from a real sidecar process."""
    side = shared
    model, W0 = make_toy(0)
    g = torch.Generator().manual_seed(1)
    directions = {n: opd_direction(p.shape, g) for n, p in model.named_parameters()}
    mon = Monitor(model, run="toy-opd", endpoint=side.endpoint, every=1)
    weights = {}
    for t in range(1, 6):
        weights[t] = set_weights(model, W0, directions, t, g)
        mon.step(t)
    assert mon.close(timeout=60) is True
    assert mon.stats()["errors"] == {}
    detail = side.get("/api/v1/runs/toy-opd")
    assert detail["last_step"] == 5 and len(detail["matrices"]) == 4
    for row in detail["matrices"]:
        name = row["matrix"]
        assert (row["layer"], row["module"]) == (int(name.split(".")[1]), name.split(".")[2])
        hist = side.history("toy-opd", name)
        assert sorted(hist) == [1, 2, 3, 4, 5]
        for t in (3, 5):  # after 3 checks the OPD-like bounds hold
            got = hist[t]
            ref = exact_keys(W0[name], weights[t][name], view="bf16", channel_rank=16)
            counts = exact_counts(W0[name], weights[t][name], view="bf16")
            numel = math.prod(SHAPES[name.split(".")[2]])
            assert rel(got["frobenius_norm"], ref["frobenius_norm"]) <= 1e-4
            assert round(got["bf16_visible_ratio"] * numel) == counts["visible"]
            assert got["bf16_visible_ratio"] == counts["visible"] / numel
            assert got["low_magnitude_overlap"] == counts["visible_low"] / counts["visible"]
            assert got["principal_overlap"] == counts["visible_principal"] / counts["visible"]
            assert rel(got["stable_rank"], ref["stable_rank"]) <= 0.02
            assert rel(got["spectral_norm"], ref["spectral_norm"]) <= 0.01
            assert abs(got["topk_energy_ratio"] - ref["topk_energy_ratio"]) <= 0.02
            assert_rotation_within_bound(got, ref)


def test_kill9_and_restart_lose_no_acknowledged_report(sidecars):
    side = sidecars()
    model, W0 = make_toy(2)
    g = torch.Generator().manual_seed(3)
    directions = {n: opd_direction(p.shape, g) for n, p in model.named_parameters()}
    mon = Monitor(model, run="toy-kill", endpoint=side.endpoint, every=1, lock_at_step=3)
    names = [m.name for m in mon.matrices]
    for t in range(1, 7):
        set_weights(model, W0, directions, t, g)
        mon.step(t)
    wait_for(  # the baselines and 8 reports acknowledged (so stored: persist, then ack)
        lambda: mon.stats()["acknowledged"] >= len(names) + 8,
        lambda: f"8 acknowledged reports: {mon.stats()}",
    )
    stored_before = {name: sorted(side.history("toy-kill", name)) for name in names}
    side.kill()
    for t in range(7, 10):  # the sidecar is down: checks queue up, the trainer does not wait
        set_weights(model, W0, directions, t, g)
        mon.step(t)
    side2 = sidecars(grpc_port=side.grpc_port)  # same data dir, same port
    for t in range(10, 13):
        set_weights(model, W0, directions, t, g)
        mon.step(t)
    assert mon.close(timeout=60) is True
    assert sum(map(len, stored_before.values())) >= 8  # acknowledged only once stored
    for name in names:  # what was stored survived kill -9; what was not acknowledged was resent
        assert sorted(side2.history("toy-kill", name)) == list(range(1, 13))
    detail = side2.get("/api/v1/runs/toy-kill")
    assert all(r["locked"] and r["lock_step"] == 3 for r in detail["matrices"])
    assert mon.stats()["connections"] >= 2
    assert mon._transport.baselines_resent == 0  # the store kept them
    assert side2.stop() == 0  # SIGTERM: a graceful exit


def test_absent_sidecar_costs_the_trainer_nothing(sidecars):
    """No sidecar for the first half of a run: no step above 2 s while the connect timeout is
    20 s, no exception, and the checks arrive once it is up."""
    port = free_port()
    model, _ = make_toy(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mon = Monitor(model, run="toy-late", endpoint=f"127.0.0.1:{port}", every=2, connect_timeout=20)
    mon.attach(opt)
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(5))
    durations = []
    side = None
    for step in range(1, 21):
        if step == 11:
            side = sidecars(grpc_port=port)
        t0 = time.monotonic()
        y = x
        for b in model.layers:
            y = b.o(torch.tanh(b.q(y)))
        loss = (y - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()  # the hook checks every 2nd step
        durations.append(time.monotonic() - t0)
    print("durations", [round(d, 3) for d in durations])
    assert max(durations) < 2.0, durations
    assert mon.close(timeout=60) is True
    assert side is not None
    for m in mon.matrices:
        assert sorted(side.history("toy-late", m.name)) == list(range(2, 21, 2))
    assert mon.stats()["dropped_reports"] == 0


def test_resume_with_a_new_incarnation_replaces_reports_from_the_resume_step(shared, tmp_path):
    from safetensors.torch import save_file

    side = shared
    model, W0 = make_toy(6)
    save_file({k: v.contiguous() for k, v in W0.items()}, str(tmp_path / "anchor.safetensors"))
    g = torch.Generator().manual_seed(7)
    first = {n: opd_direction(p.shape, g) for n, p in model.named_parameters()}
    second = {n: -2 * d for n, d in first.items()}
    mon = Monitor(model, run="toy-resume", endpoint=side.endpoint, every=1, incarnation=1)
    truth = {}
    for t in range(1, 7):
        truth[t] = set_weights(model, W0, first, t, g)
        mon.step(t)
    assert mon.close(timeout=60) is True
    state = mon.state_dict()
    # The trainer "restarts" from its step-4 checkpoint and takes another path from there on:
    # steps 5 and 6 are replaced.
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(truth[4][name])
    mon2 = Monitor(
        model, run="toy-resume", endpoint=side.endpoint, every=1, incarnation=2, resume_step=5,
        anchor_checkpoint=str(tmp_path / "anchor.safetensors"),
    )  # fmt: skip
    mon2.load_state_dict(state)
    for t in range(5, 7):
        truth[t] = {
            n: (truth[4][n].double() + (t - 4) * second[n]).float()
            for n, _ in model.named_parameters()
        }
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(truth[t][name])
        mon2.step(t)
    assert mon2.close(timeout=60) is True
    for name in W0:
        hist = side.history("toy-resume", name)
        assert sorted(hist) == list(range(1, 7))
        for t in range(1, 7):
            ref = exact_keys(W0[name], truth[t][name], view="bf16", channel_rank=16)
            assert rel(hist[t]["frobenius_norm"], ref["frobenius_norm"]) <= 1e-4, (name, t)


def test_the_hellos_channel_rank_field_sets_K_and_K_stays_within_a_run(shared):
    """K = 4 only in Hello.channel_rank (config_json says nothing of it, so the sidecar's
    default would be 16): the top-K energy follows K = 4; a hello with another K is refused,
    one from an older client (K only in config_json) with the same K is not."""
    import grpc
    from deltawatch.client import wire
    from deltawatch.client.settings import SketchSettings
    from deltawatch.client.tracker import MatrixTracker
    from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc

    g = torch.Generator().manual_seed(21)
    run, name, shape = "toy-k-field", "model.layers.0.q.weight", SHAPES["q"]
    W0, D = pretrained_like(*shape, g), opd_direction(shape, g)
    sketch = SketchSettings(channel_rank=4, oversample=4)
    tracker = MatrixTracker.attach(name, W0, sketch=sketch)
    manifest = [{"matrix": name, "shape": list(shape), "numel": math.prod(shape),
                 "dtype": "float32", "layer": 0, "module": "q"}]  # fmt: skip

    def hello(config: dict, **k) -> list:
        return wire.encode_hello(
            1, run=run, incarnation=1, resume_step=None, client_version="test", config=config,
            manifest=manifest, **k,
        )  # fmt: skip

    weights = {t: (W0.double() + t * D).float() for t in range(1, 6)}
    frames = [*hello({}, channel_rank=4, oversample=4)]
    frames += wire.encode_baseline(
        2, run=run, incarnation=1, matrix=name, sketch=tracker.baseline()
    )
    for t, Wt in weights.items():
        frames += wire.encode_report(2 + t, run=run, incarnation=1, check=tracker.check(Wt, t))
    with grpc.insecure_channel(shared.endpoint) as channel:
        stub = pb_grpc.IngestStub(channel)
        out = list(stub.Stream(iter(frames), timeout=60))
        assert [i for m in out if m.WhichOneof("body") == "ack" for i in m.ack.ids] == [
            *range(1, 8)
        ]
        got = shared.history(run, name)[5]
        ref = {
            k: exact_keys(W0, weights[5], view="bf16", channel_rank=k)["topk_energy_ratio"]
            for k in (4, 16)
        }
        assert ref[16] - ref[4] > 0.2  # K = 16 would be told apart
        assert abs(got["topk_energy_ratio"] - ref[4]) <= 0.02, (got["topk_energy_ratio"], ref)

        with pytest.raises(grpc.RpcError) as err:
            list(stub.Stream(iter(hello({}, channel_rank=8, oversample=4)), timeout=30))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value.details()
        assert "channel_rank (K) is 8" in err.value.details()
        assert "K must stay the same" in err.value.details()
        older = list(stub.Stream(iter(hello({"channel_rank": 4, "oversample": 4})), timeout=30))
        assert [m.WhichOneof("body") for m in older] == ["ack"]


# ---------------------------------------------------------------------------------------------
# Hostile input, on a raw stub


def _frames_for_hostile_tests():
    from deltawatch.client import wire
    from deltawatch.client.tracker import MatrixTracker

    g = torch.Generator().manual_seed(11)
    name = "model.layers.0.mlp.up_proj.weight"
    W0 = pretrained_like(40, 48, g)
    tracker = MatrixTracker.attach(name, W0)
    checks = [tracker.check(W0 + t * 1e-3 * torch.randn(40, 48, generator=g), t) for t in (1, 2)]
    manifest = [{"matrix": name, "shape": [40, 48], "numel": 1920, "dtype": "float32",
                 "layer": 0, "module": "mlp.up_proj"}]  # fmt: skip

    def hello(msg_id=1, run="hostile-ok", **over):
        entries = [dict(manifest[0], **over)]
        config = {"channel_rank": 16, "oversample": 16}
        return wire.encode_hello(
            msg_id, run=run, incarnation=1, resume_step=None, client_version="test",
            config=config, manifest=entries,
        )  # fmt: skip

    def report(msg_id, check, **changes):
        import dataclasses

        return wire.encode_report(
            msg_id, run="hostile-ok", incarnation=1, check=dataclasses.replace(check, **changes)
        )

    return name, checks, hello, report


def test_hostile_messages_get_clear_statuses_and_change_nothing(shared):
    import grpc
    from deltawatch.v1 import deltawatch_pb2 as pb
    from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    name, (c1, c2), hello, report = _frames_for_hostile_tests()
    channel = grpc.insecure_channel(shared.endpoint)
    stub = pb_grpc.IngestStub(channel)

    def run(frames) -> list:
        return list(stub.Stream(iter(frames), timeout=30))

    def refused(frames, code, fragment) -> None:
        with pytest.raises(grpc.RpcError) as err:
            run(frames)
        assert err.value.code() == code, err.value.details()
        assert fragment in err.value.details(), err.value.details()

    IA, FP = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
    refused(report(5, c1), FP, "before the hello")
    refused(hello(run="bad run!"), IA, "hello.run: 'bad run!'")
    refused(hello(numel=7), IA, "hello.manifest[0].numel: 7, expected 1920")
    refused(hello(matrix="x\n; DROP TABLE runs"), IA, "hello.manifest[0].matrix")
    refused(hello(shape=[40, 0]), IA, "hello.manifest[0].shape")
    orphan = pb.ClientMessage(id=9, chunk=pb.TensorChunk(id=9, field="update.G", chunk_count=1))
    refused([*hello(), orphan], IA, "no message waits")
    lying = report(6, c1)[0]
    lying.report.weight.G.shape[:] = [48, 100_000]
    lying.report.weight.G.data = b""
    lying.report.weight.G.chunk_count = 19
    oversize = pb.ClientMessage(id=3, goodbye=pb.Goodbye(run="x", reason="a" * (5 << 20)))
    refused([*hello(), oversize], grpc.StatusCode.RESOURCE_EXHAUSTED, "")
    garbage = channel.stream_stream(
        "/deltawatch.v1.Ingest/Stream",
        request_serializer=lambda b: b,
        response_deserializer=lambda b: b,
    )
    with pytest.raises(grpc.RpcError) as err:
        list(garbage(iter([b"\xff\xfe\x00garbage"]), timeout=30))
    assert err.value.code() == IA and "not a deltawatch.v1.ClientMessage" in err.value.details()

    # Message-level faults: an Error frame naming the report; the stream goes on.
    nan_C = c1.weight.C.clone()
    nan_C[0, 0] = float("nan")
    import dataclasses

    out = run([
        *hello(),
        lying,  # a declaration that does not fit the manifest: refused alone, chunks skipped
        *report(10, c1, matrix="model.layers.9.mlp.up_proj.weight"),
        *report(11, c1, shape=(41, 48)),
        *report(12, c1, weight=dataclasses.replace(c1.weight, C=nan_C)),
        *report(13, c1, frobenius_sq=float("inf")),
        *report(14, c1),
        *report(15, c2),
        *report(14, c1),  # a resent duplicate: acknowledged, stored once
    ])  # fmt: skip
    kinds = [(m.WhichOneof("body"), m) for m in out]
    acks = [i for k, m in kinds if k == "ack" for i in m.ack.ids]
    errors = {m.error.id: m.error for k, m in kinds if k == "error"}
    assert acks == [1, 14, 15, 14]
    assert set(errors) == {6, 10, 11, 12, 13}
    assert all(e.code == "INVALID_ARGUMENT" for e in errors.values())
    assert "weight.G declared with shape [48, 100000]" in errors[6].message
    assert "is not in the manifest" in errors[10].message
    assert "report.shape [41, 48], manifest says [40, 48]" in errors[11].message
    assert "weight.C: 1 non-finite values" in errors[12].message
    assert "report.frobenius_sq: inf" in errors[13].message

    # The process is healthy, and only the valid reports are stored.
    health = health_pb2_grpc.HealthStub(channel)
    status = health.Check(health_pb2.HealthCheckRequest(service="deltawatch.v1.Ingest"), timeout=10)
    assert status.status == health_pb2.HealthCheckResponse.SERVING
    runs = {r["run"] for r in shared.get("/api/v1/runs")["runs"]}
    assert "hostile-ok" in runs and "bad run!" not in runs
    assert sorted(shared.history("hostile-ok", name)) == [1, 2]
    channel.close()


def test_full_queue_drops_the_oldest_and_reports_the_count(sidecars):
    """1 MiB of queue, no sidecar, 12 checks of ~160 kB: the oldest reports are dropped and
    counted; the newest arrive, and the sidecar exports the client's count."""
    port = free_port()
    model, W0 = make_toy(8)
    g = torch.Generator().manual_seed(9)
    directions = {n: opd_direction(p.shape, g) for n, p in model.named_parameters()}
    mon = Monitor(model, run="toy-drop", endpoint=f"127.0.0.1:{port}", every=1,
                  max_queue_bytes=1 << 20)  # fmt: skip
    for t in range(1, 13):
        set_weights(model, W0, directions, t, g)
        mon.step(t)
    dropped = mon.stats()["dropped_reports"]
    assert dropped > 0 and mon.stats()["queued_bytes"] <= 1 << 20
    side = sidecars(grpc_port=port)
    assert mon.close(timeout=60) is True
    kept = {m.name: sorted(side.history("toy-drop", m.name)) for m in mon.matrices}
    assert sum(len(v) for v in kept.values()) == 4 * 12 - dropped
    for steps in kept.values():  # what is kept is the newest
        assert steps == list(range(13 - len(steps), 13))
    with urllib.request.urlopen(f"http://127.0.0.1:{side.http_port}/metrics", timeout=10) as r:
        metrics = r.read().decode()
    line = f'deltawatch_client_dropped_reports_total{{run="toy-drop"}} {float(dropped)}'
    assert line in metrics


# ---------------------------------------------------------------------------------------------
# In-process sidecar: alert fan-out to the run's streams, reflection


@pytest.fixture
def in_process(tmp_path):
    import asyncio
    import threading

    from deltawatch.sidecar.config import ServeConfig
    from deltawatch.sidecar.server import Sidecar

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    config = ServeConfig(
        grpc_address="127.0.0.1:0", http_address="127.0.0.1:0", data_dir=str(tmp_path),
        device="cpu",
    )  # fmt: skip
    sidecar = Sidecar(config)
    asyncio.run_coroutine_threadsafe(sidecar.start(), loop).result(30)
    yield sidecar
    asyncio.run_coroutine_threadsafe(sidecar.stop(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_alerts_reach_on_alert_of_their_run_only(in_process):
    import grpc
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    endpoint = f"127.0.0.1:{in_process.grpc_port}"
    got_a, got_b = [], []
    model_a, _ = make_toy(10)
    model_b, _ = make_toy(11)
    mon_a = Monitor(model_a, run="toy-alert-a", endpoint=endpoint, on_alert=got_a.append)
    mon_b = Monitor(model_b, run="toy-alert-b", endpoint=endpoint, on_alert=got_b.append)
    wait_for(
        lambda: mon_a.stats()["acknowledged"] >= 4 and mon_b.stats()["acknowledged"] >= 4,
        lambda: f"baselines acknowledged: {mon_a.stats()}, {mon_b.stats()}",
    )
    item = {
        "id": "SubspaceDrift/toy-alert-a/1", "rule": "SubspaceDrift", "run": "toy-alert-a",
        "matrix": None, "state": "firing", "severity": "warning",
        "started_at": "2026-11-26T15:00:00.000Z", "ended_at": None, "value": 0.42,
        "summary": "3 of 4 matrices left their locked channel",
    }  # fmt: skip
    in_process.ingest.publish_alert("toy-alert-a", item)  # from another thread, as the engine does
    wait_for(lambda: got_a, lambda: f"the alert on_alert: {mon_a.stats()}")
    assert got_a == [item] and got_b == []
    assert mon_a.close(60), mon_a.stats()
    assert mon_b.close(60), mon_b.stats()

    with grpc.insecure_channel(endpoint) as channel:
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "deltawatch.v1.Ingest" in services and "grpc.health.v1.Health" in services


def test_a_sidecar_that_lost_its_store_gets_the_baselines_again(sidecars, tmp_path):
    """kill -9, then a sidecar on an empty data dir at the same port: the hello recreates the run
    and the client resends the baselines, so rotation and spectral shift have their reference
    again."""
    side = sidecars()
    model, W0 = make_toy(12)
    g = torch.Generator().manual_seed(13)
    directions = {n: opd_direction(p.shape, g) for n, p in model.named_parameters()}
    mon = Monitor(model, run="toy-lost", endpoint=side.endpoint, every=1)
    for t in range(1, 3):
        set_weights(model, W0, directions, t, g)
        mon.step(t)
    wait_for(lambda: mon.unacknowledged() == 0, lambda: f"everything acknowledged: {mon.stats()}")
    side.kill()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    side2 = SidecarProcess(fresh, grpc_port=side.grpc_port).start()
    try:
        wait_for(lambda: mon._transport.baselines_resent == 4, lambda: f"resend: {mon.stats()}")
        for t in range(3, 5):
            set_weights(model, W0, directions, t, g)
            mon.step(t)
        assert mon.close(timeout=60) is True
        for m in mon.matrices:
            assert side2.history("toy-lost", m.name)[4]["step"] == 4
    finally:
        side2.kill()
    # the new store holds every matrix's baseline again (W0's Ritz pairs: rotation and shift
    # have their reference; whether they are reported is their own bound's call)
    with sqlite3.connect(fresh / "deltawatch.sqlite3") as db:
        rows = db.execute(
            "SELECT matrix FROM tensors WHERE run = 'toy-lost' AND name = 'base_V'"
        ).fetchall()
    assert {r[0] for r in rows} == {m.name for m in mon.matrices}
