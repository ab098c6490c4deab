"""Churn on one machine: a training swarm whose peers are killed (SIGKILL) and restarted with the same
identity, watched through the DHT, with what a churn benchmark wants to know.

::

    report = await run_chaos(ChaosConfig(peers=6, duration_s=150, kill_every_s=20, restart_after_s=5))

A seeded schedule kills a random peer every ``kill_every_s`` seconds (±25 %) and restarts it
``restart_after_s`` later with its key file, so it comes back as the same peer id. An observer in this
process reads the peers' records every ``poll_s`` and keeps, per process incarnation (peer id + start time),
the latest counters: rounds committed and failed, round, loss, state id and parameter sample. The report has

- ``efficiency``: rounds committed / round attempts, over every incarnation (a round a peer was killed in is
  lost with the peer's last heartbeat, so this slightly flatters; the restarts' lost local work does not);
- ``rejoin_s``: per restart, seconds from spawning the new process to the first record that shows it committed
  a round: Python and torch start-up, joining, downloading the state and one round, plus up to a heartbeat and
  a poll before the observer sees it; ``startup_s`` is the start-up part (until the process listens), which
  on a machine the other peers keep busy is mostly CPU time spent importing torch; ``rejoin_after_start_s``
  the rest;
- ``spread``: the relative parameter spread of the peers that reported the latest common round;
- ``groups_diverged``: (round, group) pairs whose members reported different state ids after the round (a state
  id is a hash of the parameters, so 0 means every group's survivors were bit-identical in every round seen);
- ``first_loss`` / ``last_loss``: the swarm's mean loss over the first and last reported rounds;
- ``crashed``: processes that exited on their own (a round past its deadline raises and ends the process,
  so this is also the check that no round hung);
- ``orphans``: p2pd daemons still alive after the swarm was shut down.
"""

from __future__ import annotations

import asyncio
import logging
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from legion_swarm.config import DHTConfig, PeerConfig
from legion_swarm.dht.records import PeerRecord
from legion_swarm.peer import SwarmPeer
from legion_swarm.sim import Churn, LocalSwarm, PeerProcess, pid_alive, threads_per_peer
from legion_swarm.train.metrics import swarm_spread

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ChaosConfig:
    peers: int = 6
    duration_s: float = 150.0
    """How long the schedule runs (the swarm trains before and after it briefly)."""
    kill_every_s: float = 20.0
    restart_after_s: float = 5.0
    seed: int = 0
    heartbeat_s: float = 1.0
    poll_s: float = 0.5
    bootstrap_args: tuple[str, ...] = ("--mode", "diloco", "--inner-steps", "10", "--compress", "int8")
    peer_args: tuple[str, ...] = ()


@dataclass
class _Incarnation:
    peer_id: str
    started_at: float
    restarted_at: float | None = None
    """Wall-clock time (time.time) we started its process, if it is a restart."""
    committed: int = 0
    failed: int = 0
    first_commit_at: float | None = None


@dataclass
class ChaosReport:
    kills: int = 0
    restarts: int = 0
    efficiency: float | None = None
    committed: int = 0
    attempted: int = 0
    rejoin_s: list[float] = field(default_factory=list)
    startup_s: list[float] = field(default_factory=list)
    """Per restart, seconds from spawning the process to its listening on the network (Python, imports, p2pd,
    joining the DHT): the part of ``rejoin_s`` that is process start-up on this machine, not the swarm."""
    rejoin_after_start_s: list[float] = field(default_factory=list)
    """Per restarted peer, ``rejoin_s`` minus its start-up: from listening to contributing (config, model,
    state download, waiting for and taking part in the next round, a heartbeat and a poll)."""
    never_rejoined: int = 0
    spread: float | None = None
    spread_round: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    rounds: int = 0
    groups_seen: int = 0
    """(round, group) pairs the observer saw members of."""
    groups_diverged: int = 0
    """Of those, groups whose members reported different state ids after the round (0: bit-identical)."""
    crashed: list[str] = field(default_factory=list)
    orphans: int = 0
    seconds: float = 0.0

    @property
    def median_rejoin_s(self) -> float | None:
        return statistics.median(self.rejoin_s) if self.rejoin_s else None

    def to_json(self) -> dict[str, Any]:
        return {
            "kills": self.kills, "restarts": self.restarts, "efficiency": self.efficiency,
            "rounds_committed": self.committed, "rounds_attempted": self.attempted, "rejoin_s": self.rejoin_s,
            "median_rejoin_s": self.median_rejoin_s, "startup_s": self.startup_s,
            "rejoin_after_start_s": self.rejoin_after_start_s,
            "never_rejoined": self.never_rejoined, "spread": self.spread,
            "spread_round": self.spread_round, "first_loss": self.first_loss, "last_loss": self.last_loss,
            "rounds": self.rounds, "groups_seen": self.groups_seen, "groups_diverged": self.groups_diverged,
            "crashed": self.crashed, "orphans": self.orphans, "seconds": self.seconds,
        }  # fmt: skip


class _Watcher:
    """Reads the peers' records and keeps per-incarnation counters and per-round losses."""

    def __init__(self, observer: SwarmPeer) -> None:
        self.observer = observer
        self.incarnations: dict[tuple[str, float], _Incarnation] = {}
        self.losses: dict[int, list[float]] = {}
        self.records: list[PeerRecord] = []
        self.restarts: dict[str, float] = {}  # peer id -> time.time() of its latest restart
        self.states: dict[tuple[int, str], set[str]] = {}  # (round, group label) -> state ids its members reported

    def contributing(self, peer_id: str) -> bool:
        """Whether the latest incarnation of ``peer_id`` has committed a round (and is not restarting)."""
        if peer_id in self.restarts:
            return False
        latest = max((i for i in self.incarnations.values() if i.peer_id == peer_id), key=lambda i: i.started_at,
                     default=None)  # fmt: skip
        return latest is not None and latest.committed > 0

    async def poll(self) -> None:
        view = await self.observer.view()
        self.records = [m.record for m in view.members if isinstance(m.record, PeerRecord) and m.record.mode]
        now = time.time()
        for r in self.records:
            key = (r.peer_id, r.started_at)
            inc = self.incarnations.get(key)
            if inc is None:
                inc = self.incarnations[key] = _Incarnation(r.peer_id, r.started_at, self.restarts.pop(r.peer_id, None))
            inc.committed = max(inc.committed, r.committed or 0)
            inc.failed = max(inc.failed, r.failed or 0)
            if inc.committed and inc.first_commit_at is None:
                inc.first_commit_at = now
            if r.round and r.group and r.state_id:
                self.states.setdefault((r.round, r.group), set()).add(r.state_id)
            if r.round and r.loss is not None:
                by_peer = self.losses.setdefault(r.round, [])
                if len(by_peer) < 64:
                    by_peer.append(r.loss)


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    """Run a churn experiment on this machine; every process is reaped before it returns."""
    report = ChaosReport()
    started = time.perf_counter()
    swarm = await LocalSwarm.create(
        config.peers, swarm=f"chaos{config.seed}", heartbeat_s=config.heartbeat_s,
        bootstrap_args=config.bootstrap_args, peer_args=(*threads_per_peer(config.peers), *config.peer_args),
        identities=True,
    )  # fmt: skip
    observer: SwarmPeer | None = None
    churn: Churn | None = None
    try:
        keys = [LocalSwarm.identity_of(p) for p in swarm.peers]
        assert swarm.bootstrap is not None
        observer = await SwarmPeer.create(
            PeerConfig.observer(swarm.bootstrap.maddr, swarm.swarm, dht=DHTConfig(wait_timeout_s=2))
        )
        watcher = _Watcher(observer)
        await _watch_until(watcher, lambda: sum(i.committed for i in watcher.incarnations.values()) >= config.peers,
                           timeout=120, poll_s=config.poll_s)  # fmt: skip

        async def ready() -> list[PeerProcess]:
            # Victims are peers that are contributing: a restarted one that has not committed yet is spared.
            # In key order, so that a seed picks the same victims whatever order the processes started in.
            alive = [p for p in swarm.peers if p.running and watcher.contributing(p.peer_id)]
            return sorted(alive, key=lambda p: keys.index(LocalSwarm.identity_of(p)))

        def on_spawn(victim: PeerProcess, spawned_at: float) -> None:
            watcher.restarts[victim.peer_id] = spawned_at  # rejoin time counts the process's start-up

        churn = Churn(
            swarm, every_s=config.kill_every_s, restart_after_s=config.restart_after_s, rng=random.Random(config.seed),
            ready=ready, on_spawn=on_spawn,
        )  # fmt: skip
        killing = asyncio.create_task(churn.run(until=time.perf_counter() + config.duration_s))
        while not killing.done() or churn.pending:
            await watcher.poll()
            await asyncio.sleep(config.poll_s)
        await killing
        # Let the last restarted peers come back before judging.
        await _watch_until(watcher, lambda: _all_rejoined(watcher), timeout=60, poll_s=config.poll_s)
        report.kills = len(churn.killed)
        # spawn time -> seconds until the process listened, for the restarts that started (a failed one has none)
        startups = {r.spawned_at: r.startup_s for r in churn.restarts if r.startup_s is not None}
        report.restarts = len(startups)
        report.startup_s = [round(s, 2) for s in startups.values()]
        _fill(report, watcher, startups)
        killed = {p.pid for p in churn.killed}
        for p in swarm.processes():
            if not p.running and p.pid not in killed:
                report.crashed.append(p.name)
                logger.error("chaos: %s exited on its own (code %s):\n%s", p.name, p.proc.returncode, p.tail(40))
    finally:
        if churn is not None:
            await churn.aclose()
        if observer is not None:
            await observer.aclose()
        await swarm.aclose()
    report.orphans = sum(pid_alive(pid) for pid in swarm.daemon_pids())
    report.seconds = time.perf_counter() - started
    return report


def _all_rejoined(watcher: _Watcher) -> bool:
    incs = watcher.incarnations.values()
    return not watcher.restarts and all(i.first_commit_at is not None for i in incs if i.restarted_at is not None)


async def _watch_until(watcher: _Watcher, done: Any, *, timeout: float, poll_s: float) -> None:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        await watcher.poll()
        if done():
            return
        await asyncio.sleep(poll_s)
    logger.warning("chaos: condition not met within %.0f s", timeout)


def _fill(report: ChaosReport, watcher: _Watcher, startups: dict[float, float]) -> None:
    incs = list(watcher.incarnations.values())
    report.committed = sum(i.committed for i in incs)
    report.attempted = sum(i.committed + i.failed for i in incs)
    report.efficiency = report.committed / report.attempted if report.attempted else None
    report.never_rejoined = len(watcher.restarts)  # restarted processes that never published a record
    for i in incs:
        if i.restarted_at is None:
            continue
        if i.first_commit_at is None:
            report.never_rejoined += 1
        else:
            report.rejoin_s.append(round(i.first_commit_at - i.restarted_at, 2))
            report.rejoin_after_start_s.append(round(i.first_commit_at - i.restarted_at - startups[i.restarted_at], 2))
    report.groups_seen = len(watcher.states)
    report.groups_diverged = sum(len(ids) > 1 for ids in watcher.states.values())
    spread = swarm_spread(watcher.records)
    if spread is not None:
        report.spread_round, report.spread, _ = spread
    rounds = sorted(r for r, losses in watcher.losses.items() if losses)
    if rounds:
        report.rounds = rounds[-1]
        report.first_loss = statistics.fmean(watcher.losses[rounds[0]])
        report.last_loss = statistics.fmean(watcher.losses[rounds[-1]])
