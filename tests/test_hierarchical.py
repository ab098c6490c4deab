"""Hierarchical rounds: several groups, the owners of each shard averaging it across groups in a column.

The whole swarm must end a round exactly where one flat group would (same average, same optimizer step), with
every peer bit-identical, the optimizer state split once over the whole swarm, and cross-group traffic per
owner a fraction of the model."""

from __future__ import annotations

import asyncio
import itertools
import os

import pytest
import torch

from legion_swarm.config import TrainConfig
from legion_swarm.errors import ConfigError
from legion_swarm.groups import GroupMember
from legion_swarm.groups.layout import Layout
from legion_swarm.train.modes import DiLoCoMode, SyncMode, trainable
from legion_swarm.train.reference import reference_diloco, reference_sync
from legion_swarm.transport.dataplane import DataPlane
from tests.helpers.collectives import planes
from tests.helpers.training import TinyLM, batches, flat, make_modes

pytestmark = pytest.mark.timeout(120)


def layout_of(ps: list[DataPlane], sizes: list[int]) -> Layout:
    members = [GroupMember(peer_id=p.identity.peer_id, direct=p.endpoint) for p in ps]
    groups, at = [], 0
    for size in sizes:
        groups.append(tuple(members[at : at + size]))
        at += size
    return Layout(round_id=os.urandom(16), groups=tuple(groups))


def member(i: int) -> GroupMember:
    return GroupMember(peer_id=f"peer{i:02d}")


def test_layout_aligns_shards_across_groups_and_splits_them_in_columns() -> None:
    layout = Layout(round_id=b"r" * 16, groups=((member(0), member(1)), (member(2), member(3), member(4))))
    assert layout.hierarchical and layout.owners == 2 and layout.size == 5
    numels = [1000, 24]
    g0, g1 = layout.group(0), layout.group(1)
    from legion_swarm.collectives import group_plan

    p0, p1 = group_plan(g0, numels), group_plan(g1, numels)
    assert p0.bounds == p1.bounds[:2] and p1.sizes[2] == 0  # shard s is the same range in every group
    assert layout.column(1).members == (member(1), member(3))
    assert g0.round_id != g1.round_id != layout.column(0).round_id
    ranges = layout.ranges(numels)
    covered = sorted((lo, hi) for _, lo, hi in ranges)
    assert covered[0][0] == 0 and covered[-1][1] == 1024
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))  # disjoint, no gaps
    assert layout.owned_range("peer04", numels) == (1024, 1024)  # the third member of a group of 3 owns nothing
    with pytest.raises(ConfigError):
        Layout(round_id=b"r", groups=((member(0),), (member(0),)))
    with pytest.raises(ConfigError):
        layout.index_of("nobody")


@pytest.mark.parametrize("sizes", [[2, 2], [2, 3, 2]])
async def test_sync_across_groups_equals_adamw_with_the_whole_swarms_batch(sizes: list[int]) -> None:
    n = sum(sizes)
    config = TrainConfig(mode="sync", lr=1e-2, weight_decay=0.05)
    steps = 8
    data = [batches(n, seed=300 + t) for t in range(steps)]
    reference = TinyLM()
    reference_sync(reference, data, config)

    async with planes(n) as ps:
        models = [TinyLM() for _ in ps]
        modes = make_modes(SyncMode, models, ps, "none", config)
        for t in range(steps):
            layout = layout_of(ps, sizes)
            outcomes = await asyncio.gather(*(m.step(layout, data[t][r]) for r, m in enumerate(modes)))
            assert all(o.result.complete and o.in_sync for o, _ in outcomes)
        column_rounds = [r for m in modes for r in m.column_results]

    for model in models[1:]:
        assert torch.equal(flat(model), flat(models[0]))  # bit-identical across groups
    for got, want in zip(trainable(models[0]), trainable(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # ZeRO over the whole swarm: the AdamW moments exist once, split over the owners' column pieces.
    reference_state = sum(p.numel() for p in trainable(reference)) * 2 * 4
    assert sum(m.optimizer.nbytes() for m in modes) == reference_state
    # Each column moves one shard (1/owners of the model) between the groups.
    owners = min(sizes)
    assert len(column_rounds) == steps * owners * len(sizes)
    model_bytes = flat(models[0]).numel() * 4
    for r in column_rounds:
        assert r.complete and r.bytes_sent <= 2 * model_bytes / owners + 4096


async def test_diloco_across_groups_equals_the_naive_reference() -> None:
    sizes, rounds, inner = [2, 2], 2, 3
    n = sum(sizes)
    config = TrainConfig(mode="diloco", lr=3e-3, inner_steps=inner)
    plan = [[batches(inner, seed=50 * k + r) for r in range(n)] for k in range(rounds)]
    reference = reference_diloco(TinyLM(), plan, config)
    async with planes(n) as ps:
        models = [TinyLM() for _ in ps]
        modes = make_modes(DiLoCoMode, models, ps, "none", config)
        for per_member in plan:
            for mode, member_batches in zip(modes, per_member, strict=True):
                for batch in member_batches:
                    await mode.inner_step(batch)
            layout = layout_of(ps, sizes)
            outcomes = await asyncio.gather(*(m.outer_step(layout) for m in modes))
            assert all(o.result.complete for o in outcomes)
    for model in models[1:]:
        assert torch.equal(flat(model), flat(models[0]))
    for got, want in zip(trainable(models[0]), trainable(reference), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_spread_is_zero_for_identical_copies_and_measures_a_perturbation() -> None:
    from legion_swarm.train.metrics import relative_spread, sample_positions, swarm_spread, take_sample

    model = TinyLM()
    params = trainable(model)
    at = sample_positions([p.numel() for p in params])
    assert at == sample_positions([p.numel() for p in params]) and len(at) == 64
    same = take_sample(params, at)
    assert relative_spread([same, same, same]) == 0.0
    with torch.no_grad():
        for p in params:
            p.mul_(1.01)  # every element 1% off: relative spread about 0.5% from the mean of two
    spread = relative_spread([same, take_sample(params, at)])
    assert spread is not None and 0.004 < spread < 0.006
    assert relative_spread([same]) is None and relative_spread([same, same[:8]]) is None

    class Rec:
        def __init__(self, round_: int | None, sample: bytes | None) -> None:
            self.round, self.sample = round_, sample

    got = swarm_spread([Rec(3, same), Rec(3, same), Rec(4, same), Rec(None, same), Rec(5, None)])
    assert got == (3, 0.0, 2)  # round 4 has a single sample
