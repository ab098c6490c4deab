"""Group formation and state sync between real in-process peers (p2pd daemons, libp2p streams)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
import torch

from legion_swarm.errors import TrainingError
from legion_swarm.groups.info import GroupMember
from legion_swarm.groups.matchmaking import Formed, Matchmaker, Resync, Retry
from legion_swarm.peer import SwarmPeer
from legion_swarm.train import state_sync
from legion_swarm.train.optim import ShardedAdamW, StateSlice
from legion_swarm.train.state_sync import StateServer, StateSource, download_state, fetch_optimizer_state
from tests.helpers.swarm import config

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(90)]


@contextlib.asynccontextmanager
async def peers(n: int) -> AsyncIterator[list[SwarmPeer]]:
    started: list[SwarmPeer] = []
    try:
        started.append(await SwarmPeer.create(config(role="bootstrap")))
        for _ in range(n - 1):
            started.append(await SwarmPeer.create(config(started[0].maddrs[0])))
        yield started
    finally:
        await asyncio.gather(*(p.aclose() for p in started), return_exceptions=True)


def member(peer: SwarmPeer) -> GroupMember:
    assert peer.plane is not None
    return GroupMember(peer_id=peer.peer_id, direct=peer.plane.endpoint, maddrs=tuple(peer.maddrs))


async def matchmakers(ps: list[SwarmPeer], window_s: float = 3.0) -> list[Matchmaker]:
    out = []
    for p in ps:
        mm = Matchmaker(p.host, p.swarm, window_s=window_s, timeout_s=5.0)
        await mm.start()
        mm.state = (4, b"state-4")
        out.append(mm)
    return out


async def form_all(mms: list[Matchmaker], ps: list[SwarmPeer]) -> list[object]:
    ids = {p.peer_id for p in ps}
    return await asyncio.gather(*(mm.form(member(p), ids - {p.peer_id}) for mm, p in zip(mms, ps, strict=True)))


async def test_every_member_gets_the_same_group_from_the_leader() -> None:
    async with peers(3) as ps:
        mms = await matchmakers(ps)
        ids = {p.peer_id for p in ps}
        decisions = await asyncio.gather(
            *(mm.form(member(p), ids - {p.peer_id}) for mm, p in zip(mms, ps, strict=True))
        )
    assert all(isinstance(d, Formed) for d in decisions)
    groups = {d.group for d in decisions}  # type: ignore[union-attr]
    assert len(groups) == 1
    (group,) = groups
    assert [m.peer_id for m in group.members] == sorted(ids) and {d.round for d in decisions} == {5}


async def test_a_member_with_other_state_is_told_to_resync_from_the_leader() -> None:
    async with peers(3) as ps:
        mms = await matchmakers(ps, window_s=1.0)
        leader = min(range(3), key=lambda i: ps[i].peer_id)
        stale = (leader + 1) % 3
        mms[stale].state = (4, b"another lineage")
        mms[leader].donors = (ps[leader].peer_id, ps[(leader + 2) % 3].peer_id)
        ids = {p.peer_id for p in ps}
        decisions = await asyncio.gather(
            *(mm.form(member(p), ids - {p.peer_id}) for mm, p in zip(mms, ps, strict=True))
        )
    resync = decisions[stale]
    assert isinstance(resync, Resync) and resync.state_id == b"state-4" and resync.round == 4
    assert resync.donors[0] == ps[leader].peer_id and set(resync.donors) == set(mms[leader].donors)
    formed = [d for i, d in enumerate(decisions) if i != stale]
    assert all(isinstance(d, Formed) and d.group.size == 2 for d in formed)


async def test_a_member_behind_by_rounds_is_told_to_resync_and_a_dead_leader_means_retry() -> None:
    async with peers(2) as ps:
        mms = await matchmakers(ps, window_s=0.5)
        leader, other = sorted(range(2), key=lambda i: ps[i].peer_id)
        mms[other].state = (1, b"state-4")  # round 2 was long ago for the leader
        lead = asyncio.ensure_future(mms[leader].form(member(ps[leader]), {ps[other].peer_id}))
        behind = await mms[other].form(member(ps[other]), {ps[leader].peer_id})
        assert isinstance(behind, Resync) and behind.round == 4
        assert isinstance(await lead, Formed)
        await ps[leader].aclose()
        dead = await mms[other].form(member(ps[other]), {ps[leader].peer_id})
    assert isinstance(dead, Retry) and "did not answer" in dead.reason


class Source(StateSource):
    def __init__(self, flat: torch.Tensor, state_id: bytes = b"s1") -> None:
        self.flat, self.state_id = flat, state_id
        self.optimizer = ShardedAdamW(lr=1e-3)
        self.optimizer.rebase(0, 100)
        self.optimizer.buffers["exp_avg"] += 3.0

    def describe(self) -> tuple[int, bytes, tuple[tuple[str, int, int], ...]]:
        return 7, self.state_id, ()

    def flat_copy(self) -> np.ndarray:
        return self.flat.numpy().copy()

    def optim_range(self, start: int, end: int) -> StateSlice | None:
        return self.optimizer.export(start, end)


async def test_state_downloads_from_several_donors_verified_by_hash(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_sync, "RANGE_ELEMS", 1000)  # many ranges, spread over both donors
    flat = torch.randn(10_500, generator=torch.Generator().manual_seed(0))
    async with peers(3) as ps:
        for p in ps[:2]:
            await StateServer(p.host, Source(flat)).start()
        seen: list[tuple[int, int]] = []
        got = await download_state(ps[2].host, [p.peer_id for p in ps[:2]], numel=flat.numel(),
                                   progress=lambda done, total: seen.append((done, total)))  # fmt: skip
        assert torch.equal(got.flat, flat) and got.meta.round == 7 and len(got.donors) == 2
        assert seen[-1] == (4 * flat.numel(), 4 * flat.numel()) and len(seen) == 11
        handed = await fetch_optimizer_state(
            ps[2].host, ((ps[0].peer_id, 0, 60), (ps[1].peer_id, 60, 100)), b"s1", 40, 90,
            buffer_names=("exp_avg", "exp_avg_sq"),
        )  # fmt: skip
        assert sorted(handed) == [(40, 60), (60, 90)]
        assert all(torch.all(s.buffers["exp_avg"] == 3.0) for s in handed.values())


async def test_a_donor_that_goes_away_mid_transfer_is_replaced_or_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state_sync, "RANGE_ELEMS", 1000)
    flat = torch.randn(4_500, generator=torch.Generator().manual_seed(2))
    real_request = state_sync._request
    gone: set[str] = set()

    async def cut(host, peer_id, request, timeout):  # type: ignore[no-untyped-def]
        if peer_id in gone and request.get("what") == "params":
            raise asyncio.IncompleteReadError(b"\0" * 100, 4000)  # the stream ended inside the payload
        return await real_request(host, peer_id, request, timeout)

    monkeypatch.setattr(state_sync, "_request", cut)
    async with peers(3) as ps:
        for p in ps[:2]:
            await StateServer(p.host, Source(flat)).start()
        donors = [p.peer_id for p in ps[:2]]
        gone.add(donors[0])
        got = await download_state(ps[2].host, donors, numel=flat.numel())
        assert torch.equal(got.flat, flat)  # every range came from the donor that stayed
        gone.add(donors[1])
        with pytest.raises(TrainingError, match="no donor served range"):  # a clear error, not an EOF
            await download_state(ps[2].host, donors, numel=flat.numel(), attempts=1)


async def test_a_donor_that_lies_is_caught_by_the_hash_and_a_moved_on_donor_serves_its_snapshot() -> None:
    flat = torch.randn(2000, generator=torch.Generator().manual_seed(1))
    async with peers(2) as ps:
        source = Source(flat)
        server = StateServer(ps[0].host, source)
        await server.start()
        got = await download_state(ps[1].host, [ps[0].peer_id], numel=flat.numel())
        assert torch.equal(got.flat, flat)
        # The donor trains on: ranges are served from the snapshot of the state id the downloader asked for.
        old = server.snapshot()
        source.flat, source.state_id = flat + 1, b"s2"
        assert server.snapshot().meta.state_id == b"s2"
        assert server._snapshots[b"s1"] is old  # kept until two newer states were snapshotted
        got = await download_state(ps[1].host, [ps[0].peer_id], numel=flat.numel())
        assert torch.equal(got.flat, flat + 1)
        # A lie: the snapshot's bytes no longer match the SHA-256 it announced.
        server.snapshot().flat[:1] += 1.0
        with pytest.raises(TrainingError, match="SHA-256"):
            await download_state(ps[1].host, [ps[0].peer_id], numel=flat.numel(), attempts=2)
        with pytest.raises(TrainingError, match="no donor answered"):
            await download_state(ps[1].host, [ps[0].peer_id], numel=flat.numel() + 1, attempts=1)


async def test_a_member_too_late_for_a_running_round_is_told_to_retry_at_once() -> None:
    async with peers(2) as ps:
        mms = await matchmakers(ps, window_s=0.3)
        leader, other = sorted(range(2), key=lambda i: ps[i].peer_id)
        alone = await mms[leader].form(member(ps[leader]), set())  # nobody else in its view: formed at once
        assert isinstance(alone, Formed) and alone.group.size == 1
        started = asyncio.get_running_loop().time()
        late = await mms[other].form(member(ps[other]), {ps[leader].peer_id})
        assert isinstance(late, Retry) and "already running" in late.reason
        assert asyncio.get_running_loop().time() - started < 2.0  # not the 5 s request timeout


async def test_an_idle_leader_waits_for_the_members_work_and_a_busy_one_does_not() -> None:
    async with peers(2) as ps:
        mms = await matchmakers(ps, window_s=0.3)
        leader, other = sorted(range(2), key=lambda i: ps[i].peer_id)
        view = {ps[other].peer_id}
        # Busy (it brings work): the window closes without the member, a round of one.
        assert (await mms[leader].form(member(ps[leader]), view)).group.size == 1  # type: ignore[union-attr]
        mms[leader].state = mms[other].state = (5, b"state-5")
        # Idle (just synced): it waits well past its window for the member that is still computing.
        idle = asyncio.create_task(mms[leader].form(member(ps[leader]), view, idle=True))
        await asyncio.sleep(1.5)  # five windows
        assert not idle.done()
        late = await mms[other].form(member(ps[other]), {ps[leader].peer_id})
        decision = await idle
        assert isinstance(decision, Formed) and isinstance(late, Formed)
        assert decision.group.size == 2 and decision.group == late.group


async def test_a_peer_that_just_joined_does_not_lead_while_views_disagree() -> None:
    async with peers(3) as ps:
        mms = await matchmakers(ps, window_s=1.0)
        new, old, other = sorted(ps, key=lambda p: p.peer_id)  # the newcomer has the smallest peer id
        mm = {p.peer_id: m for p, m in zip(ps, mms, strict=True)}
        settled = {old.peer_id, other.peer_id}
        # `old` has not seen the newcomer yet, `other` has: by smallest id alone they would follow two leaders.
        views = {new: {old.peer_id, other.peer_id}, old: {other.peer_id}, other: {new.peer_id, old.peer_id}}

        async def ask(p: SwarmPeer, delay: float) -> object:
            await asyncio.sleep(delay)
            return await mm[p.peer_id].form(member(p), views[p], settled=settled)

        decisions = await asyncio.gather(ask(old, 0.0), ask(new, 0.1), ask(other, 0.3))
    assert all(isinstance(d, Formed) for d in decisions), decisions
    assert {d.group for d in decisions} == {decisions[0].group}  # type: ignore[union-attr]
    assert decisions[0].group.size == 3  # type: ignore[union-attr]


async def test_the_leaders_grouping_reaches_every_member_as_one_layout() -> None:
    async with peers(5) as ps:
        mms = await matchmakers(ps)
        ids = sorted(p.peer_id for p in ps)
        planted = [[ids[4], ids[1]], [ids[0], ids[2], ids[3]]]  # the leader's order is what everyone uses
        asked: list[list[str]] = []

        async def grouping(peer_ids: list[str]) -> list[list[str]]:
            asked.append(peer_ids)
            return planted

        for mm in mms:
            mm.grouping = grouping
        decisions = await form_all(mms, ps)
    assert asked == [ids]  # only the leader groups
    assert all(isinstance(d, Formed) for d in decisions)
    layouts = {d.layout for d in decisions}  # type: ignore[union-attr]
    assert len(layouts) == 1
    (layout,) = layouts
    assert [[m.peer_id for m in g] for g in layout.groups] == planted and layout.owners == 2
    for d, p in zip(decisions, ps, strict=True):
        assert d.group == layout.group_of(p.peer_id) and d.group.owners == 2  # type: ignore[union-attr]


async def test_a_grouping_that_fails_or_lies_falls_back_to_one_group() -> None:
    async with peers(3) as ps:
        mms = await matchmakers(ps, window_s=1.0)
        ids = sorted(p.peer_id for p in ps)

        async def bad(peer_ids: list[str]) -> list[list[str]]:
            return [[ids[0]], [ids[0], ids[1]]]  # a peer twice, one left out

        for mm in mms:
            mm.grouping = bad
        decisions = await form_all(mms, ps)
    assert all(isinstance(d, Formed) and len(d.layout.groups) == 1 and d.group.size == 3 for d in decisions)
