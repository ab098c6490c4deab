"""The two ways a group trains together, both on the collectives' ``sharded_step``.

- :class:`SyncMode`: every step, reduce-scatter the gradients (weighted by samples); each owner applies
  AdamW to its shard with optimizer state that exists only there (ZeRO-1/2); all-gather the updates.
- :class:`DiLoCoMode`: H local AdamW steps, then the same sharded step on the pseudo-gradient
  ``anchor - params`` (how far this peer moved since the last sync) with a sharded outer Nesterov.

Both all-gather an *update* ``u`` and set ``params = start - u``, where ``start`` is what every member held
before the round (bit-identical: the current parameters in ``sync``, the anchor in ``diloco``). Shards a
round does not commit get ``u = 0``, so survivors of a round always end bit-identical; a member the round
declares faulty may have missed shards and must re-sync (:attr:`RoundOutcome.in_sync` is False).

Forward and backward passes run in a worker thread so the event loop keeps serving heartbeats and the data
plane while the model computes: the mode's :class:`~legion_swarm.train.compute.Compute`, given at construction.

**Devices.** The model, its batches and the inner optimizer live on the mode's
:class:`~legion_swarm.train.device.Placement` (a GPU, or the CPU), and passes run in its precision under
autocast. The state every member holds bit-identically (``sync``: a float32 host copy of the parameters;
``diloco``: the anchor) and the sharded optimizer state are on the host, where the round's arithmetic
happens: what leaves the device (gradients, the parameters for a pseudo-gradient) is copied into host
staging buffers, and the parameters are set from the host state after every round. Peers on different
devices and precisions therefore contribute different numbers but commit the same bits.

**Local work that outlives a round.** A member may compute more than one batch per round (a round by time or
samples: :class:`~legion_swarm.config.TrainConfig`'s ``round_seconds`` / ``round_samples``), and a member
that arrived too late for a round keeps its work for the next one (:meth:`TrainingMode.load_state` with
``keep_work``): ``sync`` keeps its accumulated gradients, ``diloco`` moves its local progress
(``params - anchor``) onto the downloaded anchor. :attr:`TrainingMode.samples` is what that work weighs.

**The protocol.** :class:`TrainingMode` is all the training loop (:mod:`legion_swarm.train.loop`) knows of a
mode: how many local steps a round's local work takes and one such step (:attr:`~TrainingMode.local_steps`,
:meth:`~TrainingMode.local_step`), the round itself (:meth:`~TrainingMode.round`, returning a
:class:`RoundOutcome` with the bytes it moved), the state every member holds bit-identically
(:meth:`~TrainingMode.state_tensors`, :meth:`~TrainingMode.load_state`), and the sharded optimizer state the
loop hands over between owners. :data:`MODE_CLASSES` maps the config's mode name to the class and
:func:`create_mode` builds one, so a third mode is one class plus one entry there (and its name in
:data:`legion_swarm.config.train.MODES`, which the config validates). The mode-specific methods
(``SyncMode.backward/sync/step``, ``DiLoCoMode.inner_step/outer_step``) stay as they are; the protocol's methods
call them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol, TypeVar, runtime_checkable

import torch

from legion_swarm.collectives import Collectives, FaultPlan, Relay, RoundResult, group_plan
from legion_swarm.config import TrainConfig
from legion_swarm.errors import ConfigError
from legion_swarm.groups.info import GroupInfo
from legion_swarm.groups.layout import Layout
from legion_swarm.train.compute import Compute
from legion_swarm.train.device import LossScaler, Placement, forward_backward
from legion_swarm.train.optim import LocalAdamW, ShardedAdamW, ShardedNesterov, ShardState, Staged, StateSlice

logger = logging.getLogger(__name__)

T = TypeVar("T")

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(inputs, targets)``: int64 token ids of shape [B, T]."""

MIN_WEIGHT = 1e-9
"""Contribution weight of a member that trained on no samples since the last round (it must send something)."""


@dataclass(frozen=True, kw_only=True)
class RoundOutcome:
    """What a training round did, for this peer."""

    result: RoundResult
    """The group's round as this peer saw it."""
    samples: int
    """Samples this peer contributed."""
    fresh_state: int
    """Optimizer-state elements of this peer's new shard that nobody could hand over (they start fresh)."""
    columns: tuple[RoundResult, ...] = ()
    """The column rounds this peer took part in as an owner (hierarchical rounds only)."""

    def __post_init__(self) -> None:
        if self.samples < 0 or self.fresh_state < 0:
            raise ValueError(f"samples and fresh_state must be >= 0, got {self.samples}, {self.fresh_state}")

    @property
    def in_sync(self) -> bool:
        """False if the round declared this peer faulty: its parameters may now differ from the group's."""
        return self.result.rank not in self.result.faulty

    @property
    def bytes_sent(self) -> int:
        """Message bytes this peer sent in the round, its column rounds included."""
        return self.result.bytes_sent + sum(r.bytes_sent for r in self.columns)

    @property
    def bytes_received(self) -> int:
        """Message bytes this peer received in the round, its column rounds included."""
        return self.result.bytes_received + sum(r.bytes_received for r in self.columns)


@runtime_checkable
class TrainingMode(Protocol):
    """What a round of the training loop needs from a mode. Construction: ``cls(model, collectives, config, *,
    compute=None, placement=None)`` (see :data:`ModeClass`)."""

    join_idle_after_resync: ClassVar[bool]
    """After downloading the swarm's state, join the next round at once with no local work (zero weight)
    rather than do the local work first: for modes whose local work is long enough to miss that round."""
    optimizer: ShardState
    """This peer's shard of the optimizer state, moved between owners when the partition moves."""
    numels: list[int]
    """Elements of each trainable tensor, in ``model.parameters()`` order."""
    samples: int
    """Samples of the local work not yet contributed to a round (its weight in the next one)."""

    @property
    def local_steps(self) -> int:
        """Batches one round's local work takes (each one :meth:`local_step`); with a round budget, the most it
        takes."""
        ...

    async def local_step(self, batch: Batch) -> float:
        """One step of local work on ``batch``, off the event loop; returns the loss."""
        ...

    def compute_step(self, batch: Batch) -> float:
        """The same step on the calling thread (the training loop runs a round's local work as one call on its
        compute thread: handing each step to the thread separately costs a quarter of the speed on CPU)."""
        ...

    def my_range(self, layout: GroupInfo | Layout) -> tuple[int, int]:
        """The flat range whose optimizer state this peer keeps in a round of ``layout``."""
        ...

    async def round(
        self, layout: GroupInfo | Layout, *, handed: Sequence[StateSlice] = (), faults: FaultPlan | None = None
    ) -> RoundOutcome:
        """The group's round on the local work since the last one; ``handed``: optimizer state of this peer's
        new range from its previous owners."""
        ...

    def state_tensors(self) -> list[torch.Tensor]:
        """What every member of a group holds bit-identically between rounds, and what donors serve."""
        ...

    def load_state(self, flat: torch.Tensor, *, keep_work: bool = False) -> None:
        """Take a downloaded flat state as this peer's own; ``keep_work``: keep the local work done since the
        last round (to contribute it to the next one) instead of dropping it."""
        ...


def trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Parameters a swarm averages, in ``model.parameters()`` order (tied weights once)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.dtype != torch.float32:
            raise TypeError(f"swarm training needs float32 parameters, got {p.dtype}")
    return params


class _ShardedMode:
    """What both modes share: the update buffers, staging the owner's state, applying the gathered update."""

    join_idle_after_resync: ClassVar[bool] = False

    def __init__(
        self, model: torch.nn.Module, collectives: Collectives, optimizer: ShardState, compute: Compute | None,
        placement: Placement | None,
    ) -> None:  # fmt: skip
        self.model = model
        self.collectives = collectives
        self.compute = compute
        """The thread forward and backward passes run on (None: any worker thread)."""
        self.placement = placement or Placement(next(model.parameters()).device)
        """The device and precision of the passes; the model must already be on that device."""
        self.scaler = LossScaler() if self.placement.scales_loss else None
        if any(p.device != self.placement.device for p in model.parameters()):
            raise ValueError(f"the model must be on {self.placement.device} before the mode is built")
        self.cross = Collectives(collectives.plane, collectives.config)
        """The column rounds of hierarchical rounds (their own residuals and buffers: other shards, other peers)."""
        self.params = trainable(model)
        self.numels = [p.numel() for p in self.params]
        self.optimizer = optimizer
        self.staging = self.placement.host_buffers(self.params)
        """Host copies of what leaves the device for a round (gradients, or parameters for a pseudo-gradient)."""
        self.updates = [torch.zeros(p.shape, dtype=torch.float32) for p in self.params]
        self.samples = 0
        self.column_results: list[RoundResult] = []
        """Results of the column rounds this peer took part in (hierarchical rounds; the caller may clear it)."""

    async def _offload(self, fn: Callable[..., T], *args: object, transfer: bool = False) -> T:
        """``fn(*args)`` on the compute thread; ``transfer``: a device-to-host copy, never throttled."""
        if self.compute is not None:
            return await self.compute.run(fn, *args, throttled=not transfer)
        return await asyncio.to_thread(fn, *args)

    @property
    def peer_id(self) -> str:
        return self.collectives.plane.identity.peer_id

    def my_range(self, layout: GroupInfo | Layout) -> tuple[int, int]:
        """The flat range whose optimizer state this peer keeps in a round of ``layout`` (or of one group)."""
        return _as_layout(layout).owned_range(self.peer_id, self.numels)

    def state_tensors(self) -> list[torch.Tensor]:
        """What every member of a group holds bit-identically between rounds, and what donors serve."""
        raise NotImplementedError

    def load_state(self, flat: torch.Tensor, *, keep_work: bool = False) -> None:
        """Take a downloaded flat state as this peer's own."""
        offset = 0
        with torch.no_grad():
            for t in self.state_tensors():
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()
            self._set_params()
        if not keep_work:
            self.samples = 0

    def _set_params(self) -> None:
        """The parameters on the device from the host state (after a round, or a download)."""
        with torch.no_grad():
            for p, t in zip(self.params, self.state_tensors(), strict=True):
                p.copy_(t)

    async def round(
        self, layout: GroupInfo | Layout, *, handed: Sequence[StateSlice] = (), faults: FaultPlan | None = None
    ) -> RoundOutcome:
        # A fresh list per round: a long run would otherwise keep every column round's result.
        self.column_results.clear()
        return await self._round(layout, handed, faults)

    async def _round(
        self, layout: GroupInfo | Layout, handed: Sequence[StateSlice], faults: FaultPlan | None
    ) -> RoundOutcome:
        raise NotImplementedError

    def prepare(self, layout: GroupInfo | Layout, handed: Sequence[StateSlice] = ()) -> int:
        """Move the sharded optimizer state to the range this peer keeps in a round of ``layout``."""
        return self.optimizer.rebase(*self.my_range(layout), handed)

    async def _sharded_round(
        self, layout: GroupInfo | Layout, contributions: Sequence[torch.Tensor], start: Sequence[torch.Tensor],
        samples: int, handed: Sequence[StateSlice], faults: FaultPlan | None,
    ) -> RoundOutcome:  # fmt: skip
        """Average ``contributions``; the owner turns its shard of ``start`` into an update; then
        ``start -= update`` on every member for the committed shards. With several groups, each owner first
        averages its group's shard across groups in its column, where the optimizer step happens. ``samples``
        weigh this peer's contribution."""
        layout = _as_layout(layout)
        first_column = len(self.column_results)
        fresh = self.prepare(layout, handed)
        group = layout.group_of(self.peer_id)
        plan = group_plan(group, self.numels)
        staged: dict[int, Staged] = {}

        def update_fn(shard: int, averaged: torch.Tensor) -> torch.Tensor:
            update, staged[shard] = self.optimizer.compute(plan.extract(start, shard), averaged)
            return update

        rank = group.rank_of(self.peer_id)
        relay = None
        if layout.hierarchical and rank < layout.owners:
            relay = self._column_relay(layout.column(rank), plan.extract(start, rank))
        for u in self.updates:
            u.zero_()
        result = await self.collectives.sharded_step(
            group, contributions, None if layout.hierarchical else update_fn, weight=max(samples, MIN_WEIGHT),
            out=self.updates, faults=faults, relay=relay,
            relay_timeout_s=self.relay_timeout_s if layout.hierarchical else 0.0,
        )  # fmt: skip
        if not layout.hierarchical and result.rank in result.committed and result.rank in staged:
            self.optimizer.commit(staged[result.rank])
        with torch.no_grad():
            for s, u in zip(start, self.updates, strict=True):
                s.sub_(u)
        columns = tuple(self.column_results[first_column:])
        return RoundOutcome(result=result, samples=samples, fresh_state=fresh, columns=columns)

    @property
    def relay_timeout_s(self) -> float:
        """How long an owner may spend in its column round: that round's deadline plus a second of grace."""
        return self.cross.config.round_timeout_s + 1.0

    def _column_relay(self, column: GroupInfo, start_shard: torch.Tensor) -> Relay:
        """The owner's part of a hierarchical round: a sharded step among the owners of the same shard in every
        group, on the group's averaged shard weighted by the samples behind it. Each column member steps the
        optimizer on its piece; the column all-gathers the updates, and a piece the column does not commit
        gets a zero update on every column member, so all groups stay bit-identical."""
        piece_plan = group_plan(column, [start_shard.numel()])

        async def relay(averaged: torch.Tensor, weight: float) -> torch.Tensor:
            staged: dict[int, Staged] = {}

            def update_fn(piece: int, piece_average: torch.Tensor) -> torch.Tensor:
                lo, hi = piece_plan.bounds[piece]
                update, staged[piece] = self.optimizer.compute(start_shard[lo:hi], piece_average)
                return update

            update = torch.zeros_like(averaged)
            result = await self.cross.sharded_step(column, [averaged], update_fn, weight=weight, out=[update])
            if result.rank in result.committed and result.rank in staged:
                self.optimizer.commit(staged[result.rank])
            self.column_results.append(result)
            return update

        return relay


class SyncMode(_ShardedMode):
    """Every step: average gradients across the group, sharded AdamW on the owners, gather the updates."""

    def __init__(
        self, model: torch.nn.Module, collectives: Collectives, config: TrainConfig, *, compute: Compute | None = None,
        placement: Placement | None = None,
    ) -> None:  # fmt: skip
        super().__init__(model, collectives, ShardedAdamW(**config.adamw()), compute, placement)
        self.config = config
        self.master = [p.detach().to("cpu", copy=True) for p in self.params]
        """The parameters as every member holds them, float32 on the host (the model's are copies of them)."""
        self.batches = 0  # batches whose gradients are accumulated for the next round

    @property
    def local_steps(self) -> int:
        # One batch a round; a round by time or samples accumulates up to inner_steps batches' gradients.
        return self.config.inner_steps if self.config.budgeted else 1

    async def local_step(self, batch: Batch) -> float:
        return await self.backward(batch)

    def compute_step(self, batch: Batch) -> float:
        return self._backward(batch)

    async def _round(
        self, layout: GroupInfo | Layout, handed: Sequence[StateSlice], faults: FaultPlan | None
    ) -> RoundOutcome:
        return await self.sync(layout, handed=handed, faults=faults)

    def state_tensors(self) -> list[torch.Tensor]:
        return self.master

    async def backward(self, batch: Batch) -> float:
        """Add this peer's gradients on ``batch`` to those of the round so far; returns the loss."""
        return await self._offload(self._backward, batch)

    def _backward(self, batch: Batch) -> float:
        loss = forward_backward(self.model, batch, self.placement, self.scaler)
        self.samples += int(batch[0].shape[0])
        self.batches += 1
        return loss

    async def sync(
        self, group: GroupInfo | Layout, *, handed: Sequence[StateSlice] = (), faults: FaultPlan | None = None
    ) -> RoundOutcome:
        """Average the gradients of :meth:`backward` across ``group`` and step."""
        grads, samples = await self._offload(self._host_gradients, transfer=True)
        outcome = await self._sharded_round(group, grads, self.master, samples, handed, faults)
        self._set_params()
        self.model.zero_grad(set_to_none=False)
        self.samples = self.batches = 0
        return outcome

    def _host_gradients(self) -> tuple[list[torch.Tensor], int]:
        """The mean gradient of the accumulated batches in the host buffers, and the samples behind it (0 if
        fp16 gradients overflowed: the round gets this peer's zeros at the smallest weight)."""
        finite = True
        if self.scaler is not None:
            finite = self.scaler.unscale_(self.params)
            self.scaler.update(finite)
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        host = self.placement.to_host(grads, self.staging)
        for g in host:
            if not finite:
                g.zero_()
            elif self.batches > 1:
                g.div_(self.batches)
        return host, self.samples if finite else 0

    async def step(
        self,
        group: GroupInfo | Layout,
        batch: Batch,
        *,
        handed: Sequence[StateSlice] = (),
        faults: FaultPlan | None = None,
    ) -> tuple[RoundOutcome, float]:
        """:meth:`backward` then :meth:`sync`; returns the outcome and this peer's loss on ``batch``."""
        loss = await self.backward(batch)
        return await self.sync(group, handed=handed, faults=faults), loss


class DiLoCoMode(_ShardedMode):
    """H local AdamW steps, then a sharded outer Nesterov step on the averaged pseudo-gradients."""

    join_idle_after_resync = True  # H local steps after a re-sync would arrive late for the next round

    def __init__(
        self, model: torch.nn.Module, collectives: Collectives, config: TrainConfig, *, compute: Compute | None = None,
        placement: Placement | None = None,
    ) -> None:  # fmt: skip
        outer = ShardedNesterov(lr=config.outer_lr, momentum=config.outer_momentum)
        super().__init__(model, collectives, outer, compute, placement)
        self.config = config
        self.inner = LocalAdamW(self.params, **config.adamw())  # type: ignore[arg-type]
        self.anchor = [p.detach().to("cpu", copy=True) for p in self.params]
        """The parameters every member of the group held after the last outer step (float32, on the host)."""
        self.inner_steps = 0

    def state_tensors(self) -> list[torch.Tensor]:
        return self.anchor

    def load_state(self, flat: torch.Tensor, *, keep_work: bool = False) -> None:
        if not keep_work:
            super().load_state(flat)
            self.inner_steps = 0
            return
        # The local progress since the old anchor, moved onto the new one: params = new anchor + (params - old).
        progress = self.placement.to_host(self.params, self.staging)
        for h, a in zip(progress, self.anchor, strict=True):
            h.sub_(a)
        super().load_state(flat, keep_work=True)
        with torch.no_grad():
            for p, a, h in zip(self.params, self.anchor, progress, strict=True):
                p.copy_(h.add_(a))

    @property
    def local_steps(self) -> int:
        return self.config.inner_steps

    async def local_step(self, batch: Batch) -> float:
        return await self.inner_step(batch)

    def compute_step(self, batch: Batch) -> float:
        return self._inner_step(batch)

    async def _round(
        self, layout: GroupInfo | Layout, handed: Sequence[StateSlice], faults: FaultPlan | None
    ) -> RoundOutcome:
        return await self.outer_step(layout, handed=handed, faults=faults)

    async def inner_step(self, batch: Batch) -> float:
        """One local AdamW step on ``batch``; returns the loss."""
        return await self._offload(self._inner_step, batch)

    def _inner_step(self, batch: Batch) -> float:
        self.inner.zero_grad()
        loss = forward_backward(self.model, batch, self.placement, self.scaler)
        finite = True
        if self.scaler is not None:
            finite = self.scaler.unscale_(self.params)
            self.scaler.update(finite)
        if not finite:  # fp16 overflow: skip the step (the scaler halved its scale)
            return loss
        if self.config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        self.inner.step()
        self.samples += int(batch[0].shape[0])
        self.inner_steps += 1
        return loss

    async def outer_step(
        self, group: GroupInfo | Layout, *, handed: Sequence[StateSlice] = (), faults: FaultPlan | None = None
    ) -> RoundOutcome:
        """Average how far each member moved since the anchor; the owners' Nesterov step moves the anchor;
        everyone continues from the new anchor."""
        pseudo = await self._offload(self._pseudo_gradient, transfer=True)
        outcome = await self._sharded_round(group, pseudo, self.anchor, self.samples, handed, faults)
        self._set_params()
        self.samples = self.inner_steps = 0
        return outcome

    def _pseudo_gradient(self) -> list[torch.Tensor]:
        """``anchor - params`` in the host buffers."""
        host = self.placement.to_host(self.params, self.staging)
        return [torch.sub(a, h, out=h) for a, h in zip(self.anchor, host, strict=True)]


ModeClass = Callable[..., TrainingMode]
"""``cls(model, collectives, config, *, compute=None, placement=None)``: builds a mode for ``model``, rounds on
``collectives``, settings from ``config`` (the swarm's :class:`TrainConfig`), local passes on ``compute``
(None: any worker thread) on ``placement``'s device and precision (None: the model's device, fp32)."""

MODE_CLASSES: dict[str, ModeClass] = {"sync": SyncMode, "diloco": DiLoCoMode}
"""The config's mode name (:attr:`TrainConfig.mode`) -> the class that trains that way."""


def create_mode(
    name: str, model: torch.nn.Module, collectives: Collectives, config: TrainConfig, *, compute: Compute | None = None,
    placement: Placement | None = None,
) -> TrainingMode:  # fmt: skip
    """The mode ``name`` of :data:`MODE_CLASSES`, built for ``model``; refuses a class that does not fulfil
    :class:`TrainingMode`."""
    try:
        cls = MODE_CLASSES[name]
    except KeyError:
        raise ConfigError(f"no training mode {name!r}: expected one of {', '.join(MODE_CLASSES)}") from None
    mode = cls(model, collectives, config, compute=compute, placement=placement)
    if not isinstance(mode, TrainingMode):
        raise TypeError(f"{type(mode).__name__} (mode {name!r}) does not fulfil the TrainingMode protocol")
    return mode


def _as_layout(layout: GroupInfo | Layout) -> Layout:
    return layout if isinstance(layout, Layout) else Layout.single(layout)
