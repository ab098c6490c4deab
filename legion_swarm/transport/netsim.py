"""Injected network conditions ("netsim"): per-peer-pair latency and bandwidth, for tests and simulation.

The kernel here has no ``netem``, so a swarm on one machine sees loopback latency (microseconds) unless we add
it ourselves. A :class:`NetSim` says where every peer is and what the network between regions looks like::

    {"regions": {"<peer id>": "r0", "<peer id>": "r1"},        every peer of the simulation, by region
     "rtt_ms": {"r0": {"r0": 5, "r1": 120},                    round-trip time (ms) per pair of regions:
                "r1": {"r0": 120, "r1": 5}},                   symmetric, every pair listed (same region too)
     "bandwidth_mbit": 100}                                    optional: Mbit/s per direction per peer pair

A peer's :class:`Shaper` then delays the bytes it *sends*: each outgoing byte stream to a peer (libp2p streams
opened or accepted through :class:`~legion_swarm.transport.host.Host`, direct-TCP data channels) is wrapped in a
:class:`DelayedTransport`. As each side delays only its own outgoing bytes by the one-way time (RTT / 2), a
request and its response see the full RTT. A peer missing from ``regions`` (a status observer) sends and
receives without delay or limit.

The delay is a pipeline, not a pause: bytes written at time ``t`` reach the socket at ``t + one_way``, while
the writer goes on writing. With a bandwidth limit the bytes also queue behind each other on the directed
pair (all streams from A to B share one :class:`Pipe`)::

    link_free = max(now, link_free) + len / bandwidth        serialisation at the bottleneck, FIFO
    due       = link_free + one_way                          then propagation

so a transfer of N bytes takes ``N / bandwidth + one_way``. Writes are copied (the caller may reuse its buffer
as soon as ``write`` returns) and queued per stream; a loop timer hands each chunk to the real transport when it
is due, so there is no task to leak: closing or aborting the stream cancels the timer. Order is kept, and
``close`` / ``write_eof`` take effect after the bytes queued before them. Memory stays bounded: the writer is
paused (``pause_writing``, i.e. ``drain`` blocks) above ``WINDOW_BYTES`` in flight plus its own high-water mark,
which also caps one stream's throughput at ``WINDOW_BYTES / one_way``, like a TCP window.

Not delayed: reads (the sender delayed them already), the DHT (hivemind's RPCs travel inside ``p2pd`` and never
cross our transports, so DHT lookups and stores see loopback latency), and the control connections to our own
``p2pd``. Without a NetSim nothing is wrapped: the hot paths are untouched.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from legion_swarm.errors import ConfigError

WINDOW_BYTES = 8 << 20
"""Bytes one delayed stream may have in flight (queued, not yet due) beyond its writer's high-water mark."""

_PIECE_BYTES = 64 << 10  # a bandwidth-limited write is delivered in pieces of this size, not in one lump
_KEYS = {"regions", "rtt_ms", "bandwidth_mbit"}


def _number(value: Any, where: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ConfigError(f"{where} must be a number (got {value!r})")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where} must be {'> 0' if positive else '>= 0'} (got {value})")
    return float(value)


@dataclass(frozen=True, kw_only=True)
class NetSim:
    """Network conditions per peer pair; validated on construction (:class:`ConfigError` naming the problem)."""

    regions: Mapping[str, str]
    """Peer id (base58) → region name."""
    rtt_ms: Mapping[str, Mapping[str, float]]
    """Region → region → round-trip time in milliseconds; symmetric, with every pair (same region too)."""
    bandwidth_mbit: float | None = None
    """Limit of each directed peer pair in Mbit/s (10^6 bits per second); ``None``: unlimited."""

    def __post_init__(self) -> None:
        if not isinstance(self.regions, Mapping) or not isinstance(self.rtt_ms, Mapping):
            raise ConfigError("netsim 'regions' and 'rtt_ms' must be maps")
        rtt: dict[str, dict[str, float]] = {}
        for a, row in self.rtt_ms.items():
            if not isinstance(a, str) or not a or not isinstance(row, Mapping):
                raise ConfigError(f"rtt_ms[{a!r}] must be a map from region names to milliseconds")
            rtt[a] = {b: _number(ms, f"rtt_ms[{a!r}][{b!r}]") for b, ms in row.items()}
        for a, row in rtt.items():
            for b in row:
                if b not in rtt:
                    raise ConfigError(f"rtt_ms[{a!r}] names unknown region {b!r} (regions: {sorted(rtt)})")
            for b in rtt:
                if b not in row:
                    raise ConfigError(f"rtt_ms has no entry for {a!r} -> {b!r}: list every pair of regions")
                if row[b] != rtt[b][a]:
                    raise ConfigError(f"rtt_ms is not symmetric: {a!r}->{b!r} is {row[b]}, {b!r}->{a!r} is {rtt[b][a]}")
        regions: dict[str, str] = {}
        for peer, region in self.regions.items():
            if not isinstance(peer, str) or not peer or not isinstance(region, str):
                raise ConfigError(f"regions must map peer ids to region names (got {peer!r}: {region!r})")
            if region not in rtt:
                raise ConfigError(f"peer {peer} is in unknown region {region!r} (rtt_ms lists {sorted(rtt)})")
            regions[peer] = region
        bandwidth = self.bandwidth_mbit
        if bandwidth is not None:
            bandwidth = _number(bandwidth, "bandwidth_mbit", positive=True)
        object.__setattr__(self, "regions", regions)
        object.__setattr__(self, "rtt_ms", rtt)
        object.__setattr__(self, "bandwidth_mbit", bandwidth)

    # ------------------------------------------------------------------------------------------ files

    @classmethod
    def from_dict(cls, data: Any) -> NetSim:
        if not isinstance(data, dict):
            raise ConfigError(f"expected a JSON object with {sorted(_KEYS)}, got {type(data).__name__}")
        if unknown := set(data) - _KEYS:
            raise ConfigError(f"unknown key(s) {sorted(unknown)}; expected {sorted(_KEYS)}")
        if missing := {"regions", "rtt_ms"} - set(data):
            raise ConfigError(f"missing key(s) {sorted(missing)}")
        return cls(regions=data["regions"], rtt_ms=data["rtt_ms"], bandwidth_mbit=data.get("bandwidth_mbit"))

    @classmethod
    def load(cls, path: str) -> NetSim:
        """Read and validate a JSON file; :class:`ConfigError` naming the file and the problem."""
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
            raise ConfigError(f"cannot read netsim file {path!r}: {reason}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"netsim file {path!r} is not JSON: {e.msg} at line {e.lineno}") from None
        try:
            return cls.from_dict(data)
        except ConfigError as e:
            raise ConfigError(f"netsim file {path!r}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(
            {"regions": dict(self.regions), "rtt_ms": {a: dict(row) for a, row in self.rtt_ms.items()},
             "bandwidth_mbit": self.bandwidth_mbit}, indent=1,
        )  # fmt: skip

    @classmethod
    def round_robin(
        cls, peer_ids: Iterable[str], n_regions: int, *, rtt_across_ms: float, rtt_inside_ms: float,
        bandwidth_mbit: float | None = None,
    ) -> NetSim:  # fmt: skip
        """Peers assigned to regions ``r0 .. r{n-1}`` in turn; one RTT inside a region, another across."""
        if n_regions < 1:
            raise ConfigError(f"need at least one region (got {n_regions})")
        names = [f"r{i}" for i in range(n_regions)]
        rtt = {a: {b: rtt_inside_ms if a == b else rtt_across_ms for b in names} for a in names}
        regions = {peer: names[i % n_regions] for i, peer in enumerate(peer_ids)}
        return cls(regions=regions, rtt_ms=rtt, bandwidth_mbit=bandwidth_mbit)

    # -------------------------------------------------------------------------------------- queries

    def one_way_s(self, a: str, b: str) -> float:
        """Delay (seconds) of a byte from peer ``a`` to peer ``b``: half their regions' RTT; 0 for an unknown peer."""
        ra, rb = self.regions.get(a), self.regions.get(b)
        if ra is None or rb is None:
            return 0.0
        return self.rtt_ms[ra][rb] / 2000.0

    def bytes_per_s(self, a: str, b: str) -> float | None:
        """Bandwidth limit from ``a`` to ``b`` in bytes per second; ``None`` if unlimited (or a peer is unknown)."""
        if self.bandwidth_mbit is None or a not in self.regions or b not in self.regions:
            return None
        return self.bandwidth_mbit * 1e6 / 8


@dataclass
class Pipe:
    """The schedule of one directed peer pair (pure): when each chunk written to it reaches the far side."""

    one_way_s: float
    bytes_per_s: float | None = None
    free_at: float = 0.0
    """When the bottleneck has serialised everything written so far (loop time, seconds)."""

    def due(self, now: float, nbytes: int) -> float:
        """Arrival time of ``nbytes`` written at ``now``; later calls must not go back in time."""
        if self.bytes_per_s is None:
            return now + self.one_way_s
        self.free_at = max(now, self.free_at) + nbytes / self.bytes_per_s
        return self.free_at + self.one_way_s


class Shaper:
    """Applies a :class:`NetSim` to one peer's outgoing streams; one :class:`Pipe` per remote peer, shared by
    every stream to it (the bandwidth limit is per pair, not per stream)."""

    def __init__(self, netsim: NetSim, local_peer_id: str) -> None:
        self.netsim = netsim
        self.local_peer_id = local_peer_id
        self._pipes: dict[str, Pipe | None] = {}

    def pipe(self, remote_peer_id: str) -> Pipe | None:
        """The pipe to ``remote_peer_id``, or ``None`` when nothing is injected towards it."""
        if remote_peer_id not in self._pipes:
            one_way = self.netsim.one_way_s(self.local_peer_id, remote_peer_id)
            rate = self.netsim.bytes_per_s(self.local_peer_id, remote_peer_id)
            self._pipes[remote_peer_id] = Pipe(one_way, rate) if one_way > 0 or rate is not None else None
        return self._pipes[remote_peer_id]

    def wrap(self, writer: asyncio.StreamWriter, remote_peer_id: str) -> asyncio.StreamWriter:
        """A writer whose bytes reach ``remote_peer_id`` late (``writer`` itself if nothing is injected). The new
        writer owns the connection; the transport under ``writer`` must not be used directly any more."""
        pipe = self.pipe(remote_peer_id)
        if pipe is None:
            return writer
        transport = DelayedTransport(writer.transport, pipe, keep=writer)  # type: ignore[arg-type]
        reader = getattr(writer, "_reader", None)
        return asyncio.StreamWriter(transport, writer._protocol, reader, asyncio.get_running_loop())  # type: ignore[attr-defined]


_CLOSE, _EOF = object(), object()  # queue markers: the real transport's close / write_eof, in order


class DelayedTransport(asyncio.Transport):
    """A transport whose writes reach the real one when :class:`Pipe` says they are due; see the module docstring.

    It becomes the real transport's protocol's front: the real transport's protocol is a relay that passes reads
    and ``connection_lost`` to this transport's protocol and keeps write flow control (``pause_writing``) for the
    delay queue, while the user's protocol gets ``pause_writing`` / ``resume_writing`` from this queue."""

    def __init__(self, transport: asyncio.Transport, pipe: Pipe, *, keep: object = None) -> None:
        super().__init__()
        self._real = transport
        self._pipe = pipe
        self._keep = keep  # the wrapped StreamWriter: collected, it would close the real transport
        self._loop = asyncio.get_running_loop()
        self._queue: deque[tuple[float, Any]] = deque()  # (due, bytes | _CLOSE | _EOF)
        self._queued = 0  # data bytes in the queue
        self._timer: asyncio.TimerHandle | None = None
        self._closing = self._eof = self._lost = False
        self._real_paused = self._user_paused = False
        self._low, self._high = 16 << 10, 64 << 10  # asyncio's defaults, until set_write_buffer_limits
        self._protocol: asyncio.BaseProtocol = transport.get_protocol()
        transport.set_protocol(_relay(self._protocol, self))

    # ----------------------------------------------------------------------------------------- writing

    def write(self, data: Any) -> None:
        if self._eof:
            raise RuntimeError("Cannot call write() after write_eof()")
        view = memoryview(data).cast("B")
        if self._closing or self._lost or not len(view):
            return
        now = self._loop.time()
        step = _PIECE_BYTES if self._pipe.bytes_per_s is not None else len(view)
        for start in range(0, len(view), step):
            piece = bytes(view[start : start + step])
            self._queue.append((self._pipe.due(now, len(piece)), piece))
        self._queued += len(view)
        self._schedule()
        if not self._user_paused and self._queued > WINDOW_BYTES + self._high:
            self._user_paused = True
            self._protocol.pause_writing()

    def writelines(self, list_of_data: Iterable[Any]) -> None:
        for data in list_of_data:
            self.write(data)

    def write_eof(self) -> None:
        if not self._real.can_write_eof():
            raise NotImplementedError(f"{self._real!r} cannot write EOF")
        if not self._eof and not self._closing:
            self._eof = True
            self._enqueue_marker(_EOF)

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def close(self) -> None:
        """Close the real transport once everything written before is delivered."""
        if not self._closing:
            self._closing = True
            self._enqueue_marker(_CLOSE)

    def abort(self) -> None:
        self._closing = True
        self._drop()
        self._real.abort()

    def is_closing(self) -> bool:
        return self._closing or self._real.is_closing()

    def get_write_buffer_size(self) -> int:
        return self._queued + self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._real.set_write_buffer_limits(high, low)
        if high is None:
            high = 4 * low if low is not None else 64 << 10
        self._high, self._low = high, high // 4 if low is None else low

    # ------------------------------------------------------------------------------ passed through as is

    def pause_reading(self) -> None:
        self._real.pause_reading()

    def resume_reading(self) -> None:
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol
        self._user_paused = False  # a new protocol starts writable, as with asyncio's transports
        self._real.set_protocol(_relay(protocol, self))

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    # ---------------------------------------------------------------------------------------- the queue

    def _enqueue_marker(self, marker: object) -> None:
        if self._lost:
            return
        self._queue.append((self._queue[-1][0] if self._queue else self._loop.time(), marker))
        if len(self._queue) == 1:
            self._flush()  # nothing before it: no timer is armed, act now
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._timer is None and self._queue and not self._lost:
            self._timer = self._loop.call_at(self._queue[0][0], self._flush)

    def _flush(self) -> None:
        """Hand every due chunk to the real transport (until it pauses us), then re-arm the timer."""
        self._timer = None
        now = self._loop.time()  # a timer that fired early (uvloop rounds to ms) re-arms for the rest
        queue = self._queue
        while queue and queue[0][0] <= now:
            if self._real.is_closing():  # closed under us (the peer went away): nobody will read these bytes
                self._drop()
                return
            item = queue[0][1]
            if item is _CLOSE:
                queue.popleft()
                self._real.close()
                continue
            if item is _EOF:
                queue.popleft()
                self._real.write_eof()
                continue
            if self._real_paused:
                return  # _resume_real re-arms the timer
            queue.popleft()
            self._queued -= len(item)
            self._real.write(item)  # may call _pause_real at once
        self._schedule()
        if self._user_paused and self._queued <= WINDOW_BYTES + self._low:
            self._user_paused = False
            self._protocol.resume_writing()

    def _drop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()
        self._queued = 0

    # ------------------------------------------------------------------- callbacks of the real transport

    def _pause_real(self) -> None:
        self._real_paused = True

    def _resume_real(self) -> None:
        self._real_paused = False
        if self._timer is None:
            self._flush()

    def _connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._drop()
        self._protocol.connection_lost(exc)

    def __repr__(self) -> str:
        return f"<DelayedTransport +{self._pipe.one_way_s * 1000:.1f} ms, {self._queued} B queued, {self._real!r}>"


def _relay(protocol: asyncio.BaseProtocol, link: DelayedTransport) -> asyncio.BaseProtocol:
    """The real transport's protocol: reads go straight to ``protocol``, write flow control to ``link``."""
    relay = _BufferedRelay() if isinstance(protocol, asyncio.BufferedProtocol) else _Relay()
    # Bound methods of the user's protocol as instance attributes: transports that cache these callbacks (uvloop)
    # call the user's methods directly, with no relay frame per read.
    for name in ("data_received", "get_buffer", "buffer_updated", "eof_received"):
        if hasattr(protocol, name):
            setattr(relay, name, getattr(protocol, name))
    relay.pause_writing = link._pause_real  # type: ignore[method-assign]
    relay.resume_writing = link._resume_real  # type: ignore[method-assign]
    relay.connection_lost = link._connection_lost  # type: ignore[method-assign]
    return relay


class _Relay(asyncio.Protocol):
    pass


class _BufferedRelay(asyncio.BufferedProtocol):
    pass
