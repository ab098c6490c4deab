"""Layout: the groups of one swarm-wide round, and the columns that join them.

When a swarm is larger than ``max_group`` the round's leader splits its members into latency-based groups
(:func:`~legion_swarm.groups.clustering.form_groups`). Every group cuts the flat parameter space into the same
``owners`` equal shards, so shard ``s`` covers the same elements everywhere; rank ``s < owners`` of each group
owns it, and the larger groups' extra ranks only contribute. A round is then hierarchical::

    group g:     reduce-scatter inside g            (each owner holds its group's average of shard s)
    column s:    sharded step among the owners of s (one per group: cross-group average + optimizer update)
    group g:     all-gather inside g                (every member gets every shard's update)

Column ``s`` splits shard ``s`` again, one piece per group, and each piece's optimizer state lives with the
column member that owns it: the whole swarm holds one copy of the optimizer state (ZeRO across groups). Per
peer, traffic inside the group is O(model) as before and across groups O(model / owners).

Everything here is pure and deterministic: every member derives the same groups, columns, round ids and
ranges from the leader's answer.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import msgpack

from legion_swarm.errors import ConfigError
from legion_swarm.groups.info import GroupInfo, GroupMember
from legion_swarm.groups.partition import group_plan

__all__ = ["Layout"]


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The groups of one round (in the leader's order) and the shard count they share."""

    round_id: bytes
    """The swarm-wide round's identifier; each group's and column's round id derives from it."""
    groups: tuple[tuple[GroupMember, ...], ...]
    """Each group's members in rank order."""

    def __post_init__(self) -> None:
        if not self.groups or any(not g for g in self.groups):
            raise ConfigError("a layout has at least one group and no empty group")
        ids = [m.peer_id for g in self.groups for m in g]
        if len(set(ids)) != len(ids):
            raise ConfigError("a peer appears in two groups")

    @classmethod
    def single(cls, group: GroupInfo) -> Layout:
        """The layout of a round with one group: :meth:`group` gives ``group`` back."""
        if group.owners is not None:
            raise ConfigError("a single group's members all own a shard")
        return cls(round_id=group.round_id, groups=(group.members,))

    @property
    def hierarchical(self) -> bool:
        return len(self.groups) > 1

    @property
    def owners(self) -> int:
        """Shards per group: the smallest group's size (every member owns one when there is one group)."""
        return min(len(g) for g in self.groups)

    @property
    def size(self) -> int:
        return sum(len(g) for g in self.groups)

    @cached_property
    def digest(self) -> bytes:
        body = [self.round_id, [[m.peer_id for m in g] for g in self.groups]]
        return hashlib.sha256(msgpack.packb(body)).digest()

    def index_of(self, peer_id: str) -> int:
        """Which group ``peer_id`` is in; ConfigError if none."""
        for index, group in enumerate(self.groups):
            if any(m.peer_id == peer_id for m in group):
                return index
        raise ConfigError(f"peer {peer_id} is in no group of this round")

    def group(self, index: int) -> GroupInfo:
        """Group ``index`` as a round of the collectives: with one group, every member owns a shard sized by
        bandwidth and the round id is the layout's; with several, the first ``owners`` ranks own equal shards."""
        if not self.hierarchical:
            return GroupInfo(round_id=self.round_id, members=self.groups[0])
        rid = hashlib.sha256(self.round_id + b"group" + index.to_bytes(4, "big")).digest()[:16]
        return GroupInfo(round_id=rid, members=self.groups[index], owners=self.owners)

    def group_of(self, peer_id: str) -> GroupInfo:
        return self.group(self.index_of(peer_id))

    def column(self, shard: int) -> GroupInfo:
        """The owners of shard ``shard``, one per group in group order: they average it across groups."""
        if not 0 <= shard < self.owners:
            raise ConfigError(f"shard {shard} out of range [0, {self.owners})")
        rid = hashlib.sha256(self.round_id + b"column" + shard.to_bytes(4, "big")).digest()[:16]
        return GroupInfo(round_id=rid, members=tuple(g[shard] for g in self.groups))

    def owned_range(self, peer_id: str, numels: Sequence[int]) -> tuple[int, int]:
        """The flat range whose optimizer state ``peer_id`` keeps: its shard with one group, its piece of its
        column's shard with several (empty for a member that owns no shard)."""
        group = self.group_of(peer_id)
        rank = group.rank_of(peer_id)
        lo, hi = group_plan(group, numels).bounds[rank]
        if not self.hierarchical:
            return lo, hi
        if rank >= self.owners:
            return hi, hi
        column = self.column(rank)
        a, b = group_plan(column, [hi - lo]).bounds[column.rank_of(peer_id)]
        return lo + a, lo + b

    def ranges(self, numels: Sequence[int]) -> list[tuple[str, int, int]]:
        """``(peer id, start, end)`` of every non-empty owned range: who keeps which optimizer state."""
        members = [m.peer_id for g in self.groups for m in g]
        return [(p, lo, hi) for p in members for lo, hi in [self.owned_range(p, numels)] if hi > lo]
