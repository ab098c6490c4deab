"""Processes a test starts: which are still running, a guard that refuses to start any, CLI runs, and a stock
hivemind DHT node.

A unit test (one not marked ``integration``) must start no process at all: no ``p2pd``, no worker, no CLI run.
:class:`ProcessGuard` enforces that from inside this process by wrapping every way to start one that the tests
can reach (``subprocess`` and asyncio subprocesses, uvloop's, ``os.fork``/``posix_spawn``, ``multiprocessing``):
while it is active each attempt raises :class:`ProcessStartRefused` and is remembered, so a test that catches the
error still fails. :func:`descendants` (zombies included) is the backstop for anything started around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing.process
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from legion_swarm.sim import pid_alive, process_name

try:  # its loops start subprocesses through libuv, not subprocess.Popen
    import uvloop
except ImportError:  # pragma: no cover - a dev dependency
    uvloop = None


def descendants(root: int | None = None, *, zombies: bool = False) -> set[int]:
    """Pids of live processes below ``root`` (default: this process), at any depth; with ``zombies`` also those
    that exited but were not reaped yet."""
    root = os.getpid() if root is None else root
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
    return found if zombies else {pid for pid in found if pid_alive(pid)}


def p2pd_pids() -> set[int]:
    """Live p2pd daemons started, directly or not, by this test process."""
    return {pid for pid in descendants() if process_name(pid) == "p2pd"}


def cmdline(pid: int) -> str:
    """The last 300 characters of ``pid``'s command line, for failure messages ("?" once it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode()[-300:]
    except OSError:
        return "?"


class ProcessStartRefused(RuntimeError):
    """A unit test tried to start a process; it needs the ``real_processes`` fixture (which marks it integration)."""


class ProcessGuard:
    """While :meth:`refusing`, every process start through the standard library raises and is recorded."""

    def __init__(self) -> None:
        self.attempts: list[str] = []
        """What each refused start would have run (program and arguments, or the API used), in order."""

    def _refuse(self, what: str) -> None:
        self.attempts.append(what)
        raise ProcessStartRefused(f"a unit test may not start a process ({what}); use the `real_processes` fixture")

    @contextlib.contextmanager
    def refusing(self) -> Iterator[list[str]]:
        """Refuse process starts inside the block; yields :attr:`attempts` (filled as attempts happen)."""
        guard = self

        # asyncio's subprocesses go through subprocess.Popen too, so this one wrapper covers p2pd (started by
        # hivemind with asyncio), WorkerProcess, run_cli and any plain subprocess.run.
        def execute_child(self: subprocess.Popen, args: Any, *rest: Any, **kwargs: Any) -> None:
            guard._refuse(f"subprocess {' '.join(map(str, args)) if isinstance(args, list | tuple) else args}"[:300])

        def refuse(what: str) -> Callable[..., Any]:
            def refused(*args: Any, **kwargs: Any) -> Any:
                guard._refuse(what)

            return refused

        patches: list[tuple[object, str, Callable[..., Any]]] = [
            (subprocess.Popen, "_execute_child", execute_child),
            (multiprocessing.process.BaseProcess, "start", refuse("multiprocessing Process.start")),
            (os, "fork", refuse("os.fork")),
            (os, "posix_spawn", refuse("os.posix_spawn")),
            (os, "posix_spawnp", refuse("os.posix_spawnp")),
        ]
        if uvloop is not None:
            for name in ("subprocess_exec", "subprocess_shell"):
                patches.append((uvloop.Loop, name, refuse(f"uvloop {name}")))
        with contextlib.ExitStack() as stack:
            for owner, name, replacement in patches:
                stack.enter_context(_replaced(owner, name, replacement))
            yield self.attempts


@contextlib.contextmanager
def _replaced(owner: object, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """``owner.name`` is ``replacement`` inside the block; after it, exactly what it was (inherited or not)."""
    own = name in vars(owner)
    original = vars(owner)[name] if own else None
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)


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


_INITIAL_PEERS_RE = re.compile(r"--initial_peers (/ip4/\S+/tcp/\d+/p2p/\w+)")


@contextlib.asynccontextmanager
async def plain_dht_node(*, ready_timeout: float = 60.0) -> AsyncIterator[str]:
    """A stock hivemind DHT node: hivemind's own ``hivemind-dht`` console script on 127.0.0.1, port 0. It speaks
    the DHT but not legion's hello. Yields its multiaddr; on the way out it is stopped with SIGTERM and it, its
    DHT process and its ``p2pd`` are killed if still there after 10 s."""
    script = shutil.which("hivemind-dht", path=os.path.dirname(sys.executable))
    argv = [script] if script else [sys.executable, "-m", "hivemind.hivemind_cli.run_dht"]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--host_maddrs", "/ip4/127.0.0.1/tcp/0",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output: deque[str] = deque(maxlen=200)
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> None:  # a full pipe would block the node
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            match = _INITIAL_PEERS_RE.search(line)
            if match and not ready.done():
                ready.set_result(match.group(1))

    draining = asyncio.create_task(drain(), name="drain-hivemind-dht")
    tree: set[int] = set()
    try:
        done, _ = await asyncio.wait({ready, draining}, timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        if ready not in done:
            raise AssertionError("hivemind-dht printed no address:\n" + "\n".join(output))
        tree = descendants(proc.pid)  # its DHT process and p2pd, for the kill below
        yield ready.result()
    finally:
        tree |= descendants(proc.pid)
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        for pid in tree:  # what its shutdown left behind, if anything
            if pid_alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(draining, 2)
