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

This module imports transformers; `import deltawatch.client` never imports this module.
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import TrainerCallback

from .config import MonitorConfig

log = logging.getLogger("deltawatch.client.hf")


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

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # noqa: D401
        if self.monitor is not None or model is None:
            return control
        from .monitor import Monitor

        options = dict(self.monitor_kwargs)
        if state.global_step > 0 and options.get("resume_step") is None:
            options["resume_step"] = int(state.global_step)
        self.monitor = Monitor(model, run=self.run, **options)
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.monitor is not None:
            # global_step is incremented after this event; the step just taken is the next one.
            self.monitor.step(int(state.global_step) + 1)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        return control
