"""The owner's side of a round without a network or a round: contributions arriving chunk by chunk into a
:class:`ShardOwner`, its average against the naive oracle (bit for bit: the owner computes exactly
``collectives.reference.weighted_average``), the early per-chunk path, left-out contributors, the update and
the encoded result every member gathers."""

from __future__ import annotations

import random

import pytest
import torch

from legion_swarm.codecs import decode, from_wire, get_codec
from legion_swarm.collectives import wire
from legion_swarm.collectives.buffers import BufferPool
from legion_swarm.collectives.owner import ShardOwner
from legion_swarm.collectives.partition import chunk_bounds
from legion_swarm.collectives.reference import weighted_average

CHUNK = 256
SIZE = 1000  # four chunks, the last short
WEIGHTS = [1.0, 2.5, 0.75, 1.0, 3.0]


def contributions(n: int, size: int = SIZE, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=gen) for _ in range(n)]


def owner_of(rank: int, values: list[torch.Tensor], *, codec: str | None = None) -> ShardOwner:
    return ShardOwner(
        rank=rank, group_size=len(values), own=values[rank], weight=WEIGHTS[rank], chunk_elems=CHUNK,
        gather_codec=None if codec is None else get_codec(codec), buffers=BufferPool(),
    )  # fmt: skip


def deliver(owner: ShardOwner, rank: int, values: torch.Tensor, chunks: list[tuple[int, int]] | None = None) -> None:
    """``rank``'s contribution as a round receives it: the buffer first, then chunk by chunk."""
    buffer = owner.start(rank, WEIGHTS[rank])
    for offset, length in chunk_bounds(values.numel(), CHUNK) if chunks is None else chunks:
        buffer[offset : offset + length] = values[offset : offset + length]
        owner.add_chunk(rank, offset, length)


def oracle(values: list[torch.Tensor], ranks: list[int]) -> torch.Tensor:
    return weighted_average([(values[r], WEIGHTS[r]) for r in sorted(ranks)])


@pytest.mark.parametrize("n", [2, 3, 5])
def test_the_average_of_every_contribution_is_the_oracle_bit_for_bit_and_done_early(n: int) -> None:
    values = contributions(n, seed=n)
    owner = owner_of(1, values)
    others = [r for r in range(n) if r != 1]
    # Interleaved, as channels deliver them: chunk by chunk across members, in a shuffled member order.
    rng = random.Random(n)
    buffers = {r: owner.start(r, WEIGHTS[r]) for r in others}
    for offset, length in chunk_bounds(SIZE, CHUNK):
        for r in rng.sample(others, len(others)):
            buffers[r][offset : offset + length] = values[r][offset : offset + length]
            owner.add_chunk(r, offset, length)
    for r in others:
        owner.complete(r)
    assert owner.averaged_early == {o for o, _ in chunk_bounds(SIZE, CHUNK)}  # every chunk averaged on arrival
    average, weight, contributors = owner.reduce()
    assert torch.equal(average, oracle(values, list(range(n))))
    assert contributors == tuple(range(n)) and weight == sum(WEIGHTS[:n])


def test_a_member_left_out_midway_is_not_averaged_and_the_early_average_is_recomputed() -> None:
    n, left = 4, 2
    values = contributions(n, seed=7)
    owner = owner_of(0, values)
    deliver(owner, 1, values[1])
    deliver(owner, 3, values[3])
    half = chunk_bounds(SIZE, CHUNK)[:2]
    deliver(owner, left, values[left], half)  # the first half of its chunks: those are averaged early
    assert owner.averaged_early == {o for o, _ in half}
    owner.leave_out(left)  # excluded: the rest never comes
    owner.complete(1)
    owner.complete(3)
    average, weight, contributors = owner.reduce()
    assert contributors == (0, 1, 3) and weight == WEIGHTS[0] + WEIGHTS[1] + WEIGHTS[3]
    assert torch.equal(average, oracle(values, [0, 1, 3]))


def test_a_member_left_out_after_its_contribution_arrived_whole_still_counts() -> None:
    n = 3
    values = contributions(n, seed=3)
    owner = owner_of(2, values)
    deliver(owner, 0, values[0], chunk_bounds(SIZE, CHUNK)[:1])
    owner.leave_out(1)  # before any of 1's chunks: no early average from now on
    deliver(owner, 0, values[0], chunk_bounds(SIZE, CHUNK)[1:])
    deliver(owner, 1, values[1])
    owner.complete(0)
    owner.complete(1)
    assert owner.averaged_early == set()
    average, _, contributors = owner.reduce()
    assert contributors == (0, 1, 2)
    assert torch.equal(average, oracle(values, [0, 1, 2]))


def test_a_member_never_heard_from_is_left_out_and_the_owner_alone_is_its_own_average() -> None:
    values = contributions(3, seed=5)
    owner = owner_of(1, values)
    deliver(owner, 2, values[2])
    owner.complete(2)
    average, weight, contributors = owner.reduce()
    assert contributors == (1, 2) and weight == WEIGHTS[1] + WEIGHTS[2]
    assert torch.equal(average, oracle(values, [1, 2]))

    alone = owner_of(0, values[:1])
    average, weight, contributors = alone.reduce()
    assert contributors == (0,) and weight == WEIGHTS[0]
    assert torch.equal(average, oracle(values, [0]))


def test_an_empty_shard_has_one_empty_chunk_and_still_reduces() -> None:
    values = contributions(2, size=0)
    owner = owner_of(0, values)
    deliver(owner, 1, values[1])
    owner.complete(1)
    assert owner.averaged_early == {0}
    average, weight, contributors = owner.reduce()
    assert average.numel() == 0 and contributors == (0, 1) and weight == WEIGHTS[0] + WEIGHTS[1]


def decoded_chunks(owner: ShardOwner, codec: str) -> torch.Tensor:
    """What a member that gathers the owner's result decodes from its encoded chunks."""
    assert owner.result is not None
    out = torch.empty(owner.result.numel())
    chunks = chunk_bounds(out.numel(), CHUNK)
    assert len(owner.encoded) == len(chunks)
    for (header, buffers), (offset, length) in zip(owner.encoded, chunks, strict=True):
        message, _ = wire.check_chunk(header, phase="ag", shard=owner.rank, offset=offset, numel=length, codec=codec)
        enc = from_wire(message["codec"], [memoryview(b).cast("B") for b in buffers], numel=length)
        decode(enc, out=out[offset : offset + length])
    return out


@pytest.mark.parametrize("codec", ["none", "fp16", "int8"])
def test_finish_applies_the_update_and_keeps_the_bits_every_member_decodes(codec: str) -> None:
    values = contributions(3, seed=11)
    owner = owner_of(1, values, codec=codec)
    for r in (0, 2):
        deliver(owner, r, values[r])
        owner.complete(r)
    average, _, _ = owner.reduce()
    expected = oracle(values, [0, 1, 2]) * 0.5 + 1.0
    result = owner.finish(average, lambda averaged: averaged * 0.5 + 1.0)
    assert result is owner.result
    assert torch.equal(decoded_chunks(owner, codec), result)
    if codec == "none":
        assert torch.equal(result, expected)
    else:
        assert torch.allclose(result, expected, atol=0.05, rtol=0.01)


def test_finish_without_an_update_or_a_gather_keeps_the_average_and_encodes_nothing() -> None:
    values = contributions(2, seed=2)
    owner = owner_of(0, values)
    deliver(owner, 1, values[1])
    owner.complete(1)
    average, _, _ = owner.reduce()
    result = owner.finish(average)
    assert result.data_ptr() == average.data_ptr() and torch.equal(result, average) and owner.encoded == []
    # The average is the pool's buffer, reused next round: what outlives the round is a copy.
    kept = owner.detached_result()
    assert kept is not None and kept is not average and torch.equal(kept, average)


def test_an_all_gather_alone_sends_the_owners_own_values_and_its_weight_is_its_own() -> None:
    values = contributions(3, seed=4)
    owner = owner_of(2, values, codec="none")
    result = owner.finish(None)
    assert torch.equal(result, values[2]) and result.data_ptr() != values[2].data_ptr()
    assert owner.contributors == (2,) and owner.total_weight == WEIGHTS[2]
    assert torch.equal(decoded_chunks(owner, "none"), values[2])
    assert owner.detached_result() is result


def test_an_update_of_the_wrong_shape_is_a_type_error() -> None:
    values = contributions(2, seed=6)
    owner = owner_of(0, values)
    average, _, _ = owner.reduce()
    with pytest.raises(TypeError, match="update_fn must return a tensor of shape"):
        owner.finish(average, lambda averaged: averaged[:-1])


def test_contributions_from_outside_the_group_or_not_started_are_refused() -> None:
    values = contributions(3)
    owner = owner_of(0, values)
    with pytest.raises(ValueError, match="cannot contribute"):
        owner.start(0, 1.0)  # the owner's own values are not received
    with pytest.raises(ValueError, match="cannot contribute"):
        owner.start(3, 1.0)
    with pytest.raises(ValueError, match="has not started"):
        owner.add_chunk(1, 0, CHUNK)
    with pytest.raises(ValueError, match="has not started"):
        owner.complete(2)
    with pytest.raises(ValueError, match="1-D float32"):
        ShardOwner(rank=0, group_size=2, own=torch.zeros(4, dtype=torch.float64), weight=1.0, chunk_elems=CHUNK)
