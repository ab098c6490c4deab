"""Collectives: how a group splits, reduces and regathers the model.

- :mod:`~legion_swarm.collectives.partition` — pure: which member owns which contiguous shard of the
  flat parameter space.
"""

from __future__ import annotations

from legion_swarm.collectives.partition import PartitionPlan, ShardSlice, flatten, plan_partition, unflatten_into

__all__ = ["PartitionPlan", "ShardSlice", "flatten", "plan_partition", "unflatten_into"]
