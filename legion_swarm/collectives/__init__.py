"""Collectives: how a group splits, reduces and regathers the model.

- :mod:`~legion_swarm.collectives.partition` — the partition plan of :mod:`legion_swarm.groups.partition`
  (which member owns which contiguous shard of the flat parameter space), and flattening tensors.
- :mod:`~legion_swarm.collectives.wire` — pure: the messages of a round and their validation.
- :mod:`~legion_swarm.collectives.reference` — the naive weighted average a round must reproduce.
- :mod:`~legion_swarm.collectives.owner` — pure: the owner's side of a round (contributions to its shard, their
  average, the update and the encoded result), testable without a network.
- :mod:`~legion_swarm.collectives.rounds` — one round (its options a frozen ``RoundSpec``): reduce-scatter,
  owner update, all-gather, commit vote.
- :mod:`~legion_swarm.collectives.result` — pure: which members a round declares faulty; what it reports.
- :mod:`~legion_swarm.collectives.buffers` — receive and reduce buffers kept across rounds.
- :mod:`~legion_swarm.collectives.api` — :class:`Collectives`: reduce_scatter, all_gather, all_reduce and
  sharded_step, one round at a time, with the state that outlives a round.
- :mod:`~legion_swarm.collectives.faults` — deterministic fault injection at named phases, as a wrapper around
  the data plane that recognises them from the messages sent.
"""

from __future__ import annotations

from legion_swarm.collectives.api import Collectives
from legion_swarm.collectives.faults import FaultPlan, InjectedCrash
from legion_swarm.collectives.partition import (
    PartitionPlan,
    ShardSlice,
    flatten,
    group_plan,
    plan_partition,
    unflatten_into,
)
from legion_swarm.collectives.reference import reference_all_reduce, weighted_average
from legion_swarm.collectives.result import RoundResult, faulty_members
from legion_swarm.collectives.rounds import Relay, UpdateFn

__all__ = [
    "Collectives",
    "FaultPlan",
    "InjectedCrash",
    "PartitionPlan",
    "Relay",
    "RoundResult",
    "ShardSlice",
    "UpdateFn",
    "faulty_members",
    "flatten",
    "group_plan",
    "plan_partition",
    "reference_all_reduce",
    "unflatten_into",
    "weighted_average",
]
