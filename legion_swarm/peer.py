"""``SwarmPeer``: one process's membership in a swarm: libp2p host, DHT node, heartbeat, RTT probing.

::

    async with await SwarmPeer.create(PeerConfig(host=HostConfig(initial_peers=(maddr,)))) as peer:
        view = await peer.view()

Everything runs in-process on the current event loop (uvloop in the CLI). ``create`` either returns a
fully joined peer or raises having released everything; ``aclose`` always releases everything, even when a
step of it fails, within ``close_timeout_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from legion_swarm import __version__
from legion_swarm.config import DEFAULT_SWARM, PeerConfig
from legion_swarm.dht.membership import Hello, Membership, read_members, say_hello, serve_hello
from legion_swarm.dht.node import Found, SwarmDHT, dht_time
from legion_swarm.dht.reconnect import Reconnector
from legion_swarm.dht.records import PeerRecord
from legion_swarm.errors import ConfigError, PeerUnreachableError, SwarmMismatchError, UnsupportedProtocolError
from legion_swarm.groups.probe import Prober, read_rtts, serve_ping
from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity, short_peer_id

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Member:
    """One live member as seen by a reader."""

    record: PeerRecord
    expires_at: float
    last_seen_s: float


@dataclass(frozen=True)
class SwarmView:
    """A snapshot of a swarm's membership, read from the DHT."""

    swarm: str
    members: tuple[Member, ...]
    read_at: float
    """Unix time of the read."""
    read_s: float
    """How long the DHT read took, in seconds."""


def advertised_ip(listen: str, announce: tuple[str, ...], maddrs: list[str]) -> str:
    """The IP other peers should dial for our data plane: an announced IPv4 address, else the listen address
    if it is a specific one, else the first non-loopback IPv4 address p2pd sees, else loopback."""
    for maddr in announce:
        if maddr.startswith("/ip4/"):
            return maddr.split("/")[2]
    if listen not in ("0.0.0.0", "::"):
        return listen
    for maddr in maddrs:
        if maddr.startswith("/ip4/") and not maddr.startswith("/ip4/127."):
            return maddr.split("/")[2]
    return "127.0.0.1"


def _peer_id_of_maddr(maddr: str) -> str:
    return maddr.rsplit("/p2p/", 1)[1]


HELLO_FALLBACK_S = 5.0
"""With the swarm named (``--swarm``), how long the entry peers' hello may take before the join goes on through the
DHT alone: hello is the fast path, not a requirement (a plain hivemind DHT node does not speak it)."""


async def _hello_with_retries(
    host: Host, peer_id: str, wanted: str | None, deadline: float, answered: asyncio.Event
) -> Hello:
    """Handshake with one entry peer, retrying transient failures (a stream reset under load) with backoff.

    Retries stop at ``deadline`` or as soon as any entry peer has answered (``answered``), so a dead
    peer in the list never holds up a join that a live one made possible. A peer that does not serve the hello
    protocol at all (:class:`UnsupportedProtocolError`) is not asked again.
    """
    delay = 0.1
    while True:
        try:
            hello = await say_hello(host, peer_id, wanted, timeout=max(deadline - time.perf_counter(), 0.1))
        except UnsupportedProtocolError:
            raise
        except Exception as e:  # reset, timeout, dial failure, garbage: all retried the same way
            if answered.is_set() or time.perf_counter() + delay >= deadline:
                raise
            tag = short_peer_id(peer_id)
            logger.debug("[%s] hello to %s failed (%r); retrying in %.1f s", host.short_id, tag, e, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)
        else:
            answered.set()
            return hello


class SwarmPeer:
    """A member (or, with ``role="observer"``, a silent reader) of one swarm."""

    def __init__(self, config: PeerConfig, host: Host, swarm: str):
        self.config = config
        self.host = host
        self.swarm = swarm
        self.dht: SwarmDHT | None = None
        self.membership: Membership | None = None
        self.reconnector: Reconnector | None = None
        """Reconnects through any member seen so far after a network cut (members only)."""
        self.plane: DataPlane | None = None
        """The direct-TCP + libp2p data plane for collectives (members only; observers have none)."""
        self.prober: Prober | None = None
        """Measures and publishes this member's RTTs (members only)."""
        self.maddrs: list[str] = []
        self.join_timings: dict[str, float] = {}
        """Seconds spent in each phase of :meth:`create`: daemon, dht (with the handshake), publish, total."""
        self.entry_hellos: list[Hello] = []
        """What the entry peers answered to our hello (empty for the first node of a swarm, and for a peer that joined
        through the DHT alone, e.g. through a plain hivemind DHT node)."""
        self._hello_fields: dict[str, object] = {}  # extra fields of our hello answers (set_hello_field)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    def set_hello_field(self, name: str, value: object) -> None:
        """Answer every later hello with ``name: value`` too, e.g. ``config``: the digest of the swarm's training
        config, which joiners through us then trust."""
        self._hello_fields[name] = value

    @property
    def peer_id(self) -> str:
        return self.host.peer_id

    @property
    def tag(self) -> str:
        return short_peer_id(self.peer_id)

    @classmethod
    async def create(cls, config: PeerConfig, *, identity: Identity | None = None) -> SwarmPeer:
        """Start the daemon, check the entry peers' swarm, join the DHT and publish our first record.

        Raises :class:`PeerUnreachableError` if no initial peer answers (neither our hello nor the DHT),
        :class:`SwarmMismatchError` if one serves another swarm, :class:`ConfigError` if they speak the DHT but
        not our hello and ``membership.swarm`` is ``None``, :class:`~legion_swarm.errors.AddressInUseError` if
        the port is taken, and ``TimeoutError`` past ``join_timeout_s``.
        """
        t0 = time.perf_counter()
        deadline = t0 + config.join_timeout_s
        host = await asyncio.wait_for(Host.create(config.host, identity), config.join_timeout_s)
        t_host = time.perf_counter()
        try:
            hellos, dht = await cls._handshake_and_bootstrap(host, config, deadline)
        except BaseException:
            await host.aclose()
            raise
        swarm = hellos[0].swarm if hellos else config.membership.swarm  # no hello: the DHT alone, --swarm named
        assert swarm is not None
        self = cls(config, host, swarm)
        self.entry_hellos = [h for h in hellos if h.peer_id != host.peer_id]
        self.dht = dht
        self.join_timings["daemon_s"] = t_host - t0
        self.join_timings["dht_s"] = time.perf_counter() - t_host
        try:
            await asyncio.wait_for(self._join(), max(deadline - time.perf_counter(), 1.0))
        except BaseException:
            await self.aclose()
            raise
        self.join_timings["total_s"] = time.perf_counter() - t0
        phases = ", ".join(f"{k[:-2]} {v:.2f}" for k, v in self.join_timings.items() if k != "total_s")
        logger.info(
            "[%s] joined swarm %r as %s in %.2f s (%s)",
            self.tag, self.swarm, config.membership.role, self.join_timings["total_s"], phases,
        )  # fmt: skip
        return self

    @classmethod
    async def _handshake_and_bootstrap(
        cls, host: Host, config: PeerConfig, deadline: float
    ) -> tuple[list[Hello], SwarmDHT]:
        """Check the entry peers' swarm while the DHT node bootstraps: both need only the daemon.

        If no entry peer answers the hello (a plain hivemind DHT node, or one too slow within
        :data:`HELLO_FALLBACK_S`), the join goes on through the DHT alone, which needs the swarm's name: the
        hellos returned are then empty. If the handshake fails (another swarm, nobody answers), the DHT node is
        cancelled or closed again.
        """
        dht_task = asyncio.ensure_future(SwarmDHT.create(host, config.dht))
        try:
            hellos, failures = await cls._check_entry_peers(host, config, timeout=deadline - time.perf_counter())
            if not hellos:
                return [], await cls._dht_only(host, config, dht_task, failures, deadline)
            dht = await asyncio.wait_for(dht_task, max(deadline - time.perf_counter(), 0.1))
        except BaseException:
            await cls._discard(dht_task)
            raise
        return hellos, dht

    @staticmethod
    async def _discard(dht_task: asyncio.Future[SwarmDHT]) -> None:
        """Cancel a DHT node's start, or close the node if it had started."""
        dht_task.cancel()
        try:
            unused = await dht_task
        except BaseException:  # cancelled or failed: nothing was built
            pass
        else:
            await unused.aclose()

    @classmethod
    async def _dht_only(
        cls, host: Host, config: PeerConfig, dht_task: asyncio.Future[SwarmDHT], failures: dict[str, BaseException],
        deadline: float,
    ) -> SwarmDHT:  # fmt: skip
        """No entry peer answered the hello: the DHT node built through them, if they speak the DHT and the swarm is
        named. :class:`PeerUnreachableError` if they speak neither (or are unreachable), :class:`ConfigError` if
        they speak the DHT but the swarm is not named."""
        entries = ", ".join(config.host.initial_peers)
        reasons = "; ".join(f"{short_peer_id(p)}: {e or type(e).__name__}" for p, e in failures.items())
        try:
            dht = await asyncio.wait_for(dht_task, max(deadline - time.perf_counter(), 0.1))
        except (PeerUnreachableError, TimeoutError):
            unsupported = any(isinstance(e, UnsupportedProtocolError) for e in failures.values())
            what = "speaks the legion hello or the hivemind DHT" if unsupported else "answered the hello or DHT pings"
            raise PeerUnreachableError(f"none of the initial peers {what} ({reasons}): {entries}") from None
        wanted = config.membership.swarm
        if wanted is None:  # the caller closes the node again
            if not any(isinstance(e, UnsupportedProtocolError) for e in failures.values()):
                raise PeerUnreachableError(f"none of the initial peers answered ({reasons}): {entries}")
            raise ConfigError(
                f"the entry peers speak the DHT but not the legion hello (plain hivemind DHT nodes?): "
                f"name the swarm with --swarm to find it through the DHT: {entries}"
            )
        logger.info(
            "[%s] no entry peer answered the hello (%s); joining swarm %r through the DHT alone",
            host.short_id, reasons, wanted,
        )  # fmt: skip
        return dht

    @staticmethod
    async def _check_entry_peers(
        host: Host, config: PeerConfig, *, timeout: float
    ) -> tuple[list[Hello], dict[str, BaseException]]:
        """Ask every initial peer which swarm it serves; return their answers (all for one swarm) and, by peer id,
        why the others did not answer.

        An unreachable peer fails at once (the daemon's dial is refused), and so does one that does not serve the
        hello (a plain DHT node). Without ``--swarm`` a reachable but busy one gets the whole remaining join
        budget, since giving up on it would turn load into "unreachable"; with ``--swarm``, at most
        :data:`HELLO_FALLBACK_S`, after which the join goes on through the DHT alone.
        """
        wanted = config.membership.swarm
        if not config.host.initial_peers:
            return [Hello(host.peer_id, wanted or DEFAULT_SWARM, __version__, config.membership.role)], {}
        peer_ids = list(dict.fromkeys(_peer_id_of_maddr(m) for m in config.host.initial_peers))
        deadline = time.perf_counter() + (timeout if wanted is None else min(timeout, HELLO_FALLBACK_S))
        answered = asyncio.Event()
        replies = await asyncio.gather(
            *(_hello_with_retries(host, p, wanted, deadline, answered) for p in peer_ids), return_exceptions=True
        )
        hellos: list[Hello] = []
        failures: dict[str, BaseException] = {}
        for peer_id, reply in zip(peer_ids, replies, strict=True):
            if isinstance(reply, Exception):  # unreachable, timed out, no hello protocol, or spoke garbage
                failures[peer_id] = reply
                logger.info("[%s] entry peer %s did not answer hello: %r", host.short_id, short_peer_id(peer_id), reply)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                hellos.append(reply)
        if not hellos:
            return [], failures
        swarms = {h.swarm for h in hellos}
        if wanted is not None and swarms != {wanted}:
            other = next(h for h in hellos if h.swarm != wanted)
            raise SwarmMismatchError(
                f"peer {other.peer_id} belongs to swarm {other.swarm!r}, not {wanted!r} "
                f"(omit --swarm to join the peer's swarm)"
            )
        if len(swarms) > 1:
            raise SwarmMismatchError(f"the initial peers belong to different swarms: {sorted(swarms)}")
        return hellos, failures

    async def _join(self) -> None:
        assert self.dht is not None
        role = self.config.membership.role
        if role != "observer":
            await serve_hello(self.host, self.swarm, role, extra=lambda: self._hello_fields)
            await serve_ping(self.host, timeout_s=self.config.probe.timeout_s)
        self.maddrs = await self.host.maddrs()
        t1 = time.perf_counter()
        if role != "observer":
            host_config = self.config.host
            self.plane = await DataPlane.create(
                self.host.identity, host=self.host, listen=host_config.host, port=host_config.data_port,
                advertise=advertised_ip(host_config.host, host_config.announce, self.maddrs),
            )  # fmt: skip
            self.membership = Membership(
                self.dht, self.config.membership, self.swarm, self.maddrs, data=self.plane.endpoint
            )
            if not await self.membership.publish():
                logger.warning("[%s] first record was not accepted by the last replica asked", self.tag)
            self._tasks.append(asyncio.create_task(self.membership.run(), name=f"heartbeat-{self.tag}"))
            self.reconnector = Reconnector(
                self.dht, self.swarm, check_s=self.config.membership.heartbeat_s, on_reconnect=self.membership.publish
            )
            self.reconnector.remember((_peer_id_of_maddr(m), (m,)) for m in self.config.host.initial_peers)
            self._tasks.append(asyncio.create_task(self.reconnector.run(), name=f"reconnect-{self.tag}"))
            self.prober = Prober(self.dht, self.swarm, self.config.probe)
            self._tasks.append(asyncio.create_task(self.prober.run(), name=f"probe-{self.tag}"))
            self.join_timings["publish_s"] = time.perf_counter() - t1

    async def view(self) -> SwarmView:
        """Read the swarm's live members from the DHT."""
        assert self.dht is not None, "SwarmPeer is not joined"
        t0 = time.perf_counter()
        found: list[Found] = await read_members(self.dht, self.swarm)
        now = dht_time()
        members = tuple(Member(f.record, f.expires_at, max(0.0, now - f.record.sent_at)) for f in found)
        if self.reconnector is not None:
            self.reconnector.remember((m.record.peer_id, m.record.addrs) for m in members)
        return SwarmView(self.swarm, members, now, time.perf_counter() - t0)

    async def rtts(self) -> dict[str, dict[str, float]]:
        """The swarm's live RTT records: prober peer id -> {measured peer id -> median RTT in ms}."""
        assert self.dht is not None, "SwarmPeer is not joined"
        return await read_rtts(self.dht, self.swarm)

    async def aclose(self) -> None:
        """Announce departure, stop the heartbeat, leave the DHT, stop the daemon (idempotent, bounded)."""
        if self._closed:
            return
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        budget = self.config.close_timeout_s
        try:
            if self.membership is not None:
                try:
                    await asyncio.wait_for(self.membership.leave(), budget / 2)
                except (TimeoutError, Exception) as e:  # departure notice is best effort
                    logger.info("[%s] departure notice not stored: %s", self.tag, e)
            if self.dht is not None:
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(self.dht.aclose(), budget / 4)
            if self.plane is not None:
                with contextlib.suppress(Exception, asyncio.TimeoutError):
                    await asyncio.wait_for(self.plane.aclose(), budget / 8)
        finally:
            await self.host.aclose()
        logger.info("[%s] left swarm %r", self.tag, self.swarm)

    async def __aenter__(self) -> SwarmPeer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
