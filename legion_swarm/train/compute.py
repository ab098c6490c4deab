"""The thread that runs a peer's model compute: forward and backward passes, local optimizer steps, evaluation.

One worker thread, off the event loop, so heartbeats, matchmaking and the collectives keep running during a
step, and the compute never competes with itself. It may run at a lower CPU priority (a larger ``nice``), as
volunteer-computing clients do: the volunteer's machine stays responsive, and where several peers share a
machine, every peer's networking, and a peer that is starting, go before anyone's number crunching.
Linux sets priorities per thread, and torch's intra-op threads inherit the priority of the thread that
starts them; elsewhere ``nice`` is ignored.

For experiments with unequal peers on one machine, ``speed`` < 1 throttles the thread for real: after each
call that took ``t`` seconds it sleeps ``t * (1 / speed - 1)``, so the peer computes at ``speed`` times its
pace in wall time (``simulate --speeds``); the event loop is untouched.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Compute:
    """``await compute.run(fn, *args)`` runs ``fn(*args)`` on the compute thread; :meth:`close` when done."""

    def __init__(self, nice: int = 0, *, speed: float = 1.0) -> None:
        if not 0 <= nice <= 19:
            raise ValueError(f"nice must be in 0..19, got {nice}")
        if not 0 < speed <= 1:
            raise ValueError(f"speed must be in (0, 1], got {speed}")
        self.nice, self.speed = nice, speed
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="compute", initializer=_lower_priority, initargs=(nice,)
        )

    async def run(self, fn: Callable[..., T], *args: object, throttled: bool = True) -> T:
        """``fn(*args)`` on the compute thread; ``throttled=False`` exempts it from ``speed`` (copies between the
        device and the host, which a slower chip does not slow down as it slows its arithmetic)."""
        call = functools.partial(fn, *args)
        if self.speed < 1 and throttled:
            call = functools.partial(_throttled, call, 1 / self.speed - 1)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def pause(self, took: float) -> None:
        """On the compute thread, after work that took ``took`` seconds: the throttle's sleep (none at speed 1),
        for callers that run many steps in one :meth:`run` (``run(..., throttled=False)``)."""
        if self.speed < 1:
            time.sleep(took * (1 / self.speed - 1))

    def close(self) -> None:
        """Let a running call finish in the background; no new calls."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def _throttled(call: Callable[[], T], pause_per_second: float) -> T:
    started = time.perf_counter()
    try:
        return call()
    finally:
        time.sleep((time.perf_counter() - started) * pause_per_second)


def _lower_priority(nice: int) -> None:
    if nice == 0 or not hasattr(os, "setpriority"):
        return
    tid = threading.get_native_id()
    try:
        # Only ever lower the priority: raising it again needs privileges.
        os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
    except OSError as e:
        logger.info("compute thread keeps its priority: %s", e)


def thread_nice() -> int:
    """The calling thread's nice value (for tests and diagnostics)."""
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
