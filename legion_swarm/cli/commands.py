"""The CLI's commands as coroutines: each takes parsed arguments and returns an exit code."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from rich.console import Console
from rich.live import Live

from legion_swarm.cli.render import status_table, view_to_json
from legion_swarm.config import DHTConfig, HostConfig, MembershipConfig, PeerConfig
from legion_swarm.peer import SwarmPeer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Addresses must survive copy-paste: never let rich wrap them. Piped output gets a wide virtual
# terminal so tables are not squeezed into 80 columns.
stdout = Console(soft_wrap=True, highlight=False, width=None if sys.stdout.isatty() else 160)


def peer_config(args: argparse.Namespace, *, role: str) -> PeerConfig:
    """Map CLI flags one-to-one onto the config dataclasses (which validate them)."""
    observer = role == "observer"
    host = HostConfig(
        host=getattr(args, "host", "0.0.0.0"),
        port=getattr(args, "port", 0),
        data_port=getattr(args, "data_port", 0),
        announce=tuple(getattr(args, "announce", None) or ()),
        identity_path=getattr(args, "identity", None),
        initial_peers=tuple(getattr(args, "peer", None) or ()),
        client_mode=observer,
        upnp=getattr(args, "upnp", False),
    )
    membership = MembershipConfig(
        swarm=args.swarm, role=role, heartbeat_s=getattr(args, "heartbeat", MembershipConfig.heartbeat_s)
    )
    return PeerConfig(host=host, dht=DHTConfig(), membership=membership)


def install_stop_signals() -> asyncio.Event:
    """An event set by the first SIGINT or SIGTERM (a second one falls back to the default action)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(sig: signal.Signals) -> None:
        logger.info("%s received: shutting down", sig.name)
        stop.set()
        for s in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(s)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    return stop


async def until_stopped(work: Awaitable[T], stop: asyncio.Event) -> T | None:
    """Run ``work`` unless ``stop`` is set first, in which case cancel it and return None."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return None


def print_addresses(command: str, peer: SwarmPeer) -> None:
    stdout.print(f"legion-swarm {command} · swarm [bold]{peer.swarm}[/bold] · peer id {peer.peer_id}")
    stdout.print("Listening on (give one of these to `legion-swarm join --peer`):")
    for maddr in peer.maddrs:
        stdout.print(maddr, markup=False)
    stdout.print("")
    sys.stdout.flush()


async def serve(args: argparse.Namespace, role: str, command: str) -> int:
    """``bootstrap`` and ``join``: be a member until SIGINT/SIGTERM, then leave cleanly."""
    stop = install_stop_signals()
    config = peer_config(args, role=role)
    peer = await until_stopped(SwarmPeer.create(config), stop)
    if peer is None:
        return 130
    try:
        print_addresses(command, peer)
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=args.report_every)
            if not stop.is_set():
                try:
                    view = await asyncio.wait_for(peer.view(), timeout=10)
                except (TimeoutError, Exception) as e:  # a report, not a duty: say why and go on
                    logger.warning("[%s] could not read the swarm for the periodic report: %r", peer.tag, e)
                else:
                    logger.info("[%s] swarm %r: %d peers alive", peer.tag, peer.swarm, len(view.members))
    finally:
        await peer.aclose()
    return 0


async def status(args: argparse.Namespace) -> int:
    stop = install_stop_signals()
    peer = await until_stopped(SwarmPeer.create(peer_config(args, role="observer")), stop)
    if peer is None:
        return 130
    try:
        if args.watch is None:
            view = await peer.view()
            if args.json:
                stdout.print_json(json.dumps(view_to_json(view)))
            else:
                stdout.print(status_table(view))
            return 0
        if args.json:  # one JSON object per line, each interval
            while not stop.is_set():
                view = await peer.view()
                print(json.dumps(view_to_json(view)), flush=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.watch)
            return 0
        with Live(status_table(await peer.view()), console=stdout, refresh_per_second=4) as live:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.watch)
                live.update(status_table(await peer.view()))
        return 0
    finally:
        await peer.aclose()


async def wait_for_members(peer: SwarmPeer, count: int, timeout: float, stop: asyncio.Event) -> int:
    """Poll the swarm until ``count`` members are visible (or ``timeout``); return how many were seen."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline and not stop.is_set():
        seen = len((await peer.view()).members)
        if seen >= count:
            break
        await asyncio.sleep(0.25)
    return seen


async def simulate(args: argparse.Namespace) -> int:
    """A bootstrap and N peer processes on this machine: show the swarm, then shut it all down."""
    from legion_swarm.sim import LocalSwarm, pid_alive

    stop = install_stop_signals()
    started = time.perf_counter()
    with stdout.status(f"starting a bootstrap node and {args.peers} peers as separate processes…"):
        swarm = await until_stopped(LocalSwarm.create(args.peers, swarm=args.swarm, heartbeat_s=args.heartbeat), stop)
    if swarm is None:
        return 130
    try:
        assert swarm.bootstrap is not None
        observer_args = argparse.Namespace(peer=[swarm.bootstrap.maddr], swarm=args.swarm, host="127.0.0.1")
        observer = await SwarmPeer.create(peer_config(observer_args, role="observer"))
        try:
            seen = await wait_for_members(observer, args.peers + 1, timeout=30, stop=stop)
            stdout.print(status_table(await observer.view()))
            stdout.print(f"{seen - 1}/{args.peers} peers joined in {time.perf_counter() - started:.1f} s")
            if args.duration > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.duration)
        finally:
            await observer.aclose()
    finally:
        with stdout.status("shutting down…"):
            await swarm.aclose()
    left = [pid for pid in swarm.daemon_pids() if pid_alive(pid)]
    codes = [p.proc.returncode for p in swarm.processes()]
    stdout.print(
        f"shut down {len(codes)} processes (exit codes {sorted(set(codes))}), "
        f"{len(swarm.daemon_pids())} p2pd daemons reaped, {len(left)} left running"
    )
    return 0 if seen - 1 >= args.peers and not left and set(codes) == {0} else 1


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "bootstrap": lambda args: serve(args, "bootstrap", "bootstrap"),
    "join": lambda args: serve(args, "peer", "join"),
    "status": status,
    "simulate": simulate,
}
