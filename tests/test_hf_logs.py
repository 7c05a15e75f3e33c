"""Geometry in the trainer's logs: a real transformers Trainer on the tiny Qwen3 with
`DeltawatchCallback` and a real sidecar. The sidecar sends the run's aggregate back once every
matrix has its check of a step stored; the callback puts the newest one into the Trainer's logs
as `deltawatch/<key>` at the next log, once. Checked: the logged values equal the sidecar's own
aggregate at that step (`/series`, whose last step is `GET /api/v1/runs/{run}`'s aggregate), in
`state.log_history` and in what a callback called after it (a report_to backend's seat) receives;
each aggregate is logged once, in increasing steps; `Monitor.latest()` is None before the first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist"))
import sidecar_process  # noqa: E402
from support import wait_for  # noqa: E402

transformers = pytest.importorskip("transformers")  # the "hf" extra

pytestmark = pytest.mark.timeout(300)

EVERY, STEPS = 2, 8


def test_trainer_logs_the_sidecars_aggregate(tmp_path):
    from deltawatch.client.hf import DeltawatchCallback
    from run_hf import Tokens, tiny_qwen3, training_args
    from transformers import Trainer, TrainerCallback

    class Backend(TrainerCallback):
        """Sits where a report_to integration sits after the deltawatch callback: records the logs
        it is given. It also holds the step after two checks until their aggregate has arrived,
        so the test does not depend on how fast the sidecar answers (the callback never waits)."""

        def __init__(self, monitor_of) -> None:
            self.logs: list[dict] = []
            self.monitor_of = monitor_of
            self.before_first = "unset"

        def on_step_end(self, args, state, control, **kwargs):
            mon = self.monitor_of()
            if state.global_step == 1:
                self.before_first = mon.latest()
            if state.global_step in (EVERY, 3 * EVERY):
                step = state.global_step
                wait_for(
                    lambda: (mon.latest() or {}).get("step") == step,
                    f"the aggregate of step {step}",
                    timeout=120,
                )
            return control

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append(dict(logs))
            return control

    torch.manual_seed(0)
    model = tiny_qwen3()
    args = training_args(
        str(tmp_path / "out"), max_steps=STEPS, logging_strategy="steps", logging_steps=1
    )
    with sidecar_process.sidecar(tmp_path) as (endpoint, base):
        callback = DeltawatchCallback(
            run="hf-logs", endpoint=endpoint, every=EVERY, channel_rank=4, oversample=4
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=Tokens(32, 16, model.config.vocab_size)
        )
        callback.attach_to(trainer)
        backend = Backend(lambda: callback.monitor)
        trainer.add_callback(backend)
        assert trainer.callback_handler.callbacks[0] is callback
        trainer.train()
        series = sidecar_process.get_json(base, "/runs/hf-logs/series")
        detail = sidecar_process.get_json(base, "/runs/hf-logs")

    assert backend.before_first is None
    assert series["steps"] == list(range(EVERY, STEPS + 1, EVERY))
    assert {k: v[-1] for k, v in series["aggregate"].items()} == detail["aggregate"]
    logged = [e for e in trainer.state.log_history if "deltawatch/step" in e]
    steps = [int(e["deltawatch/step"]) for e in logged]
    assert {EVERY, 3 * EVERY} <= set(steps), steps
    assert steps == sorted(set(steps)), "each aggregate logged once, in increasing steps"
    for entry in logged:
        at = series["steps"].index(int(entry["deltawatch/step"]))
        assert entry["step"] >= entry["deltawatch/step"]  # logged at or after its own step
        want = {
            f"deltawatch/{k}": v[at] for k, v in series["aggregate"].items() if v[at] is not None
        }
        got = {
            k: v for k, v in entry.items() if k.startswith("deltawatch/") and k != "deltawatch/step"
        }
        assert got == want
        for key in ("bf16_visible_ratio", "locked_ratio"):
            assert f"deltawatch/{key}" in entry
    # The callback after it got the same keys in its logs (what W&B, TensorBoard, MLflow get).
    seen = [e for e in backend.logs if "deltawatch/step" in e]
    assert [{k: v for k, v in e.items() if k.startswith("deltawatch/")} for e in seen] == [
        {k: v for k, v in e.items() if k.startswith("deltawatch/")} for e in logged
    ]
    assert all("loss" in e or "train_loss" in e for e in seen)  # beside the loss
