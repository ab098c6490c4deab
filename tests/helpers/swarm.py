"""For tests on real peers: peer configs, membership views, an observer, and fast flags for training via the CLI."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from legion_swarm.config import DHTConfig, HostConfig, MembershipConfig, PeerConfig
from legion_swarm.peer import SwarmPeer
from legion_swarm.sim import PeerProcess
from tests.helpers.polling import eventually

# Small and fast on 2 cores: TinyGPT-tiny on the synthetic language, short rounds.
FAST = ("--model", "tiny", "--data", "dummy", "--batch-size", "4")  # lr 1e-3: 3e-3 spikes the first losses

HEARTBEAT = 0.5  # seconds between membership heartbeats of peers built by :func:`config`


def config(*entry: str, swarm: str | None = "t", role: str = "peer", **host: object) -> PeerConfig:
    """An in-process peer on 127.0.0.1 joining through ``entry``, with short heartbeats and timeouts."""
    return PeerConfig(
        host=HostConfig(host="127.0.0.1", initial_peers=entry, **host),
        dht=DHTConfig(wait_timeout_s=2),
        membership=MembershipConfig(swarm=swarm, role=role, heartbeat_s=HEARTBEAT),
        join_timeout_s=10,
    )


async def members(peer: SwarmPeer) -> set[str]:
    """Peer ids in ``peer``'s current view of its swarm."""
    return {m.record.peer_id for m in (await peer.view()).members}


async def until_members(reader: SwarmPeer, *expected: SwarmPeer) -> set[str]:
    """Wait (10 s at most) until ``reader`` sees exactly ``expected`` as members; their ids."""
    want = {p.peer_id for p in expected}

    async def complete() -> bool:
        return await members(reader) == want

    await eventually(complete, timeout=10)
    return want


@contextlib.asynccontextmanager
async def observer(maddr: str, swarm: str | None = None) -> AsyncIterator[SwarmPeer]:
    """A client-mode observer joined through ``maddr``: reads the swarm without appearing in it."""
    peer = await SwarmPeer.create(PeerConfig.observer(maddr, swarm))
    try:
        yield peer
    finally:
        await peer.aclose()


async def trained(peers: list[PeerProcess], *, timeout: float) -> list[dict]:
    """The training summaries of ``peers`` once every one has printed its own (see :meth:`PeerProcess.trained`)."""

    async def all_trained() -> list[dict] | None:
        summaries = [p.trained() for p in peers]
        return None if any(s is None for s in summaries) else summaries  # type: ignore[return-value]

    return await eventually(all_trained, timeout=timeout, interval=0.5)
