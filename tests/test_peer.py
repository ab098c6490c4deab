"""SwarmPeer on real p2pd daemons in this process: join, records, expiry, and what peers may not do."""

from __future__ import annotations

import asyncio
import socket
import time

import msgpack
import pytest
from hivemind.dht.routing import DHTID

from legion_swarm.config import DHTConfig
from legion_swarm.dht.membership import HELLO_PROTOCOL
from legion_swarm.dht.node import SwarmDHT, dht_time
from legion_swarm.dht.records import peers_key
from legion_swarm.errors import AddressInUseError, PeerUnreachableError, SwarmMismatchError
from legion_swarm.peer import HELLO_FALLBACK_S, SwarmPeer
from legion_swarm.transport.host import Host
from tests.helpers.polling import eventually
from tests.helpers.swarm import HEARTBEAT, config, members, observer, until_members

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(90)]


@pytest.fixture
async def swarm():
    """A bootstrap and two peers, in-process."""
    boot = await SwarmPeer.create(config(role="bootstrap"))
    peers = []
    try:
        for _ in range(2):
            peers.append(await SwarmPeer.create(config(boot.maddrs[0])))
        yield boot, peers
    finally:
        errors = await asyncio.gather(*(p.aclose() for p in [*peers, boot]), return_exceptions=True)
        assert not [e for e in errors if e is not None], errors


async def test_members_see_each_other_and_observer_stays_invisible(swarm) -> None:
    boot, peers = swarm
    everyone = {boot.peer_id, *(p.peer_id for p in peers)}
    async with observer(peers[1].maddrs[0], swarm="t") as obs:
        await until_members(obs, boot, *peers)
        assert obs.peer_id not in everyone
        roles = {m.record.peer_id: m.record.role for m in (await obs.view()).members}
        assert roles[boot.peer_id] == "bootstrap"
        assert all(roles[p.peer_id] == "peer" for p in peers)


async def test_swarm_name_is_checked_or_adopted(swarm) -> None:
    boot, _ = swarm
    with pytest.raises(SwarmMismatchError, match="belongs to swarm 't', not 'other'"):
        await SwarmPeer.create(config(boot.maddrs[0], swarm="other"))
    adopted = await SwarmPeer.create(config(boot.maddrs[0], swarm=None))
    try:
        assert adopted.swarm == "t"
        await until_members(boot, boot, *swarm[1], adopted)
    finally:
        await adopted.aclose()


async def test_departure_is_seen_at_once_and_death_within_the_record_ttl(swarm) -> None:
    boot, peers = swarm
    await until_members(boot, boot, *peers)
    leaver, dier = peers
    await leaver.aclose()
    assert leaver.peer_id not in await members(boot)  # the "left" record replaced the live one

    # Simulate a crash: stop the heartbeat without any goodbye, keep the daemon.
    for task in dier._tasks:
        task.cancel()
    last_beat = time.monotonic()
    # Three beats, or a beat and two DHT timeouts if longer (a beat may wait out a dead replica).
    assert dier.membership is not None
    ttl = dier.membership.ttl_s
    assert ttl == max(3 * HEARTBEAT, HEARTBEAT + 2 * dier.config.dht.wait_timeout_s)
    await eventually(lambda: _absent(boot, dier.peer_id), timeout=ttl + 5)
    assert time.monotonic() - last_beat <= ttl + 1.5


async def _absent(peer: SwarmPeer, peer_id: str) -> bool:
    return peer_id not in await members(peer)


async def test_forged_record_for_another_peer_is_refused_everywhere(swarm) -> None:
    boot, (alice, mallory) = swarm
    await until_members(boot, boot, alice, mallory)
    genuine = alice.membership.record
    forged = {**genuine.to_wire(), "role": "bootstrap", "addrs": ["/ip4/6.6.6.6/tcp/6/p2p/" + alice.peer_id]}
    key = peers_key("t")
    # Mallory's node cannot sign Alice's subkey, so every replica must refuse the write.
    assert not await mallory.dht.node.store(key, forged, dht_time() + 60, subkey=alice.peer_id)
    view = {m.record.peer_id: m.record for m in (await boot.view()).members}
    assert view[alice.peer_id].addrs == genuine.addrs
    assert view[alice.peer_id].role == "peer"


async def test_malformed_record_in_local_storage_is_ignored_by_readers(swarm) -> None:
    boot, peers = swarm
    expected = await until_members(boot, boot, *peers)
    key_id = DHTID.generate(peers_key("t"))
    # Plant junk directly in the reader's storage, bypassing validation, as a buggy or hostile node might.
    storage = boot.dht.node.protocol.storage
    storage.store_subkey(key_id, "QmJunk", b"\xc1\xc1", dht_time() + 60)
    storage.store_subkey(key_id, "QmJunk2", msgpack.packb([1, b"x", b"y", b"z"]), dht_time() + 60)
    assert await members(boot) == expected


async def test_unreachable_initial_peer_fails_fast() -> None:
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = f"/ip4/127.0.0.1/tcp/{port}/p2p/QmdtW6xneAJGp1wtT5edc5K73XWU2uWXhNoEV1vFStwsWt"
    started = time.monotonic()
    with pytest.raises(PeerUnreachableError, match="initial peers"):
        await SwarmPeer.create(config(dead))
    assert time.monotonic() - started < 15


async def test_port_in_use_is_reported() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(AddressInUseError, match="address already in use"):
            await SwarmPeer.create(config(role="bootstrap", port=s.getsockname()[1]))


async def test_aclose_is_idempotent_and_reaps_the_daemon() -> None:
    from legion_swarm.sim import pid_alive

    peer = await SwarmPeer.create(config(role="bootstrap"))
    pid = peer.host.daemon_pid
    assert pid is not None and pid_alive(pid)
    await peer.aclose()
    await peer.aclose()
    assert not pid_alive(pid)


async def test_identity_file_gives_the_same_peer_id(tmp_path) -> None:
    key = str(tmp_path / "boot.key")
    first = await SwarmPeer.create(config(role="bootstrap", identity_path=key))
    first_id = first.peer_id
    await first.aclose()
    second = await SwarmPeer.create(config(role="bootstrap", identity_path=key))
    try:
        assert second.peer_id == first_id
        assert all(m.endswith("/p2p/" + first_id) for m in second.maddrs)
    finally:
        await second.aclose()


async def test_create_cancelled_while_the_daemon_starts_leaves_nothing() -> None:
    from tests.helpers.processes import p2pd_pids

    before = p2pd_pids()
    task = asyncio.create_task(SwarmPeer.create(config(role="bootstrap")))

    async def daemon_spawned() -> set[int]:
        return p2pd_pids() - before

    spawned = await eventually(daemon_spawned, timeout=10, interval=0.005)
    assert not task.done()  # the daemon exists but has not reported ready yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not (p2pd_pids() & spawned)  # reaped before create() returned, not by the GC later


async def test_a_dead_peer_in_the_initial_list_does_not_hold_up_the_join(swarm) -> None:
    boot, _ = swarm
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"/ip4/127.0.0.1/tcp/{s.getsockname()[1]}/p2p/QmdtW6xneAJGp1wtT5edc5K73XWU2uWXhNoEV1vFStwsWt"
    cfg = config(dead, boot.maddrs[0])
    started = time.monotonic()
    peer = await SwarmPeer.create(cfg)
    try:
        # Retries for the dead peer stop once the live one answered, long before the join deadline.
        assert time.monotonic() - started < cfg.join_timeout_s / 2
        assert peer.swarm == "t"
    finally:
        await peer.aclose()


@pytest.mark.parametrize("plane", ["direct", "libp2p"])
async def test_members_all_reduce_through_the_endpoints_they_published(swarm, plane: str) -> None:
    """The data plane end to end: a group built from nothing but the DHT's records (peer id, data endpoint,
    libp2p addresses) averages exactly, over the plane asked for."""
    import torch

    from legion_swarm.collectives import Collectives, reference_all_reduce
    from legion_swarm.config import CollectiveConfig
    from legion_swarm.groups import GroupInfo, GroupMember

    boot, peers = swarm
    everyone = [boot, *peers]
    await until_members(peers[0], *everyone)
    records = {m.record.peer_id: m.record for m in (await peers[0].view()).members}
    assert all(r.data is not None and r.data[0] == "127.0.0.1" for r in records.values())
    members = tuple(
        GroupMember(peer_id=pid, direct=records[pid].data, maddrs=records[pid].addrs) for pid in sorted(records)
    )
    group = GroupInfo(round_id=b"from-the-dht", members=members)
    by_id = {p.peer_id: p for p in everyone}
    inputs = [[torch.randn(3000, generator=torch.Generator().manual_seed(r))] for r in range(len(members))]
    work = [[t.clone() for t in ts] for ts in inputs]
    config_ = CollectiveConfig(plane=plane, chunk_elems=1024)
    results = await asyncio.gather(
        *(Collectives(by_id[m.peer_id].plane, config_).all_reduce(group, work[r]) for r, m in enumerate(members))
    )
    expected = reference_all_reduce(inputs, [1.0] * len(members))
    for r, result in enumerate(results):
        assert result.complete and set(result.planes.values()) == {plane}
        assert torch.equal(work[r][0], expected[0])


async def test_an_entry_whose_hello_hangs_is_joined_through_the_dht_after_the_fallback(swarm) -> None:
    """With the swarm named, hello is only the fast path: an entry peer that takes the hello stream and never
    answers costs HELLO_FALLBACK_S, then the join goes on through the DHT it does speak."""
    boot, peers = swarm
    host = await Host.create(config(boot.maddrs[0]).host)
    release = asyncio.Event()

    async def hang(stream_info, reader, writer) -> None:
        await release.wait()
        writer.close()

    try:
        dht = await SwarmDHT.create(host, DHTConfig(wait_timeout_s=2))
        try:
            await host.add_stream_handler(HELLO_PROTOCOL, hang)
            started = time.monotonic()
            peer = await SwarmPeer.create(config((await host.maddrs())[0]))
            try:
                assert HELLO_FALLBACK_S <= time.monotonic() - started < peer.config.join_timeout_s
                assert peer.swarm == "t" and peer.entry_hellos == []
                await until_members(peer, boot, *peers, peer)
            finally:
                await peer.aclose()
        finally:
            release.set()
            await dht.aclose()
    finally:
        await host.aclose()
