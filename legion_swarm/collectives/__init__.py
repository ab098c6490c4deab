"""Collectives: how a group splits, reduces and regathers the model.

- :mod:`~legion_swarm.collectives.partition` — pure: which member owns which contiguous shard of the
  flat parameter space.
- :mod:`~legion_swarm.collectives.wire` — pure: the messages of a round and their validation.
- :mod:`~legion_swarm.collectives.reference` — the naive weighted average a round must reproduce.
- :mod:`~legion_swarm.collectives.rounds` — :class:`Collectives`: reduce-scatter, all-gather, all-reduce and
  the sharded step, consistent under failure.
- :mod:`~legion_swarm.collectives.faults` — deterministic fault injection at named phases.
"""

from __future__ import annotations

from legion_swarm.collectives.faults import FaultPlan, InjectedCrash
from legion_swarm.collectives.partition import PartitionPlan, ShardSlice, flatten, plan_partition, unflatten_into
from legion_swarm.collectives.reference import reference_all_reduce, weighted_average
from legion_swarm.collectives.rounds import Collectives, RoundResult, faulty_members

__all__ = [
    "Collectives",
    "FaultPlan",
    "InjectedCrash",
    "PartitionPlan",
    "RoundResult",
    "ShardSlice",
    "faulty_members",
    "flatten",
    "plan_partition",
    "reference_all_reduce",
    "unflatten_into",
    "weighted_average",
]
