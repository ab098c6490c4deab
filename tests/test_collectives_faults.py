"""The fault wrapper alone, without a network: :class:`FaultyPlane` and its channels recognise a round's phases
from the messages they are asked to send, act the fault out there, and pass everything else through as it is
(the end-to-end fault tests are in test_collectives.py and test_collectives_procs.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import torch

from legion_swarm.codecs import get_codec, to_wire
from legion_swarm.collectives import wire
from legion_swarm.collectives.faults import FaultPlan, FaultyChannel, FaultyPlane, InjectedCrash
from legion_swarm.collectives.partition import chunk_bounds
from legion_swarm.errors import NetworkError
from legion_swarm.groups import GroupInfo, GroupMember

CHUNK = 4
SIZES = (10, 10, 10, 10)  # three chunks per shard: the middle one is at offset 4
PEERS = ("p0", "p1", "p2", "p3")


@dataclass
class FakeChannel:
    remote_peer_id: str
    local_peer_id: str = "p1"
    sent: list[bytes] = field(default_factory=list)
    closed: bool = False

    async def send(self, data: object) -> None:
        self.sent.append(bytes(data))  # type: ignore[call-overload]

    async def recv(self, max_bytes: int) -> bytes:
        return b"hello"

    async def recv_into(self, buffer: object) -> int:
        return 0

    async def aclose(self) -> None:
        self.closed = True


@dataclass
class FakePlane:
    identity: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(peer_id="p1"))
    closed: list[FakeChannel] = field(default_factory=list)

    def close_later(self, channel: FakeChannel) -> None:
        self.closed.append(channel)


def faulty_plane(phase: str, kind: str) -> tuple[FaultyPlane, dict[int, FaultyChannel]]:
    group = GroupInfo(round_id=b"r" * 16, members=tuple(GroupMember(peer_id=p) for p in PEERS))
    plan = FaultPlan(phase=phase, kind=kind, in_process=True)
    plane = FaultyPlane(FakePlane(), plan, group=group, sizes=SIZES, chunk_elems=CHUNK, connect_timeout_s=1.0)  # type: ignore[arg-type]
    channels = {r: FaultyChannel(FakeChannel(PEERS[r]), r, plane) for r in (0, 2, 3)}  # type: ignore[arg-type]
    return plane, channels


async def open_all(channels: dict[int, FaultyChannel]) -> None:
    for channel in channels.values():
        await channel.send(wire.hello(b"g" * 8, 1, []))
        await channel.recv(100)


def chunk_messages(phase: str, shard: int, values: torch.Tensor, weight: float | None) -> list[bytes]:
    messages = []
    for offset, length in chunk_bounds(values.numel(), CHUNK):
        header, buffers = to_wire(get_codec("none").encode(values[offset : offset + length]))
        messages.append(wire.chunk_header(phase, shard, offset, header, weight))
        messages.extend(bytes(b) for b in buffers)
    return messages


async def send_all(channel: FaultyChannel, messages: list[bytes]) -> int:
    """Send until the channel refuses; how many went through."""
    for i, message in enumerate(messages):
        try:
            await channel.send(message)
        except NetworkError:
            return i
    return len(messages)


async def test_garbage_mid_reduce_scatter_replaces_the_middle_chunk_header_of_every_contribution() -> None:
    plane, channels = faulty_plane("mid_reduce_scatter", "garbage")
    await open_all(channels)
    for rank, channel in channels.items():
        messages = chunk_messages("rs", rank, torch.arange(10.0), 1.0)
        assert await send_all(channel, messages) == 2  # chunk 0's header and its one buffer
        inner = channel.inner
        assert isinstance(inner, FakeChannel)
        assert inner.sent[1:3] == messages[:2] and inner.sent[3][:1] == b"\xc1" and len(inner.sent) == 4
    assert plane.fired and not plane.stalled


async def test_without_the_planned_phase_every_message_passes_as_it_is() -> None:
    plane, channels = faulty_plane("mid_all_gather", "kill")
    await open_all(channels)
    for rank, channel in channels.items():
        messages = chunk_messages("rs", rank, torch.arange(10.0), 1.0)
        messages += [wire.vote(1, frozenset()), wire.vote(2, frozenset())]
        assert await send_all(channel, messages) == len(messages)
        inner = channel.inner
        assert isinstance(inner, FakeChannel) and inner.sent[1:] == messages
    assert not plane.fired


async def test_a_kill_after_the_reduce_acts_at_the_first_result_before_any_of_it_is_sent() -> None:
    plane, channels = faulty_plane("after_reduce", "kill")
    await open_all(channels)
    with pytest.raises(InjectedCrash):
        await channels[0].send(wire.result_header(1, [0, 1, 2, 3], 4.0))
    inner = channels[0].inner
    assert isinstance(inner, FakeChannel) and len(inner.sent) == 1 and plane.fired


async def test_mid_all_gather_serves_the_first_half_in_full_before_the_fault_acts_on_the_rest() -> None:
    plane, channels = faulty_plane("mid_all_gather", "garbage")
    await open_all(channels)
    result = [wire.result_header(1, [0, 1, 2, 3], 4.0), *chunk_messages("ag", 1, torch.arange(10.0), None)]
    assert plane.first_half == {0}
    later = asyncio.create_task(send_all(channels[2], result))
    await asyncio.sleep(0.01)
    assert not later.done()  # waits for rank 0 to have the whole result
    assert await send_all(channels[0], result) == len(result)
    assert await later == 0 and await send_all(channels[3], result) == 0
