"""Deterministic fault injection at named phases of a round, for tests, the simulator and chaos runs.

A :class:`FaultPlan` makes *this* member misbehave once, at one phase::

    before_send          nothing sent yet
    mid_reduce_scatter   half of the chunks of every contribution sent
    after_reduce         own shard reduced (and updated), result not yet sent
    mid_all_gather       own result sent in full to the first half of the other members (in rank order),
                         not to the rest: survivors disagree on having it, which the commit votes resolve

and one of three ways::

    kill     SIGKILL this process (``in_process=True``: close every channel and raise InjectedCrash)
    stall    stop reading and writing, sockets open, until this member's round deadline
    garbage  send seeded random bytes (never a valid message) on every channel still to be served

The engine calls the hooks; without a plan they cost one attribute check.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
from dataclasses import dataclass, field

from legion_swarm.errors import ConfigError

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


@dataclass
class FaultInjector:
    """The per-round state of a plan: whether it fired, the RNG, the all-gather turn-taking."""

    plan: FaultPlan
    fired: bool = False
    stalled: bool = False
    rng: random.Random = field(init=False)
    _first_half_sent: asyncio.Event = field(default_factory=asyncio.Event, init=False)
    _first_half_left: int = field(default=-1, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.plan.seed)

    def garbage(self) -> bytes:
        """1-512 random bytes, starting with 0xC1 (a byte msgpack never uses), so never a valid message."""
        return b"\xc1" + self.rng.randbytes(self.rng.randrange(0, 512))

    async def checkpoint(self) -> None:
        """Before any read or write: a stalled member goes silent here until its round is cancelled."""
        if self.stalled:
            await asyncio.Event().wait()

    def trigger(self, phase: str) -> str | None:
        """The fault kind to act out now, if ``phase`` is the planned one (``kill`` and ``stall`` act at once)."""
        if phase != self.plan.phase:
            return None
        if not self.fired:
            self.fired = True
            if self.plan.kind == "kill" and not self.plan.in_process:
                os.kill(os.getpid(), signal.SIGKILL)
            if self.plan.kind == "stall":
                self.stalled = True
        return self.plan.kind

    async def gather_turn(self, ordinal: int, n_others: int) -> str | None:
        """Called before sending the own result to the ``ordinal``-th other member: with a ``mid_all_gather``
        plan the second half waits until the first half got the full result, then the fault acts."""
        if self.plan.phase != "mid_all_gather":
            return None
        half = n_others // 2 if n_others > 1 else 0
        if self._first_half_left < 0:
            self._first_half_left = half
            if half == 0:
                self._first_half_sent.set()
        if ordinal < half:
            return None
        await self._first_half_sent.wait()
        return self.trigger("mid_all_gather")

    def gather_sent(self, ordinal: int, n_others: int) -> None:
        if self.plan.phase == "mid_all_gather" and ordinal < n_others // 2:
            self._first_half_left -= 1
            if self._first_half_left == 0:
                self._first_half_sent.set()
