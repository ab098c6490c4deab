"""Forming the group of a round: every member asks one leader, the leader answers with the same GroupInfo.

Each round ``R`` of a swarm has a leader: the live, synced training peer with the smallest peer id in the
asker's view of the DHT, among those that have committed a round since they started (a restarted peer is seen
by some members a heartbeat before the others; while it cannot lead, their views still agree on the leader). A
member that wants to take part in round ``R`` sends the leader its request (round, state id, how to reach it)
on ``legion/round/1`` and waits. The leader collects requests for ``R`` until every peer in its own view has
asked or ``window_s`` has passed since it asked itself, then answers every asker with one :class:`GroupInfo`
(members sorted by peer id). Only members whose *state id* equals the leader's are grouped: the state id names
the exact parameters a member holds (it is chained through every committed round), so a group always starts a
round from bit-identical state. Everyone else is told to re-sync.

When the round has more members than one group should hold, the leader splits them with its ``grouping``
(latency-based groups from the swarm's RTT records) and answers everyone with the whole
:class:`~legion_swarm.groups.layout.Layout`: the groups then run one hierarchical round together.

Answers: :class:`Formed` (take part in the round), :class:`Resync` (your state is not the swarm's: download
it from ``donors``), :class:`Retry` (the leader was unreachable, is not leading, or is behind: ask again).
Views may disagree for a heartbeat or two (a new peer with a smaller id, a dead leader); then two leaders
may form two groups for the same round from the same state. Their results have different state ids, so at
the next round the leader's lineage wins and the others re-sync: views converge, nobody deadlocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import msgpack

from legion_swarm.errors import LegionError, ProtocolError
from legion_swarm.groups.info import GroupInfo, GroupMember
from legion_swarm.groups.layout import Layout
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import short_peer_id

logger = logging.getLogger(__name__)

ROUND_PROTOCOL = "legion/round/1"
MAX_REQUEST_BYTES = 16 * 1024


@dataclass(frozen=True)
class Request:
    """A member's wish to take part in ``round`` with the state ``state_id``."""

    member: GroupMember
    round: int
    state_id: bytes

    def to_wire(self) -> dict[str, object]:
        m = self.member
        return {
            "peer_id": m.peer_id, "direct": list(m.direct) if m.direct else None, "maddrs": list(m.maddrs),
            "bandwidth": m.bandwidth, "round": self.round, "state_id": self.state_id,
        }  # fmt: skip

    @classmethod
    def from_wire(cls, obj: object) -> Request:
        try:
            assert isinstance(obj, dict)
            direct = obj["direct"]
            member = GroupMember(
                peer_id=obj["peer_id"], direct=(direct[0], direct[1]) if direct is not None else None,
                maddrs=tuple(obj["maddrs"]), bandwidth=float(obj["bandwidth"]),
            )  # fmt: skip
            round_, state_id = obj["round"], obj["state_id"]
            assert type(round_) is int and round_ >= 1 and isinstance(state_id, bytes) and len(state_id) <= 64
        except (AssertionError, KeyError, TypeError, ValueError, IndexError, LegionError) as e:
            raise ProtocolError(f"malformed round request: {e!r}") from None
        return cls(member, round_, state_id)


@dataclass(frozen=True)
class Formed:
    layout: Layout
    """Every group of the round (one, unless the swarm is larger than its ``max_group``)."""
    round: int
    group: GroupInfo
    """This peer's group."""


@dataclass(frozen=True)
class Resync:
    round: int
    """The round whose result the leader holds."""
    state_id: bytes
    donors: tuple[str, ...]
    """Peers that hold that state (the leader first)."""


@dataclass(frozen=True)
class Retry:
    reason: str
    unreachable: str | None = None
    """The leader's peer id if it could not be reached at all (likely dead: look past it)."""
    busy: bool = False
    """The leader is alive and running the round we asked for without us (we were late): not a failure, ask
    again when it is over."""


Decision = Formed | Resync | Retry

Grouping = Callable[[list[str]], Awaitable[Sequence[Sequence[str]]]]
"""``await grouping(peer_ids)``: split the (sorted) members of a round into groups. The leader calls it; the
groups' order and each group's member order are what everyone uses."""


def round_id(swarm: str, round_: int, state_id: bytes, members: list[GroupMember]) -> bytes:
    body = msgpack.packb([swarm, round_, state_id, [m.peer_id for m in members]])
    return hashlib.sha256(body).digest()[:16]


def _layout(rid: bytes, members: tuple[GroupMember, ...], groups: object) -> Layout:
    """The layout a leader's answer describes: ``groups`` lists indices into ``members`` (None: one group).
    Every member must be in exactly one group."""
    if groups is None:
        return Layout(round_id=rid, groups=(members,))
    if not isinstance(groups, list) or not all(isinstance(g, list) and g for g in groups):
        raise ProtocolError("groups must be a list of non-empty lists")
    flat = [i for g in groups for i in g]
    if sorted(flat) != list(range(len(members))) or not all(type(i) is int for i in flat):
        raise ProtocolError("groups must name every member exactly once")
    return Layout(round_id=rid, groups=tuple(tuple(members[i] for i in g) for g in groups))


def _new_future() -> asyncio.Future[dict[str, object]]:
    return asyncio.get_running_loop().create_future()


@dataclass
class _Pending:
    request: Request
    answer: asyncio.Future[dict[str, object]] = field(default_factory=_new_future)


class Matchmaker:
    """One peer's side of group formation: asks the leader, or leads. ``await start()`` once, then
    :meth:`form` before each round."""

    def __init__(
        self, host: Host, swarm: str, *, window_s: float, timeout_s: float, grouping: Grouping | None = None
    ) -> None:
        self.host, self.swarm = host, swarm
        self.window_s, self.timeout_s = window_s, timeout_s
        self.grouping = grouping
        """How a leader splits a round's members into groups (None: one group)."""
        self.tag = f"[{host.short_id}]"
        self._pending: dict[int, list[_Pending]] = {}
        self._arrived: dict[int, asyncio.Event] = {}
        self.state: tuple[int, bytes] = (0, b"")
        """``(round, state_id)`` of the state this peer holds (set by the trainer after every round)."""
        self.donors: tuple[str, ...] = ()
        """Peers known to hold this peer's state: the members of the last round it committed."""
        self._formed = 0  # the last round this peer formed as a leader

    async def start(self) -> None:
        await self.host.add_stream_handler(ROUND_PROTOCOL, self._handle)

    def asked(self, round_: int) -> set[str]:
        """Peer ids that have asked this peer (as the leader) for ``round_`` and are waiting for its answer."""
        return {p.request.member.peer_id for p in self._pending.get(round_, ())}

    async def form(
        self, me: GroupMember, view: set[str], *, idle: bool = False, settled: set[str] | None = None
    ) -> Decision:
        """The group of round ``state[0] + 1``, given the peer ids of the live, synced trainers in our view.

        ``settled``: the peers of ``view`` (and maybe we) that have committed a round since they started; the
        leader is the smallest of them, so a peer that just (re)joined does not take over the lead while half
        the swarm has not seen it yet (None or empty: any peer may lead). ``idle``: we bring nothing to the
        round (just synced); as its leader we wait for the others' work."""
        round_, state_id = self.state
        request = Request(me, round_ + 1, state_id)
        leader = min(settled or view | {me.peer_id})
        if leader == me.peer_id:
            return await self._lead(request, view, idle=idle)
        try:
            async with asyncio.timeout(self.window_s + self.timeout_s):
                reader, writer = await self.host.open_stream(leader, ROUND_PROTOCOL)
                try:
                    await write_message(writer, request.to_wire())
                    answer = await read_message(reader, max_bytes=MAX_REQUEST_BYTES * 64)
                finally:
                    writer.close()
        except (TimeoutError, OSError, LegionError, asyncio.IncompleteReadError) as e:
            return Retry(f"leader {short_peer_id(leader)} did not answer: {e!r}", unreachable=leader)
        return self._parse_answer(answer, request, leader)

    def _parse_answer(self, answer: object, request: Request, leader: str) -> Decision:
        try:
            assert isinstance(answer, dict)
            status = answer["status"]
            if status == "formed":
                members = tuple(Request.from_wire(m).member for m in answer["members"])
                expected = round_id(self.swarm, request.round, request.state_id, list(members))
                assert answer["round_id"] == expected and request.member.peer_id in {m.peer_id for m in members}
                layout = _layout(expected, members, answer.get("groups"))
                return Formed(layout, request.round, layout.group_of(request.member.peer_id))
            if status == "resync":
                donors = tuple(str(d) for d in answer["donors"])[:64]
                return Resync(int(answer["round"]), bytes(answer["state_id"]), donors)
            reason = answer.get("reason", status)
            return Retry(f"leader {short_peer_id(leader)}: {reason}", busy=answer.get("busy") is True)
        except (AssertionError, KeyError, TypeError, ValueError, LegionError) as e:
            logger.warning("%s malformed answer from leader %s: %r", self.tag, short_peer_id(leader), e)
            return Retry("malformed answer")

    async def _lead(self, request: Request, view: set[str], *, idle: bool = False) -> Decision:
        round_ = request.round
        mine = _Pending(request)
        self._pending.setdefault(round_, []).append(mine)
        arrived = self._arrived.setdefault(round_, asyncio.Event())
        # Askers for rounds we have passed will never be answered by a round of ours: tell them to re-sync.
        for old in [r for r in self._pending if r < round_]:
            for pending in self._pending.pop(old):
                self._answer_outdated(pending)
            self._arrived.pop(old, None)
        if idle and view:
            # A leader with nothing to add opens the window when the first member with work asks: the others
            # are still computing, and a round of one would only fork the state it just downloaded.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.timeout_s):
                    while len(self._pending[round_]) < 2:
                        arrived.clear()
                        await arrived.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.window_s):
                while not view <= {p.request.member.peer_id for p in self._pending[round_]}:
                    arrived.clear()
                    await arrived.wait()
        pending = self._pending.pop(round_)
        self._arrived.pop(round_, None)
        self._formed = max(self._formed, round_)
        same = sorted(
            (p for p in pending if p.request.state_id == request.state_id), key=lambda p: p.request.member.peer_id
        )
        members = [p.request.member for p in same]
        rid = round_id(self.swarm, round_, request.state_id, members)
        groups = await self._groups([m.peer_id for m in members])
        layout = _layout(rid, tuple(members), groups)
        answer = {
            "status": "formed", "round_id": rid, "members": [p.request.to_wire() for p in same], "groups": groups,
        }  # fmt: skip
        for p in pending:
            if p.answer.done():
                continue
            p.answer.set_result(answer if p in same else self._resync_answer())
        logger.info("%s leading round %d: %d members in %d groups (%d told to re-sync)", self.tag, round_,
                    len(same), len(layout.groups), len(pending) - len(same))  # fmt: skip
        return Formed(layout, round_, layout.group_of(self.host.peer_id))

    async def _groups(self, peer_ids: list[str]) -> list[list[int]]:
        """The round's groups as indices into ``peer_ids``; one group if there is no grouping or it fails."""
        if self.grouping is None or len(peer_ids) < 2:
            return [list(range(len(peer_ids)))]
        try:
            groups = await self.grouping(peer_ids)
            index = {p: i for i, p in enumerate(peer_ids)}
            as_indices = [[index[p] for p in g] for g in groups]
            _layout(b"check", tuple(GroupMember(peer_id=p) for p in peer_ids), as_indices)
            return as_indices
        except Exception as e:  # a failed grouping must not stop training: one group is always valid
            logger.warning("%s grouping failed (%r): one group this round", self.tag, e)
            return [list(range(len(peer_ids)))]

    def _resync_answer(self) -> dict[str, object]:
        round_, state_id = self.state
        donors = [self.host.peer_id, *[d for d in self.donors if d != self.host.peer_id]]
        return {"status": "resync", "round": round_, "state_id": state_id, "donors": donors}

    def _answer_outdated(self, pending: _Pending) -> None:
        if not pending.answer.done():
            pending.answer.set_result(self._resync_answer())

    async def _handle(self, stream_info: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = Request.from_wire(await asyncio.wait_for(read_message(reader, max_bytes=MAX_REQUEST_BYTES), 5))
            answer = await self._answer(request)
            await write_message(writer, answer)
        except (TimeoutError, ProtocolError, ConnectionError) as e:
            logger.info("%s bad round request from %s: %r", self.tag, stream_info, e)
        finally:
            writer.close()

    async def _answer(self, request: Request) -> dict[str, object]:
        round_, _ = self.state
        if request.round <= round_:
            return self._resync_answer()  # the asker's state is older than ours
        if request.round > round_ + 2:  # one round ahead is normal: the asker finished that round before us
            return {"status": "retry", "reason": f"this leader is at round {round_}, behind round {request.round}"}
        if request.round <= self._formed:  # too late for a round that is running: ask again once it is over
            return {"status": "retry", "reason": f"round {request.round} is already running", "busy": True}
        pending = _Pending(request)
        self._pending.setdefault(request.round, []).append(pending)
        self._arrived.setdefault(request.round, asyncio.Event()).set()
        try:
            async with asyncio.timeout(self.window_s + self.timeout_s):
                return await pending.answer
        except TimeoutError:
            return {"status": "retry", "reason": "the leader did not start the round in time"}
        finally:
            queue = self._pending.get(request.round, [])
            if pending in queue:
                queue.remove(pending)
