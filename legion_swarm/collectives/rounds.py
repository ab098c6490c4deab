"""One collective round of a group: reduce-scatter → owner update → all-gather → commit.

A group of G members (ordered; rank ``s`` owns shard ``s`` of the partition plan) runs, per member::

    connect     the lower rank of each pair opens a channel, both send a hello (group digest, rank, setup)
    reduce      send shard s of my tensors, chunk by chunk, to its owner s; receive every member's chunks of
                my shard and decode them as they arrive. At the phase deadline (or once all are in) I alone
                fix my shard's contributor set: me plus every member whose contribution arrived complete
                and valid. Average in rank order (collectives.reference), then ``update_fn``.
    gather      send my result (contributor list, then chunks) to every member; receive theirs into staging
                buffers. The result is encoded once and I keep its *decoded* value, so all hold the same bits.
    commit      two vote exchanges of broken links ("edges"): (1) the members I excluded or lack the result
                of, (2) the union of the stage-1 edges I heard. Every member computes the same set of faulty
                members from the edges (:func:`faulty_members`) and drops their shards: everyone's tensors keep
                those shards' pre-round values. Two stages make the edge set identical on every survivor
                whenever at most one member fails (crash, stall or garbage) during the round: a faulty member's
                stage-1 vote either reached some survivor, which relays it in stage 2, or reached nobody, and
                its stage-2 vote is only heard by members that also heard its stage-1 vote. A member that
                lacks a shard has an edge to its owner, so one of the two is declared faulty: no survivor is
                ever asked to commit a shard it does not have.

Failures come back as values: a member that dies, stalls or sends anything invalid is excluded for the round
(its channel closed, the reason logged), its contribution is left out by the owners that had not received it
whole, and its shard is missing. Every wait has a deadline (``CollectiveConfig``), so a round ends by
``round_timeout_s`` whatever the others do. Only a bug in ``update_fn`` or an injected crash raises.

What the round does is a frozen :class:`RoundSpec` (reduce and/or gather, weight, output, ``update_fn`` or
``relay``, the relay's timeout). The round drives the protocol (channels, deadlines, votes); the owner's side of
it (contributions to this member's shard, their average, the update and the encoded result) is a
:class:`~legion_swarm.collectives.owner.ShardOwner` it feeds as chunks arrive. A round with a fault plan runs
the same code over a :class:`~legion_swarm.collectives.faults.FaultyPlane`.

Memory per member, beyond the caller's tensors: the (G-1) decoded contributions to its shard and the staging
buffers of the other shards, together about one model's worth of float32.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
import torch

from legion_swarm.codecs import Codec, Encoded, ErrorFeedback, decode, from_wire, get_codec, to_wire
from legion_swarm.collectives import wire
from legion_swarm.collectives.buffers import BufferPool
from legion_swarm.collectives.faults import FaultPlan, FaultyChannel, FaultyInbox, FaultyPlane, InjectedCrash
from legion_swarm.collectives.owner import ShardOwner
from legion_swarm.collectives.partition import chunk_bounds, group_plan
from legion_swarm.collectives.result import RoundResult, edge, faulty_members
from legion_swarm.config import CollectiveConfig
from legion_swarm.errors import CodecError, NetworkError, ProtocolError, RoundTimeoutError
from legion_swarm.groups.info import GroupInfo
from legion_swarm.transport.dataplane import Channel, DataPlane, Inbox
from legion_swarm.transport.identity import short_peer_id
from legion_swarm.transport.record_layer import BytesLike
from legion_swarm.transport.secure import SecureChannel

logger = logging.getLogger(__name__)

UpdateFn = Callable[[int, torch.Tensor], torch.Tensor]
"""``update_fn(shard, averaged) -> new values``: runs on the owner with its averaged shard (1-D float32)."""
Relay = Callable[[torch.Tensor, float], Awaitable[torch.Tensor]]
"""``await relay(averaged, weight) -> new values``: instead of ``update_fn``, the owner hands its averaged shard
and the weight behind it on (a hierarchical round averages it across groups) and sends what comes back."""

_GRACE_S = 1.0  # past the last phase deadline, before a round is declared hung


@dataclass(frozen=True, kw_only=True)
class RoundSpec:
    """What one round does, the same on every member of the group (``reduce``, ``gather``, ``relay_timeout_s``)
    or this member's own (its ``weight``, ``out``, ``update_fn`` or ``relay``)."""

    reduce: bool = True
    """Reduce-scatter: average every member's contribution to each shard on its owner."""
    gather: bool = True
    """All-gather: every member receives every owner's result into ``out``."""
    weight: float = 1.0
    """This member's contribution's weight (e.g. its sample count), in (0, ``wire.MAX_WEIGHT``]; 1 without reduce."""
    out: tuple[torch.Tensor, ...] | None = None
    """Where the gathered results go (CPU float32, the sizes of the round's tensors); None: the tensors themselves."""
    update_fn: UpdateFn | None = None
    """Maps the owner's averaged shard to its new values (None: the average itself)."""
    relay: Relay | None = None
    """Instead of ``update_fn``: hands the averaged shard on and sends what comes back (hierarchical rounds)."""
    relay_timeout_s: float = 0.0
    """How long an owner may spend in ``relay``; it extends the all-gather's deadlines (every member alike)."""

    def __post_init__(self) -> None:
        if self.reduce and not (isinstance(self.weight, (int, float)) and 0 < self.weight <= wire.MAX_WEIGHT):
            raise ValueError(f"weight must be a number in (0, {wire.MAX_WEIGHT:g}], got {self.weight!r}")
        if not (isinstance(self.relay_timeout_s, (int, float)) and 0 <= self.relay_timeout_s < float("inf")):
            raise ValueError(f"relay_timeout_s must be a finite number >= 0, got {self.relay_timeout_s!r}")
        if not (self.reduce or self.gather):
            raise ValueError("a round reduces, gathers, or both")

    @property
    def contribution_weight(self) -> float:
        """The weight this member's own values carry: ``weight``, or 1 for an all-gather alone."""
        return float(self.weight) if self.reduce else 1.0


@dataclass(eq=False)
class _Peer:
    rank: int
    channel: Channel | None = None
    incoming: asyncio.Future[Channel] | None = None
    excluded: str | None = None
    result: tuple[tuple[int, ...], float] | None = None  # (contributors, weight) of its shard, once received whole
    staging: torch.Tensor | None = None
    votes: dict[int, frozenset[wire.Edge]] = field(default_factory=dict)
    done: dict[str, asyncio.Event] = field(
        default_factory=lambda: {phase: asyncio.Event() for phase in ("connect", "reduce", "gather", "vote1", "vote2")}
    )
    sent_encodings: list[tuple[object, Encoded]] = field(default_factory=list)
    plane: str = "-"


class Round:
    """The state of one round for one member; :meth:`run` it once.

    ``faults``: a plan to act out (tests, chaos runs): the round then talks to a :class:`FaultyPlane` around
    ``plane`` and runs the same code. ``error_feedback`` and ``buffers`` outlive the round (see
    :class:`~legion_swarm.collectives.api.Collectives`)."""

    def __init__(
        self, plane: DataPlane, group: GroupInfo, tensors: Sequence[torch.Tensor], spec: RoundSpec, *,
        config: CollectiveConfig, faults: FaultPlan | None = None, error_feedback: ErrorFeedback | None = None,
        buffers: BufferPool | None = None,
    ) -> None:  # fmt: skip
        self.group, self.config, self.spec = group, config, spec
        self.rank = group.rank_of(plane.identity.peer_id)
        self.tensors = list(tensors)
        self.out = self.tensors if spec.out is None else list(spec.out)
        _check_tensors(self.tensors, self.out)
        self.plan = group_plan(group, [t.numel() for t in self.tensors])
        self.plane: DataPlane | FaultyPlane = plane
        if faults is not None:
            self.plane = FaultyPlane(
                plane, faults, group=group, sizes=self.plan.sizes, chunk_elems=config.chunk_elems,
                connect_timeout_s=config.connect_timeout_s,
            )  # fmt: skip
        self.codec: Codec = get_codec(config.codec, **config.codec_options(config.codec))
        gather_name = config.resolved_gather_codec
        gather_codec: Codec = get_codec(gather_name, **config.codec_options(gather_name))
        self.gather_codec_name = gather_codec.name
        self.ef = error_feedback if error_feedback is not None and not self.codec.lossless else None
        self.buffers = buffers if buffers is not None else BufferPool()
        self.owner = ShardOwner(
            rank=self.rank, group_size=group.size, own=self.plan.shard_values(self.tensors, self.rank),
            weight=spec.contribution_weight, chunk_elems=config.chunk_elems,
            gather_codec=gather_codec if spec.gather else None, buffers=self.buffers,
        )  # fmt: skip
        self.restored_before: frozenset[object] = frozenset()  # residual keys restored by the previous round
        self.restored: set[object] = set()
        # Everything members must share beyond the group itself; tensor sizes as a digest of the partition.
        layout = hashlib.sha256(msgpack.packb([list(self.plan.numels), list(self.plan.bounds)])).digest()[:8]
        self.setup = [config.codec, gather_name, config.chunk_elems, spec.reduce, spec.gather, layout]
        self.peers = {r: _Peer(r) for r in range(group.size) if r != self.rank}
        self.tag = f"[{short_peer_id(plane.identity.peer_id)}/{group.round_id.hex()[:8]}]"
        self.result_ready = asyncio.Event()
        self.vote_ready = {1: asyncio.Event(), 2: asyncio.Event()}
        self.my_votes: dict[int, frozenset[wire.Edge]] = {}
        self.dropped: frozenset[int] = frozenset()
        self.edges: frozenset[wire.Edge] = frozenset()
        self.timings: dict[str, float] = {}
        self.bytes_sent = self.bytes_received = 0  # message payloads, before channel framing / encryption
        self.t0 = 0.0
        self.deadline: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------ driver

    async def run(self) -> RoundResult:
        loop = asyncio.get_running_loop()
        self.t0 = t = loop.time()
        c = self.config
        for phase, length in (
            ("connect", c.connect_timeout_s), ("reduce", c.reduce_timeout_s),
            ("gather", c.gather_timeout_s + self.spec.relay_timeout_s),
            ("vote1", c.commit_timeout_s / 2), ("vote2", c.commit_timeout_s / 2),
        ):  # fmt: skip
            t += length
            self.deadline[phase] = t
        for peer in self.peers.values():
            if peer.rank < self.rank:
                peer.incoming = loop.create_future()
        try:
            async with asyncio.timeout_at(t + _GRACE_S):
                async with self.plane.expect(self.group.round_id + self.group.digest[:8]) as inbox:
                    async with asyncio.TaskGroup() as tasks:
                        if any(p.rank < self.rank for p in self.peers.values()):
                            tasks.create_task(self._accept(inbox))
                        for peer in self.peers.values():
                            tasks.create_task(self._session(peer))
                        await self._coordinate()
        except TimeoutError:
            raise RoundTimeoutError(f"{self.tag} round overran its {c.round_timeout_s:.1f} s deadline") from None
        except BaseExceptionGroup as group:
            crash = group.subgroup(InjectedCrash)
            if crash is not None:
                raise _leaves(crash)[0] from None
            errors = _leaves(group)
            if len(errors) == 1:  # a bug (e.g. in update_fn): raise it as it is, not wrapped in task groups
                raise errors[0] from None
            raise
        finally:
            await self._close_all()
        return self._commit()

    async def _coordinate(self) -> None:
        spec, owner = self.spec, self.owner
        await self._wait_all("reduce")
        self._mark("reduce_scatter")
        averaged = owner.reduce()[0] if spec.reduce else None
        if averaged is not None and spec.relay is not None and averaged.numel():
            averaged = await spec.relay(averaged, owner.total_weight)
            self._mark("relay")
        update_fn = None if spec.relay is not None else spec.update_fn
        owner.finish(averaged, None if update_fn is None else lambda values: update_fn(self.rank, values))
        self._mark("update")
        self.result_ready.set()
        await self._wait_all("gather")
        self._mark("all_gather")
        edges = frozenset(
            edge(self.rank, p.rank)
            for p in self.peers.values()
            if p.excluded is not None or (spec.gather and p.result is None)
        )
        for stage in (1, 2):
            self.my_votes[stage] = edges
            self.vote_ready[stage].set()
            await self._wait_all(f"vote{stage}")
            for peer in self.peers.values():
                edges |= peer.votes.get(stage, frozenset())
        self.edges = edges
        self.dropped = faulty_members(edges) if spec.gather else frozenset()
        self._mark("commit")

    async def _wait_all(self, phase: str) -> None:
        """Until every peer is past ``phase`` (or excluded), or the phase deadline; stragglers are excluded."""
        waits = [p.done[phase].wait() for p in self.peers.values()]
        remaining = self.deadline[phase] - asyncio.get_running_loop().time()
        if waits:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, remaining)):
                    await asyncio.gather(*waits)
        for peer in self.peers.values():
            if not peer.done[phase].is_set():
                self._exclude(peer, f"{phase} deadline passed")

    def _mark(self, phase: str) -> None:
        self.timings[phase] = asyncio.get_running_loop().time() - self.t0

    # ------------------------------------------------------------------------------------------ connect

    async def _accept(self, inbox: Inbox | FaultyInbox) -> None:
        """Hand channels opened by lower ranks to their sessions; refuse anyone else."""
        waiting = {p.rank for p in self.peers.values() if p.rank < self.rank}
        while waiting:
            try:
                async with asyncio.timeout_at(self.deadline["connect"]):
                    channel = await inbox.get()
            except TimeoutError:
                return  # the sessions still waiting time out on their own
            rank = next((r for r in waiting if self.group.members[r].peer_id == channel.remote_peer_id), None)
            if rank is None:
                logger.info("%s refused a channel from %s: not expected", self.tag, channel.remote_peer_id)
                await channel.aclose()
                continue
            waiting.discard(rank)
            future = self.peers[rank].incoming
            if future is not None and not future.done():
                future.set_result(channel)
            else:
                await channel.aclose()

    async def _session(self, peer: _Peer) -> None:
        loop = asyncio.get_running_loop()
        member = self.group.members[peer.rank]
        budget = self.deadline["connect"] - loop.time()
        try:
            if peer.rank > self.rank:
                peer.channel = await self.plane.connect(
                    member.peer_id, self.group.round_id + self.group.digest[:8], direct=member.direct,
                    maddrs=member.maddrs, plane=self.config.plane, timeout=max(0.01, budget),
                )  # fmt: skip
            else:
                assert peer.incoming is not None
                async with asyncio.timeout(max(0.0, budget)):
                    peer.channel = await peer.incoming
            peer.plane = _plane_name(peer.channel)
            await self._send(peer, wire.hello(self.group.digest, self.rank, self.setup), "connect")
            raw = await self._recv(peer, wire.MAX_CONTROL_BYTES, "connect")
            wire.check_hello(raw, group_digest=self.group.digest, rank=peer.rank, setup=self.setup)
        except (NetworkError, OSError, TimeoutError) as e:
            self._exclude(peer, f"connect: {e!r}")
            return
        finally:
            peer.done["connect"].set()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._sender(peer))
            tasks.create_task(self._receiver(peer))

    # ------------------------------------------------------------------------------------------ sending

    async def _sender(self, peer: _Peer) -> None:
        try:
            if self.spec.reduce:
                await self._send_contribution(peer)
            if self.spec.gather:
                await self.result_ready.wait()
                await self._send_result(peer)
            for stage in (1, 2):
                await self.vote_ready[stage].wait()
                await self._send(peer, wire.vote(stage, self.my_votes[stage]), f"vote{stage}")
        except (NetworkError, OSError, TimeoutError) as e:
            self._exclude(peer, f"send: {e!r}")

    async def _send_contribution(self, peer: _Peer) -> None:
        start, end = self.plan.bounds[peer.rank]
        data = self.plan.shard_values(self.tensors, peer.rank)
        weight = self.spec.contribution_weight
        for offset, length in chunk_bounds(end - start, self.config.chunk_elems):
            piece = data[offset : offset + length]
            if self.ef is not None:
                key = ("rs", start + offset, length)
                enc = self.ef.encode(piece, key)
                peer.sent_encodings.append((key, enc))
            else:
                enc = self.codec.encode(piece)
            header, buffers = to_wire(enc)
            await self._send(peer, wire.chunk_header("rs", peer.rank, offset, header, weight), "reduce")
            for buffer in buffers:
                await self._send(peer, buffer, "reduce")

    async def _send_result(self, peer: _Peer) -> None:
        owner = self.owner
        await self._send(peer, wire.result_header(self.rank, owner.contributors, owner.total_weight), "gather")
        for chunk_header, buffers in owner.encoded:
            await self._send(peer, chunk_header, "gather")
            for buffer in buffers:
                await self._send(peer, buffer, "gather")

    async def _send(self, peer: _Peer, data: BytesLike, phase: str) -> None:
        channel = peer.channel
        if channel is None or peer.excluded is not None:
            raise NetworkError("peer excluded")
        timeout = min(self.config.stall_timeout_s, self.deadline[phase] - asyncio.get_running_loop().time())
        async with asyncio.timeout(max(0.0, timeout)):
            await channel.send(data)
        self.bytes_sent += memoryview(data).nbytes

    # ---------------------------------------------------------------------------------------- receiving

    async def _receiver(self, peer: _Peer) -> None:
        phase = "reduce"
        try:
            if self.spec.reduce:
                await self._receive_contribution(peer)
            peer.done["reduce"].set()
            phase = "gather"
            if self.spec.gather:
                await self._receive_result(peer)
            peer.done["gather"].set()
            for stage in (1, 2):
                phase = f"vote{stage}"
                await self.vote_ready[stage].wait()  # the peer votes when its previous phase is over, as we do
                raw = await self._recv(peer, wire.MAX_CONTROL_BYTES, phase, boundary=4)
                peer.votes[stage] = wire.check_vote(raw, stage=stage, group_size=self.group.size)
                peer.done[phase].set()
        except (NetworkError, OSError, TimeoutError) as e:
            self._exclude(peer, f"{phase}: {e!r}")

    async def _receive_contribution(self, peer: _Peer) -> None:
        target: torch.Tensor | None = None  # the owner's buffer for this contribution, once its weight is known
        weight = 0.0
        for offset, length in chunk_bounds(self.plan.sizes[self.rank], self.config.chunk_elems):
            raw = await self._recv(peer, wire.MAX_CONTROL_BYTES, "reduce")
            header, layout = wire.check_chunk(
                raw, phase="rs", shard=self.rank, offset=offset, numel=length, codec=self.codec.name
            )
            if target is None:
                weight = header["weight"]
                target = self.owner.start(peer.rank, weight)
            elif header["weight"] != weight:
                raise ProtocolError(f"weight changed from {weight} to {header['weight']} within a contribution")
            await self._receive_chunk(peer, header["codec"], layout, target[offset : offset + length], "reduce")
            self.owner.add_chunk(peer.rank, offset, length)
        self.owner.complete(peer.rank)

    async def _receive_result(self, peer: _Peer) -> None:
        size = self.plan.sizes[peer.rank]
        # An owner sends its result once its own reduce-scatter is over, which may end up to a stall timeout
        # after ours (a contributor that went silent towards it only): the silence clock starts when ours
        # is over and allows for that (see _recv_timeout).
        await self.result_ready.wait()
        raw = await self._recv(peer, wire.MAX_CONTROL_BYTES, "gather", boundary=2)
        meta = wire.check_result(raw, shard=peer.rank, group_size=self.group.size)
        if not self.spec.reduce and meta[0] != (peer.rank,):
            raise ProtocolError("an all-gather result has its owner as only contributor")
        staging = self.buffers.get(f"staging/{peer.rank}", size)
        for offset, length in chunk_bounds(size, self.config.chunk_elems):
            raw = await self._recv(peer, wire.MAX_CONTROL_BYTES, "gather")
            header, layout = wire.check_chunk(
                raw, phase="ag", shard=peer.rank, offset=offset, numel=length, codec=self.gather_codec_name
            )
            await self._receive_chunk(peer, header["codec"], layout, staging[offset : offset + length], "gather")
        peer.staging, peer.result = staging, meta

    async def _receive_chunk(
        self, peer: _Peer, codec_header: bytes, layout: list[tuple[str, int]], out: torch.Tensor, phase: str
    ) -> None:
        """Receive a chunk's buffers and decode them into ``out``; raw float32 lands in ``out`` directly."""
        in_place = layout == [("float32", out.numel())]
        buffers: list[np.ndarray] = []
        for i, (dtype, length) in enumerate(layout):
            buffer = out.numpy() if in_place else self.buffers.wire(f"wire/{peer.rank}/{i}", dtype, length)
            got = await self._recv_into(peer, buffer, phase)
            if got != buffer.nbytes:
                raise ProtocolError(f"buffer of {got} bytes, expected {buffer.nbytes}")
            buffers.append(buffer)
        try:
            enc = from_wire(codec_header, [memoryview(b).cast("B") for b in buffers], numel=out.numel())
            if not in_place:
                decode(enc, out=out)
        except CodecError as e:
            if in_place:
                out.zero_()  # nothing of a rejected chunk stays anywhere
            raise ProtocolError(f"rejected chunk: {e}") from None

    async def _recv(self, peer: _Peer, max_bytes: int, phase: str, *, boundary: int = 1) -> bytes:
        channel = await self._before_recv(peer)
        async with asyncio.timeout(self._recv_timeout(phase, boundary)):
            raw = await channel.recv(max_bytes)
        self.bytes_received += len(raw)
        return raw

    async def _recv_into(self, peer: _Peer, buffer: np.ndarray, phase: str) -> int:
        channel = await self._before_recv(peer)
        async with asyncio.timeout(self._recv_timeout(phase)):
            got = await channel.recv_into(memoryview(buffer).cast("B"))
        self.bytes_received += got
        return got

    async def _before_recv(self, peer: _Peer) -> Channel:
        if peer.channel is None or peer.excluded is not None:
            raise NetworkError("peer excluded")
        return peer.channel

    def _recv_timeout(self, phase: str, boundary: int = 1) -> float:
        """Silence allowed before the next message, in stall timeouts (s), never past the phase deadline.

        Within a stream of messages: 1 s. The first message of a phase comes when the *peer's* previous phase
        ends, which may be later than ours, and the clock starts when ours ends: an owner's result comes at
        most 1 s after our reduce-scatter ends (it waited for a contributor silent towards it only): allow
        2 s. A vote comes when the peer's all-gather ends, up to 1 s + 2 s after ours (it waited 2 s for a
        result we already had): allow 4 s. Shorter windows let an honest member exclude honest peers that
        are merely waiting out a faulty one, and then survivors would no longer agree."""
        remaining = self.deadline[phase] - asyncio.get_running_loop().time()
        allowed = self.config.stall_timeout_s * boundary
        if phase == "gather" and boundary == 2:
            allowed += self.spec.relay_timeout_s  # the owner averages its shard across groups before sending it
        return max(0.0, min(allowed, remaining))

    # ------------------------------------------------------------------------------------------ endings

    def _exclude(self, peer: _Peer, reason: str) -> None:
        if peer.excluded is not None:
            return
        peer.excluded = reason
        logger.warning("%s excluded rank %d (%s) for this round: %s", self.tag, peer.rank,
                       short_peer_id(self.group.members[peer.rank].peer_id), reason)  # fmt: skip
        self.owner.leave_out(peer.rank)
        if peer.channel is not None:
            channel, peer.channel = peer.channel, None
            self.plane.close_later(channel)  # a stalled peer must not hold up the end of our round
        for event in peer.done.values():
            event.set()

    async def _close_all(self) -> None:
        channels = [p.channel for p in self.peers.values() if p.channel is not None]
        for peer in self.peers.values():
            peer.channel = None
            if peer.incoming is not None and peer.incoming.done() and not peer.incoming.cancelled():
                if peer.incoming.result() not in channels:
                    channels.append(peer.incoming.result())
        await asyncio.gather(*(c.aclose() for c in channels), return_exceptions=True)

    def _commit(self) -> RoundResult:
        gather, owner = self.spec.gather, self.owner
        committed: list[int] = []
        contributors: dict[int, tuple[int, ...]] = {}
        if not gather:  # reduce-scatter alone: this member's shard is its own business
            committed, contributors = [self.rank], {self.rank: owner.contributors}
        for shard in range(self.group.size) if gather else ():
            if shard in self.dropped:
                continue
            if shard == self.rank:
                assert owner.result is not None
                values, contributors[shard] = owner.result, owner.contributors
            else:
                peer = self.peers[shard]
                if peer.result is None or peer.staging is None:
                    continue  # only possible for a member declared faulty itself: it diverges this round
                values, contributors[shard] = peer.staging, peer.result[0]
            self.plan.assign(self.out, shard, values)
            committed.append(shard)
        self._restore_residuals(contributors)
        missing = tuple(s for s in range(self.group.size) if s not in committed) if gather else ()
        return RoundResult(
            rank=self.rank, group=self.group, plan=self.plan, committed=tuple(committed), missing_shards=missing,
            faulty=tuple(sorted(self.dropped)), contributors=contributors,
            excluded={p.rank: p.excluded for p in self.peers.values() if p.excluded},
            shard=self._reported_shard(self.rank in committed and gather),
            planes={r: p.plane for r, p in self.peers.items()}, timings=self.timings, reduced=self.spec.reduce,
            bytes_sent=self.bytes_sent, bytes_received=self.bytes_received,
        )  # fmt: skip

    def _reported_shard(self, in_out: bool) -> torch.Tensor | None:
        """This member's result for :class:`RoundResult`, which outlives the pool's buffers. Once the result is in
        ``out`` and lies in one tensor, a view of it (copying 1/G of the model per round into fresh memory was
        a tenth of a member's CPU time, page faults included); otherwise a copy where it is the pool's buffer."""
        if self.owner.result is None:
            return None
        pieces = self.plan.slices_for(self.rank)
        if in_out and len(pieces) == 1:
            piece = pieces[0]
            return self.out[piece.tensor].detach().view(-1)[piece.start : piece.end]
        return self.owner.detached_result()

    def _restore_residuals(self, contributors: dict[int, tuple[int, ...]]) -> None:
        """Error feedback: what an owner did not average in (or a dropped shard) goes back into the residual,
        once. If that destination failed the previous round too, the residual is dropped instead: a peer that
        keeps failing must not make it grow without bound (until it no longer fits the codec's range)."""
        if self.ef is None or not self.spec.gather:
            return
        for peer in self.peers.values():
            if self.rank in contributors.get(peer.rank, ()):
                continue
            for key, enc in peer.sent_encodings:
                residual = self.ef.residual(key)
                if residual is None:
                    continue
                if key in self.restored_before:
                    self.ef.reset(key)
                else:
                    residual.add_(decode(enc))
                    self.restored.add(key)


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions inside (nested) exception groups."""
    leaves: list[BaseException] = []
    for error in group.exceptions:
        leaves.extend(_leaves(error) if isinstance(error, BaseExceptionGroup) else [error])
    return leaves


def _plane_name(channel: Channel | None) -> str:
    if channel is None:
        return "-"
    if isinstance(channel, FaultyChannel):
        channel = channel.inner
    return "direct" if isinstance(channel, SecureChannel) else "libp2p"


def _check_tensors(tensors: Sequence[torch.Tensor], out: Sequence[torch.Tensor]) -> None:
    for t in (*tensors, *out):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or t.device.type != "cpu":
            raise TypeError("collectives take CPU float32 tensors")
        if not t.is_contiguous():
            raise ValueError("collectives need contiguous tensors")
    if [t.numel() for t in tensors] != [t.numel() for t in out]:
        raise ValueError("out must have the sizes of tensors")
