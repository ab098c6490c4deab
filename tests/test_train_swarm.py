"""Training across real peer processes: the simulate command, a peer joining a running swarm, work stealing
after a kill -9. Every process is reaped (and the autouse fixture checks that no p2pd is left behind)."""

from __future__ import annotations

import asyncio
import signal

import pytest

from legion_swarm.dht.records import LeaseRecord, leases_key
from legion_swarm.sim import LocalSwarm, PeerProcess
from legion_swarm.train.state_sync import fetch_meta
from tests.helpers.polling import eventually
from tests.helpers.processes import run_cli
from tests.helpers.swarm import FAST, observer

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(300)]


async def test_simulate_trains_and_the_loss_falls() -> None:
    result = await run_cli(
        "simulate", "--peers", "2", "--swarm", "simtrain", "--mode", "diloco", "--inner-steps", "5", "--steps", "6",
        "--compress", "int8", *FAST, timeout=240,
    )  # fmt: skip
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "training summary" in result.stdout and "0 left running" in result.stdout
    assert "diloco" in result.stdout  # the status table shows each peer's mode


async def test_a_peer_joining_a_running_swarm_syncs_and_holds_identical_parameters(tmp_path) -> None:
    spec = ("--mode", "sync", *FAST)
    async with await LocalSwarm.create(
        3, swarm="midjoin", heartbeat_s=1.0, bootstrap_args=spec, peer_args=("--rounds", "400")
    ) as swarm:
        assert swarm.bootstrap is not None
        async with observer(swarm.bootstrap.maddr, swarm="midjoin") as obs:

            async def rounds_of(peers: list[PeerProcess]) -> list[int] | None:
                try:
                    metas = await asyncio.gather(*(fetch_meta(obs.host, p.peer_id, timeout=5) for p in peers))
                except Exception:
                    return None
                return [m.round for m in metas]

            async def trained_a_while() -> bool:
                rounds = await rounds_of(swarm.peers)
                return rounds is not None and min(rounds) >= 5

            await eventually(trained_a_while, timeout=120, interval=1.0)
            joiner = await swarm.add_peer()
            first = None

            async def joiner_in_step() -> bool:
                nonlocal first
                metas = await asyncio.gather(
                    *(fetch_meta(obs.host, p.peer_id, timeout=5) for p in swarm.peers), return_exceptions=True
                )
                if any(isinstance(m, BaseException) for m in metas):
                    return False
                if first is None and metas[-1].round > 0:
                    first = metas[-1].round
                # Compare the actual parameters' SHA-256 once everyone reports the same round.
                return len({(m.round, m.sha256) for m in metas}) == 1 and metas[-1].round > (first or 10**9)

            await eventually(joiner_in_step, timeout=120, interval=0.3)
            assert "downloaded round" in joiner.tail(400) or "now at round" in joiner.tail(400)


async def test_a_killed_peers_data_shard_is_taken_over(tmp_path) -> None:
    config = tmp_path / "swarm.toml"
    config.write_text('[data]\nsource = "dummy"\nnum_shards = 3\nbatch_size = 4\n[train]\nmode = "sync"\n')
    async with await LocalSwarm.create(
        3, swarm="steal", heartbeat_s=1.0, bootstrap_args=("--config", str(config)), peer_args=("--rounds", "400")
    ) as swarm:
        assert swarm.bootstrap is not None
        async with observer(swarm.bootstrap.maddr, swarm="steal") as obs:

            async def holders() -> dict[int, tuple[str, int]]:
                found = await obs.dht.read_all(leases_key("steal"), LeaseRecord)
                return {lease.shard: (owner, lease.position) for owner, f in found.items() for lease in f.record.leases}

            async def all_shards_held() -> dict[int, tuple[str, int]] | None:
                held = await holders()
                return held if len(held) == 3 and all(pos > 2 for _, pos in held.values()) else None

            held = await eventually(all_shards_held, timeout=120, interval=1.0)
            victim = swarm.peers[0]
            (shard,) = [s for s, (owner, _) in held.items() if owner == victim.peer_id]
            await swarm.kill(victim, signal.SIGKILL)
            thief = await swarm.add_peer()  # every other shard is held: only the victim's can come free

            async def taken_over() -> tuple[str, int] | None:
                now = await holders()
                got = now.get(shard)
                return got if got is not None and got[0] == thief.peer_id and got[1] > held[shard][1] else None

            owner, position = await eventually(taken_over, timeout=90, interval=1.0)
            assert owner == thief.peer_id and position > held[shard][1]
