"""Groups: who averages with whom in a round.

- :mod:`~legion_swarm.groups.info` — :class:`GroupInfo`, the ordered member list of one round that every
  member must hold identically (its digest is checked when members connect).
"""

from __future__ import annotations

from legion_swarm.groups.info import GroupInfo, GroupMember

__all__ = ["GroupInfo", "GroupMember"]
