"""What a round decides and reports: the faulty members (from the broken links everyone agreed on) and the
:class:`RoundResult` each member gets back. Pure, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from legion_swarm.collectives import wire
from legion_swarm.collectives.partition import PartitionPlan
from legion_swarm.groups.info import GroupInfo


@dataclass(frozen=True)
class RoundResult:
    """What one member saw of a round. Survivors of a round agree on ``committed``, ``missing_shards`` and
    ``contributors`` (and hold bit-identical tensors); ``excluded`` is this member's own view."""

    rank: int
    group: GroupInfo
    plan: PartitionPlan
    committed: tuple[int, ...]
    """Shards whose new values are now in the output tensors."""
    missing_shards: tuple[int, ...]
    """Shards that kept their pre-round values here: those of the faulty members on every survivor."""
    faulty: tuple[int, ...]
    """Members declared faulty by the commit vote (the same on every survivor). A member declared faulty
    may miss more shards than the survivors; its tensors then differ from theirs until the next sync."""
    contributors: dict[int, tuple[int, ...]]
    """Ranks averaged into each committed shard, as its owner decided."""
    excluded: dict[int, str]
    """Members this peer stopped talking to during the round, and why."""
    shard: torch.Tensor | None
    """This member's own result (averaged + updated, as decoded by everyone), or None. When the round committed
    it into ``out`` and it lies within one tensor, a view of that tensor (it changes when ``out`` does); else a
    tensor of its own."""
    planes: dict[int, str]
    """Data plane used with each other member: ``direct`` or ``libp2p``."""
    timings: dict[str, float]
    """Seconds since the round's start at which each phase ended."""
    reduced: bool = True
    """False for an all-gather alone, whose shards have their owner as only contributor."""
    bytes_sent: int = 0
    """Message bytes this member sent in the round (encoded tensors and headers, before channel framing)."""
    bytes_received: int = 0

    @property
    def missing_peers(self) -> tuple[str, ...]:
        """Peer ids of the owners of missing shards."""
        return tuple(self.group.members[s].peer_id for s in self.missing_shards)

    @property
    def complete(self) -> bool:
        """Every shard committed, with every member's contribution (if the round reduced)."""
        everyone = tuple(range(self.group.size))
        return not self.missing_shards and (not self.reduced or all(c == everyone for c in self.contributors.values()))


def faulty_members(edges: frozenset[wire.Edge]) -> frozenset[int]:
    """The members declared faulty, given the broken links everyone agreed on: the single member that touches
    every edge if there is exactly one (under one failure per round, the culprit), else every member that
    touches an edge (the evidence cannot tell who failed, e.g. one broken link between two members).
    Either way every edge has a faulty end, so no member outside the set lacks a shard outside it."""
    if not edges:
        return frozenset()
    touching = frozenset(r for edge in edges for r in edge)
    covering = [r for r in sorted(touching) if all(r in edge for edge in edges)]
    return frozenset(covering) if len(covering) == 1 else touching


def edge(a: int, b: int) -> wire.Edge:
    """The link between ranks ``a`` and ``b``, lower rank first."""
    return (a, b) if a < b else (b, a)
