"""GroupInfo: the ordered member list of one round, agreed before the round starts.

A member's rank is its index in ``members``; rank ``s`` owns shard ``s`` of the round's partition. Every
member must hold the same GroupInfo: the collectives compare :attr:`GroupInfo.digest` in their hello
and refuse a peer whose view differs, instead of averaging with mismatched shard boundaries.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from dataclasses import dataclass
from functools import cached_property

import msgpack

from legion_swarm.config import validate_multiaddr
from legion_swarm.errors import ConfigError

MAX_GROUP_SIZE = 256
MAX_ROUND_ID_BYTES = 64


@dataclass(frozen=True, kw_only=True)
class GroupMember:
    """One member of a group, as every other member sees it."""

    peer_id: str
    """libp2p peer id: the identity its data-plane channels must prove."""
    direct: tuple[str, int] | None = None
    """``(ip, port)`` of its direct-TCP data plane, if it published one."""
    maddrs: tuple[str, ...] = ()
    """Full multiaddrs of its libp2p host, for the libp2p-stream plane (dialled if not yet connected)."""
    bandwidth: float = 1.0
    """Relative bandwidth: shards are sized in proportion to it."""

    def __post_init__(self) -> None:
        if not isinstance(self.peer_id, str) or not self.peer_id:
            raise ConfigError(f"bad peer id {self.peer_id!r}")
        if self.direct is not None:
            host, port = self.direct
            try:
                ipaddress.ip_address(host)
            except ValueError:
                raise ConfigError(f"bad direct endpoint host {host!r}: expected an IP address") from None
            if type(port) is not int or not 0 < port <= 65535:
                raise ConfigError(f"bad direct endpoint port {port!r}")
        for maddr in self.maddrs:
            validate_multiaddr(maddr, require_peer_id=False, allow_port_zero=False)
        if not (math.isfinite(self.bandwidth) and self.bandwidth > 0):
            raise ConfigError(f"bandwidth must be finite and positive, got {self.bandwidth}")


@dataclass(frozen=True, kw_only=True)
class GroupInfo:
    """The members of one round, in rank order, and the round's identifier."""

    round_id: bytes
    """Unique per round and identical on every member (e.g. a hash of swarm, step and member list)."""
    members: tuple[GroupMember, ...]
    owners: int | None = None
    """How many ranks own a shard: ranks ``0 .. owners-1`` split the space evenly, the others only contribute
    (their shards are empty). ``None``: every member owns a shard, sized by bandwidth. Groups of one swarm-wide
    round use the same count, so shard ``s`` covers the same elements in every group (see :mod:`.layout`)."""

    def __post_init__(self) -> None:
        if not isinstance(self.round_id, bytes) or not 1 <= len(self.round_id) <= MAX_ROUND_ID_BYTES:
            raise ConfigError(f"round_id must be 1-{MAX_ROUND_ID_BYTES} bytes")
        if not 1 <= len(self.members) <= MAX_GROUP_SIZE:
            raise ConfigError(f"a group has 1-{MAX_GROUP_SIZE} members, got {len(self.members)}")
        ids = [m.peer_id for m in self.members]
        if len(set(ids)) != len(ids):
            raise ConfigError("a peer appears twice in the group")
        if self.owners is not None and (type(self.owners) is not int or not 1 <= self.owners <= len(self.members)):
            raise ConfigError(f"owners must be an int in [1, {len(self.members)}], got {self.owners!r}")

    @property
    def size(self) -> int:
        return len(self.members)

    def rank_of(self, peer_id: str) -> int:
        """This peer's rank; ConfigError if it is not a member."""
        for rank, member in enumerate(self.members):
            if member.peer_id == peer_id:
                return rank
        raise ConfigError(f"peer {peer_id} is not a member of this group")

    @cached_property
    def digest(self) -> bytes:
        """SHA-256 over everything that shapes the round: round id, members in order, their bandwidths, owners."""
        body = [self.round_id, [[m.peer_id, float(m.bandwidth)] for m in self.members], self.owners]
        return hashlib.sha256(msgpack.packb(body)).digest()
