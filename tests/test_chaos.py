"""Churn with real peer processes: a seeded schedule of SIGKILLs and restarts with the same identity (the swarm
keeps committing rounds, every restarted peer contributes again within 15 s of being up, the loss falls, nothing
is left running); ``simulate --dropout``; and the bootstrap node's death, which stops neither training nor new
joins through other members. (The benchmark with the goals' numbers is ``benchmarks/bench_churn.py``.)"""

from __future__ import annotations

import re
import signal

import pytest

from legion_swarm.chaos import ChaosConfig, run_chaos
from legion_swarm.sim import LocalSwarm
from tests.helpers.polling import eventually
from tests.helpers.processes import run_cli
from tests.helpers.swarm import FAST, observer

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(420)]


async def test_a_swarm_under_churn_keeps_training_and_restarted_peers_rejoin() -> None:
    config = ChaosConfig(peers=6, duration_s=120, kill_every_s=20, restart_after_s=5, seed=3)
    report = await run_chaos(config)
    print("chaos report:", report.to_json())  # the efficiency, for the log
    assert report.kills >= 4 and report.restarts == report.kills
    assert not report.crashed, f"processes exited on their own (a round past its deadline raises): {report.crashed}"
    assert report.never_rejoined == 0 and len(report.rejoin_s) == report.restarts
    # From the restarted process listening to its first committed round. Starting Python and torch is not
    # counted: it takes 4-14 s of CPU shared with six trainers here, and ~3 s on a machine of its own.
    assert max(report.rejoin_after_start_s) <= 15.0, (report.rejoin_after_start_s, report.rejoin_s)
    assert report.efficiency is not None and report.efficiency > 0.5
    assert report.first_loss is not None and report.last_loss is not None and report.last_loss < report.first_loss
    assert report.spread is not None and report.spread <= 1e-3
    # The survivors of every round the observer saw hold bit-identical parameters within their group.
    assert report.groups_seen >= 5 and report.groups_diverged == 0
    assert report.orphans == 0


@pytest.mark.timeout(300)
async def test_simulate_with_dropout_kills_and_restarts_peers_and_finishes_cleanly() -> None:
    result = await run_cli(
        "simulate", "--peers", "3", "--swarm", "simchurn", "--mode", "diloco", "--inner-steps", "5", "--steps", "16",
        "--dropout", "8", *FAST, timeout=280,
    )  # fmt: skip
    assert result.code == 0, result.stdout[-3000:] + result.stderr[-3000:]
    churn = re.search(r"churn: (\d+) peers killed with SIGKILL, (\d+) restarted", result.stdout)
    assert churn is not None and int(churn.group(1)) >= 1 and int(churn.group(2)) >= 1, result.stdout[-3000:]
    assert "training summary" in result.stdout and "0 left running" in result.stdout


@pytest.mark.timeout(360)
async def test_training_goes_on_without_the_bootstrap_and_newcomers_join_through_members() -> None:
    spec = ("--mode", "diloco", "--inner-steps", "4", *FAST)
    async with await LocalSwarm.create(3, swarm="noboot", heartbeat_s=1.0, bootstrap_args=spec) as swarm:
        assert swarm.bootstrap is not None
        trainers = [p.peer_id for p in swarm.peers]
        async with observer(swarm.peers[0].maddr, swarm="noboot") as obs:

            async def rounds() -> dict[str, int]:
                members = (await obs.view()).members
                return {m.record.peer_id: m.record.round or 0 for m in members if m.record.committed}

            async def all_past(peer_ids: list[str], round_: int) -> bool:
                seen = await rounds()
                return all(seen.get(p, 0) >= round_ for p in peer_ids)

            await eventually(lambda: all_past(trainers, 2), timeout=120, interval=0.5)
            await swarm.kill(swarm.bootstrap, signal.SIGKILL)
            at_death = max((await rounds()).values())
            # Training goes on among the members...
            await eventually(lambda: all_past(trainers, at_death + 3), timeout=120, interval=0.5)
            # ...and a newcomer joins through one of them, fetches the config from the members, and contributes.
            newcomer = await swarm.add_peer(entry=swarm.peers[1].maddr)
            await eventually(lambda: all_past([newcomer.peer_id, *trainers], at_death + 5), timeout=120, interval=0.5)
        assert all(p.running for p in swarm.peers)
