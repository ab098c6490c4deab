"""A real swarm of CLI processes: bootstrap + joiners, status, kill -9, restarts, signals."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import time

import pytest

from legion_swarm.config import DHTConfig
from legion_swarm.sim import LocalSwarm, pid_alive, start_process, stop_process, threads_per_peer
from tests.helpers.polling import eventually
from tests.helpers.processes import plain_dht_node, run_cli
from tests.helpers.swarm import FAST, observer

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(180)]
HEARTBEAT = 1.0
NO_TRAIN = ("--no-train",)  # these tests are about membership; training has its own tests


async def member_ids(maddr: str) -> set[str]:
    async with observer(maddr) as obs:
        return {m.record.peer_id for m in (await obs.view()).members}


async def test_status_lists_members_and_forgets_a_killed_one() -> None:
    async with await LocalSwarm.create(3, swarm="cli", heartbeat_s=HEARTBEAT, peer_args=NO_TRAIN) as swarm:
        boot = swarm.bootstrap
        joiners = {p.peer_id for p in swarm.peers}
        expected = joiners | {boot.peer_id}

        async def all_listed() -> dict | None:
            result = await run_cli("status", "--peer", boot.maddr, "--json", timeout=30)
            assert result.code == 0, result.stderr
            report = json.loads(result.stdout)
            return report if {p["peer_id"] for p in report["peers"]} == expected else None

        report = await eventually(all_listed, timeout=30, interval=0.5)
        assert report["swarm"] == "cli"
        roles = {p["peer_id"]: p["role"] for p in report["peers"]}
        assert {pid for pid, role in roles.items() if role == "peer"} == joiners
        assert roles[boot.peer_id] == "bootstrap"
        for peer in report["peers"]:
            assert peer["addrs"] and all(a.endswith("/p2p/" + peer["peer_id"]) for a in peer["addrs"])
            assert 0 <= peer["last_seen_s"] < 3 * HEARTBEAT + 1
            host, port = peer["data"]  # every member serves a data plane, distinct ports on one machine
            assert isinstance(host, str) and 0 < port <= 65535
        assert len({tuple(p["data"]) for p in report["peers"]}) == 4
        assert report["summary"]["peers"] == 4

        victim = swarm.peers[0]
        daemon = victim.daemon_pids[0]
        killed_at = time.monotonic()
        await swarm.kill(victim, signal.SIGKILL)
        # PR_SET_PDEATHSIG: its p2pd dies with it, before anyone reaps anything.
        await eventually(lambda: _dead(daemon), timeout=2, interval=0.02)

        async def forgotten() -> bool:
            return victim.peer_id not in await member_ids(swarm.peers[-1].maddr)

        await eventually(forgotten, timeout=3 * HEARTBEAT + 10, interval=0.25)
        # The record expires 3 heartbeats (at least a beat and two DHT timeouts) after its last refresh; allow
        # for reading it through a new node.
        assert time.monotonic() - killed_at <= max(3 * HEARTBEAT, HEARTBEAT + 2 * DHTConfig().wait_timeout_s) + 5
        assert await member_ids(boot.maddr) == expected - {victim.peer_id}


async def _dead(pid: int) -> bool:
    return not pid_alive(pid)


async def test_a_joiner_can_be_the_entry_point_of_another() -> None:
    async with await LocalSwarm.create(1, swarm="chain", heartbeat_s=HEARTBEAT, peer_args=NO_TRAIN) as swarm:
        first = swarm.peers[0]
        second = await swarm.add_peer(entry=first.maddr)
        third = await swarm.add_peer(entry=second.maddr)
        want = {swarm.bootstrap.peer_id, first.peer_id, second.peer_id, third.peer_id}

        async def complete() -> bool:
            return await member_ids(third.maddr) == want

        await eventually(complete, timeout=20, interval=0.5)


async def test_bootstrap_restarted_with_its_identity_keeps_its_peer_id(tmp_path) -> None:
    key = str(tmp_path / "boot.key")
    async with await LocalSwarm.create(0, swarm="restart", bootstrap_identity=key, peer_args=NO_TRAIN) as swarm:
        first = swarm.bootstrap
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
        assert await stop_process(first) == 0
        second = await swarm.start_bootstrap(identity=key)
        swarm.retired.append(first)
        assert second.peer_id == first.peer_id
        assert second.maddr != first.maddr  # port 0: a new port, same identity
    printed = await run_cli("identity", key)
    assert printed.code == 0 and printed.stdout.strip() == first.peer_id  # what scripts publish


async def test_bootstrap_nodes_link_with_peer_into_one_swarm() -> None:
    async with await LocalSwarm.create(0, swarm="twin", heartbeat_s=HEARTBEAT, peer_args=NO_TRAIN) as swarm:
        first = swarm.bootstrap
        second = await start_process(
            "bootstrap2",
            ["bootstrap", "--swarm", "twin", "--host", "127.0.0.1", "--port", "0", "--peer", first.maddr],
        )
        swarm.retired.append(second)  # reaped by the swarm
        joiner = await swarm.add_peer(entry=second.maddr)
        want = {first.peer_id, second.peer_id, joiner.peer_id}

        async def one_swarm() -> bool:
            return await member_ids(first.maddr) == want

        await eventually(one_swarm, timeout=20, interval=0.5)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signals_shut_down_cleanly_within_five_seconds(sig: signal.Signals) -> None:
    async with await LocalSwarm.create(1, swarm="sig", heartbeat_s=HEARTBEAT, peer_args=NO_TRAIN) as swarm:
        for proc in (swarm.peers[0], swarm.bootstrap):
            daemons = list(proc.daemon_pids)
            assert daemons and all(pid_alive(d) for d in daemons)
            started = time.monotonic()
            proc.signal(sig)
            assert await proc.wait(5) == 0, proc.tail()
            assert time.monotonic() - started < 5
            assert not any(pid_alive(d) for d in daemons)
            assert "Traceback" not in proc.tail(200)


async def test_status_table_and_simulate_command() -> None:
    result = await run_cli("simulate", "--peers", "2", "--swarm", "sim", "--no-train", timeout=120)
    assert result.code == 0, result.stdout + result.stderr
    assert "2/2 peers joined" in result.stdout
    assert "3 peers alive" in result.stdout
    assert "0 left running" in result.stdout


async def test_status_table_renders_members() -> None:
    boot = await start_process("bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--swarm", "tbl"])
    try:
        result = await run_cli("status", "--peer", boot.maddr, timeout=30)
        assert result.code == 0, result.stderr
        assert boot.peer_id[-8:] in result.stdout
        assert "bootstrap" in result.stdout
        assert "1 peers alive" in result.stdout
    finally:
        await stop_process(boot)


async def test_a_plain_hivemind_dht_node_is_enough_as_entry_peer() -> None:
    """A stock ``hivemind-dht`` node, which speaks the DHT but not our hello, is the only address anyone is given:
    the bootstrap links up through it and publishes the signed config, two joiners find the swarm's members and
    config through it alone and train together, and ``status`` through it lists them."""
    async with plain_dht_node() as entry:
        swarm = LocalSwarm(
            "plain", HEARTBEAT, (), bootstrap_args=("--peer", entry, "--mode", "sync", *FAST),
            peer_args=("--rounds", "400", *threads_per_peer(2)),
        )  # fmt: skip
        async with swarm:
            await swarm.start_bootstrap()
            joiners = await asyncio.gather(swarm.add_peer(entry=entry), swarm.add_peer(entry=entry))
            want = {p.peer_id for p in joiners}

            async def trained_together() -> dict | None:
                result = await run_cli("status", "--peer", entry, "--swarm", "plain", "--json", timeout=30)
                assert result.code == 0, result.stderr
                peers = {p["peer_id"]: p for p in json.loads(result.stdout)["peers"]}
                ok = want <= set(peers) and all(
                    (peers[pid]["round"] or 0) >= 2 and (peers[pid]["bytes_received"] or 0) > 0 for pid in want
                )  # fmt: skip
                return peers if ok else None

            peers = await eventually(trained_together, timeout=150, interval=1.0)
            assert set(peers) == want | {swarm.bootstrap.peer_id}
            assert peers[swarm.bootstrap.peer_id]["role"] == "bootstrap"
            for joiner in joiners:
                assert joiner.running, joiner.tail()
                assert "through the DHT alone" in "\n".join(joiner.output)  # no hello: the fallback was taken
