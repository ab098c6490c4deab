"""Groups: who averages with whom in a round.

- :mod:`~legion_swarm.groups.info` — :class:`GroupInfo`, the ordered member list of one round that every
  member must hold identically (its digest is checked when members connect).
- :mod:`~legion_swarm.groups.partition` — pure: :class:`~legion_swarm.groups.partition.PartitionPlan`, which
  member of a group owns which contiguous shard of the flat parameter space, and the chunks a shard is sent in.
- :mod:`~legion_swarm.groups.layout` — :class:`~legion_swarm.groups.layout.Layout`, a round's groups with one
  shard layout for all of them, and the columns (owners of the same range in different groups).
- :mod:`~legion_swarm.groups.probe` — RTT pings to a bounded sample of members, published as signed records.
- :mod:`~legion_swarm.groups.clustering` — the RTT matrix completed from sparse measurements, and deterministic
  groups of bounded size on it.
- :mod:`~legion_swarm.groups.matchmaking` — a round's leader, its answer (the layout, or re-sync), and how
  conflicting views resolve.
"""

from __future__ import annotations

from legion_swarm.groups.info import GroupInfo, GroupMember

__all__ = ["GroupInfo", "GroupMember"]
