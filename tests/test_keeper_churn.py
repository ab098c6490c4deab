"""The swarm config keeper and the churn driver as pure logic: a stand-in DHT and a stand-in swarm record what
they are asked to do; no daemon or process starts (the integration tests run both for real)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from legion_swarm.config import TrainConfig
from legion_swarm.errors import NetworkError, SwarmConfigError
from legion_swarm.sim import Churn
from legion_swarm.train.swarm_config import SignedSpec, SwarmConfigKeeper, SwarmSpec
from legion_swarm.transport.identity import Identity


class StubDHT:
    def __init__(self, copies: dict[str, Any] | None = None) -> None:
        self.host = SimpleNamespace(peer_id="QmStub")
        self.stored: list[float] = []
        self.copies = copies or {}

    async def store_own(self, key: Any, value: bytes, expiration: float) -> bool:
        self.stored.append(expiration)
        return True

    async def read_all(self, key: Any, schema: Any) -> dict[str, Any]:
        return self.copies


class StubPeer:
    def __init__(self, dht: StubDHT, named: tuple[bytes | None, ...] = ()) -> None:
        self.dht, self.swarm, self.tag = dht, "t", "stub"
        self.entry_hellos = [SimpleNamespace(config=d) for d in named]
        self.hello: dict[str, object] = {}

    def set_hello_field(self, name: str, value: object) -> None:
        self.hello[name] = value


def signed(mode: str = "diloco") -> SignedSpec:
    return SignedSpec.sign(SwarmSpec(train=TrainConfig(mode=mode)), Identity.generate())


async def test_the_keeper_names_the_config_in_the_hello_republishes_it_and_awaits_its_task_on_close() -> None:
    dht, spec = StubDHT(), signed()
    peer = StubPeer(dht)
    async with SwarmConfigKeeper(peer, every_s=0.01) as keeper:  # type: ignore[arg-type]
        keeper.hold(spec)
        assert peer.hello == {"config": spec.digest} and keeper.signed is spec
        with pytest.raises(RuntimeError, match="already holds"):
            keeper.hold(spec)
        await asyncio.sleep(0.1)
        task = keeper._publisher
        assert task is not None
    assert task.done() and task.cancelled()
    assert len(dht.stored) >= 3  # republished every every_s
    count = len(dht.stored)
    await asyncio.sleep(0.05)
    assert len(dht.stored) == count  # nothing runs after close


async def test_the_keeper_refuses_entry_peers_that_name_different_configs_and_times_out_clearly() -> None:
    a, b = signed("diloco"), signed("sync")
    with pytest.raises(SwarmConfigError, match="different training configs"):
        await SwarmConfigKeeper(StubPeer(StubDHT(), named=(a.digest, b.digest))).fetch(timeout=0.1)  # type: ignore[arg-type]
    with pytest.raises(SwarmConfigError, match="publishes no training config"):
        await SwarmConfigKeeper(StubPeer(StubDHT(), named=(a.digest,))).fetch(timeout=0.01)  # type: ignore[arg-type]


async def test_the_keeper_fetches_the_named_copy() -> None:
    a, b = signed("diloco"), signed("sync")
    copies = {"p1": SimpleNamespace(record=a.record("t", "p1")), "p2": SimpleNamespace(record=b.record("t", "p2"))}
    got = await SwarmConfigKeeper(StubPeer(StubDHT(copies), named=(b.digest,))).fetch(timeout=1)  # type: ignore[arg-type]
    assert got.digest == b.digest


@dataclass
class StubProcess:
    name: str
    argv: list[str]
    running: bool = True

    @property
    def peer_id(self) -> str:
        return "id-" + self.argv[-1]


@dataclass
class StubSwarm:
    peers: list[StubProcess]
    fail_restarts: bool = False
    kills: list[str] = field(default_factory=list)
    started: list[tuple[str, tuple[str, ...] | None]] = field(default_factory=list)

    async def kill(self, peer: StubProcess, sig: int) -> None:
        self.kills.append(peer.name)
        peer.running = False
        self.peers.remove(peer)

    def entries(self, rng: random.Random) -> list[str]:
        entries = [p.name for p in self.peers]
        rng.shuffle(entries)
        return entries

    async def add_peer(self, *, entry: Any, identity: str | None, args: tuple[str, ...] | None) -> StubProcess:
        if self.fail_restarts:
            raise NetworkError("no listen address")
        assert identity is not None
        self.started.append((identity, args))
        peer = StubProcess(f"re-{identity}", ["join", "--identity", identity])
        self.peers.append(peer)
        return peer


def stub_swarm(n: int) -> StubSwarm:
    return StubSwarm([StubProcess(f"peer{i}", ["join", "--identity", f"k{i}"]) for i in range(n)])


def victims(seed: int) -> list[str]:
    async def go() -> list[str]:
        swarm = stub_swarm(5)

        async def ready() -> list[Any]:
            return sorted(swarm.peers, key=lambda p: p.argv[-1])

        churn = Churn(swarm, every_s=1.0, ready=ready, rng=random.Random(seed), restart_after_s=0)  # type: ignore[arg-type]
        for _ in range(6):
            await churn.kill_one()
            await churn.settle()
        return [p.argv[-1] for p in churn.killed]

    return asyncio.run(go())


def test_a_seed_picks_the_same_victims_and_a_restart_keeps_the_victims_key() -> None:
    assert victims(7) == victims(7)
    assert victims(7) != victims(8)


async def test_restarts_use_the_key_and_flags_named_at_the_kill_and_record_their_start() -> None:
    swarm = stub_swarm(3)
    spawned: list[tuple[str, float]] = []

    async def ready() -> list[Any]:
        return list(swarm.peers)

    churn = Churn(
        swarm, every_s=1.0, ready=ready, rng=random.Random(1), restart_after_s=0,  # type: ignore[arg-type]
        restart_args=lambda v: ("--rounds", v.name), on_spawn=lambda v, t: spawned.append((v.name, t)),
    )  # fmt: skip
    victim = await churn.kill_one()
    await churn.settle()
    assert victim is not None and swarm.kills == [victim.name]
    assert swarm.started == [(victim.argv[-1], ("--rounds", victim.name))]
    (restart,) = churn.restarts
    assert restart.victim is victim and restart.peer is swarm.peers[-1] and restart.startup_s is not None
    assert spawned == [(victim.name, restart.spawned_at)]


async def test_no_victim_when_none_is_ready_and_a_failed_restart_is_recorded() -> None:
    swarm = stub_swarm(2)
    swarm.fail_restarts = True

    async def nobody() -> list[Any]:
        return []

    assert await Churn(swarm, every_s=1.0, ready=nobody).kill_one() is None  # type: ignore[arg-type]
    assert swarm.kills == []

    async def anyone() -> list[Any]:
        return list(swarm.peers)

    churn = Churn(swarm, every_s=1.0, ready=anyone, restart_after_s=0)  # type: ignore[arg-type]
    await churn.kill_one()
    await churn.settle()
    assert [r.peer for r in churn.restarts] == [None]


async def test_ending_stops_the_kills_and_the_restarts_not_yet_started_and_close_cancels_the_rest() -> None:
    swarm = stub_swarm(3)
    ending = False

    async def anyone() -> list[Any]:
        return list(swarm.peers)

    churn = Churn(swarm, every_s=0.01, ready=anyone, restart_after_s=0.05, ending=lambda: ending)  # type: ignore[arg-type]
    await churn.kill_one()
    ending = True
    await churn.run()  # returns at once: the run is ending
    await churn.settle()
    assert len(swarm.kills) == 1 and churn.restarts == [] and swarm.started == []

    ending = False
    slow = Churn(swarm, every_s=0.01, ready=anyone, restart_after_s=30)  # type: ignore[arg-type]
    await slow.kill_one()
    (task,) = slow.pending
    await slow.aclose()
    assert task.cancelled() and not slow.pending


async def test_run_stops_at_until_and_when_stop_is_set() -> None:
    swarm = stub_swarm(4)

    async def anyone() -> list[Any]:
        return list(swarm.peers)

    churn = Churn(swarm, every_s=10.0, ready=anyone)  # type: ignore[arg-type]
    await asyncio.wait_for(churn.run(until=time.perf_counter() - 1), timeout=1)  # `until` already passed: no kill
    assert swarm.kills == []
    stop = asyncio.Event()
    running = asyncio.create_task(churn.run(stop))
    await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(running, timeout=1)
    assert swarm.kills == []
    with pytest.raises(ValueError):
        Churn(swarm, every_s=0, ready=anyone)  # type: ignore[arg-type]
