"""The wire format on its own: chunking, reassembly, validation; the two configurations."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import pytest
import torch
from deltawatch.client import wire
from deltawatch.client.config import MonitorConfig
from deltawatch.client.records import ManifestEntry, MatrixCheck
from deltawatch.client.tracker import MatrixTracker
from deltawatch.sidecar.cli import build_parser, serve_config
from deltawatch.v1 import deltawatch_pb2 as pb


@pytest.fixture(scope="module")
def wide_check() -> MatrixCheck:
    """A real check of a 48 x 9000 matrix: its G (9000 x 32 float32) needs two 1 MiB chunks."""
    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(48, 9000, generator=g) * 0.02
    tracker = MatrixTracker.attach("model.layers.0.mlp.down_proj.weight", W0)
    Wt = W0 + 1e-3 * torch.randn(48, 16, generator=g) @ torch.randn(16, 9000, generator=g)
    check = tracker.check(Wt, 7)
    # A locked check carries v_ref too: give it one so every field travels.
    v_ref = torch.linalg.qr(torch.randn(9000, 16, generator=g))[0]
    return dataclasses.replace(check, lock_step=7, locked_now=True, v_ref=v_ref)


def assemble(frames):
    a = wire.Assembler()
    out = [m for m in (a.feed(f) for f in frames) if m is not None]
    assert not a.incomplete
    return out


def test_report_round_trip_is_bitwise(wide_check):
    frames = wire.encode_report(5, run="r", incarnation=3, check=wide_check, dropped_reports=2)
    assert len(frames) > 1, "the 1.15 MB G must travel in chunks"
    for f in frames[1:]:
        assert f.WhichOneof("body") == "chunk" and len(f.chunk.data) <= wire.MAX_CHUNK_BYTES
    assert frames[0].ByteSize() <= wire.MAX_CHUNK_BYTES + 4096
    (msg,) = assemble(frames)
    assert msg.id == 5 and msg.kind == "report" and msg.body.dropped_reports == 2
    back = wire.check_from(msg)
    for f in dataclasses.fields(MatrixCheck):
        a, b = getattr(wide_check, f.name), getattr(back, f.name)
        if f.name in ("update", "weight"):
            assert torch.equal(a.G, b.G) and torch.equal(a.C, b.C)
            assert (a.convergence, a.power_steps, a.exact) == (
                b.convergence,
                b.power_steps,
                b.exact,
            )
        elif isinstance(a, torch.Tensor):
            assert torch.equal(a.float(), b)
        else:
            assert a == b, f.name


def test_baseline_round_trip(wide_check):
    frames = wire.encode_baseline(9, run="r", incarnation=1, matrix="m", sketch=wide_check.weight)
    (msg,) = assemble(frames)
    s = wire.sketch_from(msg, "weight", msg.body.weight)
    assert torch.equal(s.G, wide_check.weight.G) and torch.equal(s.C, wide_check.weight.C)


def _reject(frames, fragment: str) -> None:
    a = wire.Assembler()
    with pytest.raises(wire.WireError) as err:
        for f in frames:
            a.feed(f)
    assert err.value.code == "INVALID_ARGUMENT"
    assert fragment in err.value.message, err.value.message


def test_malformed_chunking_is_refused(wide_check):
    frames = wire.encode_report(5, run="r", incarnation=1, check=wide_check)
    head, c0, c1 = frames[0], frames[1], frames[2]
    _reject([c0], "no message waits")
    _reject([head, c1], "expected chunk 0/")
    _reject([head, c0, head], "still waits for chunks")
    bad = pb.ClientMessage()
    bad.CopyFrom(c0)
    bad.chunk.field = "weight.C"
    _reject([head, bad], "expected field")
    big = pb.ClientMessage()
    big.CopyFrom(c0)
    big.chunk.data = bytes(wire.MAX_CHUNK_BYTES + 1)
    _reject([head, big], "at most 1 MiB")
    short = pb.ClientMessage()
    short.CopyFrom(frames[-1])
    short.chunk.data = short.chunk.data[:-4]
    _reject([*frames[:-1], short], "bytes, expected")
    lying = pb.ClientMessage()
    lying.CopyFrom(head)
    lying.report.weight.G.shape[:] = [1 << 20, 1 << 10]
    _reject([lying], "expected at most")
    _reject([pb.ClientMessage(id=1)], "body is empty")


def test_tensor_validation():
    t = torch.tensor([[1.0, float("nan")], [0.0, 2.0]])
    dtype, shape, raw = wire.tensor_bytes(t)
    msg = pb.Tensor(dtype=dtype, shape=shape, chunk_count=1, data=raw)
    with pytest.raises(wire.WireError, match="1 non-finite values"):
        wire.decode_tensor("update.G", msg)
    msg.dtype = "int8"
    with pytest.raises(wire.WireError, match="dtype 'int8'"):
        wire.decode_tensor("update.G", msg)
    msg.dtype, msg.shape[:] = "float32", [3, 2]
    with pytest.raises(wire.WireError, match="16 bytes, expected 24"):
        wire.decode_tensor("update.G", msg)


def test_alert_round_trip():
    item = {
        "id": "a1", "rule": "SubspaceDrift", "run": "r", "matrix": None, "state": "firing",
        "severity": "warning", "started_at": "2026-01-01T00:00:00Z", "ended_at": None,
        "value": 0.25, "summary": "drift",
    }  # fmt: skip
    assert wire.alert_from(wire.encode_alert(item).alert) == item


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"run": "bad name!"}, "[A-Za-z0-9._-]{1,128}"),
        ({"run": "x" * 129}, "[A-Za-z0-9._-]{1,128}"),
        ({"every": 0}, "every must be > 0"),
        ({"channel_rank": -1}, "channel_rank must be > 0"),
        ({"rank": 16}, "is now channel_rank"),
        ({"view": "fp8"}, "view='bf16'"),
        ({"anchor": "disk"}, "anchor='host'"),
        ({"include": "("}, "not a valid regular expression"),
        ({"lock_threshold": 1.5}, "lock_threshold must be in (0, 1]"),
        ({"endpoint": "localhost"}, "host:port"),
        ({"tls": {"ca": "/nonexistent/ca.pem"}}, "does not exist"),
        ({"tls": {"cert": __file__}}, "'cert' and 'key' together"),
        ({"token": "a", "token_file": __file__}, "not both"),
        ({"max_queue_bytes": 10}, "below 1 MiB"),
        ({"anchor_checkpoint": "/nonexistent.safetensors"}, "does not exist"),
    ],
)
def test_monitor_config_says_the_fix(kwargs, fragment):
    kwargs = {"run": "ok-run", **kwargs}
    with pytest.raises((ValueError, TypeError)) as err:
        MonitorConfig.from_keywords(**kwargs)
    assert fragment in str(err.value)


def test_unknown_monitor_keyword_names_the_closest():
    from deltawatch.client.config import check_keywords

    with pytest.raises(TypeError, match="unknown keyword 'evry'; did you mean 'every'"):
        check_keywords({"evry": 10})


def test_monitor_config_selection():
    c = MonitorConfig(run="r", include=[r"q_proj"], exclude=r"layers\.1\.")
    assert c.selects("model.layers.0.self_attn.q_proj.weight") is True
    assert c.selects("model.layers.1.self_attn.q_proj.weight") is False
    assert c.selects("model.layers.0.mlp.up_proj.weight") is False
    assert MonitorConfig(run="r").selects("anything") is None
    assert MonitorConfig(run="r", include=lambda n: "up" in n).selects("a.up.weight") is True
    assert "on_alert" not in MonitorConfig(run="r").to_json_dict()


def test_serve_flags_and_environment(tmp_path):
    args = build_parser(with_demo=False).parse_args(["serve", "--grpc-address", "127.0.0.1:0"])
    env = {"DELTAWATCH_DATA_DIR": str(tmp_path), "DELTAWATCH_GRPC_ADDRESS": "127.0.0.1:7",
           "DELTAWATCH_METRICS_DETAIL": "layer", "DELTAWATCH_GRACE_SECONDS": "2.5",
           "DELTAWATCH_METRICS_REQUIRE_TOKEN": "true"}  # fmt: skip
    c = serve_config(args, env)
    assert c.grpc_address == "127.0.0.1:0"  # the flag wins over the environment
    assert (c.data_dir, c.metrics_detail, c.grace_seconds) == (str(tmp_path), "layer", 2.5)
    assert c.metrics_require_token is True and c.http_address == "127.0.0.1:9400"
    with pytest.raises(ValueError, match="--device 'tpu'"):
        serve_config(args, {"DELTAWATCH_DEVICE": "tpu"})
    with pytest.raises(ValueError, match="--tls-cert and --tls-key go together"):
        serve_config(args, {"DELTAWATCH_TLS_CERT": __file__})
    with pytest.raises(ValueError, match="must be host:port"):
        serve_config(args, {"DELTAWATCH_HTTP_ADDRESS": "9400"})
    parse = build_parser(with_demo=False).parse_args
    assert serve_config(parse(["serve", "--channel-rank", "8"]), {}).channel_rank == 8
    assert serve_config(args, {"DELTAWATCH_CHANNEL_RANK": "4"}).channel_rank == 4
    with pytest.raises(ValueError, match="--rank is now --channel-rank"):
        serve_config(parse(["serve", "--rank", "8"]), {})
    with pytest.raises(ValueError, match="DELTAWATCH_RANK is now DELTAWATCH_CHANNEL_RANK"):
        serve_config(args, {"DELTAWATCH_RANK": "8"})
    empty = tmp_path / "token"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="--token-file: .* is empty: write the token into it"):
        serve_config(args, {"DELTAWATCH_TOKEN_FILE": str(empty)})


def test_serve_refuses_an_empty_token_file_with_a_message_not_a_traceback(tmp_path):
    (tmp_path / "token").write_text("")
    proc = subprocess.run(
        [sys.executable, "-m", "deltawatch.sidecar.cli", "serve", "--data-dir", str(tmp_path),
         "--token-file", str(tmp_path / "token")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "--token-file" in proc.stderr and "is empty" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_frame_budget_counts_serialized_bytes(wide_check):
    frames = wire.encode_report(1, run="r", incarnation=1, check=wide_check)
    raw = sum(t.numel() * 4 for t in (wide_check.update.G, wide_check.update.C,
                                       wide_check.weight.G, wide_check.weight.C,
                                       wide_check.v_ref))  # fmt: skip
    assert raw <= wire.frames_size(frames) <= raw + 4096 * math.ceil(raw / wire.MAX_CHUNK_BYTES)


def test_the_hello_carries_k_and_p_as_fields_and_the_manifest():
    from deltawatch.client.monitor import hello_frames, manifest_entry

    config = MonitorConfig.from_keywords("r", channel_rank=4, oversample=6)
    entry = manifest_entry("model.layers.0.w", (3, 4), "bfloat16", 0, "w", "rows", 1)
    [frame] = hello_frames(1, config, 7, [entry], rank=1, world_size=2)
    assert (frame.hello.channel_rank, frame.hello.oversample) == (4, 6)
    h = wire.hello_from(frame.hello)
    assert (h.channel_rank, h.oversample, h.incarnation, h.rank) == (4, 6, 7, 1)
    assert h.manifest == [
        ManifestEntry("model.layers.0.w", (3, 4), 12, "bfloat16", 0, "w", "rows", 1)
    ]
    assert h.config["channel_rank"] == 4 and h.config["incarnation"] == 7
    frame.hello.channel_rank = frame.hello.oversample = 0  # an older client: neither field
    older = wire.hello_from(frame.hello)
    assert (older.channel_rank, older.oversample) == (None, None)
