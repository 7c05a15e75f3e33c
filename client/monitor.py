"""Monitor: the hook a trainer creates (DESIGN §4).

    mon = Monitor(model, run="qwen3-opd-1", endpoint="127.0.0.1:50051", every=10)
    mon.attach(optimizer)   # counts optimizer steps 1, 2, 3, ... (or call mon.step(step) yourself)
    mon.close()             # flush what is queued (bounded wait), then disconnect

Construction selects the matrices (client/naming.py, `include`/`exclude`, `fused=`), asks
client/sharding.py where each lives (`_placement`: the one place that knows about ranks), copies
the anchors, builds one `MatrixTracker` per matrix, and starts the background sender. A bad
configuration raises here, with the fix in the message. After construction nothing raises into the
trainer: failures are logged once per kind and counted (`Monitor.errors`); a check that fails on
any rank of a sharded matrix is dropped on all of them (`Monitor.checks_dropped`).

On the training thread, a check only runs the trackers (sketch math, plus collectives when
sharded) and appends the resulting `MatrixCheck`s to the sender's queue; serialisation and all
network I/O happen on the sender thread.
"""

from __future__ import annotations

import atexit
import functools
import logging
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import adapters, audit, experts, flat, naming, schedule, sharding
from . import fused as fused_mod
from .batch import MatrixGroup
from .collectives import CheckSession, FaultPlan
from .config import MonitorConfig
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
    adapter: Any = None  # adapters.LoraMatrix for a base matrix with LoRA adapters
    tracker: Any = None  # MatrixTracker
    expert: int | None = None  # the expert index of a mixture-of-experts matrix
    packed: bool = False  # an expert of a packed 3-D parameter: checked by its experts.ExpertGroup

    @property
    def batchable(self) -> bool:
        """Whether the check may run in a batch with other matrices of its shape (client/batch.py
        `MatrixGroup`): a whole dense matrix on this rank with no collective (single process,
        DDP's "replicated" layout); not an adapter's update or a packed expert (its own group)."""
        p = self.placement
        plain = not sharding.is_dtensor(self.param) and not isinstance(self.param, flat.FlatSlice)
        return plain and self.adapter is None and not self.packed and p.spec is None

    @property
    def owned(self) -> bool:
        return self.placement.owner_rank == sharding.world()[0]


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DistributedDataParallel, DeepSpeedEngine and torch.compile wrappers, so the monitored
    names (and the start bases seeded from them) match a single-process, uncompiled run:
    `model.layers.0...`, not `module.model.layers.0...` or `_orig_mod.model.layers.0...`."""
    while True:
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        if ddp or type(model).__name__ == "DeepSpeedEngine":  # deepspeed.initialize's engine
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


def _locals(matrices: list[_Matrix]) -> list[torch.Tensor]:
    """The local blocks of a `MatrixGroup`'s dense members: its stack."""
    return [_local(m) for m in matrices]


def _source(m: _Matrix, s: CheckSession):
    """What the tracker checks: the local block of the weight, or, for a base matrix with LoRA
    adapters, the adapters' update of it (client/adapters.py; sharded factors are gathered through
    the check's session `s`, so every rank issues those collectives too). None on a rank whose
    local work failed. The single seam between Monitor and adapters at check time."""
    W = s.local(lambda: _local(m))
    return W if m.adapter is None else m.adapter.update(W, m.rows, s)


class Monitor:
    """Watches the geometry of the weight update of `model`'s selected matrices."""

    def __init__(self, model: torch.nn.Module, run: str, **kwargs: Any) -> None:
        self.config = MonitorConfig.from_keywords(run, **kwargs)
        c = self.config
        model = unwrap(model)
        self.errors = ErrorLog()
        self._faults = FaultPlan.from_env()  # the test seam; None unless DELTAWATCH_FAULT is set
        self.checks_dropped = 0  # matrix checks dropped on every rank after a failure
        self.rank, self.world_size = sharding.world()
        self._packed: list[tuple] = []  # (param name, param, part rows, offset) per expert part
        self.matrices = self._select(model)
        if c.enforce_channel and any(m.placement.flat is not None for m in self.matrices):
            raise ValueError(
                "enforce_channel=True is not supported with flat shards (FSDP1, DeepSpeed "
                "ZeRO-3); use FSDP2 (fully_shard) or DDP to project gradients onto the channel"
            )
        self.incarnation = c.incarnation or _agree_incarnation()
        self._steps = c.resume_step or 0  # optimizer steps counted by attach()
        self._last_check: int | None = None
        self._hooks: list[Any] = []
        checkpoint = _CheckpointReader(c.anchor_checkpoint) if c.anchor_checkpoint else None
        for m in self.matrices:
            if m.placement.computes_here and not m.packed:
                m.tracker = self._make_tracker(m, checkpoint)
        self._expert_groups = self._make_expert_groups()
        # the self-audit's rotation: dense matrices (an adapter's or a packed expert's update is
        # not a block of the weight); the same list on every rank
        self._auditable = [m.name for m in self.matrices if not m.packed and m.adapter is None]
        self._audited: str | None = None  # the matrix the current check audits
        self._by_name = {m.name: m for m in self.matrices}
        self._slots = [self._batched(units) for units in self._units_by_slot()]
        self.manifest = [
            manifest_entry(
                m.name,
                m.placement.shape,
                str(m.param.dtype).replace("torch.", ""),
                m.layer,
                m.module,
                m.placement.layout,
                m.placement.owner_rank,
                m.expert,
            )
            for m in self.matrices
        ]
        self._channel = None
        if c.enforce_channel:
            self._channel = _install_channel_projection(self)
        self._transport = Transport(
            run=c.run,
            incarnation=self.incarnation,
            hello=self._hello_frames,
            channel_factory=self._new_channel,
            max_queue_bytes=c.transport.max_queue_bytes,
            connect_timeout=c.transport.connect_timeout,
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
        """The monitored matrices, by the reported name (PEFT's wrappers removed): the user's
        include/exclude or the default selection; frozen parameters only with `include_frozen`
        unless LoRA adapters train them; LoRA factors never (client/adapters.py); a packed 3-D
        expert parameter as its per-expert matrices (client/experts.py)."""
        c = self.config
        rules = fused_mod.parse_fused(c.fused)
        adapted, adapter_params = adapters.find_lora(model)
        out: list[_Matrix] = []
        seen: set[int] = set(adapter_params)
        for param_name, param in sharding.named_parameters(model):  # FSDP1/ZeRO-3: original names
            if id(param) in seen:  # tied weights are monitored once
                continue
            adapter = adapted.get(param_name)
            name = adapters.base_name(param_name)
            verdict = c.selects(name)
            if verdict is None:
                verdict = naming.default_selected(name, param)
            if not (param.requires_grad or adapter or c.include_frozen):
                continue
            if adapter is None and experts.is_packed(name, param):
                seen.add(id(param))
                self._select_experts(model, name, param_name, param, out)
                continue
            if not verdict:
                continue
            if param.dim() != 2:
                raise ValueError(
                    f"include selected {name!r} of shape {tuple(param.shape)}; deltawatch "
                    f"monitors 2-D weight matrices; narrow the include pattern"
                )
            if adapter is not None:
                adapter.validate()
            seen.add(id(param))
            for part in fused_mod.split(name, tuple(param.shape), rules):
                index = len(out)
                layer, module = naming.parse_name(part.name)
                expert = naming.parse_expert(part.name)
                out.append(
                    _Matrix(
                        index=index,
                        name=part.name,
                        param_name=param_name,
                        param=param,
                        rows=part.rows,
                        placement=_placement(param, index, part.rows),
                        layer=layer,
                        module=module,
                        adapter=adapter,
                        expert=expert,
                    )
                )
        if not out:
            raise ValueError(
                "no parameter selected: the default selects trainable 2-D weights inside "
                "repeated blocks (names with a block index such as model.layers.3.mlp.up_proj."
                "weight) and LoRA-adapted base weights; pass include=r'...' (a regex searched in "
                "parameter names) to choose others, include_frozen=True for frozen ones"
            )
        if c.enforce_channel and any(m.adapter is not None for m in out):
            raise ValueError(
                "enforce_channel projects the gradient of a monitored weight, but a LoRA-adapted "
                "base weight has none (its adapters train); use enforce_channel=False with LoRA"
            )
        if self._packed and (c.enforce_channel or c.anchor_checkpoint):
            raise ValueError(
                "enforce_channel and anchor_checkpoint do not support packed expert parameters "
                "(mlp.experts.gate_up_proj/down_proj) yet; leave them out with exclude=r'experts\\.' "
                "or drop the option"
            )
        return out

    def _select_experts(
        self, model: torch.nn.Module, name: str, param_name: str, param, out: list[_Matrix]
    ) -> None:
        """The per-expert matrices of a packed 3-D expert parameter (client/experts.py), selected
        by their per-expert names."""
        selected, offset, _ = experts.select(model, name, param, self.config.selects)
        parts = {}
        for x in selected:
            layer, module = naming.parse_name(x.name)
            m = _Matrix(len(out), x.name, param_name, param, x.rows, x.placement, layer, module,
                        expert=x.expert, packed=True)  # fmt: skip
            out.append(m)
            parts.setdefault(x.part, []).append(m)
        for matrices in parts.values():
            self._packed.append((param, matrices[0].rows, offset, matrices))

    def _make_expert_groups(self) -> list[experts.ExpertGroup]:
        """One batched `ExpertGroup` per part of each packed parameter, over the experts this
        rank checks; each expert's `_Matrix` gets its group's tracker."""
        c = self.config
        groups = []
        for param, rows, offset, matrices in self._packed:
            here = [m for m in matrices if m.placement.computes_here]
            if not here:
                continue
            g = experts.ExpertGroup(
                param,
                rows,
                [m.expert for m in here],
                offset,
                [m.name for m in here],
                anchor=c.anchor,
                sketch=c.sketch,
                lock=c.lock,
            )
            for m, tracker in zip(here, g.trackers, strict=True):
                m.tracker = tracker
            groups.append(g)
        return groups

    def _units_by_slot(self) -> list[list[_Matrix | experts.ExpertGroup]]:
        """What this rank checks, per slot of the schedule (client/schedule.py): one slot holding
        every unit under schedule="every"; under "spread", `every` slots balanced by parameter
        count over the whole manifest (each matrix, or each part of a packed expert parameter
        with all its experts, is one unit), so every rank assigns every matrix the same slot."""
        c = self.config
        here = [m for m in self.matrices if m.tracker is not None and not m.packed]
        units: list[_Matrix | experts.ExpertGroup] = [*here, *self._expert_groups]
        if c.schedule != "spread":
            return [units]
        keys = {m.name: m.index for m in self.matrices if not m.packed}
        for j, (_, _, _, members) in enumerate(self._packed):
            keys.update((m.name, -1 - j) for m in members)
        costs: dict[int, int] = {}
        for m in self.matrices:
            shape = m.placement.shape
            costs[keys[m.name]] = costs.get(keys[m.name], 0) + shape[0] * shape[1]
        order = sorted(costs)
        slot = dict(zip(order, schedule.slots([costs[k] for k in order], c.every), strict=True))
        out: list[list[_Matrix | experts.ExpertGroup]] = [[] for _ in range(c.every)]
        for u in units:
            name = u.name if isinstance(u, _Matrix) else u.names[0]
            out[slot[keys[name]]].append(u)
        return out

    def _batched(self, units: list) -> list[_Matrix | MatrixGroup]:
        """One slot's units with its batchable dense matrices (`_Matrix.batchable`) of one shape,
        parameter dtype and device replaced by one `MatrixGroup` each, at its first member's
        place (`batch_matrices=False`: every matrix on its own)."""
        if not self.config.batch_matrices:
            return units

        def key(u) -> tuple | None:
            ok = isinstance(u, _Matrix) and u.batchable
            return (u.placement.shape, u.param.dtype, u.tracker.device) if ok else None

        alike: dict[tuple, list[_Matrix]] = {}
        for u in units:
            if key(u) is not None:
                alike.setdefault(key(u), []).append(u)
        out: list[_Matrix | MatrixGroup] = []
        for u in units:
            members = alike.get(key(u)) if key(u) is not None else None
            if members is None or len(members) == 1:
                out.append(u)
            elif u is members[0]:
                source = functools.partial(_locals, members)
                out.append(MatrixGroup([m.tracker for m in members], source))
        return out

    def _make_tracker(self, m: _Matrix, checkpoint: _CheckpointReader | None):
        from .tracker import MatrixTracker

        c = self.config
        W0 = _local(m) if checkpoint is None else checkpoint.local(m)
        return MatrixTracker.attach(
            m.name,
            W0,
            shape=m.placement.shape,
            spec=m.placement.spec,
            anchor=c.anchor,
            sketch=c.sketch,
            lock=c.lock,
        )

    def _hello_frames(self, msg_id: int) -> list:
        return hello_frames(
            msg_id, self.config, self.incarnation, self.manifest, self.rank, self.world_size
        )

    def _new_channel(self):
        from .credentials import channel
        from .transport import CHANNEL_OPTIONS

        t = self.config.transport
        return channel(
            t.endpoint, tls=t.tls, token=t.token, token_file=t.token_file, options=CHANNEL_OPTIONS
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
        `step % every == 0` (schedule="spread": the step's slice of the matrices, at every step;
        client/schedule.py). Never raises."""
        try:
            c = self.config
            if self._closed or step == self._last_check:
                return
            if c.schedule == "spread":
                units = self._slots[schedule.slot_of_step(step, c.every)]
            elif step % c.every == 0:
                units = self._slots[0]
            else:
                return
            self._last_check = step
            self._audited = self._audit_choice(step)
            self._apply_lock_references()
            weight = schedule.weight_due(step, c.every, c.weight_every)
            for u in units:
                check = self._check_matrix if isinstance(u, _Matrix) else self._check_group
                check(u, step, last=u is units[-1], weight=weight)
        except Exception as exc:  # never into the trainer
            self.errors("step", "step failed: %s", repr(exc))

    def _check_matrix(self, m: _Matrix, step: int, last: bool, weight: bool = True) -> None:
        """One matrix's check, fault-isolated across the ranks holding it (client/collectives.py
        `CheckSession`): when any of them fails, every one drops the check (counted, logged once
        per kind; the owner counts its report as dropped); a kept check is queued by its owner."""
        s = CheckSession(
            m.placement.spec, m.tracker.device, step=step, faults=self._faults, last=last
        )
        check = m.tracker.check(_source(m, s), step, s, weight=weight)
        if check is not None:
            if m.owned:
                self._guard("submit", lambda: self._transport.submit_report(check))
            if m.name == self._audited:
                self._guard("audit", lambda: self._send_audit(m, step))
            return
        self.checks_dropped += 1
        if s.failure is not None:
            kind = f"check_failed_{type(s.failure).__name__}"
            self.errors(kind, "the check of %s at step %d failed here: %r", m.name, step, s.failure)
        self.errors(
            "check_dropped",
            "dropped the check of %s at step %d on every rank holding it (%d failed; bases and "
            "lock unchanged, nothing sent)",
            m.name,
            step,
            s.failed_ranks,
        )
        if m.owned:
            self._transport.count_unsent()

    def _audit_choice(self, step: int) -> str | None:
        """The matrix this check audits (client/audit.py), or None."""
        i = audit.audited_index(
            step, self.config.every, self.config.transport.audit_every, len(self._auditable)
        )
        return None if i is None else self._auditable[i]

    def _send_audit(self, m: _Matrix, step: int) -> None:
        """This rank's blocks of m's ΔW at `step` to the sender's queue (skipped and
        counted there when the queue is full); the trainer never gathers."""
        D = m.tracker.update_block(_local(m))
        for piece in audit.pieces(m.name, step, D, m.placement):
            self._transport.submit_audit(piece)

    def _check_group(self, g: MatrixGroup, step: int, last: bool, weight: bool = True) -> None:
        """One batched check of a group (an expert part, or dense matrices of one shape; no
        collective: this rank holds them whole); when it fails, every member's check is dropped
        (counted, logged once per kind). An audited member's ΔW is sent as `_check_matrix` does."""
        s = CheckSession(None, g.device, step=step, faults=self._faults, last=last)
        checks = g.check(step, s, weight)
        if checks is not None:
            for check in checks:
                self._guard("submit", lambda c=check: self._transport.submit_report(c))
            if self._audited in g.names:
                m = self._by_name[self._audited]
                self._guard("audit", lambda: self._send_audit(m, step))
            return
        self.checks_dropped += len(g.trackers)
        if s.failure is not None:
            kind = f"check_failed_{type(s.failure).__name__}"
            self.errors(kind, "the check of %s at step %d failed: %r", g.names[0], step, s.failure)
        self.errors(
            "check_dropped",
            "dropped the check of %d matrices (%s, ...) at step %d (bases and locks unchanged, "
            "nothing sent)",
            len(g.names),
            g.names[0],
            step,
        )
        for _ in g.trackers:
            self._transport.count_unsent()

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
            bound = self.config.transport.close_timeout if timeout is None else timeout
            return self._transport.close(bound)
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
        run has its check of that step stored (schedule="spread": its check in that step's cycle,
        labelled with the cycle's last step). Never blocks on the network."""
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
            "audits_skipped": t.audits_skipped,
            "refused": t.refused_total,
            "checks_dropped": self.checks_dropped,
            "projections_dropped": getattr(self._channel, "dropped_total", 0),
            "retried": t.retried_total,
            "connections": t.connections,
            "errors": dict(self.errors.counts),
        }


def manifest_entry(
    name: str,
    shape: tuple[int, int],
    dtype: str,
    layer: int | None,
    module: str,
    shard_layout: str = "replicated",
    owner_rank: int = 0,
    expert: int | None = None,
) -> dict[str, Any]:
    """One matrix of a hello's manifest, as `wire.encode_hello` takes it (numel = m·n; `expert`
    the expert index of a mixture-of-experts matrix, else None)."""
    return {
        "matrix": name,
        "shape": list(shape),
        "numel": int(shape[0] * shape[1]),
        "dtype": dtype,
        "layer": layer,
        "module": module,
        "shard_layout": shard_layout,
        "owner_rank": owner_rank,
        "expert": expert,
    }


def hello_frames(
    msg_id: int,
    config: MonitorConfig,
    incarnation: int,
    manifest: list[dict[str, Any]],
    rank: int = 0,
    world_size: int = 1,
) -> list:
    """The Hello frames of a run with these settings: every setting as config_json (with the
    incarnation), K and p as their own fields, the manifest (`manifest_entry` items). The
    Monitor's and `deltawatch replay`'s one hello."""
    from . import wire

    return wire.encode_hello(
        msg_id,
        run=config.run,
        incarnation=incarnation,
        resume_step=config.resume_step,
        client_version=CLIENT_VERSION,
        config=config.to_json_dict() | {"incarnation": incarnation},
        manifest=manifest,
        rank=rank,
        world_size=world_size,
        channel_rank=config.sketch.channel_rank,
        oversample=config.sketch.oversample,
    )


def _close_at_exit(ref: weakref.ref) -> None:
    mon = ref()
    if mon is not None and not mon._closed:
        mon.close(timeout=min(2.0, mon.config.transport.close_timeout))


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


def _install_channel_projection(monitor: Monitor):
    """enforce_channel=True: project gradients onto each locked channel (client/channel.py): a
    post-accumulate-grad hook per parameter now, an optimizer step pre-hook once `attach` is
    called."""
    from .channel import ChannelProjection

    trackers = {m.name: m for m in monitor.matrices if m.tracker is not None}
    projection = ChannelProjection(trackers, errors=monitor.errors, faults=monitor._faults)
    projection.install()
    return projection


class _CheckpointReader:
    """anchor_checkpoint: W0 from a safetensors file or a directory of them (never torch.load)."""

    def __init__(self, path: str):
        from .checkpoint import model_files

        try:
            self._files = model_files(Path(path))
        except ValueError as exc:
            raise ValueError(f"anchor_checkpoint {path!r}: {exc}") from None
        self.path = path

    def local(self, m: _Matrix) -> torch.Tensor:
        """This rank's block of W0 for matrix `m`, read from the checkpoint."""
        pname = next(
            (n for n in self._candidates(m) if n in self._files.where),
            None,
        )
        if pname is None:
            raise ValueError(
                f"anchor_checkpoint {self.path!r} has no tensor for {m.name}; it must hold the "
                f"model's parameters under the same names"
            )
        W0 = self._files.get(pname)
        p = m.placement
        full = tuple(m.param.shape) if not sharding.is_dtensor(m.param) else None
        if full is not None and tuple(W0.shape) != full:
            raise ValueError(
                f"anchor_checkpoint: {pname} has shape {list(W0.shape)}, the model's parameter "
                f"{list(full)}"
            )
        if m.rows is not None:
            W0 = W0[m.rows[0] : m.rows[1]]
        if p.flat is not None:  # this rank's slice of the row-major weight, in its block
            return flat.embed(W0.reshape(-1)[p.flat[0] : p.flat[1]], p.spec).to(_local(m).device)
        if p.sharded:
            if p.rows is None:
                raise ValueError(
                    f"anchor_checkpoint with {m.name}: rows split over several mesh dimensions "
                    f"are not supported; start without anchor_checkpoint"
                )
            W0 = W0[p.rows[0] : p.rows[1], p.cols[0] : p.cols[1]]
        return W0.to(_local(m).device)

    def _candidates(self, m: _Matrix) -> list[str]:
        """The parameter's own name and its name without PEFT's wrappers first, then checkpoint
        keys that differ only by a prefix (e.g. `model.` present on one side only)."""
        own = list(dict.fromkeys([m.param_name, adapters.base_name(m.param_name)]))
        names = list(own)
        for key in self._files.where:
            if any(key.endswith("." + n) or n.endswith("." + key) for n in own):
                names.append(key)
        return names
