"""Reconnecting after a cut: a peer that lost every DHT neighbour and connection comes back through a member it
saw earlier, not only through its entry peer, which is dead by then. Real in-process peers (p2pd daemons)."""

from __future__ import annotations

import asyncio

import pytest
from hivemind.p2p import PeerID
from hivemind.proto import p2pd_pb2

from legion_swarm.peer import SwarmPeer
from legion_swarm.transport.identity import short_peer_id
from tests.helpers.polling import eventually
from tests.helpers.swarm import config, until_members

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(90)]


async def cut_off(peer: SwarmPeer, *bystanders: SwarmPeer) -> None:
    """What a network cut leaves behind: no connection held by the daemon, an empty DHT routing table.

    ``bystanders`` lose ``peer`` too (from their routing tables and reconnectors), as they would across a real
    cut. Otherwise their DHT traffic reaches ``peer`` again and refills its table before its own reconnector
    looks, and a test of that reconnector races them (CI saw it: the peer was back, but not through it)."""
    assert peer.dht is not None and peer.reconnector is not None
    reconnects = peer.reconnector.reconnects
    own_table = peer.dht.node.protocol.routing_table

    def forget() -> None:  # no await inside: nothing runs in between
        for node_id in list(own_table.uid_to_peer_id):
            del own_table[node_id]
        for other in bystanders:
            assert other.dht is not None and other.reconnector is not None
            table = other.dht.node.protocol.routing_table
            for node_id, peer_id in list(table.uid_to_peer_id.items()):
                if peer_id.to_base58() == peer.peer_id:
                    del table[node_id]
            other.reconnector.seen.pop(peer.peer_id, None)

    forget()
    for info in await peer.host.p2p.list_peers():
        request = p2pd_pb2.Request(
            type=p2pd_pb2.Request.DISCONNECT, disconnect=p2pd_pb2.DisconnectRequest(peer=info.peer_id.to_bytes())
        )
        _, writer = await peer.host.daemon_request(request)
        writer.close()
    await asyncio.sleep(0.5)
    # A DHT request in flight during the cut puts an entry back when it completes: forget again, unless the
    # reconnector has already done its job (then the entries are its own).
    if peer.reconnector.reconnects == reconnects:
        forget()


async def test_a_cut_off_peer_reconnects_through_a_member_it_saw_after_its_entry_peer_died() -> None:
    boot = await SwarmPeer.create(config(role="bootstrap"))
    a = b = None
    try:
        a = await SwarmPeer.create(config(boot.maddrs[0]))
        b = await SwarmPeer.create(config(boot.maddrs[0]))
        await until_members(a, boot, a, b)  # a has seen b: it is remembered
        assert a.reconnector is not None and b.peer_id in a.reconnector.seen
        await boot.aclose()  # the only address a was given is gone
        await cut_off(a, b)

        async def back() -> bool:
            return a.reconnector.reconnects >= 1  # type: ignore[union-attr]

        await eventually(back, timeout=20)
        health = await a.reconnector.health()
        assert health.neighbours >= 1 and not health.cut_off
        assert PeerID.from_base58(b.peer_id) in a.dht.node.protocol.routing_table.peer_id_to_uid  # type: ignore[union-attr]
        await until_members(b, a, b)  # a's heartbeats reach the swarm again
    finally:
        for peer in (a, b, boot):
            if peer is not None:
                await peer.aclose()


async def test_reconnect_reports_failure_when_nobody_it_knows_answers() -> None:
    boot = await SwarmPeer.create(config(role="bootstrap"))
    a = None
    try:
        a = await SwarmPeer.create(config(boot.maddrs[0]))
        await boot.aclose()
        assert a.reconnector is not None
        a.reconnector.dial_timeout_s = 2.0
        assert await a.reconnector.reconnect() is False
        assert list(a.reconnector.failures) == [short_peer_id(boot.peer_id)]  # each failure says why
        assert a.reconnector.failures[short_peer_id(boot.peer_id)]
    finally:
        if a is not None:
            await a.aclose()
        await boot.aclose()
