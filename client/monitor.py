"""Monitor: the hook a trainer creates (DESIGN §4).

    mon = Monitor(model, run="qwen3-opd-1", endpoint="127.0.0.1:50051", every=10)
    mon.attach(optimizer)   # counts optimizer steps 1, 2, 3, ... (or call mon.step(step) yourself)
    mon.close()             # flush what is queued (bounded wait), then disconnect

Construction selects the matrices (client/naming.py, `include`/`exclude`, `fused=`), asks
client/sharding.py where each lives (`_placement`: the one place that knows about ranks), copies
the anchors, builds one `MatrixTracker` per matrix, and starts the background sender. A bad
configuration raises here, with the fix in the message. After construction nothing raises into the
trainer: failures are logged once per kind and counted (`Monitor.errors`).

On the training thread, a check only runs the trackers (sketch math, plus collectives when
sharded) and appends the resulting `MatrixCheck`s to the sender's queue; serialisation and all
network I/O happen on the sender thread.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from . import fused as fused_mod
from . import naming, sharding
from .config import MonitorConfig, check_keywords
from .transport import ErrorLog, Transport

log = logging.getLogger("deltawatch.client")

CLIENT_VERSION = "deltawatch-client/0.1.0"


@dataclass
class _Matrix:
    """One monitored matrix: where it lives, and its tracker (None where another rank computes)."""

    index: int
    name: str  # the reported matrix name (a fused part gets its own)
    param_name: str
    param: torch.Tensor
    rows: tuple[int, int] | None  # global row range inside the parameter (fused parts)
    placement: Any  # sharding.Placement
    layer: int | None
    module: str
    tracker: Any = None  # MatrixTracker

    @property
    def owned(self) -> bool:
        return self.placement.owner_rank == sharding.world()[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel and torch.compile wrappers, so the monitored
    names (and the start bases seeded from them) match a single-process, uncompiled run:
    `model.layers.0...`, not `module.model.layers.0...` or `_orig_mod.model.layers.0...`."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _placement(param: torch.Tensor, index: int, rows: tuple[int, int] | None):
    """Where matrix `index` lives on this rank (client/sharding.py): its local block, ShardSpec,
    owner rank and whether this rank computes it. The single seam between Monitor and sharding."""
    return sharding.place(param, index, rows)


def _local(m: _Matrix) -> torch.Tensor:
    """This rank's block of the matrix, as a view (no copy)."""
    return sharding.local_block(m.param, m.rows)


class Monitor:
    """Watches the geometry of the weight update of `model`'s selected matrices."""

    def __init__(self, model: torch.nn.Module, run: str, **kwargs: Any) -> None:
        check_keywords(kwargs)
        self.config = MonitorConfig(run=run, **kwargs)
        c = self.config
        sharding.check_supported(model)
        model = unwrap(model)
        self.errors = ErrorLog()
        self.rank, self.world_size = sharding.world()
        self.matrices = self._select(model)
        self.incarnation = c.incarnation or _agree_incarnation()
        self._steps = c.resume_step or 0  # optimizer steps counted by attach()
        self._last_check: int | None = None
        self._hooks: list[Any] = []
        checkpoint = _CheckpointReader(c.anchor_checkpoint) if c.anchor_checkpoint else None
        for m in self.matrices:
            if m.placement.computes_here:
                m.tracker = self._make_tracker(m, checkpoint)
        self.manifest = [
            {
                "matrix": m.name,
                "shape": list(m.placement.shape),
                "numel": int(m.placement.shape[0] * m.placement.shape[1]),
                "dtype": str(m.param.dtype).replace("torch.", ""),
                "layer": m.layer,
                "module": m.module,
                "shard_layout": m.placement.layout,
                "owner_rank": m.placement.owner_rank,
            }
            for m in self.matrices
        ]
        self._channel = None
        if c.enforce_channel:
            self._channel = _install_channel_projection(self, model)
        self._transport = Transport(
            run=c.run,
            incarnation=self.incarnation,
            hello=self._hello_frames,
            channel_factory=self._new_channel,
            max_queue_bytes=c.max_queue_bytes,
            connect_timeout=c.connect_timeout,
            on_alert=c.on_alert,
            errors=self.errors,
        )
        for m in self.matrices:
            if m.tracker is not None and m.owned:
                self._guard("baseline", lambda m=m: self._transport.submit_baseline(
                    m.name, m.tracker.baseline()
                ))  # fmt: skip
        self._closed = False
        # Flush at interpreter exit when the trainer forgets close() (a short bounded wait).
        atexit.register(_close_at_exit, weakref.ref(self))

    # -- construction helpers ------------------------------------------------------------------

    def _select(self, model: torch.nn.Module) -> list[_Matrix]:
        c = self.config
        rules = fused_mod.parse_fused(c.fused)
        out: list[_Matrix] = []
        seen: set[int] = set()
        for name, param in model.named_parameters():
            if id(param) in seen:  # tied weights are monitored once
                continue
            verdict = c.selects(name)
            if verdict is None:
                verdict = naming.default_selected(name, param)
            if not verdict:
                continue
            if param.dim() != 2:
                raise ValueError(
                    f"include selected {name!r} of shape {tuple(param.shape)}; deltawatch "
                    f"monitors 2-D weight matrices; narrow the include pattern"
                )
            seen.add(id(param))
            for part in fused_mod.split(name, tuple(param.shape), rules):
                index = len(out)
                layer, module = naming.parse_name(part.name)
                out.append(
                    _Matrix(
                        index=index,
                        name=part.name,
                        param_name=name,
                        param=param,
                        rows=part.rows,
                        placement=_placement(param, index, part.rows),
                        layer=layer,
                        module=module,
                    )
                )
        if not out:
            raise ValueError(
                "no parameter selected: the default selects 2-D weights inside repeated blocks "
                "(names with a block index such as model.layers.3.mlp.up_proj.weight); pass "
                "include=r'...' (a regex searched in parameter names) to choose others"
            )
        return out

    def _make_tracker(self, m: _Matrix, checkpoint: _CheckpointReader | None):
        from .tracker import MatrixTracker

        c = self.config
        W0 = _local(m) if checkpoint is None else checkpoint.local(m)
        return MatrixTracker.attach(
            m.name,
            W0,
            shape=m.placement.shape,
            placement=c.anchor,
            rank=c.rank,
            oversample=c.oversample,
            max_power_steps=c.max_power_steps,
            view=c.view,
            alpha=c.alpha,
            mask_rank=c.mask_rank,
            seed=c.seed,
            spec=m.placement.spec,
            lock_threshold=c.lock_threshold,
            lock_patience=c.lock_patience,
            lock_min_energy=c.lock_min_energy,
            lock_at_step=c.lock_at_step,
        )

    def _hello_frames(self, msg_id: int) -> list:
        from . import wire

        return wire.encode_hello(
            msg_id,
            run=self.config.run,
            incarnation=self.incarnation,
            resume_step=self.config.resume_step,
            client_version=CLIENT_VERSION,
            config=self.config.to_json_dict() | {"incarnation": self.incarnation},
            manifest=self.manifest,
            rank=self.rank,
            world_size=self.world_size,
        )

    def _new_channel(self):
        from .transport import CHANNEL_OPTIONS

        c = self.config
        try:
            from .credentials import channel
        except ImportError:  # pragma: no cover - credentials.py ships with the client
            import grpc

            return grpc.insecure_channel(c.endpoint, options=CHANNEL_OPTIONS)
        return channel(
            c.endpoint, tls=c.tls, token=c.token, token_file=c.token_file, options=CHANNEL_OPTIONS
        )

    # -- the trainer's calls ---------------------------------------------------------------------

    def attach(self, optimizer: torch.optim.Optimizer) -> Monitor:
        """Check after optimizer steps: registers a step post-hook counting steps 1, 2, 3, ...
        (continuing from `resume_step` or a loaded state_dict)."""

        def hook(opt, args, kwargs) -> None:
            self._steps += 1
            self.step(self._steps)

        self._hooks.append(optimizer.register_step_post_hook(hook))
        if self._channel is not None:  # project in a step pre-hook: right for DDP and FSDP2 too
            self._channel.attach(optimizer)
        return self

    def step(self, step: int) -> None:
        """Call after each optimizer step with the global step number; a check runs when
        `step % every == 0`. Never raises."""
        try:
            if self._closed or step % self.config.every != 0 or step == self._last_check:
                return
            self._last_check = step
            self._apply_lock_references()
            for m in self.matrices:
                if m.tracker is None:
                    continue
                check = self._guard("check", lambda m=m: m.tracker.check(_local(m), step))
                if check is not None and m.owned:
                    self._transport.submit_report(check)
        except Exception as exc:  # never into the trainer
            self.errors("step", "step failed: %s", repr(exc))

    def _guard(self, kind: str, fn):
        try:
            return fn()
        except Exception as exc:
            self.errors(kind, f"{kind} failed: %s", repr(exc))
            return None

    def _apply_lock_references(self) -> None:
        """Locks the sidecar holds for this run (a trainer restarted without its Monitor state):
        applied at a check boundary, single process only — with several ranks the lock must come
        from data every rank holds (load_state_dict), never from a message's arrival time."""
        refs = self._transport.lock_references
        if not refs or self.world_size > 1:
            return
        by_name = {m.name: m for m in self.matrices}
        for matrix, (lock_step, v_ref) in list(refs.items()):
            refs.pop(matrix, None)
            m = by_name.get(matrix)
            setter = getattr(getattr(m, "tracker", None), "restore_lock", None)
            if setter is not None:
                self._guard("lock_reference", lambda s=setter, a=lock_step, b=v_ref: s(a, b))

    def close(self, timeout: float | None = None) -> bool:
        """Flush what is queued (waiting at most `timeout` s, default `close_timeout`), then
        disconnect. True when every report was acknowledged. Never raises."""
        if self._closed:
            return True
        self._closed = True
        for h in self._hooks:
            h.remove()
        try:
            return self._transport.close(self.config.close_timeout if timeout is None else timeout)
        except Exception as exc:
            self.errors("close", "close failed: %s", repr(exc))
            return False

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- checkpoints -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors and ints (no pickle needed): the step counter and every tracker's state.
        Save it with the trainer's checkpoint; a restarted trainer passes a new incarnation and
        `resume_step`, and calls `load_state_dict`."""
        trackers = {m.name: m.tracker.state_dict() for m in self.matrices if m.tracker is not None}
        return {"version": 1, "steps": self._steps, "trackers": trackers}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output (raises on a mismatch: it is called at setup time)."""
        if state.get("version") != 1:
            raise ValueError(f"unknown Monitor state version {state.get('version')!r}")
        self._steps = int(state["steps"])
        trackers = state["trackers"]
        for m in self.matrices:
            if m.tracker is None:
                continue
            if m.name not in trackers:
                raise ValueError(f"the saved Monitor state has no tracker for {m.name}")
            m.tracker.load_state_dict(trackers[m.name])

    # -- introspection -----------------------------------------------------------------------------

    def latest(self) -> dict[str, Any] | None:
        """The newest run aggregate the sidecar sent back (the `aggregate` of
        `GET /api/v1/runs/{run}`, every key, unknown values None) with `"step"`, the step whose
        checks it aggregates; None before the first. The sidecar sends it once every matrix of the
        run has its check of that step stored. Never blocks on the network."""
        return self._transport.latest_aggregate()

    def unacknowledged(self) -> int:
        """Reports and baselines not yet acknowledged by the sidecar."""
        return self._transport.unacknowledged()

    def stats(self) -> dict[str, Any]:
        """Counters for dashboards and tests: queue, acks, drops, errors by kind."""
        t = self._transport
        return {
            "queued_bytes": t.queued_bytes,
            "unacknowledged": t.unacknowledged(),
            "acknowledged": t.acked_total,
            "dropped_reports": t.dropped_total,
            "refused": t.refused_total,
            "connections": t.connections,
            "errors": dict(self.errors.counts),
        }


def _close_at_exit(ref: weakref.ref) -> None:
    mon = ref()
    if mon is not None and not mon._closed:
        mon.close(timeout=min(2.0, mon.config.close_timeout))


def _agree_incarnation() -> int:
    """A new incarnation: the wall clock in milliseconds, broadcast from rank 0 so every rank of
    a distributed trainer uses the same one (one small collective, at construction only)."""
    value = int(time.time() * 1000)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        import torch.distributed as dist

        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(t, src=0)
        value = int(t.item())
    return value


def _install_channel_projection(monitor: Monitor, model: torch.nn.Module):
    """enforce_channel=True: project gradients onto each locked channel (client/channel.py): a
    post-accumulate-grad hook per parameter now, an optimizer step pre-hook once `attach` is
    called."""
    from .channel import ChannelProjection

    trackers = {m.name: m for m in monitor.matrices if m.tracker is not None}
    projection = ChannelProjection(trackers)
    projection.install(model)
    return projection


class _CheckpointReader:
    """anchor_checkpoint: W0 from a safetensors file or a directory of them (never torch.load)."""

    def __init__(self, path: str):
        try:
            from safetensors import safe_open
        except ImportError as exc:
            raise ValueError(
                "anchor_checkpoint needs the safetensors package: pip install safetensors"
            ) from exc
        files = (
            sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
            if os.path.isdir(path)
            else [path]
        )
        if not files:
            raise ValueError(f"anchor_checkpoint {path!r}: no .safetensors file in it")
        self._where: dict[str, str] = {}
        self._open = safe_open
        for f in files:
            with safe_open(f, framework="pt") as h:
                for key in h.keys():  # noqa: SIM118 - safe_open handles are not mappings
                    self._where[key] = f
        self.path = path

    def local(self, m: _Matrix) -> torch.Tensor:
        """This rank's block of W0 for matrix `m`, read from the checkpoint."""
        pname = next(
            (n for n in self._candidates(m) if n in self._where),
            None,
        )
        if pname is None:
            raise ValueError(
                f"anchor_checkpoint {self.path!r} has no tensor for {m.name}; it must hold the "
                f"model's parameters under the same names"
            )
        with self._open(self._where[pname], framework="pt") as h:
            W0 = h.get_tensor(pname)
        p = m.placement
        full = tuple(m.param.shape) if not sharding.is_dtensor(m.param) else None
        if full is not None and tuple(W0.shape) != full:
            raise ValueError(
                f"anchor_checkpoint: {pname} has shape {list(W0.shape)}, the model's parameter "
                f"{list(full)}"
            )
        if m.rows is not None:
            W0 = W0[m.rows[0] : m.rows[1]]
        if p.sharded:
            if p.rows is None:
                raise ValueError(
                    f"anchor_checkpoint with {m.name}: rows split over several mesh dimensions "
                    f"are not supported; start without anchor_checkpoint"
                )
            W0 = W0[p.rows[0] : p.rows[1], p.cols[0] : p.cols[1]]
        return W0.to(_local(m).device)

    def _candidates(self, m: _Matrix) -> list[str]:
        """The parameter's own name first, then checkpoint keys that differ only by a prefix
        (e.g. `model.` present on one side only)."""
        names = [m.param_name]
        for key in self._where:
            if key.endswith("." + m.param_name) or m.param_name.endswith("." + key):
                names.append(key)
        return names
