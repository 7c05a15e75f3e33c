"""The rank-K bottleneck (client/channel.py): g ← g·V_ref·V_refᵀ, checked in float64."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import torch
from deltawatch.client import Monitor
from deltawatch.client.channel import project_gradient
from deltawatch.client.collectives import ShardSpec
from safetensors.torch import load_file, save_file
from support import one_thread_fixture

_one_thread = one_thread_fixture(scope="function")


def _orthonormal(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
    return Q


def _out_of_span(g: torch.Tensor, V: torch.Tensor) -> float:
    """‖g·(I − V·Vᵀ)‖_F / ‖g‖_F in float64: 0 when every row of g lies in span(V)."""
    g = g.double()
    V = V.double()
    return float(torch.linalg.norm(g - g @ V @ V.T) / torch.linalg.norm(g))


def test_projection_lies_in_the_channel_and_matches_float64():
    m, n, k = 40, 56, 16
    V = _orthonormal(n, k, 1)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = g @ V @ V.T  # the float64 reference
    out = project_gradient(g, V)
    assert out.dtype == torch.float64
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert _out_of_span(out, V) < 1e-13
    assert torch.allclose(project_gradient(out, V), out, rtol=0, atol=1e-12)  # P² = P
    # the energy kept is exactly ‖g·V‖_F²
    assert abs(float(out.square().sum()) - float((g @ V).square().sum())) < 1e-9

    out32 = project_gradient(g.float(), V.float())  # what a float32 trainer gets
    assert out32.dtype == torch.float32
    assert float(torch.linalg.norm(out32.double() - ref) / torch.linalg.norm(ref)) < 1e-5
    assert _out_of_span(out32, V) < 1e-5


def test_row_blocks_need_no_collective():
    """Rows split over ranks: each rank's block of the projection is the block of the whole."""
    V = _orthonormal(32, 16, 3)
    g = torch.randn(24, 32, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    ref = g @ V @ V.T
    spec = ShardSpec((24, 32), row_offset=8, row_length=10, col_offset=0, col_length=32)
    assert torch.allclose(project_gradient(g[8:18], V, spec), ref[8:18], rtol=0, atol=1e-12)


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up_proj = torch.nn.Linear(48, 96, bias=False)
        self.down_proj = torch.nn.Linear(96, 48, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(torch.tanh(self.up_proj(x)))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.layers:
            x = x + block(x)
        return x


def test_monitor_enforce_channel_projects_from_the_step_after_the_lock():
    """A real Monitor (its sidecar absent: the trainer must not care) with lock_at_step=2 and
    every=1, attached to plain SGD: gradients of steps 1–2 are untouched; from step 3 on every
    monitored gradient is g·V_ref·V_refᵀ of the unprojected one, in span(V_ref), and the update is
    −lr times it (float64 checks)."""
    torch.manual_seed(0)
    model = _Tiny()
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mon = Monitor(
        model,
        run="channel-test",
        endpoint=f"127.0.0.1:{port}",
        every=1,
        lock_at_step=2,
        enforce_channel=True,
        connect_timeout=1.0,
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon.attach(opt)
    names = [m.name for m in mon.matrices]
    assert len(names) == 4
    params = dict(model.named_parameters())
    data = torch.Generator().manual_seed(1)
    try:
        for step in range(1, 6):
            x = torch.randn(64, 48, generator=data)
            y = torch.randn(64, 48, generator=data)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            trackers = {m.name: m.tracker for m in mon.matrices}
            locked = {n: trackers[n].v_ref for n in names}
            before = {n: params[n].detach().double().clone() for n in names}
            unprojected = {n: params[n].grad.double().clone() for n in names}
            opt.step()  # pre-hook: projection; post-hook: the Monitor's check (lock at step 2)
            for name in names:
                g = params[name].grad
                if step <= 2:
                    assert locked[name] is None
                    assert torch.equal(g.double(), unprojected[name])
                else:
                    V = locked[name]
                    assert V is not None and V.shape == (params[name].shape[1], 16)
                    assert _out_of_span(g, V) < 1e-5, (step, name)
                    ref = unprojected[name] @ V.double() @ V.double().T
                    assert (
                        float(torch.linalg.norm(g.double() - ref) / torch.linalg.norm(ref)) < 1e-5
                    )
                # the update is exactly −lr·g up to float32 rounding of W
                W = params[name].detach().double()
                lr_g = 0.05 * g.double()
                bound = 2.0**-23 * float(torch.linalg.norm(W) + torch.linalg.norm(lr_g))
                assert float(torch.linalg.norm(W - before[name] + lr_g)) <= bound
        assert mon._channel.projected_total == 3 * len(names)
    finally:
        mon.close(timeout=0.5)


_WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from deltawatch.client.channel import project_gradient
    from deltawatch.client.collectives import ShardSpec
    rank, port, folder = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    data = load_file(folder + "/in.safetensors")
    g, V = data["g"], data["V"]
    m, n = g.shape
    cols = [(0, 25), (25, n - 25)][rank]  # uneven column blocks
    spec = ShardSpec((m, n), 0, m, cols[0], cols[1], row_group=None, col_group=dist.group.WORLD)
    out = project_gradient(g[:, cols[0] : cols[0] + cols[1]].contiguous(), V, spec)
    save_file({"out": out.contiguous()}, folder + f"/out{rank}.safetensors")
    dist.destroy_process_group()
    """
)


def test_column_split_projection_all_reduces_over_the_column_group(tmp_path):
    """Two gloo ranks each hold some columns: Q = g_local·V_ref[cols] summed over the column group,
    then Q·V_ref[cols]ᵀ; the blocks put together equal the unsharded float64 projection."""
    m, n, k = 20, 44, 16
    V = _orthonormal(n, k, 5)
    g = torch.randn(m, n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    save_file({"g": g, "V": V.contiguous()}, str(tmp_path / "in.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(r), str(port), str(tmp_path)])
        for r in range(2)
    ]
    for p in procs:
        assert p.wait(timeout=120) == 0
    out = torch.cat([load_file(str(tmp_path / f"out{r}.safetensors"))["out"] for r in range(2)], 1)
    assert torch.allclose(out, g @ V @ V.T, rtol=0, atol=1e-12)
