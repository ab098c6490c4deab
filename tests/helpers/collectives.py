"""Data planes in this process (direct TCP on loopback, no daemon) and collective timeouts short enough for tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.identity import Identity

# Seconds: generous for 2 loaded cores, short enough that a fault test ends well within its timeout.
FAST = {"connect_timeout_s": 3.0, "reduce_timeout_s": 6.0, "gather_timeout_s": 6.0, "commit_timeout_s": 2.0}
FAST["stall_timeout_s"] = 3.0


@contextlib.asynccontextmanager
async def planes(n: int) -> AsyncIterator[list[DataPlane]]:
    """``n`` direct-only data planes with fresh identities, all closed on exit."""
    opened: list[DataPlane] = []
    try:
        for _ in range(n):
            opened.append(await DataPlane.create(Identity.generate()))
        yield opened
    finally:
        for plane in opened:
            await plane.aclose()
