"""Collective rounds between real data planes in one process: results against the naive oracle, codecs
within their declared bounds, error feedback over rounds, and faults at every named phase."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence

import pytest
import torch

from legion_swarm.codecs import available_codecs, get_codec
from legion_swarm.collectives import Collectives, RoundResult
from legion_swarm.collectives.faults import KINDS, PHASES, FaultPlan, InjectedCrash
from legion_swarm.collectives.partition import PartitionPlan
from legion_swarm.collectives.reference import reference_all_reduce, weighted_average
from legion_swarm.config import CODECS, CollectiveConfig
from legion_swarm.errors import ConfigError
from legion_swarm.groups import GroupInfo, GroupMember
from legion_swarm.transport.dataplane import DataPlane
from tests.helpers.collectives import FAST, planes


def group_of(planes_: Sequence[DataPlane]) -> GroupInfo:
    members = tuple(GroupMember(peer_id=p.identity.peer_id, direct=p.endpoint) for p in planes_)
    return GroupInfo(round_id=os.urandom(16), members=members)


def make_inputs(n_members: int, sizes: Sequence[int], seed: int = 0) -> list[list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(size, generator=gen) for size in sizes] for _ in range(n_members)]


def clone(inputs: list[list[torch.Tensor]]) -> list[list[torch.Tensor]]:
    return [[t.clone() for t in ts] for ts in inputs]


def assert_identical(tensor_lists: Sequence[Sequence[torch.Tensor]]) -> None:
    for ts in tensor_lists[1:]:
        for a, b in zip(ts, tensor_lists[0], strict=True):
            assert torch.equal(a, b)


# Tensor sizes: an empty tensor, tensors spanning shards, odd sizes; chunk_elems small enough for many chunks.
SIZES = [1000, 0, 4097, 33, 12000]


@pytest.mark.parametrize("n_members", [1, 2, 3, 4, 7])
async def test_all_reduce_equals_the_naive_average_exactly(n_members: int) -> None:
    inputs = make_inputs(n_members, SIZES, seed=n_members)
    weights = [1.0 + 0.5 * r for r in range(n_members)]
    expected = reference_all_reduce(inputs, weights)
    work = clone(inputs)
    config = CollectiveConfig(chunk_elems=1024, **FAST)
    async with planes(n_members) as ps:
        group = group_of(ps)
        results = await asyncio.gather(
            *(Collectives(p, config).all_reduce(group, work[r], weight=weights[r]) for r, p in enumerate(ps))
        )
    for r, result in enumerate(results):
        assert result.complete and result.rank == r and not result.excluded
        for got, want in zip(work[r], expected, strict=True):
            assert torch.equal(got, want)
        assert set(result.planes.values()) <= {"direct"}
        # Lossless: each member sends every other owner its shard and every other member its own result.
        payload = 4 * ((sum(SIZES) - result.plan.sizes[r]) + (n_members - 1) * result.plan.sizes[r])
        assert payload <= result.bytes_sent <= payload + 4096 * n_members
    assert sum(r.bytes_sent for r in results) == sum(r.bytes_received for r in results)


@pytest.mark.parametrize("codec", ["fp16", "bf16", "int8", "int4", "sparse"])
async def test_lossy_codecs_stay_within_their_declared_bound(codec: str) -> None:
    n_members = 4
    inputs = make_inputs(n_members, SIZES, seed=7)
    weights = [3.0, 1.0, 2.0, 0.5]
    expected = reference_all_reduce(inputs, weights)
    work = clone(inputs)
    config = CollectiveConfig(codec=codec, chunk_elems=2048, **FAST)
    async with planes(n_members) as ps:
        group = group_of(ps)
        results = await asyncio.gather(
            *(Collectives(p, config).all_reduce(group, work[r], weight=weights[r]) for r, p in enumerate(ps))
        )
    assert all(r.complete for r in results)
    assert_identical(work)
    coder, gatherer = get_codec(codec), get_codec(config.resolved_gather_codec)  # sparse gathers in int8
    # Contributions: each owner's own slice is exact, the others are decoded, so the average's error is at
    # most the weighted mean of the contributors' bounds; the result then goes through the gather codec.
    flat = [torch.cat([t.reshape(-1) for t in ts]) for ts in inputs]
    contribution_bound = sum(w * coder.max_abs_error(x) for w, x in zip(weights, flat, strict=True)) / sum(weights)
    got, want = torch.cat([t.reshape(-1) for t in work[0]]), torch.cat([t.reshape(-1) for t in expected])
    bound = contribution_bound + gatherer.max_abs_error(want) * 1.01 + 1e-6
    error = (got - want).abs().max().item()
    assert 0 < error <= bound, (error, bound)


async def test_topk_with_error_feedback_tracks_the_sum_of_inputs() -> None:
    """Over rounds, what top-k leaves out is carried forward, so the summed results track the summed averages."""
    n_members, size, rounds = 3, 6000, 30
    gen = torch.Generator().manual_seed(3)
    means = [torch.randn(size, generator=gen) for _ in range(n_members)]
    config = CollectiveConfig(codec="topk", topk_fraction=0.1, chunk_elems=2048, **FAST)
    async with planes(n_members) as ps:
        colls = [Collectives(p, config) for p in ps]
        sum_results, sum_expected, ratios = torch.zeros(size), torch.zeros(size), []
        for _ in range(rounds):
            inputs = [[means[r] + 0.3 * torch.randn(size, generator=gen)] for r in range(n_members)]
            expected = reference_all_reduce(inputs, [1.0] * n_members)[0]
            work = clone(inputs)
            group = group_of(ps)
            results = await asyncio.gather(*(c.all_reduce(group, work[r]) for r, c in enumerate(colls)))
            assert all(r.complete for r in results)
            assert_identical(work)
            sum_results += work[0][0]
            sum_expected += expected
            ratios.append(((sum_results - sum_expected).norm() / sum_expected.norm()).item())
    # One round of 10 % top-k loses most of the signal; with error feedback the loss does not accumulate.
    assert ratios[0] > 0.5
    assert ratios[-1] < 0.15 and ratios[-1] < ratios[0] / 4, ratios


async def test_sharded_step_applies_the_owner_update_and_gathers_parameters() -> None:
    n_members, lr = 3, 0.1
    grads = make_inputs(n_members, [5000, 300], seed=11)
    params0 = [torch.randn(5000, generator=torch.Generator().manual_seed(1)), torch.randn(300)]
    params = [[p.clone() for p in params0] for _ in range(n_members)]
    avg = reference_all_reduce(grads, [1.0] * n_members)
    config = CollectiveConfig(chunk_elems=1024, **FAST)
    async with planes(n_members) as ps:
        group = group_of(ps)

        def sgd(rank: int):
            def update(shard: int, averaged: torch.Tensor) -> torch.Tensor:
                assert shard == rank
                return results_plan[0].extract(params[rank], shard) - lr * averaged

            return update

        from legion_swarm.collectives.partition import plan_partition

        results_plan = [plan_partition([5000, 300], n_members)]
        results = await asyncio.gather(
            *(Collectives(p, config).sharded_step(group, grads[r], sgd(r), out=params[r]) for r, p in enumerate(ps))
        )
    assert all(r.complete for r in results)
    assert_identical(params)
    for got, p0, g in zip(params[0], params0, avg, strict=True):
        assert torch.allclose(got, p0 - lr * g, atol=1e-6)
    for r in range(n_members):  # gradients are inputs, never written
        for g_in, g_ref in zip(grads[r], make_inputs(n_members, [5000, 300], seed=11)[r], strict=True):
            assert torch.equal(g_in, g_ref)


async def test_reduce_scatter_and_all_gather() -> None:
    n_members = 4
    inputs = make_inputs(n_members, [10000], seed=5)
    expected = reference_all_reduce(inputs, [1.0] * n_members)[0]
    config = CollectiveConfig(chunk_elems=1024, **FAST)
    async with planes(n_members) as ps:
        group = group_of(ps)
        colls = [Collectives(p, config) for p in ps]
        work = clone(inputs)
        results = await asyncio.gather(*(c.reduce_scatter(group, work[r]) for r, c in enumerate(colls)))
        for r, result in enumerate(results):
            start, end = result.plan.bounds[r]
            assert result.shard is not None and torch.equal(result.shard, expected[start:end])
            assert result.contributors == {r: tuple(range(n_members))}
            assert torch.equal(work[r][0], inputs[r][0])  # untouched
            work[r][0][start:end] = result.shard  # now every member holds its own averaged shard
        first_shards = [r.shard for r in results]
        again = await asyncio.gather(*(c.reduce_scatter(group_of(ps), [torch.zeros(10000)]) for c in colls))
        for r, result in enumerate(results):  # results stay valid after later rounds reuse the buffers
            assert result.shard is first_shards[r] and not torch.equal(result.shard, again[r].shard)
            assert torch.equal(result.shard, expected[slice(*result.plan.bounds[r])])
        results = await asyncio.gather(*(c.all_gather(group, work[r]) for r, c in enumerate(colls)))
    assert all(r.complete for r in results)
    for r in range(n_members):
        assert torch.equal(work[r][0], expected)


async def test_bad_local_arguments_raise_before_any_traffic() -> None:
    async with planes(2) as ps:
        group = group_of(ps)
        coll = Collectives(ps[0], CollectiveConfig(**FAST))
        with pytest.raises(ValueError, match="weight"):
            await coll.all_reduce(group, [torch.zeros(10)], weight=0.0)
        with pytest.raises(TypeError, match="float32"):
            await coll.all_reduce(group, [torch.zeros(10, dtype=torch.float64)])
        with pytest.raises(ConfigError, match="not a member"):
            await Collectives(ps[0]).all_reduce(group_of(ps[1:]), [torch.zeros(10)])
    with pytest.raises(ConfigError, match="stall_timeout_s"):
        CollectiveConfig(stall_timeout_s=10, reduce_timeout_s=5)
    with pytest.raises(ConfigError, match="connect_timeout_s"):
        CollectiveConfig(connect_timeout_s=6, stall_timeout_s=5)
    with pytest.raises(ConfigError, match="topk"):
        CollectiveConfig(gather_codec="topk")
    with pytest.raises(ConfigError, match="sparse"):
        CollectiveConfig(gather_codec="sparse")
    with pytest.raises(ConfigError, match="codec"):
        CollectiveConfig(codec="zstd")
    # config.py validates names without importing torch; its list must stay the registry's.
    assert set(CODECS) == set(available_codecs())


# ------------------------------------------------------------------------------------------------- faults

FAULT_CONFIG = CollectiveConfig(
    chunk_elems=1024, connect_timeout_s=1.0, reduce_timeout_s=5.0, gather_timeout_s=5.0, commit_timeout_s=2.0,
    stall_timeout_s=1.0,
)  # fmt: skip


LR = 0.5


async def run_with_fault(
    n_members: int,
    faulty: int,
    plan: FaultPlan,
    grads: list[list[torch.Tensor]],
    weights: list[float],
    params0: list[torch.Tensor],
) -> tuple[dict[int, RoundResult], list[list[torch.Tensor]], BaseException | None]:
    """One sharded SGD step (every member starts from ``params0``) with ``plan`` injected into ``faulty``."""
    params = [[p.clone() for p in params0] for _ in range(n_members)]
    async with planes(n_members) as ps:
        group = group_of(ps)

        def sgd(rank: int, coll: Collectives):
            def update(shard: int, averaged: torch.Tensor) -> torch.Tensor:
                return last_plan(coll).extract(params[rank], shard) - LR * averaged

            return update

        colls = [Collectives(p, FAULT_CONFIG) for p in ps]
        tasks = {
            r: asyncio.create_task(
                c.sharded_step(
                    group, grads[r], sgd(r, c), out=params[r], weight=weights[r], faults=plan if r == faulty else None
                )
            )
            for r, c in enumerate(colls)
        }
        survivors = {r: t for r, t in tasks.items() if r != faulty}
        started = asyncio.get_running_loop().time()
        done = dict(zip(survivors, await asyncio.gather(*survivors.values()), strict=True))
        assert asyncio.get_running_loop().time() - started < FAULT_CONFIG.round_timeout_s
        faulty_task = tasks[faulty]
        if not faulty_task.done():
            faulty_task.cancel()  # a stalled member would sit out its own deadline
        outcome = await asyncio.gather(faulty_task, return_exceptions=True)
        error = outcome[0] if isinstance(outcome[0], BaseException) else None
    return done, params, error


def last_plan(coll: Collectives) -> PartitionPlan:
    assert coll.last_plan is not None
    return coll.last_plan


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("phase", PHASES)
async def test_a_faulty_member_leaves_survivors_identical(phase: str, kind: str) -> None:
    n_members, faulty = 4, 2
    sizes = [9000, 100]
    grads = make_inputs(n_members, sizes, seed=PHASES.index(phase))
    params0 = make_inputs(1, sizes, seed=99)[0]
    weights = [1.0, 2.0, 3.0, 4.0]
    plan = FaultPlan(phase=phase, kind=kind, seed=1, in_process=True)
    results, params, error = await run_with_fault(n_members, faulty, plan, grads, weights, params0)
    if kind == "kill":
        assert isinstance(error, InjectedCrash)

    survivors = sorted(results)
    assert_identical([params[r] for r in survivors])
    first = results[survivors[0]]
    for r in survivors:
        assert results[r].missing_shards == results[r].faulty == (faulty,)
        assert results[r].missing_peers == (first.group.members[faulty].peer_id,)
        assert results[r].contributors == first.contributors
    # The faulty member's contribution counts only if it was sent in full before the fault.
    sent_everything = phase in ("after_reduce", "mid_all_gather")
    contributors = tuple(r for r in range(n_members) if sent_everything or r != faulty)
    assert all(first.contributors[s] == contributors for s in survivors)
    # Committed shards hold the update of the average over the contributors; the faulty owner's is untouched.
    flat_grads = [torch.cat([t.reshape(-1) for t in ts]) for ts in grads]
    flat_p0 = torch.cat([t.reshape(-1) for t in params0])
    flat_out = torch.cat([t.reshape(-1) for t in params[survivors[0]]])
    for shard in range(n_members):
        start, end = first.plan.bounds[shard]
        if shard == faulty:
            assert torch.equal(flat_out[start:end], flat_p0[start:end])
        else:
            averaged = weighted_average([(flat_grads[r][start:end], weights[r]) for r in contributors])
            assert torch.equal(flat_out[start:end], flat_p0[start:end] - LR * averaged)


async def test_members_with_different_tensor_sizes_refuse_each_other_at_hello() -> None:
    config = CollectiveConfig(**FAST)
    async with planes(2) as ps:
        group = group_of(ps)
        a, b = [torch.ones(1000)], [torch.ones(1001)]
        results = await asyncio.gather(
            Collectives(ps[0], config).all_reduce(group, a), Collectives(ps[1], config).all_reduce(group, b)
        )
    for r, result in enumerate(results):
        assert "setup" in result.excluded[1 - r]
        assert result.faulty == (0, 1) and result.committed == ()
    assert torch.equal(a[0], torch.ones(1000)) and torch.equal(b[0], torch.ones(1001))


async def test_error_feedback_takes_back_what_a_failed_owner_never_averaged() -> None:
    """Top-k: a survivor's residual for the shard of a member that crashed holds its whole input again (the
    round sent nothing that counted); after a second failure in a row it is dropped, so it cannot grow."""
    n_members, faulty = 3, 2
    config = CollectiveConfig(codec="topk", topk_fraction=0.1, chunk_elems=1024, **{**FAST, "stall_timeout_s": 3.0})
    inputs = make_inputs(n_members, [6000], seed=4)
    async with planes(n_members) as ps:
        colls = [Collectives(p, config) for p in ps]
        for attempt in range(2):
            group = group_of(ps)
            plan = FaultPlan(phase="after_reduce", kind="kill", in_process=True)
            work = clone(inputs)
            outcome = await asyncio.gather(
                *(c.all_reduce(group, work[r], faults=plan if r == faulty else None) for r, c in enumerate(colls)),
                return_exceptions=True,
            )
            assert isinstance(outcome[faulty], InjectedCrash)
            survivor = colls[0]
            assert survivor.last_plan is not None
            start, end = survivor.last_plan.bounds[faulty]
            keys = [k for k in survivor.error_feedback.keys() if start <= k[1] < end]
            if attempt == 0:
                assert keys
                restored = torch.cat([survivor.error_feedback.residual(k) for k in sorted(keys)])
                assert torch.allclose(restored, inputs[0][0][start:end], atol=1e-6)
            else:
                assert keys == []


async def test_an_update_fn_bug_raises_on_its_owner_and_the_others_drop_its_shard() -> None:
    n_members, broken = 3, 1
    params0 = make_inputs(1, [5000], seed=8)[0]
    params = [[p.clone() for p in params0] for _ in range(n_members)]
    grads = make_inputs(n_members, [5000], seed=9)
    async with planes(n_members) as ps:
        group = group_of(ps)

        def update(rank: int):
            def fn(shard: int, averaged: torch.Tensor) -> torch.Tensor:
                if rank == broken:
                    raise ZeroDivisionError("a bug in the optimizer")
                return averaged * 0  # any value: checked below as "not the pre-round one"

            return fn

        outcome = await asyncio.gather(
            *(
                Collectives(p, CollectiveConfig(**FAST)).sharded_step(group, grads[r], update(r), out=params[r])
                for r, p in enumerate(ps)
            ),
            return_exceptions=True,
        )
    assert isinstance(outcome[broken], ZeroDivisionError)  # the bug itself, not wrapped in task groups
    survivors = [r for r in range(n_members) if r != broken]
    assert all(outcome[r].faulty == (broken,) for r in survivors)
    assert_identical([params[r] for r in survivors])
    start, end = outcome[survivors[0]].plan.bounds[broken]
    assert torch.equal(params[survivors[0]][0][start:end], params0[0][start:end])
