"""The data plane: authenticated message channels between peers, over direct TCP or libp2p streams.

Two planes sit behind one :class:`Channel` interface (``send`` / ``recv`` / ``recv_into`` / ``aclose``):

- **direct**: a TCP connection secured by :mod:`~legion_swarm.transport.secure` (both ends prove their
  libp2p identity; AES-128-OCB3 records). Fast, but needs the peer to be reachable at its published endpoint.
- **libp2p**: a ``p2pd`` stream (:mod:`~legion_swarm.transport.p2p_stream`), which libp2p authenticates and
  routes through NAT and relays; slower (every byte crosses two daemons).

:meth:`DataPlane.connect` prefers direct (``plane="auto"``) and falls back to libp2p when the peer publishes
no endpoint or cannot be dialled; a peer found unreachable directly is not dialled directly again for
``_DIRECT_RETRY_S``. Channels are *routed*: the opener's first message is a short route key (a round id),
and the accepting side hands the channel to whoever :meth:`DataPlane.expect` s that key. A channel may
arrive before the local side expects it (its peer started the round first): it waits, a bounded number
for a bounded time, then is closed.

Both planes go through the host's :class:`~legion_swarm.transport.netsim.Shaper` when it injects network
conditions (``HostConfig.netsim``): the stream plane inside :class:`Host`, the direct plane in the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Protocol

from legion_swarm.errors import NetworkError, ProtocolError
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity, short_peer_id
from legion_swarm.transport.netsim import NetSim, Shaper
from legion_swarm.transport.p2p_stream import StreamChannel, open_stream_channel
from legion_swarm.transport.record_layer import BytesLike
from legion_swarm.transport.secure import secure_accept, secure_connect

logger = logging.getLogger(__name__)

DATA_PROTOCOL = "/legion/data/2"  # 2: CRC-32C framing (p2p_stream)
"""libp2p protocol name of the stream plane."""
MAX_ROUTE_BYTES = 128
_DIRECT_RETRY_S = 60.0
_MAX_PENDING = 64  # channels that arrived before anyone expected their route
_PENDING_TTL_S = 30.0


class Channel(Protocol):
    """A reliable, ordered, message-oriented duplex channel to one authenticated peer."""

    local_peer_id: str
    remote_peer_id: str

    @property
    def closed(self) -> bool: ...

    async def send(self, data: BytesLike) -> None: ...

    async def recv(self, max_bytes: int) -> bytes: ...

    async def recv_into(self, buffer: BytesLike) -> int: ...

    async def aclose(self) -> None: ...


class Inbox:
    """Channels opened to us for one route, as they arrive (see :meth:`DataPlane.expect`)."""

    def __init__(self, route: bytes) -> None:
        self.route = route
        self._queue: asyncio.Queue[Channel] = asyncio.Queue()

    async def get(self) -> Channel:
        return await self._queue.get()

    def _put(self, channel: Channel) -> None:
        self._queue.put_nowait(channel)

    def _drain(self) -> list[Channel]:
        left = []
        while not self._queue.empty():
            left.append(self._queue.get_nowait())
        return left


class DataPlane:
    """Opens and accepts data channels for this peer. Build with :meth:`create`, release with :meth:`aclose`."""

    def __init__(self, identity: Identity, host: Host | None, tag: str, shaper: Shaper | None = None) -> None:
        self.identity = identity
        self.host = host
        self.shaper = shaper
        """Delays our side of direct channels (netsim); ``None``: no injection."""
        self.endpoint: tuple[str, int] | None = None
        """``(ip, port)`` other peers dial for the direct plane; ``None`` if this peer serves no direct plane."""
        self._tag = tag
        self._server: asyncio.Server | None = None
        self._inboxes: dict[bytes, Inbox] = {}
        self._pending: list[tuple[float, bytes, Channel]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._direct_failed: dict[str, float] = {}  # peer id -> when a direct dial last failed
        self._handshake_timeout = 5.0
        self._closed = False

    @classmethod
    async def create(
        cls, identity: Identity, *, host: Host | None = None, listen: str | None = "127.0.0.1", port: int = 0,
        advertise: str | None = None, handshake_timeout_s: float = 5.0, netsim: NetSim | None = None,
    ) -> DataPlane:  # fmt: skip
        """Start serving: a direct-TCP listener on ``listen:port`` (none if ``listen`` is None) and, given a
        ``host``, the libp2p stream handler. ``advertise`` is the IP peers should dial (default: ``listen``,
        or 127.0.0.1 for a wildcard listen address). ``netsim`` delays direct channels (default: the host's)."""
        shaper = Shaper(netsim, identity.peer_id) if netsim is not None else host.shaper if host is not None else None
        plane = cls(identity, host, f"[{short_peer_id(identity.peer_id)}]", shaper)
        plane._handshake_timeout = handshake_timeout_s
        try:
            if listen is not None:
                plane._server = await asyncio.start_server(plane._on_tcp, listen, port)
                bound_port = plane._server.sockets[0].getsockname()[1]
                if advertise is None:
                    advertise = "127.0.0.1" if ipaddress.ip_address(listen).is_unspecified else listen
                plane.endpoint = (advertise, bound_port)
            if host is not None:
                await host.add_stream_handler(DATA_PROTOCOL, plane._on_stream)
        except BaseException:
            await plane.aclose()
            raise
        logger.debug("%s data plane up: direct %s, libp2p %s", plane._tag, plane.endpoint, host is not None)
        return plane

    # ------------------------------------------------------------------------------------------ opening

    async def connect(
        self, peer_id: str, route: bytes, *, direct: tuple[str, int] | None = None, maddrs: tuple[str, ...] = (),
        plane: str = "auto", timeout: float = 5.0,
    ) -> Channel:  # fmt: skip
        """Open a channel to ``peer_id`` for ``route`` within ``timeout`` seconds.

        Raises :class:`NetworkError` (or ``TimeoutError``) if neither allowed plane reaches the peer."""
        if not 0 < len(route) <= MAX_ROUTE_BYTES:
            raise ValueError(f"route must be 1-{MAX_ROUTE_BYTES} bytes")
        deadline = time.monotonic() + timeout
        errors: list[str] = []
        channel: Channel | None = None
        recently_failed = time.monotonic() - self._direct_failed.get(peer_id, -1e9) < _DIRECT_RETRY_S
        try_direct = plane == "direct" or (plane == "auto" and direct is not None and not recently_failed)
        if try_direct:
            if direct is None:
                raise NetworkError(f"peer {short_peer_id(peer_id)} publishes no direct endpoint")
            # With a fallback available, leave it half of the budget.
            budget = timeout / 2 if plane == "auto" and self.host is not None else timeout
            try:
                channel = await secure_connect(direct[0], direct[1], self.identity, peer_id, budget, shaper=self.shaper)
            except (TimeoutError, OSError, NetworkError) as e:
                self._direct_failed[peer_id] = time.monotonic()
                errors.append(f"direct {direct[0]}:{direct[1]}: {e!r}")
                if plane == "direct" or self.host is None:
                    raise NetworkError(f"cannot reach {short_peer_id(peer_id)}: {'; '.join(errors)}") from e
        if channel is None:
            if self.host is None:
                raise NetworkError(f"cannot reach {short_peer_id(peer_id)}: no direct endpoint and no libp2p host")
            remaining = max(0.1, deadline - time.monotonic())
            try:
                if maddrs:
                    await asyncio.wait_for(self.host.connect(peer_id, maddrs), remaining)
                channel = await open_stream_channel(
                    self.host, peer_id, DATA_PROTOCOL, timeout=max(0.1, deadline - time.monotonic())
                )
            except (TimeoutError, OSError, NetworkError) as e:
                errors.append(f"libp2p: {e!r}")
                raise NetworkError(f"cannot reach {short_peer_id(peer_id)}: {'; '.join(errors)}") from e
        try:
            await asyncio.wait_for(channel.send(route), max(0.1, deadline - time.monotonic()))
        except BaseException:
            await channel.aclose()
            raise
        return channel

    # ---------------------------------------------------------------------------------------- accepting

    @contextlib.asynccontextmanager
    async def expect(self, route: bytes) -> AsyncIterator[Inbox]:
        """Receive the channels opened to us for ``route`` while the context is open; those not taken are
        closed when it exits (so are channels that arrived earlier and waited)."""
        if route in self._inboxes:
            raise RuntimeError(f"route {route.hex()} is already expected")
        inbox = self._inboxes[route] = Inbox(route)
        waiting = [entry for entry in self._pending if entry[1] == route]
        self._pending = [entry for entry in self._pending if entry[1] != route]
        for _, _, channel in waiting:
            inbox._put(channel)
        try:
            yield inbox
        finally:
            del self._inboxes[route]
            for channel in inbox._drain():
                await channel.aclose()

    def _route(self, route: bytes, channel: Channel) -> None:
        inbox = self._inboxes.get(route)
        if inbox is not None:
            inbox._put(channel)
            return
        now = time.monotonic()
        stale = [c for t, _, c in self._pending if now - t > _PENDING_TTL_S]
        self._pending = [e for e in self._pending if now - e[0] <= _PENDING_TTL_S]
        if len(self._pending) >= _MAX_PENDING:
            stale.append(self._pending.pop(0)[2])
        self._pending.append((now, route, channel))
        for old in stale:
            self._spawn(old.aclose())

    async def _admit(self, channel: Channel) -> None:
        """Read the route key of a fresh channel and hand it on."""
        try:
            route = await asyncio.wait_for(channel.recv(MAX_ROUTE_BYTES), self._handshake_timeout)
            if not route:
                raise ProtocolError("empty route")
        except (TimeoutError, NetworkError, OSError) as e:
            peer = short_peer_id(channel.remote_peer_id)
            logger.info("%s dropped a channel from %s: no route (%r)", self._tag, peer, e)
            await channel.aclose()
            return
        if self._closed:
            await channel.aclose()
            return
        self._route(route, channel)

    async def _on_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            channel = await secure_accept(
                reader, writer, self.identity, lambda peer_id: True, self._handshake_timeout, shaper=self.shaper
            )
            await self._admit(channel)
        except (TimeoutError, NetworkError, OSError) as e:
            logger.info("%s refused a direct connection: %r", self._tag, e)
        finally:
            self._tasks.discard(task)

    async def _on_stream(self, stream_info: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._admit(StreamChannel.accepted(self.identity.peer_id, stream_info, reader, writer))
        finally:
            self._tasks.discard(task)

    def close_later(self, channel: Channel) -> None:
        """Close ``channel`` in the background (a peer that stopped reading can hold a graceful close for a
        second); the plane owns the task and cancels it in :meth:`aclose`."""
        self._spawn(channel.aclose())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------------------------------ closing

    async def aclose(self) -> None:
        """Stop accepting, close waiting channels and cancel handshakes in progress (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        if self.host is not None:
            with contextlib.suppress(Exception):
                await self.host.p2p.remove_binary_stream_handler(DATA_PROTOCOL)
        pending, self._pending = self._pending, []
        for _, _, channel in pending:
            await channel.aclose()
        tasks = [t for t in self._tasks if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)

    async def __aenter__(self) -> DataPlane:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
