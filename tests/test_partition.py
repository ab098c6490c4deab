"""Partition plan: invariants, proportionality, determinism, shard <-> tensor mapping, bad input."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from legion_swarm.collectives import PartitionPlan, flatten, plan_partition, unflatten_into
from legion_swarm.errors import ConfigError

SHARD_COUNTS = [1, 2, 3, 4, 7]
LAYOUTS = [
    [1000],
    [100, 30, 0],
    [0, 0, 5, 0, 64, 1, 4096, 0],
    [3, 3, 3],
    [64 * 7],
    [1],
    [],
    [12345, 777, 2048, 1],
]


def check_invariants(plan: PartitionPlan, numels: list[int], n_shards: int, align: int) -> None:
    assert plan.total == sum(numels)
    assert plan.n_shards == len(plan.bounds) == n_shards
    assert plan.bounds[0][0] == 0 and plan.bounds[-1][1] == plan.total
    for (_, end), (start, _) in zip(plan.bounds, plan.bounds[1:], strict=False):
        assert end == start  # contiguous
    for start, end in plan.bounds:
        assert start % align == 0 and start <= end
    assert sum(plan.sizes) == plan.total


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
@pytest.mark.parametrize("numels", LAYOUTS)
@pytest.mark.parametrize("align", [1, 64])
def test_invariants_and_equal_shares(numels: list[int], n_shards: int, align: int) -> None:
    plan = plan_partition(numels, n_shards, align=align)
    check_invariants(plan, numels, n_shards, align)
    ideal = Fraction(plan.total, n_shards)
    assert all(abs(size - ideal) < align for size in plan.sizes)
    if plan.total >= n_shards * align:
        assert all(plan.sizes), "equal weights and total >= n_shards * align must leave no shard empty"


@pytest.mark.parametrize("seed", range(20))
def test_sizes_proportional_to_weights(seed: int) -> None:
    rng = random.Random(seed)
    n_shards = rng.choice(SHARD_COUNTS)
    numels = [rng.randrange(0, 50_000) for _ in range(rng.randrange(1, 6))]
    weights = [rng.uniform(0.05, 20.0) for _ in range(n_shards)]
    align = rng.choice([1, 8, 64, 256])
    plan = plan_partition(numels, n_shards, weights, align=align)
    check_invariants(plan, numels, n_shards, align)
    exact = [Fraction(w) for w in weights]
    for size, w in zip(plan.sizes, exact, strict=True):
        share = plan.total * w / sum(exact)
        assert abs(size - share) < align, (size, float(share))
        if share >= align:
            assert size > 0


def test_deterministic_and_golden() -> None:
    # Same inputs, any machine: the exact same plan. The golden value pins the rounding rule.
    args = ([1000, 37, 5000], 3, [1.0, 2.5, 0.3])
    plans = {plan_partition(*args) for _ in range(3)}
    assert len(plans) == 1
    assert plan_partition(*args).bounds == ((0, 1536), (1536, 5504), (5504, 6037))
    # numpy scalars are the same numbers as Python ones
    same = plan_partition([np.int64(1000), 37, np.int32(5000)], 3, [np.float64(1.0), np.float32(2.5), np.float64(0.3)])
    assert same == plan_partition(*args)


def test_weights_scale_invariant() -> None:
    a = plan_partition([10_000, 3], 4, [1, 2, 3, 4])
    b = plan_partition([10_000, 3], 4, [0.5, 1.0, 1.5, 2.0])
    assert a.bounds == b.bounds


def test_more_shards_than_elements() -> None:
    plan = plan_partition([5], 7, align=1)
    assert plan.sizes == (0, 1, 1, 0, 1, 1, 1)
    aligned = plan_partition([100], 4, align=64)
    assert aligned.bounds == ((0, 0), (0, 0), (0, 64), (64, 100))
    empty = plan_partition([0, 0], 3)
    assert empty.sizes == (0, 0, 0) and empty.slices_for(1) == []


@pytest.mark.parametrize("n_shards", SHARD_COUNTS)
@pytest.mark.parametrize("numels", LAYOUTS)
def test_slices_reconstruct_every_tensor(numels: list[int], n_shards: int) -> None:
    gen = torch.Generator().manual_seed(n_shards)
    tensors = [torch.randn(n, generator=gen) for n in numels]
    plan = plan_partition(numels, n_shards, align=8)
    flat = flatten(tensors)
    rebuilt = [torch.zeros(n) for n in numels]
    for shard in range(n_shards):
        start, end = plan.bounds[shard]
        piece = plan.extract(tensors, shard)
        assert torch.equal(piece, flat[start:end])
        covered = sum(s.end - s.start for s in plan.slices_for(shard))
        assert covered == end - start
        for s in plan.slices_for(shard):
            assert 0 <= s.start < s.end <= numels[s.tensor]
        plan.assign(rebuilt, shard, piece)
    for original, copy in zip(tensors, rebuilt, strict=True):
        assert torch.equal(original, copy)


def test_shard_of_matches_bounds() -> None:
    plan = plan_partition([300, 0, 1000, 17], 7, [1, 1, 3, 0.2, 2, 1, 1], align=16)
    for index in range(plan.total):
        start, end = plan.bounds[plan.shard_of(index)]
        assert start <= index < end
    with pytest.raises(IndexError):
        plan.shard_of(plan.total)
    with pytest.raises(IndexError):
        plan.slices_for(7)


def test_flatten_unflatten_mixed_dtypes() -> None:
    tensors = [torch.arange(6, dtype=torch.float16).view(2, 3), torch.ones(0), torch.full((4,), 2.5)]
    flat = flatten(tensors)
    assert flat.dtype == torch.float32 and flat.tolist() == [0, 1, 2, 3, 4, 5, 2.5, 2.5, 2.5, 2.5]
    targets = [torch.zeros(2, 3, dtype=torch.float16), torch.ones(0), torch.zeros(4)]
    unflatten_into(flat * 2, targets)
    assert targets[0].tolist() == [[0, 2, 4], [6, 8, 10]] and targets[2].tolist() == [5.0] * 4
    with pytest.raises(ValueError):
        unflatten_into(flat[:-1], targets)


@pytest.mark.parametrize(
    ("numels", "n_shards", "weights", "align"),
    [
        ([10], 0, None, 64),
        ([10], -1, None, 64),
        ([10], 2.0, None, 64),
        ([10], True, None, 64),
        ([-1, 5], 2, None, 64),
        ([1.5], 2, None, 64),
        ([10], 2, [1.0], 64),
        ([10], 2, [1.0, 0.0], 64),
        ([10], 2, [1.0, -2.0], 64),
        ([10], 2, [1.0, float("nan")], 64),
        ([10], 2, [1.0, float("inf")], 64),
        ([10], 2, [1.0, "2"], 64),
        ([10], 2, None, 0),
    ],
)
def test_bad_input_is_config_error(numels: list, n_shards: object, weights: object, align: int) -> None:
    with pytest.raises(ConfigError):
        plan_partition(numels, n_shards, weights, align=align)  # type: ignore[arg-type]


def test_tensor_mismatch_is_refused() -> None:
    plan = plan_partition([4, 4], 2, align=1)
    with pytest.raises(ValueError):
        plan.extract([torch.zeros(4)], 0)
    with pytest.raises(ValueError):
        plan.assign([torch.zeros(4), torch.zeros(4)], 0, torch.zeros(3))
