"""A real swarm on one machine: a bootstrap node and N peers, each its own OS process and ``p2pd``.

Used by ``legion-swarm simulate``, the integration tests and the notebooks. Every process is started as
``python -m legion_swarm ...`` on 127.0.0.1 with port 0, and :meth:`LocalSwarm.aclose` reaps every one of
them and their ``p2pd`` daemons (SIGTERM, then SIGKILL after a grace period), whatever state they are in.

With a :class:`NetSimSpec`, the swarm runs under injected latency and bandwidth
(:mod:`legion_swarm.transport.netsim`): peer ids must be known before the processes start, so the swarm makes
their key files and the NetSim JSON in a temporary directory, which :meth:`LocalSwarm.aclose` removes.

:class:`Churn` is the one churn driver (``simulate --dropout`` and :mod:`legion_swarm.chaos`): it kills a random
peer with SIGKILL every S s ± 25 % and restarts it a few seconds later with its key file, as the same peer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from legion_swarm.errors import NetworkError
from legion_swarm.transport.identity import Identity
from legion_swarm.transport.netsim import NetSim

logger = logging.getLogger(__name__)

MADDR_RE = re.compile(r"(/ip[46]/\S+/tcp/\d+/p2p/[1-9A-HJ-NP-Za-km-z]+)")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc``); empty if the process is gone."""
    pids: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                pids.extend(int(p) for p in f.read().split())
    return pids


def process_name(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@dataclass
class PeerProcess:
    """One ``legion-swarm bootstrap|join`` process and what it printed."""

    name: str
    argv: list[str]
    proc: asyncio.subprocess.Process
    maddrs: list[str] = field(default_factory=list)
    daemon_pids: list[int] = field(default_factory=list)
    output: deque[str] = field(default_factory=lambda: deque(maxlen=400))
    _drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def maddr(self) -> str:
        return self.maddrs[0]

    @property
    def peer_id(self) -> str:
        return self.maddr.rsplit("/p2p/", 1)[1]

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def trained(self) -> dict | None:
        """The summary a ``join`` process prints once it has trained its ``--rounds`` (None before that)."""
        marker = '{"event": "trained"'
        for line in reversed(self.output):
            if marker in line:
                return json.loads(line[line.index(marker) :])
        return None

    def tail(self, lines: int = 30) -> str:
        return "\n".join(list(self.output)[-lines:])

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int | None:
        """Exit code, or None if still running after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.proc.wait(), timeout)
        except TimeoutError:
            return None


async def start_process(name: str, argv: list[str], *, ready_timeout: float = 60.0) -> PeerProcess:
    """Start ``python -m legion_swarm *argv`` and wait until it prints its multiaddrs.

    stdout and stderr are merged and drained continuously into ``PeerProcess.output`` (a full pipe would
    otherwise block the child). Raises :class:`NetworkError` with the child's last output if it exits or
    prints no address within ``ready_timeout``.
    """
    # Output goes to a pipe: children must not think they draw on a terminal (a notebook kernel forces colour).
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "TTY_COMPATIBLE")}
    env["PYTHONUNBUFFERED"] = "1"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "legion_swarm", *argv,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env=env,
    )  # fmt: skip
    peer = PeerProcess(name, argv, proc)
    ready = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            peer.output.append(line)
            match = MADDR_RE.search(line)
            if match and not ready.done() and line.lstrip().startswith("/"):
                peer.maddrs.append(match.group(1))
            if line.strip() == "" and peer.maddrs and not ready.done():
                ready.set_result(None)  # the address block ends with a blank line
        if not ready.done():
            ready.set_result(None)

    peer._drain = asyncio.create_task(drain(), name=f"drain-{name}")
    try:
        await asyncio.wait_for(asyncio.shield(ready), ready_timeout)
    except TimeoutError:
        pass
    if not peer.maddrs or not peer.running:
        await stop_process(peer)
        raise NetworkError(f"{name} did not start (exit code {proc.returncode}):\n{peer.tail()}")
    peer.daemon_pids = [p for p in child_pids(peer.pid) if process_name(p) == "p2pd"]
    return peer


async def stop_process(peer: PeerProcess, *, sig: int = signal.SIGTERM, grace: float = 8.0) -> int | None:
    """Signal ``peer``, wait ``grace`` seconds, SIGKILL if needed; also kill any leftover ``p2pd``."""
    if peer.running:
        peer.signal(sig)
        if await peer.wait(grace) is None:
            logger.warning("%s ignored signal %s for %.0f s; killing it", peer.name, sig, grace)
            peer.signal(signal.SIGKILL)
            await peer.wait(grace)
    for pid in peer.daemon_pids:  # PR_SET_PDEATHSIG should have done this already
        if pid_alive(pid):
            logger.warning("%s left p2pd %d running; killing it", peer.name, pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    if peer._drain is not None:
        with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(peer._drain, 2)
    return peer.proc.returncode


@dataclass(frozen=True, kw_only=True)
class NetSimSpec:
    """Network conditions of a :class:`LocalSwarm`, which spreads its processes over the regions in turn: the
    bootstrap in ``r0``, peer ``i`` in ``r{(i + 1) % regions}``."""

    regions: int = 1
    """Number of regions the processes are spread over, in turn."""
    rtt_across_ms: float = 100.0
    """Round-trip time between two regions (ms)."""
    rtt_inside_ms: float = 5.0
    """Round-trip time inside a region (ms)."""
    bandwidth_mbit: float | None = None
    """Mbit/s per direction per peer pair; ``None``: unlimited."""

    def build(self, peer_ids: list[str]) -> NetSim:
        """The NetSim of these peers (bootstrap first); :class:`ConfigError` for a bad value."""
        return NetSim.round_robin(
            peer_ids, self.regions, rtt_across_ms=self.rtt_across_ms, rtt_inside_ms=self.rtt_inside_ms,
            bandwidth_mbit=self.bandwidth_mbit,
        )  # fmt: skip


def threads_per_peer(n_peers: int) -> tuple[str, ...]:
    """``join`` flags that share this machine's cores among ``n_peers`` training processes: torch's default of
    one thread per core in every process oversubscribes the CPU, and a starting process then waits its turn."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return ("--threads", str(max(1, cores // max(1, n_peers))))


class LocalSwarm:
    """A bootstrap node plus peers as processes on 127.0.0.1. Build with :meth:`create`, end with :meth:`aclose`."""

    def __init__(
        self, swarm: str, heartbeat_s: float, extra_args: tuple[str, ...], bootstrap_args: tuple[str, ...] = (),
        peer_args: tuple[str, ...] = (),
    ):  # fmt: skip
        self.swarm = swarm
        self.heartbeat_s = heartbeat_s
        self.extra_args = extra_args
        self.bootstrap_args = bootstrap_args
        """Only for the bootstrap node, e.g. the swarm's training config flags."""
        self.peer_args = peer_args
        """Only for joined peers, e.g. ``--rounds 20`` or ``--no-train``."""
        self.bootstrap: PeerProcess | None = None
        self.peers: list[PeerProcess] = []
        self.retired: list[PeerProcess] = []
        self.netsim: NetSim | None = None
        """The injected network conditions (:meth:`use_netsim`); every process gets them."""
        self._started = 0
        self._dir: str | None = None  # key files and the NetSim file, removed by aclose
        self._netsim_path: str | None = None
        self._keys: deque[str] = deque()  # pre-made key files, for the next add_peer calls

    @classmethod
    async def create(
        cls,
        n_peers: int,
        *,
        swarm: str = "local",
        heartbeat_s: float = 1.0,
        extra_args: tuple[str, ...] = (),
        bootstrap_identity: str | None = None,
        bootstrap_args: tuple[str, ...] = (),
        peer_args: tuple[str, ...] = (),
        per_peer_args: Sequence[tuple[str, ...]] = (),
        netsim: NetSimSpec | None = None,
        identities: bool = False,
    ) -> LocalSwarm:
        """Start a bootstrap node and ``n_peers`` peers; with ``netsim``, under those network conditions. With
        ``identities`` (implied by ``netsim``) every peer gets a key file (:meth:`identity_of`), so it can be
        restarted as the same peer. ``per_peer_args[i]`` go to peer ``i`` after ``peer_args`` (e.g. its
        ``--speed``)."""
        if len(per_peer_args) > n_peers:
            raise ValueError(f"per_peer_args for {len(per_peer_args)} peers, but only {n_peers} peers")
        self = cls(swarm, heartbeat_s, extra_args, bootstrap_args, peer_args)
        try:
            if netsim is not None:
                bootstrap_identity = self.use_netsim(netsim, n_peers, bootstrap_identity=bootstrap_identity)
            elif identities:
                self._make_keys(n_peers)
            await self.start_bootstrap(identity=bootstrap_identity)
            extra = [*per_peer_args, *[()] * (n_peers - len(per_peer_args))]
            await asyncio.gather(*(self.add_peer(args=(*peer_args, *extra[i])) for i in range(n_peers)))
        except BaseException:
            await self.aclose()
            raise
        return self

    def use_netsim(self, spec: NetSimSpec, n_peers: int, *, bootstrap_identity: str | None = None) -> str:
        """Before any process starts: make key files for the bootstrap (unless ``bootstrap_identity``) and the
        next ``n_peers`` :meth:`add_peer` calls, and the NetSim JSON of their peer ids that every process gets.
        Returns the bootstrap's key file."""
        if self._dir is not None or self.bootstrap is not None:
            raise RuntimeError("use_netsim must be called once, before the swarm starts")
        peer_ids = self._make_keys(n_peers)
        assert self._dir is not None
        if bootstrap_identity is None:
            bootstrap_identity = os.path.join(self._dir, "bootstrap.key")
        peer_ids.insert(0, Identity.load_or_create(bootstrap_identity).peer_id)
        self.netsim = spec.build(peer_ids)
        self._netsim_path = os.path.join(self._dir, "netsim.json")
        with open(self._netsim_path, "w", encoding="utf-8") as f:
            f.write(self.netsim.to_json())
        return bootstrap_identity

    def _make_keys(self, n_peers: int) -> list[str]:
        """Key files for the next ``n_peers`` :meth:`add_peer` calls, in a directory removed by :meth:`aclose`;
        returns their peer ids."""
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="legion-swarm-")
        peer_ids = []
        for _ in range(n_peers):
            path = os.path.join(self._dir, f"peer{len(self._keys) + self._started}.key")
            identity = Identity.generate()
            identity.save(path)
            peer_ids.append(identity.peer_id)
            self._keys.append(path)
        return peer_ids

    def entries(self, rng: random.Random) -> list[str]:
        """Every live process's address (peers and bootstrap) in ``rng``'s order: what a restarted peer is given
        to join through, since any one of them may die while it starts."""
        live = [p for p in [*self.peers, self.bootstrap] if p is not None and p.running]
        entries = [p.maddr for p in live]
        rng.shuffle(entries)
        return entries

    @staticmethod
    def identity_of(peer: PeerProcess) -> str | None:
        """The key file ``peer`` was started with, if any."""
        return peer.argv[peer.argv.index("--identity") + 1] if "--identity" in peer.argv else None

    def _common(self) -> list[str]:
        netsim = ["--netsim", self._netsim_path] if self._netsim_path is not None else []
        return ["--host", "127.0.0.1", "--port", "0", "--heartbeat", str(self.heartbeat_s), *netsim, *self.extra_args]

    async def start_bootstrap(self, *, identity: str | None = None) -> PeerProcess:
        argv = ["bootstrap", "--swarm", self.swarm, *self._common(), *self.bootstrap_args]
        if identity:
            argv += ["--identity", identity]
        self.bootstrap = await start_process("bootstrap", argv)
        return self.bootstrap

    async def add_peer(
        self, *, entry: str | Sequence[str] | None = None, identity: str | None = None,
        args: tuple[str, ...] | None = None,
    ) -> PeerProcess:  # fmt: skip
        """Start one more ``join`` process through ``entry`` (one address or several to try; default: the
        bootstrap's address), with ``args`` instead of the swarm's ``peer_args`` if given. ``identity`` defaults
        to the next pre-made key file, if any."""
        if entry is None:
            assert self.bootstrap is not None
            entry = self.bootstrap.maddr
        entries = [entry] if isinstance(entry, str) else list(entry)
        argv = [
            "join",
            *[arg for maddr in entries for arg in ("--peer", maddr)],
            "--swarm",
            self.swarm,
            *self._common(),
            *(self.peer_args if args is None else args),
        ]
        if identity is None and self._keys:
            identity = self._keys.popleft()  # before awaiting, like the name: peer i gets key i
        if identity:
            argv += ["--identity", identity]
        name = f"peer{self._started}"  # counted before awaiting: peers are often started concurrently
        self._started += 1
        peer = await start_process(name, argv)
        self.peers.append(peer)
        return peer

    def processes(self) -> list[PeerProcess]:
        return [p for p in [self.bootstrap, *self.peers, *self.retired] if p is not None]

    def daemon_pids(self) -> list[int]:
        return [pid for p in self.processes() for pid in p.daemon_pids]

    async def kill(self, peer: PeerProcess, sig: int = signal.SIGKILL) -> None:
        """Stop one process with ``sig`` (SIGKILL by default: no goodbye) and reap it."""
        await stop_process(peer, sig=sig)
        if peer in self.peers:
            self.peers.remove(peer)
            self.retired.append(peer)

    async def aclose(self) -> None:
        """Stop every process (peers first, then the bootstrap), reap every daemon, remove the NetSim's files."""
        try:
            procs = [*self.peers, *self.retired]
            await asyncio.gather(*(stop_process(p) for p in procs), return_exceptions=True)
            if self.bootstrap is not None:
                await stop_process(self.bootstrap)
        finally:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)

    async def __aenter__(self) -> LocalSwarm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


@dataclass(frozen=True, kw_only=True)
class Restart:
    """One restart :class:`Churn` attempted."""

    victim: PeerProcess
    """The killed process."""
    spawned_at: float
    """Wall-clock time (``time.time()``) the new process was started."""
    peer: PeerProcess | None
    """The new process, the same peer id as the victim; None if it could not start."""
    startup_s: float | None
    """Seconds from spawning until the new process listened."""


class Churn:
    """Kill a random peer with SIGKILL every ``every_s`` s (± 25 %, drawn from ``rng``) and restart it
    ``restart_after_s`` s later with its key file, as the same peer, through every live process in ``rng``'s
    order. The swarm's peers need key files (``LocalSwarm.create(..., identities=True)``).

    ``ready()`` names the peers that may be killed now (an empty list skips this turn); ``ending()`` true stops
    the kills and the restarts not yet started; ``restart_args(victim)`` (called at the kill) gives the new
    process's ``join`` flags (None: the swarm's); ``on_spawn(victim, spawned_at)`` runs just before a restart
    starts. Restarts under way are :attr:`pending`; :meth:`aclose` cancels and awaits them."""

    def __init__(
        self, swarm: LocalSwarm, *, every_s: float, ready: Callable[[], Awaitable[list[PeerProcess]]],
        rng: random.Random | None = None, restart_after_s: float = 5.0,
        restart_args: Callable[[PeerProcess], tuple[str, ...] | None] = lambda victim: None,
        ending: Callable[[], bool] = lambda: False, on_spawn: Callable[[PeerProcess, float], None] | None = None,
    ) -> None:  # fmt: skip
        if every_s <= 0 or restart_after_s < 0:
            raise ValueError("churn needs every_s > 0 and restart_after_s >= 0")
        self.swarm = swarm
        self.every_s, self.restart_after_s = every_s, restart_after_s
        self.rng = rng if rng is not None else random.Random()
        self.ready, self.restart_args, self.ending, self.on_spawn = ready, restart_args, ending, on_spawn
        self.killed: list[PeerProcess] = []
        self.restarts: list[Restart] = []
        self.pending: set[asyncio.Task[None]] = set()

    def next_delay(self) -> float:
        return self.every_s * self.rng.uniform(0.75, 1.25)

    async def run(self, stop: asyncio.Event | None = None, *, until: float | None = None) -> None:
        """Kill and restart until ``stop`` is set, ``until`` (a ``time.perf_counter()`` value) passes or
        ``ending()`` is true. Restarts already scheduled go on: see :attr:`pending`."""
        stop = stop if stop is not None else asyncio.Event()
        while not stop.is_set():
            delay = self.next_delay()
            if until is not None and time.perf_counter() + delay >= until:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set() or self.ending():
                return
            await self.kill_one()

    async def kill_one(self) -> PeerProcess | None:
        """Kill one of the ready peers, if any, and schedule its restart."""
        ready = await self.ready()
        if not ready:
            return None
        victim = self.rng.choice(ready)
        logger.info("churn: SIGKILL %s", victim.name)
        await self.swarm.kill(victim, signal.SIGKILL)
        self.killed.append(victim)
        task = asyncio.create_task(self._restart(victim, self.restart_args(victim)))
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)
        return victim

    async def _restart(self, victim: PeerProcess, args: tuple[str, ...] | None) -> None:
        await asyncio.sleep(self.restart_after_s)
        if self.ending():
            logger.info("churn: not restarting %s: the run is ending", victim.name)
            return
        spawned_at = time.time()  # a rejoin time counts the process's start-up
        if self.on_spawn is not None:
            self.on_spawn(victim, spawned_at)
        try:
            identity = LocalSwarm.identity_of(victim)
            peer = await self.swarm.add_peer(entry=self.swarm.entries(self.rng), identity=identity, args=args)
        except NetworkError as e:  # counted: restarts < kills
            logger.warning("churn: could not restart %s: %s", victim.name, e)
            self.restarts.append(Restart(victim=victim, spawned_at=spawned_at, peer=None, startup_s=None))
            return
        startup_s = time.time() - spawned_at
        self.restarts.append(Restart(victim=victim, spawned_at=spawned_at, peer=peer, startup_s=startup_s))
        logger.info("churn: restarted %s as %s", victim.name, peer.name)

    async def settle(self) -> None:
        """Wait for the restarts under way."""
        while self.pending:
            await asyncio.wait(set(self.pending))

    async def aclose(self) -> None:
        """Cancel the restarts under way and wait until they have ended."""
        tasks = list(self.pending)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
