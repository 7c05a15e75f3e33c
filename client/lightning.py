"""The Lightning adapter: `DeltawatchCallback`, a `lightning.pytorch.Callback` that runs a `Monitor`.

    import lightning
    from deltawatch.client.lightning import DeltawatchCallback

    trainer = lightning.Trainer(max_steps=1000,
                                callbacks=[DeltawatchCallback(run="qwen3-sft-1", every=10)])

The callback creates the Monitor when training starts (after the strategy has set the module up
and a checkpoint, if any, was restored) and checks after each batch whose optimizer step advanced
`trainer.global_step`, with that step number (so gradient accumulation checks once per optimizer
step). It closes the Monitor when fitting ends. A resumed fit attaches with ``resume_step`` = the
restored global step unless you pass one.

This module imports lightning; `import deltawatch.client` never imports this module.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback

from .config import MonitorConfig


class DeltawatchCallback(Callback):
    """Attach a deltawatch `Monitor` to a Lightning Trainer; `run` and `monitor_kwargs` are
    `Monitor`'s keyword arguments, validated here so a typo fails before training starts."""

    def __init__(self, run: str, **monitor_kwargs: Any) -> None:
        MonitorConfig.from_keywords(run, **monitor_kwargs)  # raises with the fix in the message
        self.run = run
        self.monitor_kwargs = dict(monitor_kwargs)
        self.monitor: Any = None  # the Monitor, once training has started

    def on_train_start(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            return
        from .monitor import Monitor

        options = dict(self.monitor_kwargs)
        if trainer.global_step > 0 and options.get("resume_step") is None:
            options["resume_step"] = int(trainer.global_step)
        self.monitor = Monitor(pl_module, run=self.run, **options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor is not None and trainer.global_step > 0:
            self.monitor.step(int(trainer.global_step))  # a repeated step is not checked twice

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
