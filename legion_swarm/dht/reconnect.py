"""Staying in the swarm: remember every member seen, and reconnect through any of them after a cut.

A peer joins through its ``--peer`` addresses, but those may be gone an hour later (the bootstrap node died,
the operator's laptop closed). hivemind's DHT drops routing-table entries that stop answering, so a peer whose
network was cut for a while comes back with an empty table and nobody to ask. :class:`Reconnector` keeps its
own list of every member it has seen in a view (peer id → addresses, most recently seen first), and every
``check_s`` seconds looks at the peer's health: connections the daemon holds and DHT neighbours. When both are
gone it dials the remembered members one after another (each within ``dial_timeout_s``), pings every one that
answers into the DHT's routing table and republishes this peer's record at once; if nobody answers it tries
again after a backoff that doubles up to ``max_backoff_s``. The entry peers are remembered too, so a swarm
whose other members all changed is still reachable through them.

Cost: one ``list_peers`` call to the local daemon per check while healthy; dialling only while cut off.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from hivemind.p2p import P2PDaemonError, PeerID

from legion_swarm.dht.membership import read_members
from legion_swarm.dht.node import SwarmDHT
from legion_swarm.errors import LegionError
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)

MAX_REMEMBERED = 256
REFRESH_EVERY = 5
"""While healthy, re-read the member list every this many checks to remember who is around."""


@dataclass(frozen=True)
class Health:
    connections: int
    """Peers the libp2p daemon is connected to."""
    neighbours: int
    """Peers in the DHT's routing table."""

    @property
    def cut_off(self) -> bool:
        return self.connections == 0 or self.neighbours == 0


class Reconnector:
    """Owned by a :class:`~legion_swarm.peer.SwarmPeer`: :meth:`remember` members from views, :meth:`run` as
    a task."""

    def __init__(
        self, dht: SwarmDHT, swarm: str, *, check_s: float, dial_timeout_s: float = 3.0, max_backoff_s: float = 30.0,
        on_reconnect: Callable[[], Awaitable[object]] | None = None,
    ) -> None:  # fmt: skip
        self.dht, self.swarm = dht, swarm
        self.host = dht.host
        self.check_s, self.dial_timeout_s, self.max_backoff_s = check_s, dial_timeout_s, max_backoff_s
        self.on_reconnect = on_reconnect
        self.seen: dict[str, tuple[str, ...]] = {}
        """Peer id → addresses, least recently seen first."""
        self.reconnects = 0
        self.last_reconnect_s: float | None = None
        self.failures: dict[str, str] = {}
        """Why each remembered peer did not answer the last reconnection attempt (short peer id → reason)."""
        """Seconds the last reconnection took, from noticing the cut to the first answering peer."""

    def remember(self, peers: Iterable[tuple[str, Iterable[str]]]) -> None:
        """Note ``(peer id, addresses)`` pairs seen alive (moved to the most recent end)."""
        for peer_id, addrs in peers:
            if peer_id == self.host.peer_id:
                continue
            self.seen.pop(peer_id, None)
            self.seen[peer_id] = tuple(addrs)
        while len(self.seen) > MAX_REMEMBERED:
            self.seen.pop(next(iter(self.seen)))

    async def health(self) -> Health:
        connections = len(await self.host.p2p.list_peers())
        neighbours = len(self.dht.node.protocol.routing_table.uid_to_peer_id)
        return Health(connections, neighbours)

    async def run(self) -> None:
        backoff = self.check_s
        checks = 0
        while True:
            await asyncio.sleep(self.check_s)
            checks += 1
            try:
                health = await self.health()
                if not health.cut_off and checks % REFRESH_EVERY == 1:
                    found = await read_members(self.dht, self.swarm)
                    self.remember((f.record.peer_id, f.record.addrs) for f in found)
            except (TimeoutError, OSError, LegionError, P2PDaemonError) as e:  # look again next time
                logger.debug("[%s] health check failed: %r", self.host.short_id, e)
                continue
            if not health.cut_off:
                backoff = self.check_s
                continue
            logger.warning(
                "[%s] cut off from the swarm (%d connections, %d DHT neighbours): reconnecting through %d known "
                "peers", self.host.short_id, health.connections, health.neighbours, len(self.seen),
            )  # fmt: skip
            started = time.perf_counter()
            while not await self.reconnect():
                logger.warning(
                    "[%s] no known peer answered (%s); trying again in %.0f s", self.host.short_id,
                    ", ".join(f"{p}: {why}" for p, why in self.failures.items()) or "none known", backoff,
                )  # fmt: skip
                await asyncio.sleep(backoff)
                backoff = min(2 * backoff, self.max_backoff_s)
            self.reconnects += 1
            self.last_reconnect_s = time.perf_counter() - started
            backoff = self.check_s

    async def reconnect(self) -> bool:
        """Dial remembered peers, most recent first; True once one answered a DHT ping (and the rest were
        tried too: the routing table should hold more than one neighbour)."""
        answered = 0
        self.failures = {}
        for peer_id, addrs in reversed(list(self.seen.items())):
            try:
                async with asyncio.timeout(self.dial_timeout_s):
                    await self.host.connect(peer_id, addrs)
                    node_id = await self.dht.node.protocol.call_ping(PeerID.from_base58(peer_id))
            except (TimeoutError, OSError, ValueError, LegionError) as e:
                logger.debug("[%s] %s did not answer: %r", self.host.short_id, short_peer_id(peer_id), e)
                self.failures[short_peer_id(peer_id)] = repr(e)
                continue
            if node_id is None:
                self.failures[short_peer_id(peer_id)] = "connected, but no answer to a DHT ping"
            else:
                answered += 1
                if answered >= 3:  # enough neighbours to find the rest through the DHT
                    break
        if not answered:
            return False
        logger.info("[%s] reconnected to the swarm through %d peers", self.host.short_id, answered)
        if self.on_reconnect is not None:
            try:  # bounded: a store that waits on dead replicas must not hold the reconnection up
                async with asyncio.timeout(self.dial_timeout_s):
                    await self.on_reconnect()
            except (TimeoutError, OSError, LegionError) as e:  # the next heartbeat publishes again anyway
                logger.info("[%s] republishing after reconnecting failed: %r", self.host.short_id, e)
        return True
