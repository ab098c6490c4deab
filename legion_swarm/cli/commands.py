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
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console
from rich.live import Live
from rich.table import Table

from legion_swarm.cli.render import status_report, status_table, view_to_json
from legion_swarm.config import DHTConfig, HostConfig, MembershipConfig, PeerConfig, ProbeConfig
from legion_swarm.errors import ConfigError
from legion_swarm.peer import SwarmPeer, SwarmView

if TYPE_CHECKING:
    from legion_swarm.sim import Churn, LocalSwarm, PeerProcess

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
        netsim=getattr(args, "netsim", None),
    )
    membership = MembershipConfig(
        swarm=args.swarm, role=role, heartbeat_s=getattr(args, "heartbeat", MembershipConfig.heartbeat_s)
    )
    interval = getattr(args, "probe_interval", None)
    # A short interval brings the ping timeout down with it (a ping never outlasts a round).
    probe = ProbeConfig()
    if interval is not None:
        probe = ProbeConfig(interval_s=interval, timeout_s=min(probe.timeout_s, interval))
    return PeerConfig(host=host, dht=DHTConfig(), membership=membership, probe=probe)


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
        await cancel_and_wait(stopper)
        if not task.done():  # stopped, or cancelled ourselves: the work ends before we return
            await cancel_and_wait(task)
    return task.result() if not task.cancelled() else None


async def cancel_and_wait(*tasks: asyncio.Future[Any]) -> None:
    """Cancel ``tasks`` and wait until each has ended, so none outlives its owner (their errors are logged)."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            await task
        except asyncio.CancelledError:
            if not task.cancelled():  # the caller itself is being cancelled
                raise
        except Exception as e:
            logger.warning("a background task failed: %r", e)


def print_addresses(command: str, peer: SwarmPeer) -> None:
    stdout.print(f"legion-swarm {command} · swarm [bold]{peer.swarm}[/bold] · peer id {peer.peer_id}")
    stdout.print("Listening on (give one of these to `legion-swarm join --peer`):")
    for maddr in peer.maddrs:
        stdout.print(maddr, markup=False)
    stdout.print("")
    sys.stdout.flush()


async def serve(args: argparse.Namespace, role: str, command: str) -> int:
    """``bootstrap`` and ``join``: be a member until SIGINT/SIGTERM, then leave cleanly. A bootstrap node
    publishes the swarm's signed training config; a joined peer trains with the swarm unless ``--no-train``
    (and exits once it has trained ``--rounds`` rounds)."""
    from legion_swarm.cli import train

    stop = install_stop_signals()
    config = peer_config(args, role=role)
    spec = train.spec_from_args(args) if role == "bootstrap" else None  # bad config: fail before any daemon
    metrics = None
    if args.metrics_port is not None:
        from legion_swarm.cli.metrics import MetricsServer

        metrics = MetricsServer(args.metrics_port, host=args.host)
        metrics.start()  # a port in use: exit 2 before any daemon starts
    try:
        peer = await until_stopped(SwarmPeer.create(config), stop)
    except BaseException:
        if metrics is not None:
            await metrics.aclose()
        raise
    if peer is None:
        if metrics is not None:
            await metrics.aclose()
        return 130
    from legion_swarm.train.swarm_config import SignedSpec, SwarmConfigKeeper

    keeper = SwarmConfigKeeper(peer, every_s=max(args.heartbeat, 5.0))
    node = metrics.attach(peer, role) if metrics is not None else None
    try:
        print_addresses(command, peer)
        if spec is not None:
            signed = SignedSpec.sign(await asyncio.to_thread(train.pin_data, spec), peer.host.identity)
            logger.info("[%s] swarm config %s: %s", peer.tag, signed.digest.hex()[:12], spec.to_dict())
            keeper.hold(signed)
        if role == "peer" and not args.no_train:
            trained = await until_stopped(train.train(peer, args, stdout, keeper, node), stop)
            return 0 if trained is not None else 130
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
        if metrics is not None:
            await metrics.aclose()
        await keeper.aclose()
        await peer.aclose()
    return 0


async def status(args: argparse.Namespace) -> int:
    stop = install_stop_signals()
    peer = await until_stopped(SwarmPeer.create(peer_config(args, role="observer")), stop)
    if peer is None:
        return 130

    async def read() -> tuple[SwarmView, dict[str, dict[str, float]]]:
        view = await peer.view()
        try:
            rtts = await peer.rtts()
        except Exception as e:  # the members are the point of status; RTTs are an extra
            logger.warning("could not read the swarm's RTT records: %r", e)
            rtts = {}
        return view, rtts

    try:
        if args.watch is None:
            view, rtts = await read()
            if args.json:
                stdout.print_json(json.dumps(view_to_json(view, rtts)))
            else:
                stdout.print(status_report(view, rtts, width=stdout.width))
            return 0
        if args.json:  # one JSON object per line, each interval
            while not stop.is_set():
                view, rtts = await read()
                print(json.dumps(view_to_json(view, rtts)), flush=True)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.watch)
            return 0
        with Live(status_report(*await read(), width=stdout.width), console=stdout, refresh_per_second=4) as live:
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.watch)
                live.update(status_report(*await read(), width=stdout.width))
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


def _spec_argv(args: argparse.Namespace) -> list[str]:
    """The creator flags of ``simulate`` as the bootstrap node's command line."""
    from legion_swarm.cli.train import spec_argv

    return (["--config", args.config] if args.config else []) + spec_argv(args)


def loss_table(summaries: dict[str, dict | None]) -> Table:
    table = Table(title="training summary", header_style="bold")
    for column in ("peer", "rounds", "steps", "first loss", "last loss", "val loss", "tokens/s", "sent", "resyncs"):
        table.add_column(column, justify="right" if column != "peer" else "left")
    for name, s in summaries.items():
        if s is None:
            table.add_row(name, *["—"] * 8)
            continue
        table.add_row(
            name, str(s["rounds_committed"]), str(s["steps"]), f"{s['first_loss']:.3f}", f"{s['loss']:.3f}",
            f"{s['val_loss']:.3f}", f"{s['tokens_per_s']:,.0f}", f"{s['bytes_sent'] / 1e6:.1f} MB", str(s["resyncs"]),
        )  # fmt: skip
    return table


async def simulate(args: argparse.Namespace) -> int:
    """A bootstrap and N peer processes on this machine; unless ``--no-train`` they train ``--rounds`` rounds on the
    swarm's config (the embedded default: TinyGPT-tiny on the built-in corpus); then everything shuts down."""
    from legion_swarm.cli.train import spec_from_args
    from legion_swarm.sim import LocalSwarm, NetSimSpec, pid_alive, threads_per_peer

    spec_from_args(args)  # a bad flag or config file fails here, before any process starts
    speeds = args.speeds or []
    if len(speeds) > args.peers:
        raise ConfigError(f"--speeds names {len(speeds)} peers, but --peers is {args.peers}")
    netsim = None
    if any(getattr(args, flag) is not None for flag in ("regions", "latency", "intra_latency", "bandwidth")):
        regions = args.regions or 1
        if args.latency is not None and regions == 1:
            logger.warning("--latency is the RTT across regions: no effect with one region (see --intra-latency)")
        netsim = NetSimSpec(
            regions=regions, rtt_across_ms=100.0 if args.latency is None else args.latency,
            rtt_inside_ms=5.0 if args.intra_latency is None else args.intra_latency, bandwidth_mbit=args.bandwidth,
        )  # fmt: skip
    stop = install_stop_signals()
    started = time.perf_counter()
    peer_args = ("--no-train",) if args.no_train else (
        "--rounds", str(args.rounds), *threads_per_peer(args.peers), "--device", args.device,
        "--precision", args.precision,
    )  # fmt: skip
    with stdout.status(f"starting a bootstrap node and {args.peers} peers as separate processes…"):
        swarm = await until_stopped(
            LocalSwarm.create(
                args.peers, swarm=args.swarm, heartbeat_s=args.heartbeat, bootstrap_args=tuple(_spec_argv(args)),
                peer_args=peer_args, per_peer_args=[("--speed", str(s)) for s in speeds], netsim=netsim,
                identities=args.dropout is not None,
            ),
            stop,
        )  # fmt: skip
    if swarm is None:
        return 130
    trained_ok = True
    killed: list[PeerProcess] = []
    try:
        assert swarm.bootstrap is not None
        observer = await SwarmPeer.create(PeerConfig.observer(swarm.bootstrap.maddr, args.swarm))
        try:
            seen = await wait_for_members(observer, args.peers + 1, timeout=30, stop=stop)
            joined_s = time.perf_counter() - started
            view = await observer.view()
            if not args.no_train:
                churn = _churn(swarm, observer, args) if args.dropout is not None else None
                churning = asyncio.create_task(churn.run(stop)) if churn is not None else None
                try:
                    view = await _follow_training(swarm, observer, view, stop, lambda: bool(churn and churn.pending))
                finally:
                    if churn is not None and churning is not None:
                        killed = churn.killed
                        await cancel_and_wait(churning)
                        await churn.aclose()
                restarted = {r.peer.name for r in churn.restarts if r.peer is not None} if churn else set()
                summaries = {p.name: p.trained() for p in swarm.peers}
                for p in swarm.peers:
                    if summaries[p.name] is None:
                        logger.warning("%s did not finish its rounds (exit code %s):\n%s", p.name, p.proc.returncode,
                                       p.tail(25))  # fmt: skip
                stdout.print(f"{seen - 1}/{args.peers} peers joined in {joined_s:.1f} s")
                stdout.print(loss_table(summaries))
                trained_ok = all(
                    s is not None and (name in restarted or s["loss"] < s["first_loss"])
                    for name, s in summaries.items()
                )
                if churn is not None:
                    stdout.print(
                        f"churn: {len(killed)} peers killed with SIGKILL, {len(restarted)} restarted as the same peer"
                    )
            if args.no_train:
                stdout.print(f"{seen - 1}/{args.peers} peers joined in {joined_s:.1f} s")
            stdout.print(status_table(view, width=stdout.width))
            if args.duration > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), args.duration)
        finally:
            await observer.aclose()
    finally:
        with stdout.status("shutting down…"):
            await swarm.aclose()
    left = [pid for pid in swarm.daemon_pids() if pid_alive(pid)]
    killed_pids = {p.pid for p in killed}
    codes = [p.proc.returncode for p in swarm.processes() if p.pid not in killed_pids]
    stdout.print(
        f"shut down {len(codes)} processes (exit codes {sorted(set(codes))}), "
        f"{len(swarm.daemon_pids())} p2pd daemons reaped, {len(left)} left running"
    )
    if stop.is_set():
        return 130
    return 0 if seen - 1 >= args.peers and not left and set(codes) == {0} and trained_ok else 1


def _churn(swarm: LocalSwarm, observer: SwarmPeer, args: argparse.Namespace) -> Churn:
    """``simulate --dropout``: every ~``--dropout`` s (±25 %) SIGKILL a random peer that has committed a round and
    restart it 5 s later with its key file, through another peer, to train the rounds it had left. Kills stop
    once a peer has finished its rounds; restarts under way complete."""
    from legion_swarm.sim import Churn, threads_per_peer

    committed: dict[str, int] = {}  # rounds each peer had committed when the last victim was chosen

    async def ready() -> list[PeerProcess]:
        committed.clear()
        committed.update({m.record.peer_id: m.record.committed or 0 for m in (await observer.view()).members})
        return [p for p in swarm.peers if p.running and committed.get(p.peer_id, 0) > 0]

    def restart_args(victim: PeerProcess) -> tuple[str, ...]:
        rounds = ("--rounds", str(max(1, args.rounds - committed[victim.peer_id])))
        placement = ("--device", args.device, "--precision", args.precision)
        speed = victim.argv[victim.argv.index("--speed") :][:2] if "--speed" in victim.argv else []
        return (*rounds, *threads_per_peer(args.peers), *placement, *speed)

    return Churn(
        swarm, every_s=args.dropout, ready=ready, restart_args=restart_args,
        ending=lambda: any(not p.running for p in swarm.peers),  # a peer has finished its rounds: the run ends
    )  # fmt: skip


async def _follow_training(
    swarm: LocalSwarm, observer: SwarmPeer, view: SwarmView, stop: asyncio.Event, restarting: Callable[[], bool]
) -> SwarmView:
    """Wait for every peer process to finish its rounds (and any restart under way), showing progress; returns the
    last full view."""
    peers = swarm.peers  # the same list as peers are killed and restarted
    with stdout.status("training…") as status:
        while (any(p.running for p in peers) or restarting()) and not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 2.0)
            current = await observer.view()
            rounds = [m.record.round for m in current.members if m.record.round is not None]
            losses = [m.record.loss for m in current.members if m.record.loss is not None]
            if len(current.members) == len(view.members):
                view = current
            if rounds:
                loss = f", loss {sum(losses) / len(losses):.3f}" if losses else ""
                status.update(f"training… round {max(rounds)}{loss}")
    return view


async def checkpoint(args: argparse.Namespace) -> int:
    from legion_swarm.cli.train import export

    stop = install_stop_signals()
    peer = await until_stopped(SwarmPeer.create(peer_config(args, role="observer")), stop)
    if peer is None:
        return 130
    try:
        done = await until_stopped(export(peer, args.out, stdout), stop)
    finally:
        await peer.aclose()
    if done is None:
        return 130
    stdout.print_json(json.dumps(done))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], Awaitable[int]]] = {
    "bootstrap": lambda args: serve(args, "bootstrap", "bootstrap"),
    "join": lambda args: serve(args, "peer", "join"),
    "status": status,
    "simulate": simulate,
    "checkpoint": checkpoint,
}
