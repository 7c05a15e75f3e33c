"""The live self-audit end to end, against a real `deltawatch serve` over real gRPC: a Monitor with
`audit_every` on a model trained by a real optimizer sends its matrices' ΔW in rotation; the
sidecar's exact keys equal an independent float64 numpy computation from W_t − W0 and the live
estimates are within their stated bounds; a report with a wrong σ1 makes the AuditError rule
fire; hostile AuditBlocks are refused by name and change nothing; audits that do not fit the
client's queue are skipped and counted on both sides."""

from __future__ import annotations

import re
from dataclasses import replace

import grpc
import numpy as np
import pytest
import torch
from deltawatch.client import wire
from deltawatch.client.monitor import Monitor
from deltawatch.client.records import AuditPiece
from deltawatch.sidecar.audit import AUDITED_KEYS, STATED_BOUNDS
from deltawatch.v1 import deltawatch_pb2 as pb
from deltawatch.v1 import deltawatch_pb2_grpc as pb_grpc
from support import SidecarProcess, SyntheticRun, TinyModel, get_json, wait_for

Q = "model.layers.0.self_attn.q_proj.weight"  # SyntheticRun's 96×64 matrix


@pytest.fixture(scope="module")
def side(tmp_path_factory):
    with SidecarProcess(tmp_path_factory.mktemp("audit") / "data") as s:
        yield s


def audit_block(side: SidecarProcess, run: str) -> dict:
    return get_json(f"{side.http_url}/api/v1/runs/{run}")["audit"]


def numpy_keys(D: np.ndarray, k: int) -> dict[str, float]:
    """The audited keys of ΔW by numpy's float64 SVD (independent of torch's)."""
    S = np.linalg.svd(D, compute_uv=False)
    fro2 = float((D * D).sum())
    return {
        "frobenius_norm": fro2**0.5,
        "spectral_norm": float(S[0]),
        "stable_rank": fro2 / float(S[0]) ** 2,
        "topk_energy_ratio": float((S[:k] ** 2).sum()) / fro2,
    }


def bf16_view_delta(W_t: torch.Tensor, W0: torch.Tensor) -> np.ndarray:
    """bf16(W_t) − bf16(W0) in float64: the bf16 view's ΔW (DESIGN §2), formed independently."""
    return (W_t.to(torch.bfloat16).double() - W0.to(torch.bfloat16).double()).numpy()


def test_audits_equal_float64_and_live_keys_are_within_their_bounds(side):
    g = torch.Generator().manual_seed(5)
    model = TinyModel(g)
    params = {n: p for n, p in model.named_parameters()}
    W0 = {n: p.detach().clone() for n, p in params.items()}
    targets = {}  # W0 plus a rank-4 pull: a low-rank-dominated update, as in fine-tuning
    for n, W in W0.items():
        A, B = torch.randn(W.shape[0], 4, generator=g), torch.randn(4, W.shape[1], generator=g)
        targets[n] = W + 0.05 * A @ B / 8
    mon = Monitor(model, run="audit-live", endpoint=side.endpoint, every=1, audit_every=1,
                  channel_rank=8, oversample=8)  # fmt: skip
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon.attach(opt)
    weights = {}
    for step in range(1, 7):
        x = torch.randn(32, 128, generator=g)
        loss = sum(((x @ p.T - x @ targets[n].T) ** 2).mean() for n, p in params.items())
        opt.zero_grad()
        loss.backward()
        opt.step()  # the Monitor's post-hook checks (and audits) here
        weights[step] = {n: p.detach().clone() for n, p in params.items()}
    assert mon.close(timeout=60)
    assert mon.stats()["audits_skipped"] == 0
    wait_for(lambda: len(audit_block(side, "audit-live")["matrices"]) == 2, "two audited matrices")
    block = audit_block(side, "audit-live")
    assert block["pending"] == 0 and block["skipped"] == 0
    # steps 1..6 rotate over the 2 matrices (matrix t mod 2): the latest audits are steps 5 and 6
    assert sorted(item["step"] for item in block["matrices"]) == [5, 6]
    for item in block["matrices"]:
        name, step = item["matrix"], item["step"]
        ref = numpy_keys(bf16_view_delta(weights[step][name], W0[name]), 8)
        history = get_json(f"{side.http_url}/api/v1/runs/audit-live/history?matrix={name}")
        live = next(p for p in history["points"] if p["step"] == step)
        for key in AUDITED_KEYS:
            got = item["keys"][key]
            assert got["exact"] == pytest.approx(ref[key], rel=1e-9), (name, key)
            assert got["live"] == live[key]
            assert got["bound"] == STATED_BOUNDS[key][1]
            assert got["error_ratio"] is not None and got["error_ratio"] <= 1, (name, key, got)
            print(f"audit {name} step {step} {key}: error ratio {got['error_ratio']:.3g}")
    series = re.findall(r'deltawatch_audit_error_ratio\{[^}]*run="audit-live"[^}]*\} (\S+)',
                        side.metrics_text())  # fmt: skip
    assert len(series) == 2 * len(AUDITED_KEYS) and all(float(v) <= 1 for v in series)


def synthetic_frames(run: SyntheticRun, steps: list[int], wrong: dict[int, float]) -> list:
    """hello, baselines, then per step every report and the whole-matrix audit block of Q; the
    report of Q at a step in `wrong` has its update sketch G scaled (σ1 scaled by the factor)."""
    frames = wire.encode_hello(1, run=run.run, incarnation=1, resume_step=None, client_version="t",
                               config=run.config(),
                               manifest=[vars(e) for e in run.manifest()])  # fmt: skip
    msg_id = 2
    for name, sketch in run.baselines().items():
        frames += wire.encode_baseline(msg_id, run=run.run, incarnation=1, matrix=name,
                                       sketch=sketch)  # fmt: skip
        msg_id += 1
    for step in steps:
        D = run.trackers[Q].update_block(run.weight(Q, step))
        for check in run.checks(step):
            if check.matrix == Q and step in wrong:
                update = replace(check.update, G=check.update.G * wrong[step])
                check = replace(check, update=update)
            frames += wire.encode_report(msg_id, run=run.run, incarnation=1, check=check)
            msg_id += 1
        piece = AuditPiece(Q, step, 0, 0, D)
        frames += wire.encode_audit(msg_id, run=run.run, incarnation=1, piece=piece)
        msg_id += 1
    return frames


def send(side: SidecarProcess, frames: list) -> list[pb.ServerMessage]:
    with grpc.insecure_channel(side.endpoint) as ch:
        return list(pb_grpc.IngestStub(ch).Stream(iter(frames), timeout=120))


def alerts_of(side: SidecarProcess, run: str, rule: str) -> list[dict]:
    items = get_json(side.http_url + "/api/v1/alerts")["alerts"]
    return [a for a in items if a["run"] == run and a["rule"] == rule]


def test_a_wrong_sigma1_fires_the_audit_error_rule(side):
    run = SyntheticRun(run="audit-wrong")
    out = send(side, synthetic_frames(run, [1, 2, 3], wrong={3: 1.5}))
    assert not [m.error for m in out if m.WhichOneof("body") == "error"]
    wait_for(lambda: audit_block(side, run.run)["matrices"][0]["step"] == 3, "the step-3 audit")
    keys = audit_block(side, run.run)["matrices"][0]["keys"]
    assert keys["spectral_norm"]["live"] == pytest.approx(1.5 * keys["spectral_norm"]["exact"],
                                                          rel=0.05)  # fmt: skip
    assert keys["spectral_norm"]["error_ratio"] > 1 and keys["frobenius_norm"]["error_ratio"] <= 1
    wait_for(lambda: alerts_of(side, run.run, "AuditError"), "an AuditError alert")
    alerts = alerts_of(side, run.run, "AuditError")
    (alert,) = [a for a in alerts if a["matrix"] == Q]  # and the run's roll-up over matrices
    assert alert["state"] == "firing" and alert["value"] > 1 and "step 3" in alert["summary"]
    line = re.search(r'deltawatch_audit_error_ratio\{key="spectral_norm",matrix="[^"]*q_proj'
                     r'[^"]*",run="audit-wrong"\} (\S+)', side.metrics_text())  # fmt: skip
    assert line and float(line.group(1)) > 1


def hostile(run: SyntheticRun) -> list[tuple[pb.AuditBlock, bytes | None, str]]:
    """(AuditBlock, data or None for the right bytes, what the refusal must say)."""
    m, n = run.shapes[Q]

    def block(shape, row=0, col=0, matrix=Q, dtype="float32"):
        t = pb.Tensor(dtype=dtype, shape=shape, chunk_index=0, chunk_count=1)
        return pb.AuditBlock(run=run.run, incarnation=1, matrix=matrix, step=1, row_offset=row,
                             col_offset=col, delta=t)  # fmt: skip

    nan = torch.full((4, n), float("nan"))
    return [
        (block([m + 1, n]), None, "expected at most the manifest's"),
        (block([10, n], row=m - 5), None, "lie outside the matrix"),
        (block([4, n], col=-1), None, "lie outside the matrix"),
        (block([4, n], matrix="model.layers.9.nope.weight"), None, "is not in the manifest"),
        (block([4, n]), wire.tensor_bytes(nan)[2], "non-finite"),
        (block([4, n]), b"\0" * (4 * n * 4 + 2), "bytes, expected"),
        (block([4, n], dtype="float64"), None, "expected one of ['float32']"),
        (block([m, n, 2]), None, "expected 1 or 2 positive dimensions"),
    ]


def test_hostile_audit_blocks_are_refused_by_name_and_change_nothing(side):
    run = SyntheticRun(run="audit-hostile")
    frames = wire.encode_hello(1, run=run.run, incarnation=1, resume_step=None, client_version="t",
                               config=run.config(),
                               manifest=[vars(e) for e in run.manifest()])  # fmt: skip
    cases = hostile(run)
    for i, (body, data, _) in enumerate(cases):
        h, w = (list(body.delta.shape) + [1])[:2]
        body.delta.data = data if data is not None else b"\0" * (4 * max(h, 1) * max(w, 1))
        frames.append(pb.ClientMessage(id=10 + i, audit=body))
    n = run.shapes[Q][1]
    top = torch.ones(48, n)
    for i, row in enumerate((0, 40)):  # the second overlaps the first's rows 40..47
        piece = AuditPiece(Q, 1, row, 0, top)
        frames += wire.encode_audit(100 + i, run=run.run, incarnation=1, piece=piece)
    out = send(side, frames)
    errors = {m.error.id: m.error for m in out if m.WhichOneof("body") == "error"}
    for i, (_, _, says) in enumerate(cases):
        assert errors[10 + i].code == "INVALID_ARGUMENT" and says in errors[10 + i].message, (
            i, errors.get(10 + i))  # fmt: skip
    assert errors[101].code == "INVALID_ARGUMENT" and "overlap" in errors[101].message
    acked = {i for m in out if m.WhichOneof("body") == "ack" for i in m.ack.ids}
    assert 100 in acked and not acked & set(errors)
    block = audit_block(side, run.run)
    assert block["matrices"] == [] and block["pending"] == 1  # only the one good block is held


class TwoSizes(torch.nn.Module):
    """A 64×128 matrix whose ΔW (32 KiB in float32) fits a 1 MiB queue, and a 2048×130 one
    (1.06 MB) that never does."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(
            torch.nn.Linear(n, m, bias=False) for m, n in ((64, 128), (2048, 130))
        )
        with torch.no_grad():
            for layer in self.model.layers:
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.02)


def test_audits_that_do_not_fit_the_queue_are_skipped_and_counted(side):
    model = TwoSizes()
    mon = Monitor(model, run="audit-skip", endpoint=side.endpoint, every=1, audit_every=1,
                  channel_rank=4, oversample=4, max_queue_bytes=1 << 20, include=r"layers")  # fmt: skip
    g = torch.Generator().manual_seed(4)
    for step in range(1, 5):  # step t audits matrix t mod 2: the large one at steps 1 and 3
        with torch.no_grad():
            for layer in model.model.layers:
                layer.weight.add_(torch.randn(layer.weight.shape, generator=g) * 1e-3)
        mon.step(step)
    assert mon.close(timeout=60)
    stats = mon.stats()
    assert stats["audits_skipped"] == 2 and stats["dropped_reports"] == 0
    wait_for(lambda: audit_block(side, "audit-skip")["skipped"] == 2, "the skips counted")
    assert re.search(r'deltawatch_client_skipped_audits_total\{run="audit-skip"\} 2\.0',
                     side.metrics_text())  # fmt: skip
    items = audit_block(side, "audit-skip")["matrices"]
    assert [(i["matrix"], i["step"]) for i in items] == [("model.layers.0.weight", 4)]


@pytest.mark.parametrize(
    "value, error, says",
    [(-1, ValueError, "audit_every must be > 0"), ("2", TypeError, "audit_every must be an int")],
)
def test_a_bad_audit_every_fails_at_construction_naming_it(value, error, says):
    with pytest.raises(error, match=says):
        Monitor(TinyModel(torch.Generator().manual_seed(0)), run="x", audit_every=value)
