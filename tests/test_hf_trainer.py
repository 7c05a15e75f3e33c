"""A real transformers Trainer with DeltawatchCallback: checks arrive in a real sidecar.

A tiny randomly initialised Qwen3 (2 layers, hidden 64; no download) trains 4 steps with plain
SGD; the callback creates the Monitor when training begins and checks after every second
optimizer step. The sidecar must hold 14 matrices (q/k/v/o, gate/up/down per layer) under the
Hugging Face names with the right layer and module, checks at steps 2 and 4 (the Trainer's
global steps), and the exact statistics must equal the float64 reference computed from the
weights before and after training. The same under torchrun with 2 ranks, where the Trainer wraps
the model in DDP and the two ranks' Monitors split the matrices between them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import sidecar_process  # noqa: E402

transformers = pytest.importorskip("transformers")  # the "hf" extra

pytestmark = pytest.mark.timeout(300)

MODULES = {
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
}


def _detail_and_histories(base: str, run: str) -> tuple[dict, dict[str, list[dict]]]:
    """The run's detail and each of its matrices' history points, from the HTTP API."""
    detail = sidecar_process.get_json(base, f"/runs/{run}")
    path = f"/runs/{run}/history?matrix="
    histories = {
        m["matrix"]: sidecar_process.get_json(base, path + m["matrix"])["points"]
        for m in detail["matrices"]
    }
    return detail, histories


def test_trainer_checks_arrive_under_hf_names(tmp_path):
    from deltawatch.client.hf import DeltawatchCallback
    from run_hf import Tokens, tiny_qwen3, training_args
    from transformers import Trainer

    torch.manual_seed(0)
    model = tiny_qwen3()
    W0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.dim() == 2}
    args = training_args(str(tmp_path / "out"))
    with sidecar_process.sidecar(tmp_path) as (endpoint, base):
        callback = DeltawatchCallback(
            run="hf-qwen3", endpoint=endpoint, every=2, channel_rank=4, oversample=4
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(16, 16, model.config.vocab_size),
            callbacks=[callback],
        )
        trainer.train()
        assert callback.monitor is None  # closed at on_train_end
        assert trainer.state.global_step == 4
        detail, histories = _detail_and_histories(base, "hf-qwen3")

    WT = {n: p.detach() for n, p in model.named_parameters() if p.dim() == 2}
    check_arrivals(detail, histories, W0, WT)


def check_arrivals(detail: dict, histories: dict, W0: dict, WT: dict) -> None:
    """14 matrices under HF names, layers and modules; checks at steps 2 and 4; the last check's
    exact statistics equal float64 from the weights before and after training."""
    rows = detail["matrices"]
    assert len(rows) == 14
    assert detail["last_step"] == 4
    assert {(m["layer"], m["module"]) for m in rows} == {
        (i, mod) for i in (0, 1) for mod in MODULES
    }
    for m in rows:
        assert m["matrix"] == f"model.layers.{m['layer']}.{m['module']}.weight"
        assert [p["step"] for p in histories[m["matrix"]]] == [2, 4]
    for m in rows:
        name = m["matrix"]
        w0, wt = W0[name].to(torch.bfloat16), WT[name].to(torch.bfloat16)
        dw = wt.double() - w0.double()
        visible = (w0.view(torch.int16) != wt.view(torch.int16)).double().mean().item()
        last = histories[name][-1]
        assert m["shape"] == list(W0[name].shape)
        assert last["frobenius_norm"] == pytest.approx(dw.norm().item(), rel=1e-6)
        assert last["bf16_visible_ratio"] == pytest.approx(visible, abs=1e-12)
        assert visible > 0.2  # SGD at this rate moves many weights visibly


def test_trainer_under_torchrun_ddp_spreads_the_matrices(tmp_path):
    """torchrun, 2 ranks: the Trainer wraps the model in DDP (accelerate, gloo); each rank's
    Monitor computes and sends half of the matrices; together they deliver all 14."""
    import json
    import subprocess

    from safetensors.torch import load_file

    out = tmp_path / "ranks"
    with sidecar_process.sidecar(tmp_path) as (endpoint, base):
        job = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone"]
            + ["--nproc-per-node", "2", str(Path(__file__).parent / "dist" / "run_hf.py")]
            + ["--endpoint", endpoint, "--run-name", "hf-ddp", "--out", str(out)],
            env=sidecar_process.quiet_env(),
            capture_output=True,
            text=True,
            timeout=200,
        )
        assert job.returncode == 0, job.stdout[-5000:] + job.stderr[-10000:]
        detail, histories = _detail_and_histories(base, "hf-ddp")
    ranks = [json.loads((out / f"rank{k}.json").read_text()) for k in (0, 1)]
    names = [e["matrix"] for e in ranks[0]["manifest"]]
    for k, r in enumerate(ranks):
        assert r["wrapped"] == "DistributedDataParallel" and r["global_step"] == 4
        assert r["computed"] == names[k::2]
        assert r["stats"]["errors"] == {} and r["stats"]["unacknowledged"] == 0
    check_arrivals(
        detail, histories, load_file(out / "w0.safetensors"), load_file(out / "wt.safetensors")
    )
