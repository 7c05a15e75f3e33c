"""The transformers adapter: `DeltawatchCallback`, a `TrainerCallback` that runs a `Monitor`.

    from transformers import Trainer
    from deltawatch.client.hf import DeltawatchCallback

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[DeltawatchCallback(run="qwen3-sft-1", every=10)])

The callback creates the Monitor when training begins (after the Trainer/accelerate has wrapped and
sharded the model, so FSDP2 DTensor parameters are seen as they are trained) and checks right after
each optimizer step, with the step number the Trainer will log (``state.global_step + 1``). TRL's
trainers (SFTTrainer, GRPOTrainer, GKDTrainer, ...) subclass `Trainer`, so the same callback works
there. Every rank of a distributed run creates its own Monitor (the Trainer calls callbacks on
every rank); the Monitor spreads the sending over ranks. Training resumed from a checkpoint
(``trainer.train(resume_from_checkpoint=...)``) attaches with ``resume_step`` = the restored global
step unless you pass one; give ``anchor_checkpoint`` to keep the original anchor.

Geometry in the trainer's logs: at every log the callback adds the newest run aggregate the sidecar
sent back (`Monitor.latest()`) as ``deltawatch/<key>`` (``deltawatch/stable_rank``,
``deltawatch/bf16_visible_ratio``, ``deltawatch/locked_ratio``, ..., null keys left out) with
``deltawatch/step``, the step the aggregate belongs to; an aggregate is logged once, at the first
log after it arrived, never again. The Trainer calls its ``report_to`` callbacks before the ones
passed in ``callbacks=[...]``, so for W&B, TensorBoard, MLflow or trackio to see the keys the
callback must come first: ``DeltawatchCallback(run=...).attach_to(trainer)``. Either way the keys
go into the logs the later callbacks get and into ``trainer.state.log_history``.

This module imports transformers; `import deltawatch.client` never imports this module.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from .config import MonitorConfig

log = logging.getLogger("deltawatch.client.hf")

LOG_PREFIX = "deltawatch/"


class DeltawatchCallback(TrainerCallback):
    """Attach a deltawatch `Monitor` to a transformers (or TRL) Trainer.

    `run` and `monitor_kwargs` are `Monitor`'s keyword arguments (DESIGN §4); they are validated
    here, at construction, so a typo fails before training starts.
    """

    def __init__(self, run: str, **monitor_kwargs: Any) -> None:
        MonitorConfig.from_keywords(run, **monitor_kwargs)  # raises with the fix in the message
        self.run = run
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: Any = None  # the Monitor, once training has begun
        self.logged_step: int | None = None  # the step of the last aggregate put into the logs
        self._first = False  # attach_to() put the callback before the report_to callbacks

    def attach_to(self, trainer: Any) -> DeltawatchCallback:
        """Add this callback to `trainer` ahead of every other callback, so the ``report_to``
        integrations log the ``deltawatch/*`` keys it adds (see the module docstring)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        self._first = True
        return self

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D401
        if self.monitor is not None or model is None:
            return control
        from .monitor import Monitor

        options = dict(self.monitor_kwargs)
        if state.global_step > 0 and options.get("resume_step") is None:
            options["resume_step"] = int(state.global_step)
        self.monitor = Monitor(model, run=self.run, **options)
        self.logged_step = None  # a new Monitor (a resumed run may log lower steps again)
        if not self._first and [r for r in args.report_to if r != "none"]:
            log.warning(
                "deltawatch: report_to=%s is called before DeltawatchCallback, so it will not "
                "see the deltawatch/* keys; add the callback with .attach_to(trainer) instead",
                args.report_to,
            )
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            # global_step is incremented after this event; the step just taken is the next one.
            self.monitor.step(int(state.global_step) + 1)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Add the newest aggregate to `logs` (and the entry the Trainer just put in
        `state.log_history`) when it is newer than the last one logged. Never blocks."""
        if self.monitor is None or logs is None:
            return control
        aggregate = self.monitor.latest()
        if aggregate is None or (
            self.logged_step is not None and aggregate["step"] <= self.logged_step
        ):
            return control
        self.logged_step = aggregate["step"]
        values = log_values(aggregate)
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        return control


def log_values(aggregate: dict[str, Any]) -> dict[str, float]:
    """``deltawatch/<key>`` -> value for a `Monitor.latest()` dict: numbers only (null keys left
    out; a bool becomes 0/1), ``deltawatch/step`` the step the aggregate belongs to."""
    out: dict[str, float] = {}
    for key, value in aggregate.items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, (int, float)):
            out[LOG_PREFIX + key] = value
    return out
