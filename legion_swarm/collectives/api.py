"""The entry point of the collectives: one peer's :class:`Collectives` over its data plane.

It runs one :class:`~legion_swarm.collectives.rounds.Round` at a time and keeps what must outlive a round:
the error-feedback residuals of lossy codecs, the receive buffers, the latest partition.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import torch

from legion_swarm.codecs import ErrorFeedback, get_codec
from legion_swarm.collectives.buffers import BufferPool
from legion_swarm.collectives.faults import FaultPlan
from legion_swarm.collectives.partition import PartitionPlan
from legion_swarm.collectives.result import RoundResult
from legion_swarm.collectives.rounds import Relay, Round, RoundSpec, UpdateFn
from legion_swarm.config import CollectiveConfig
from legion_swarm.groups.info import GroupInfo
from legion_swarm.transport.dataplane import DataPlane

logger = logging.getLogger(__name__)


class Collectives:
    """Sharded collectives of one peer over its :class:`DataPlane`; keeps the error-feedback residuals of
    lossy codecs across rounds.

    ::

        coll = Collectives(plane, CollectiveConfig(codec="int8"))
        result = await coll.all_reduce(group, [grad])               # average in place
        result = await coll.sharded_step(group, grads, update_fn, out=params, weight=n_samples)
    """

    def __init__(self, plane: DataPlane, config: CollectiveConfig | None = None) -> None:
        self.plane = plane
        self.config = config or CollectiveConfig()
        codec = self.config.codec
        self.error_feedback = ErrorFeedback(get_codec(codec, **self.config.codec_options(codec)))
        self.buffers = BufferPool()
        self._one_round_at_a_time = asyncio.Lock()  # rounds share the buffers and the residuals
        self._restored: set[object] = set()
        self.last_plan: PartitionPlan | None = None
        """The partition of the latest round (set before it starts: an ``update_fn`` may use it)."""

    async def sharded_step(
        self, group: GroupInfo, tensors: Sequence[torch.Tensor], update_fn: UpdateFn | None, *,
        weight: float = 1.0, out: Sequence[torch.Tensor] | None = None, faults: FaultPlan | None = None,
        relay: Relay | None = None, relay_timeout_s: float = 0.0,
    ) -> RoundResult:  # fmt: skip
        """Reduce-scatter ``tensors`` (weighted by ``weight``), let each owner map its averaged shard through
        ``update_fn``, and all-gather the results into ``out`` (default: ``tensors``). Shards that are not
        committed keep their pre-round values in ``out``. If ``update_fn`` keeps state (optimizer moments),
        it should apply it only for shards in ``result.committed``.

        Hierarchical rounds: an owner with a ``relay`` awaits it (with its averaged shard and that shard's total
        weight) instead of calling ``update_fn``; every member of the group passes the same ``relay_timeout_s``,
        the time an owner may spend in it, which extends the all-gather's deadlines."""
        spec = RoundSpec(
            weight=weight, out=None if out is None else tuple(out), update_fn=update_fn, relay=relay,
            relay_timeout_s=relay_timeout_s,
        )  # fmt: skip
        return await self._run(group, tensors, spec, faults)

    async def all_reduce(
        self, group: GroupInfo, tensors: Sequence[torch.Tensor], *, weight: float = 1.0, faults: FaultPlan | None = None
    ) -> RoundResult:
        """Weighted average of ``tensors`` across the group, in place."""
        return await self._run(group, tensors, RoundSpec(weight=weight), faults)

    async def reduce_scatter(
        self, group: GroupInfo, tensors: Sequence[torch.Tensor], *, weight: float = 1.0, faults: FaultPlan | None = None
    ) -> RoundResult:
        """Average only this member's shard: ``result.shard`` (``tensors`` are not modified)."""
        return await self._run(group, tensors, RoundSpec(weight=weight, gather=False), faults)

    async def all_gather(
        self, group: GroupInfo, tensors: Sequence[torch.Tensor], *, faults: FaultPlan | None = None
    ) -> RoundResult:
        """Every member sends its own shard of ``tensors``; everyone's copies are overwritten with the owners'."""
        return await self._run(group, tensors, RoundSpec(reduce=False), faults)

    async def _run(
        self, group: GroupInfo, tensors: Sequence[torch.Tensor], spec: RoundSpec, faults: FaultPlan | None
    ) -> RoundResult:
        async with self._one_round_at_a_time:
            round_ = Round(
                self.plane, group, tensors, spec, config=self.config, faults=faults,
                error_feedback=self.error_feedback, buffers=self.buffers,
            )  # fmt: skip
            if self.last_plan is not None and round_.plan.bounds != self.last_plan.bounds:
                self.error_feedback.reset()  # shards moved: old residuals belong to other elements
            self.last_plan = round_.plan
            round_.restored_before, self._restored = frozenset(self._restored), round_.restored
            started = time.perf_counter()
            result = await round_.run()
        logger.info(
            "%s round done in %.3f s: committed %s, missing %s, excluded %s", round_.tag,
            time.perf_counter() - started, list(result.committed), list(result.missing_shards), result.excluded,
        )  # fmt: skip
        return result
