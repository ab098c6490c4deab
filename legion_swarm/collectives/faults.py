"""Deterministic fault injection at named phases of a round, for tests, the simulator and chaos runs.

A :class:`FaultPlan` makes *this* member misbehave once, at one phase::

    before_send          every channel open (hellos exchanged), nothing else sent yet
    mid_reduce_scatter   half of the chunks of every contribution sent
    after_reduce         own shard reduced (and updated), result not yet sent
    mid_all_gather       own result sent in full to the first half of the other members (in rank order),
                         not to the rest: survivors disagree on having it, which the commit votes resolve

and one of three ways::

    kill     SIGKILL this process (``in_process=True``: close every channel and raise InjectedCrash)
    stall    stop reading and writing, sockets open, until this member's round deadline
    garbage  send seeded random bytes (never a valid message) on every channel still to be served

The round knows nothing of this: a round with a plan runs over a :class:`FaultyPlane`, a wrapper around its
data plane whose channels (:class:`FaultyChannel`) recognise the phases from the messages the round asks them to
send (the ``wire`` headers: the first message after the hello, the middle chunk header of a contribution, the
result header) and act the fault out there, instead of the message. Where a phase needs the member's channels in
step (``before_send``: every channel open; ``mid_all_gather``: the first half served in full), the wrapper waits
for it before the message. Without a plan the round talks to its plane directly: no check anywhere.

A stalled member's channels block every read and write, and the closes its round asks for (it excludes the
members it no longer hears from) wait until the round ends: at its deadline it raises ``RoundTimeoutError``. A
fault needs a channel to act on: a group of one member never fires one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from legion_swarm.codecs.base import wire_layout
from legion_swarm.errors import ConfigError, NetworkError
from legion_swarm.groups.info import GroupInfo
from legion_swarm.groups.partition import chunk_bounds
from legion_swarm.transport.dataplane import Channel, DataPlane, Inbox
from legion_swarm.transport.identity import Identity
from legion_swarm.transport.record_layer import BytesLike

logger = logging.getLogger(__name__)

PHASES = ("before_send", "mid_reduce_scatter", "after_reduce", "mid_all_gather")
KINDS = ("kill", "stall", "garbage")


class InjectedCrash(Exception):
    """Raised out of a round whose member was 'killed' in-process by a :class:`FaultPlan`."""


@dataclass(frozen=True, kw_only=True)
class FaultPlan:
    phase: str
    """One of :data:`PHASES`."""
    kind: str
    """One of :data:`KINDS`."""
    seed: int = 0
    """Seeds the garbage bytes."""
    in_process: bool = False
    """``kill`` simulates the crash (channels closed, InjectedCrash) instead of killing the process."""

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ConfigError(f"bad fault phase {self.phase!r}: expected one of {', '.join(PHASES)}")
        if self.kind not in KINDS:
            raise ConfigError(f"bad fault kind {self.kind!r}: expected one of {', '.join(KINDS)}")


class FaultyPlane:
    """A member's data plane for one round with ``plan`` injected: what the round uses of a :class:`DataPlane`
    (``identity``, ``connect``, ``expect``, ``close_later``), with every channel wrapped in a
    :class:`FaultyChannel`. It holds the plan's state for the round: whether it fired, the garbage RNG, which
    channels are open and which members got the whole result."""

    def __init__(
        self, plane: DataPlane, plan: FaultPlan, *, group: GroupInfo, sizes: Sequence[int], chunk_elems: int,
        connect_timeout_s: float,
    ) -> None:  # fmt: skip
        """``sizes``: elements of each rank's shard (the round's partition); ``chunk_elems``: the round's chunk
        size (they locate the middle chunk of a contribution and the end of a result); ``connect_timeout_s``:
        the round's connect phase, the longest ``before_send`` waits for every channel to open."""
        self.plane, self.plan, self.group = plane, plan, group
        self.rank = group.rank_of(plane.identity.peer_id)
        self.sizes, self.chunk_elems = tuple(sizes), chunk_elems
        self.connect_timeout_s = connect_timeout_s
        self.fired = self.stalled = False
        self.rng = random.Random(plan.seed)
        others = [r for r in range(group.size) if r != self.rank]
        self._connecting = set(others)  # ranks whose channel is neither open (hellos exchanged) nor given up
        self._all_connected = asyncio.Event()
        self._connect_deadline = asyncio.get_running_loop().time() + connect_timeout_s
        half = len(others) // 2 if len(others) > 1 else 0
        self.first_half = frozenset(others[:half])
        """The members that get the whole result before a ``mid_all_gather`` fault acts towards the rest."""
        self._first_half_left = set(self.first_half)
        self._first_half_served = asyncio.Event()
        self._deferred: list[Channel] = []  # closes a stalled member holds back until its round ends
        if not others:
            self._all_connected.set()
        if not self._first_half_left:
            self._first_half_served.set()

    @property
    def identity(self) -> Identity:
        return self.plane.identity

    # ---------------------------------------------------------------------------------- the plane's API

    async def connect(self, peer_id: str, route: bytes, **options: Any) -> FaultyChannel:
        rank = self.group.rank_of(peer_id)
        try:
            channel = await self.plane.connect(peer_id, route, **options)
        except BaseException:
            self.gone(rank)
            raise
        return FaultyChannel(channel, rank, self)

    @contextlib.asynccontextmanager
    async def expect(self, route: bytes) -> AsyncIterator[FaultyInbox]:
        """The plane's ``expect``; the connect phase's clock starts here, with the round. A stalled member's round
        does not end when its phases do: it waits here, silent, until its deadline cancels it."""
        self._connect_deadline = asyncio.get_running_loop().time() + self.connect_timeout_s
        try:
            async with self.plane.expect(route) as inbox:
                yield FaultyInbox(inbox, self)
                if self.stalled:
                    await asyncio.Event().wait()
        finally:
            for channel in self._deferred:
                self.plane.close_later(channel)
            self._deferred.clear()

    def close_later(self, channel: Channel) -> None:
        inner = channel.inner if isinstance(channel, FaultyChannel) else channel
        if isinstance(channel, FaultyChannel):
            self.gone(channel.rank)
        if self.stalled:
            self._deferred.append(inner)  # sockets stay open: the peers must see silence, not a close
        else:
            self.plane.close_later(inner)

    # -------------------------------------------------------------------------------------- the plan

    async def checkpoint(self) -> None:
        """Before any read or write: a stalled member goes silent here until its round is cancelled."""
        if self.stalled:
            await asyncio.Event().wait()

    def garbage(self) -> bytes:
        """1-512 random bytes, starting with 0xC1 (a byte msgpack never uses), so never a valid message."""
        return b"\xc1" + self.rng.randbytes(self.rng.randrange(0, 512))

    async def act(self, phase: str) -> bool:
        """The fault, if ``phase`` is the planned one: kill and stall act here (once), garbage returns True
        (every time: the caller sends garbage instead of its message)."""
        if phase != self.plan.phase:
            return False
        if not self.fired:
            self.fired = True
            logger.info("rank %d: injecting %s at %s", self.rank, self.plan.kind, phase)
            if self.plan.kind == "kill" and not self.plan.in_process:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.plan.kind == "stall":
                self.stalled = True
        if self.plan.kind == "kill":
            raise InjectedCrash(f"rank {self.rank}: crash injected at {phase}")
        await self.checkpoint()
        return self.plan.kind == "garbage"

    # ------------------------------------------------------------------------- keeping channels in step

    def connected(self, rank: int) -> None:
        """``rank``'s channel is open (hellos exchanged) or given up."""
        self._connecting.discard(rank)
        if not self._connecting:
            self._all_connected.set()

    def gone(self, rank: int) -> None:
        """``rank``'s channel failed or closed: it is done connecting, and done being served."""
        self.connected(rank)
        self.served(rank)

    async def all_connected(self) -> None:
        """Until every channel is open or given up, or the connect phase is over."""
        remaining = self._connect_deadline - asyncio.get_running_loop().time()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, remaining)):
                await self._all_connected.wait()

    def served(self, rank: int) -> None:
        """``rank`` got the whole result (or its channel is gone)."""
        if rank in self._first_half_left:
            self._first_half_left.discard(rank)
            if not self._first_half_left:
                self._first_half_served.set()

    async def first_half_served(self) -> None:
        await self._first_half_served.wait()

    def is_middle_chunk(self, shard: int, offset: int) -> bool:
        """Whether the chunk of ``shard`` at ``offset`` is the one half way through a contribution (never the
        first: a contribution of one chunk is sent whole)."""
        index, count = offset // self.chunk_elems, len(chunk_bounds(self.sizes[shard], self.chunk_elems))
        return index == count // 2 and index > 0

    def n_buffers(self, shard: int, offset: int, codec_header: bytes) -> int:
        """How many buffer messages follow the chunk header of ``shard`` at ``offset``."""
        length = max(0, min(self.chunk_elems, self.sizes[shard] - offset))
        return len(wire_layout(codec_header, numel=length)[1])

    def result_chunks(self) -> int:
        return len(chunk_bounds(self.sizes[self.rank], self.chunk_elems))


class FaultyInbox:
    """The plane's inbox for the round, handing out wrapped channels."""

    def __init__(self, inbox: Inbox, plane: FaultyPlane) -> None:
        self.inbox, self.plane = inbox, plane

    async def get(self) -> Channel:
        channel = await self.inbox.get()
        peer_id = channel.remote_peer_id
        ranks = [r for r, m in enumerate(self.plane.group.members) if m.peer_id == peer_id]
        # A channel from outside the group is refused by the round; it needs no wrapping (rank -1: not tracked).
        return FaultyChannel(channel, ranks[0], self.plane) if ranks else channel


class FaultyChannel:
    """A channel of a round with a fault plan: it follows the stream the round sends on it (the hello, then control
    messages, each chunk header followed by the buffers it declares) to tell where in the round it is."""

    def __init__(self, inner: Channel, rank: int, plane: FaultyPlane) -> None:
        self.inner, self.rank, self.plane = inner, rank, plane
        self.local_peer_id, self.remote_peer_id = inner.local_peer_id, inner.remote_peer_id
        self._sent = self._received = 0  # messages
        self._buffers_left = 0  # buffer messages still due after the last chunk header
        self._result_chunks_left = 0  # chunks of the result still to send to this peer
        self._reduced = False  # the result (or, without an all-gather, the vote) is on its way

    @property
    def closed(self) -> bool:
        return self.inner.closed

    async def send(self, data: BytesLike) -> None:
        await self.plane.checkpoint()
        if self._buffers_left:  # a buffer of the last chunk
            await self._forward(data)
            self._buffers_left -= 1
            if not self._buffers_left:
                self._chunk_sent()
            return
        if not self._sent:  # the hello
            return await self._forward(data)
        message = msgpack.unpackb(bytes(data))
        if await self._fault_before(message):
            await self.inner.send(self.plane.garbage())
            raise NetworkError("sent garbage (injected fault): the peer will drop this channel")
        await self._forward(data)
        if message["t"] == "chunk":
            shard, offset = message["shard"], message["offset"]
            self._buffers_left = self.plane.n_buffers(shard, offset, message["codec"])
            if not self._buffers_left:
                self._chunk_sent()

    async def _fault_before(self, message: dict[str, Any]) -> bool:
        """Act the fault out if this control message marks its phase; True: send garbage instead of it."""
        plane = self.plane
        phases: list[str] = []
        if self._sent == 1:  # the first message after the hello
            await plane.all_connected()
            phases.append("before_send")
        kind = message["t"]
        if kind == "chunk" and message["phase"] == "rs" and plane.is_middle_chunk(message["shard"], message["offset"]):
            phases.append("mid_reduce_scatter")
        if kind in ("result", "vote") and not self._reduced:
            self._reduced = True
            phases.append("after_reduce")
        if kind == "result":
            self._result_chunks_left = plane.result_chunks()
            if plane.plan.phase == "mid_all_gather" and self.rank not in plane.first_half:
                await plane.first_half_served()
                phases.append("mid_all_gather")
        garbage = False
        for phase in phases:  # at most one is the planned phase
            # Garbage after the reduce replaces the result; a vote (a round without an all-gather) goes out as it is.
            garbage |= await plane.act(phase) and (phase != "after_reduce" or kind == "result")
        return garbage

    def _chunk_sent(self) -> None:
        if self._result_chunks_left:
            self._result_chunks_left -= 1
            if not self._result_chunks_left:
                self.plane.served(self.rank)

    async def _forward(self, data: BytesLike) -> None:
        try:
            await self.inner.send(data)
        except BaseException:
            self.plane.gone(self.rank)
            raise
        self._sent += 1

    async def recv(self, max_bytes: int) -> bytes:
        await self.plane.checkpoint()
        try:
            return await self.inner.recv(max_bytes)
        finally:
            self._on_recv()

    async def recv_into(self, buffer: BytesLike) -> int:
        await self.plane.checkpoint()
        try:
            return await self.inner.recv_into(buffer)
        finally:
            self._on_recv()

    def _on_recv(self) -> None:
        self._received += 1
        if self._received == 1:  # the peer's hello (or the end of the channel): open or gone, either way connected
            self.plane.connected(self.rank)

    async def aclose(self) -> None:
        self.plane.gone(self.rank)
        await self.inner.aclose()
