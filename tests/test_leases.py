"""Data-shard leases: the pure arbitration and choice, then real in-process peers acquiring, dying, releasing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import time

import pytest

from legion_swarm.config import DHTConfig, HostConfig, MembershipConfig, PeerConfig
from legion_swarm.dht.node import Found, dht_time
from legion_swarm.dht.records import Lease, LeaseRecord, leases_key
from legion_swarm.errors import ConfigError
from legion_swarm.peer import SwarmPeer
from legion_swarm.train.leases import (
    Holder,
    LeaseConfig,
    ShardLeases,
    arbitrate,
    choose_shards,
    rendezvous_score,
)
from tests.helpers.polling import eventually

pytestmark = pytest.mark.timeout(60)

RENEW, TTL, SETTLE = 0.5, 4.6, 0.3
WAIT = 1.0  # DHT request timeout: twice this must stay below the leases' safety margin, (TTL - RENEW) / 2


# ---------------------------------------------------------------------------------------------- pure core


def found(peer: str, *claims: tuple[int, float], expires_at: float = 100.0, owner: str | None = None) -> Found:
    leases = tuple(Lease(shard=s, since=since, position=int(since)) for s, since in claims)
    return Found(LeaseRecord(swarm="t", peer_id=owner or peer, sent_at=0.0, leases=leases), expires_at)


def holders_of(records: dict[str, Found], now: float = 50.0) -> dict[int, str]:
    return {shard: h.peer_id for shard, h in arbitrate(records, now).items()}


def test_earliest_claim_wins_and_ties_go_to_the_smaller_peer_id() -> None:
    records = {
        "QmB": found("QmB", (0, 10.0), (1, 5.0), (2, 7.0)),
        "QmA": found("QmA", (0, 11.0), (1, 5.0)),
        "QmC": found("QmC", (2, 6.5), (3, 1.0)),
    }
    assert holders_of(records) == {0: "QmB", 1: "QmA", 2: "QmC", 3: "QmC"}
    won = arbitrate(records, 50.0)[2]
    assert won == Holder("QmC", Lease(shard=2, since=6.5, position=6), 100.0)
    # Independent of the order the records were read in.
    for order in itertools.permutations(records):
        assert holders_of({k: records[k] for k in order}) == holders_of(records)


def test_expired_and_misattributed_claims_are_void() -> None:
    records = {
        "QmA": found("QmA", (0, 1.0), expires_at=49.0),  # earliest, but its lease is over
        "QmB": found("QmB", (0, 9.0)),
        "QmC": found("QmC", (1, 1.0), expires_at=50.0),  # expiring exactly now counts as expired
        "QmD": found("QmD", (2, 1.0), owner="QmE"),  # a record under someone else's subkey claims nothing
    }
    assert holders_of(records, now=50.0) == {0: "QmB"}


def test_choice_is_deterministic_and_spreads_peers_over_free_shards() -> None:
    peers = [f"Qm{i:04d}" for i in range(200)]
    firsts = [choose_shards({}, num_shards=16, peer_id=p, target=1) for p in peers]
    assert firsts == [choose_shards({}, num_shards=16, peer_id=p, target=1) for p in peers]
    counts = [sum(f == [s] for f in firsts) for s in range(16)]
    assert min(counts) >= 3 and max(counts) <= 30, counts  # ~12.5 each: no shard everyone piles onto
    # A peer's ranking is its own: it does not change with who else exists.
    ranking = choose_shards({}, num_shards=16, peer_id="QmX", target=16)
    assert ranking == sorted(range(16), key=lambda s: -rendezvous_score("QmX", s))


def test_choice_takes_free_shards_lowest_position_first_up_to_the_target() -> None:
    held = arbitrate({"QmA": found("QmA", (0, 1.0)), "QmMe": found("QmMe", (1, 1.0))}, 50.0)
    positions = {2: 40, 3: 0, 4: 7, 5: 7}
    pick = choose_shards(held, num_shards=6, peer_id="QmMe", target=4, positions=positions)
    assert pick[0] == 3 and set(pick[1:]) == {4, 5} and len(pick) == 3  # 2 (most read) comes last, if at all
    assert choose_shards(held, num_shards=6, peer_id="QmMe", target=1) == []  # already holds shard 1
    assert choose_shards(held, num_shards=6, peer_id="QmMe", target=2, exclude={2, 3, 4, 5}) == []
    everything = choose_shards(held, num_shards=6, peer_id="QmMe", target=10, positions=positions)
    assert everything[-1] == 2 and 0 not in everything and 1 not in everything


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="2 × renew_s"):
        LeaseConfig(num_shards=4, renew_s=5, ttl_s=9)
    with pytest.raises(ConfigError, match="num_shards"):
        LeaseConfig(num_shards=0)
    with pytest.raises(ConfigError, match="settle_s"):
        LeaseConfig(num_shards=4, renew_s=1, ttl_s=3, settle_s=2)
    assert LeaseConfig(num_shards=4, renew_s=1, ttl_s=3).safety_margin_s == 1.0
    # Timeouts are checked against each other: a dead replica may not delay a renewal past the margin.
    LeaseConfig(num_shards=4).check_against(DHTConfig())  # the defaults fit
    with pytest.raises(ConfigError, match="wait_timeout_s"):
        LeaseConfig(num_shards=4, renew_s=1, ttl_s=4).check_against(DHTConfig(wait_timeout_s=1.5))


# ---------------------------------------------------------------------------------- real in-process peers


def peer_config(*entry: str, swarm: str, role: str = "peer") -> PeerConfig:
    return PeerConfig(
        host=HostConfig(host="127.0.0.1", initial_peers=entry),
        dht=DHTConfig(wait_timeout_s=WAIT),
        membership=MembershipConfig(swarm=swarm, role=role, heartbeat_s=2.0),
        join_timeout_s=10,
    )


def lease_config(num_shards: int, **overrides: object) -> LeaseConfig:
    fields = {"renew_s": RENEW, "ttl_s": TTL, "settle_s": SETTLE, "poll_s": 0.2, "acquire_timeout_s": 10.0}
    return LeaseConfig(num_shards=num_shards, **{**fields, **overrides})


@pytest.fixture
async def peers(request: pytest.FixtureRequest, real_processes: None):
    """A bootstrap and peers (4 in all, or as many as ``indirect`` parametrization says), all in this process."""
    count = getattr(request, "param", 4)
    swarm = request.node.originalname.removeprefix("test_")[:40].replace("_", "-")
    boot = await SwarmPeer.create(peer_config(swarm=swarm, role="bootstrap"))
    started: list[SwarmPeer] = [boot]
    try:
        others = await asyncio.gather(
            *(SwarmPeer.create(peer_config(boot.maddrs[0], swarm=swarm)) for _ in range(count - 1)),
            return_exceptions=True,
        )
        started += [p for p in others if isinstance(p, SwarmPeer)]
        for p in others:
            if isinstance(p, BaseException):
                raise p
        yield started
    finally:
        errors = await asyncio.gather(*(p.aclose() for p in started), return_exceptions=True)
        assert not [e for e in errors if e is not None], errors


@contextlib.asynccontextmanager
async def leases_on(peers: list[SwarmPeer], config: LeaseConfig, **kwargs: object):
    made = [await ShardLeases.create(p.dht, p.swarm, config, **kwargs) for p in peers]
    try:
        yield made
    finally:
        await asyncio.gather(*(leases.aclose() for leases in made))


async def agreed_holders(everyone: list[ShardLeases], expected: dict[int, str]) -> None:
    """Wait until every peer's own read of the DHT arbitrates to ``expected`` (shard -> peer id)."""

    async def all_agree() -> bool:
        views = await asyncio.gather(*(leases.holders() for leases in everyone))
        return all({s: h.peer_id for s, h in view.items()} == expected for view in views)

    await eventually(all_agree, timeout=10)


async def test_concurrent_acquires_get_disjoint_shards_and_everyone_agrees(peers) -> None:
    async with leases_on(peers, lease_config(num_shards=6)) as everyone:
        shards = await asyncio.gather(*(leases.acquire() for leases in everyone))
        assert None not in shards and len(set(shards)) == len(everyone), shards
        assert all(leases.held == {s} for leases, s in zip(everyone, shards, strict=True))
        await agreed_holders(everyone, {s: leases.peer_id for leases, s in zip(everyone, shards, strict=True)})
        # At the target already: no second shard, no waiting.
        started = time.monotonic()
        assert await everyone[0].acquire() is None
        assert time.monotonic() - started < 0.1


async def test_racing_for_the_single_free_shard_leaves_exactly_one_holder(peers) -> None:
    async with leases_on(peers, lease_config(num_shards=1, acquire_timeout_s=SETTLE * 3)) as everyone:
        results = await asyncio.gather(*(leases.acquire() for leases in everyone))
        winners = [leases for leases, r in zip(everyone, results, strict=True) if r == 0]
        assert len(winners) == 1 and results.count(None) == len(everyone) - 1, results
        assert [leases.held for leases in everyone].count(frozenset({0})) == 1
        await agreed_holders(everyone, {0: winners[0].peer_id})

        # The losers withdrew their claims: no record but the winner's still names the shard.
        async def withdrawn() -> bool:
            records = await peers[0].dht.read_all(leases_key(peers[0].swarm), LeaseRecord)
            return {owner for owner, f in records.items() if f.record.leases} == {winners[0].peer_id}

        await eventually(withdrawn, timeout=5)


async def test_a_killed_peer_loses_its_shard_after_the_ttl_and_a_thief_resumes_its_position(peers) -> None:
    config = lease_config(num_shards=4, shards_per_peer=2)
    async with leases_on(peers, config) as everyone:
        boot, bystander, thief, victim = everyone
        shards = await asyncio.gather(*(leases.acquire() for leases in everyone))
        assert len(set(shards)) == 4, shards
        stolen = shards[3]
        assert victim.update_position(stolen, 7)
        await victim.renew()  # publish the position now rather than at the next renewal

        async def thief_saw_position() -> bool:
            return (await thief.holders())[stolen].lease.position == 7

        await eventually(thief_saw_position, timeout=5)

        # Crash: the daemon dies without a word and the process stops renewing; the lease record stays
        # in the DHT until it expires. (aclose at the end tries a release, which goes nowhere.)
        os.kill(peers[3].host.daemon_pid, signal.SIGKILL)
        victim._task.cancel()
        killed_at = dht_time()
        expiry = victim.expires_at
        assert expiry - killed_at <= TTL + 0.1

        # Nothing is free until then: the thief must wait for the victim's lease to run out.
        got = await thief.acquire(timeout=TTL + 5)
        taken_at = dht_time()
        assert got == stolen
        assert thief.position(stolen) == 7  # continues where the dead holder stopped
        assert taken_at >= expiry  # never before the victim's lease ended...
        assert taken_at - killed_at <= TTL + 3  # ...and not long after
        # The survivors kept their shards across the TTL by renewing them.
        assert boot.still_holds(shards[0]) and bystander.still_holds(shards[1])
        assert thief.held == {shards[2], stolen}
        expected = {shards[0]: boot.peer_id, shards[1]: bystander.peer_id, shards[2]: thief.peer_id}
        await agreed_holders([boot, bystander, thief], expected | {stolen: thief.peer_id})


@pytest.mark.parametrize("peers", [2], indirect=True)
async def test_a_clean_release_frees_the_shard_at_once(peers) -> None:
    async with leases_on(peers[:2], lease_config(num_shards=1)) as (first, second):
        assert await first.acquire() == 0
        assert await second.acquire(timeout=SETTLE) is None
        assert first.update_position(0, 3)
        await first.renew()

        async def second_saw_position() -> bool:
            return (await second.holders())[0].lease.position == 3

        await eventually(second_saw_position, timeout=5)
        released_at = time.monotonic()
        assert await first.release(0)
        assert first.held == frozenset() and not first.still_holds(0)
        assert await second.acquire(timeout=TTL / 2) == 0  # well before the old lease would have expired
        assert time.monotonic() - released_at < TTL / 2
        assert second.position(0) == 3
        await agreed_holders([first, second], {0: second.peer_id})
    with pytest.raises(ConfigError, match="wait_timeout_s"):
        await ShardLeases.create(first.dht, first.swarm, LeaseConfig(num_shards=2, renew_s=1.0, ttl_s=2.5))


@pytest.mark.parametrize("peers", [3], indirect=True)
async def test_a_holder_drops_its_shard_when_an_earlier_claim_becomes_visible(peers) -> None:
    lost: list[int] = []
    async with leases_on(peers[:2], lease_config(num_shards=1), on_lost=lost.append) as (holder, observer):
        assert await holder.acquire() == 0
        mine = (await holder.holders())[0].lease
        # Another peer's claim, made earlier but unseen until now (as after a partition heals).
        rival = peers[2]
        earlier = LeaseRecord(
            swarm=rival.swarm, peer_id=rival.peer_id, sent_at=dht_time(),
            leases=(Lease(shard=0, since=mine.since - 1.0, position=2),),
        )  # fmt: skip
        assert await rival.dht.store_own(leases_key(rival.swarm), earlier.to_wire(), dht_time() + TTL)

        async def renewal_found_out() -> bool:
            await holder.renew()  # or the renewal task does it first: either way on_lost is called once
            return bool(lost)

        await eventually(renewal_found_out, timeout=5)
        assert lost == [0]
        assert not holder.still_holds(0) and holder.held == frozenset()
        assert not holder.update_position(0, 5)
        await agreed_holders([holder, observer], {0: rival.peer_id})

        async def withdrawn() -> bool:  # the loser's record no longer claims the shard
            records = await observer.dht.read_all(leases_key(rival.swarm), LeaseRecord)
            return records[holder.peer_id].record.leases == ()

        await eventually(withdrawn, timeout=5)


@pytest.mark.parametrize("peers", [2], indirect=True)
async def test_a_holder_whose_renewals_are_refused_gives_up_before_its_lease_expires(peers, monkeypatch) -> None:
    lost_at: dict[int, float] = {}
    config = lease_config(num_shards=1)
    async with leases_on(peers[:1], config, on_lost=lambda s: lost_at.setdefault(s, dht_time())) as (holder,):
        async with leases_on(peers[1:2], config) as (other,):
            assert await holder.acquire() == 0

            async def refuse(*args: object, **kwargs: object) -> bool:
                return False  # every replica says no (injected fault at the "renew write" phase)

            monkeypatch.setattr(peers[0].dht, "store_own", refuse)
            await holder.renew()  # waits for a renewal in flight, if any, to finish (they take turns)
            last_accepted = holder.expires_at
            got = await other.acquire(timeout=TTL + 5)
            taken_at = dht_time()
            assert got == 0 and other.position(0) == 0
            assert holder.expires_at == last_accepted  # no refused write counted as a renewal
            assert taken_at >= last_accepted
            # The holder let go (and told the trainer) before anyone could have taken the shard over.
            assert lost_at[0] <= last_accepted - config.safety_margin_s + RENEW + 0.2
            assert not holder.still_holds(0) and holder.held == frozenset()
