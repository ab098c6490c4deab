"""Shared fixtures: a p2pd leak check around every test, CLI runner, observers, polling."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import pytest

from legion_swarm.sim import pid_alive, process_name

T = TypeVar("T")


_PR_SET_CHILD_SUBREAPER = 36


def pytest_configure(config: pytest.Config) -> None:
    # Orphans of processes the tests start (a SIGKILLed peer's p2pd) are re-parented to this process
    # instead of init, so "descendants of the test process" is exactly what the tests started, and
    # daemons of anything else running on the machine are never counted (or killed) as leaks.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    found, stack = set(), [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found.add(child)
                stack.append(child)
    return found


def p2pd_pids() -> set[int]:
    """Live p2pd daemons started, directly or not, by this test process."""
    return {pid for pid in _descendants(os.getpid()) if process_name(pid) == "p2pd" and pid_alive(pid)}


@pytest.fixture(autouse=True)
def no_p2pd_left_behind() -> object:
    """Every p2pd that appears during a test must be gone shortly after it (checked by pid)."""
    before = p2pd_pids()
    yield
    deadline = time.monotonic() + 5
    while (left := p2pd_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = {pid: _cmdline(pid) for pid in left}
    for pid in left:  # do not poison the following tests, but fail this one
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"p2pd processes left running after the test: {described}"


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()[-300:]
    except OSError:
        return "?"


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str
    seconds: float


async def run_cli(*args: str, timeout: float = 60.0) -> CliResult:
    """Run ``python -m legion_swarm *args`` to completion; kill it (and fail) past ``timeout``."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "legion_swarm", *args,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"legion-swarm {' '.join(args)} did not finish in {timeout} s") from None
    return CliResult(proc.returncode or 0, out.decode(), err.decode(), time.monotonic() - started)


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float, interval: float = 0.2) -> T:
    """Poll ``check`` until it returns a truthy value; fail with its last value after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s (last value: {value!r})")
        await asyncio.sleep(interval)


@contextlib.asynccontextmanager
async def observer(maddr: str, swarm: str | None = None) -> AsyncIterator[object]:
    from legion_swarm.config import HostConfig, MembershipConfig, PeerConfig
    from legion_swarm.peer import SwarmPeer

    config = PeerConfig(
        host=HostConfig(host="127.0.0.1", client_mode=True, initial_peers=(maddr,)),
        membership=MembershipConfig(swarm=swarm, role="observer"),
    )
    peer = await SwarmPeer.create(config)
    try:
        yield peer
    finally:
        await peer.aclose()
