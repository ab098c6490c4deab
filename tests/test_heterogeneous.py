"""Unequal peers with real processes: three peers whose compute is throttled to 1, 0.5 and 0.25 of its pace
train in rounds by time. None is sent to re-sync or exits for being slow, no work is thrown away, every round
commits with all three, and each contributes samples in proportion to its speed.

"Its speed" is each peer's own measured compute rate (samples per second of local steps): on a shared 2-core
machine the throttled peers also wait for cores, unequally, so the nominal 1 : 0.5 : 0.25 is only roughly what
they compute. ``benchmarks/bench_heterogeneous.py`` reports the samples against the nominal speeds."""

from __future__ import annotations

import pytest

from legion_swarm.sim import LocalSwarm
from legion_swarm.transport.identity import Identity
from tests.helpers.swarm import FAST, trained

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(400)]

SPEEDS = (1.0, 0.5, 0.25)


async def test_peers_of_unequal_speed_train_together_each_at_its_own_pace() -> None:
    rounds, budget = 6, 4.0
    spec = ("--mode", "diloco", "--train-round-seconds", str(budget), "--inner-steps", "1000", *FAST)
    async with await LocalSwarm.create(
        len(SPEEDS), swarm="unequal", bootstrap_args=spec, peer_args=("--rounds", str(rounds), "--threads", "1"),
        per_peer_args=[("--speed", str(s)) for s in SPEEDS],
    ) as swarm:  # fmt: skip
        by_name = sorted(swarm.peers, key=lambda p: p.name)  # peer i got SPEEDS[i]
        summaries = await trained(by_name, timeout=300)
        codes = [await p.wait(60) for p in by_name]
    assert codes == [0, 0, 0]
    for s in summaries:
        assert s["rounds_committed"] == rounds and s["rounds_failed"] == 0, s
        assert s["samples_dropped"] == 0, s  # nothing thrown away
        assert s["bandwidth_mb_s"] is not None and s["bandwidth_mb_s"] > 0, s  # measured, announced
        # Every round after the first (whose start the peers' start-up skews) has all three members.
        assert s["group_sizes"][1:] == [3] * (len(s["group_sizes"]) - 1), s
    assert len({s["val_loss"] for s in summaries}) == 1  # one state
    rates = [s["steps"] / s["compute_s"] for s in summaries]
    assert rates[0] > rates[1] > rates[2], rates  # the throttle is real
    # Each contributed what its own pace gives in the rounds' time: samples / rate equal within 20 %.
    seconds = [s["samples"] / (r * 4) for s, r in zip(summaries, rates, strict=True)]  # FAST: batch size 4
    mean = sum(seconds) / len(seconds)
    assert all(abs(x - mean) <= 0.2 * mean for x in seconds), (seconds, rates)
    assert mean >= 0.5 * rounds * budget, seconds  # and they computed for most of the rounds' budgets


async def test_a_member_too_slow_for_fixed_rounds_keeps_its_work_and_never_exits(tmp_path) -> None:
    """Rounds by steps, one peer 5x slower: it misses rounds (the others' leader does not wait that long), is
    told so, moves its work onto the new state and contributes it to the next round (its work is ~4 rounds
    old by then, within ``max_staleness``). It never exits, and on
    every peer each sample computed went into a committed round: nothing thrown away, nothing done twice. (The
    fast peers train more rounds, so that the slow one always has company.)"""
    slow_rounds, fast_rounds = 2, 14
    spec = ("--mode", "diloco", "--inner-steps", "40", *FAST)
    # The slow peer gets the largest peer id, so it never leads a round (a slow leader in rounds by steps makes
    # everyone wait for it, which is the other case: nobody is late then).
    keys = sorted((Identity.generate() for _ in range(3)), key=lambda i: i.peer_id)
    paths = [str(tmp_path / f"peer{i}.key") for i in range(3)]
    for identity, path in zip(keys, paths, strict=True):
        identity.save(path)
    fast = ("--rounds", str(fast_rounds))
    async with await LocalSwarm.create(
        3, swarm="slowpoke", bootstrap_args=spec, peer_args=("--rounds", str(slow_rounds), "--threads", "1"),
        per_peer_args=[(*fast, "--identity", paths[0]), (*fast, "--identity", paths[1]),
                       ("--speed", "0.2", "--identity", paths[2])],
    ) as swarm:  # fmt: skip
        by_name = sorted(swarm.peers, key=lambda p: p.name)
        summaries = await trained(by_name, timeout=300)
        codes = [await p.wait(60) for p in by_name]
        slow_log = by_name[2].tail(400)
        logs = [p.tail(400) for p in by_name]
    assert codes == [0, 0, 0]
    assert [s["rounds_committed"] for s in summaries] == [fast_rounds, fast_rounds, slow_rounds]
    for s in summaries:
        assert s["samples_dropped"] == 0 and s["samples"] == s["steps"] * 4, (s, logs)  # FAST: batch size 4
    slow = summaries[2]
    assert slow["resyncs"] >= 1, slow  # it was late at least once...
    assert "samples of local work" in slow_log  # ...kept its work ("keeping N samples of local work")...
    assert all(size == 3 for size in slow["group_sizes"]), slow  # ...and contributed it with the others


async def test_rounds_by_samples_share_the_swarms_target_among_its_members() -> None:
    """``--train-round-samples 160``: each round's local work, summed over the members, is about 160 samples,
    however high the step cap, from the first round on (before any rate is published, a member assumes the
    others compute at its own rate)."""
    rounds, target = 3, 160
    spec = ("--mode", "diloco", "--train-round-samples", str(target), "--inner-steps", "1000", *FAST)
    async with await LocalSwarm.create(
        2, swarm="bysamples", bootstrap_args=spec, peer_args=("--rounds", str(rounds), "--threads", "1")
    ) as swarm:
        summaries = await trained(sorted(swarm.peers, key=lambda p: p.name), timeout=240)
    assert all(s["rounds_committed"] == rounds and s["samples_dropped"] == 0 for s in summaries), summaries
    per_round = sum(s["samples"] for s in summaries) / rounds
    assert 0.5 * target <= per_round <= 1.5 * target, (per_round, summaries)
