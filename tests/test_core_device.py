"""The tracker on every device this machine has (CPU always; CUDA when present): the same checks
as on the CPU, for host (pinned, streamed in chunks) and device anchors, fp32 and bf16
parameters. Runnable as a script on a GPU machine without pytest:
`PYTHONPATH=<dir with deltawatch/> python tests/test_core_device.py`."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deltawatch.client.settings import AnchorSettings
from deltawatch.client.tracker import MatrixTracker  # noqa: E402
from deltawatch.sidecar.geometry import MatrixGeometry  # noqa: E402
from test_core_trajectories import pretrained_like, trajectory  # noqa: E402

NAME = "model.layers.4.self_attn.q_proj.weight"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def same_keys(a: dict, b: dict, rel: float) -> None:
    for key, value in a.items():
        if isinstance(value, float) and b[key] is not None:
            assert abs(value - b[key]) <= rel * max(abs(value), 1e-3), (key, value, b[key])
        else:
            assert (value is None) == (b[key] is None), key


def check_device(device: str) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        W0 = pretrained_like(96, 160, seed=15, dtype=dtype)
        cpu = MatrixTracker.attach(NAME, W0)
        here = {
            p: MatrixTracker.attach(NAME, W0.to(device), anchor=AnchorSettings(location=p))
            for p in ("host", "device")
        }
        if device == "cuda":
            assert (
                here["host"].anchor.W0.is_pinned() and here["host"].anchor.W0.device.type == "cpu"
            )
            assert here["device"].anchor.W0.device.type == "cuda"
        assert float(here["host"].anchor.a) == float(cpu.anchor.a)
        g_cpu = MatrixGeometry((96, 160))
        g_cpu.baseline(cpu.baseline())
        g_here = MatrixGeometry((96, 160), device=device)
        g_here.baseline(here["device"].baseline())
        for step, W in trajectory("opd", W0, 3):
            c_cpu = cpu.check(W, step)
            for placement, tracker in here.items():
                c = tracker.check(W.to(device), step)
                assert c.update.G.device.type == "cpu" and c.update.G.dtype == torch.float32
                assert abs(c.frobenius_sq - c_cpu.frobenius_sq) <= 1e-6 * c_cpu.frobenius_sq
                assert c.visible_count == c_cpu.visible_count, placement
                assert c.visible_low_count == c_cpu.visible_low_count, placement
                assert c.visible_principal_count == c_cpu.visible_principal_count, placement
                assert c.lock_step == c_cpu.lock_step, placement
                if placement == "device":
                    same_keys(g_cpu.ingest(c_cpu), g_here.ingest(c), rel=1e-3)


def test_tracker_on_every_device() -> None:
    for device in DEVICES:
        check_device(device)


if __name__ == "__main__":
    for device in DEVICES:
        check_device(device)
        print(f"test_core_device: {device} ok", flush=True)
