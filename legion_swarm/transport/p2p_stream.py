"""A message channel over a libp2p stream (hivemind's ``p2pd`` binary streams), the data plane's fallback.

When two peers cannot open a direct TCP connection (NAT, relays), tensors travel over a libp2p stream,
which is already authenticated and encrypted by libp2p itself (Noise / TLS between the daemons). This module
gives that stream the same public interface as :class:`~legion_swarm.transport.secure.SecureChannel`, so the
collectives can use either: ``send`` / ``recv`` / ``recv_into`` of whole messages, ``aclose``, ``closed``,
``local_peer_id`` / ``remote_peer_id``.

Framing (libp2p streams have no half-close, so every message carries its own length)::

    uint32 big-endian payload length | uint32 big-endian CRC-32C(payload) | payload

The CRC is not security (libp2p authenticates the bytes between the daemons); it catches our own bugs and
the daemon pipe losing or duplicating bytes, which a length prefix alone would turn into garbage tensors.
CRC-32C (Castagnoli) because CPUs compute it in hardware: the ``crc32c`` package runs at ~20 GB/s on one core
here, zlib's CRC-32 at 2-3 GB/s, which cost a member ~0.13 core-s of a 4 x 100 MB all-reduce round whose
every byte is checked on both sides (and the daemons need the CPU).

The path of a byte: our process → unix socket → ``p2pd`` → TCP (Noise, yamux) → ``p2pd`` → unix socket → peer.
The channel is the unix socket's asyncio protocol (a :class:`asyncio.BufferedProtocol`): once a message's
header is known and the small read-ahead buffer is drained, the socket is read straight into the destination
(``recv_into``'s buffer) in pieces of at most ``READ_PIECE_BYTES`` with the CRC updated per piece, so
``recv_into`` never holds a 64 MiB tensor twice. At most ``_STAGE_BYTES`` are read ahead of the receiver.

Throughput, measured on this shared 2-core machine (loopback; 64 MiB per transfer in 4 MiB messages, sent with
``StreamChannel.send``; receivers alternate, median of 5 transfers, then the median of 2-3 such runs; load average
2.3-5.8 from other work, so expect ±30 % between runs). "two processes": sender and receiver are separate peers;
"one process": both hosts on one event loop. All four receivers verify the CRC and land the payload in a
preallocated buffer:

======================================================  ===========  ===========  ===========  ===========
receiver (GB/s)                                          uvloop, 1p   uvloop, 2p   asyncio, 1p  asyncio, 2p
======================================================  ===========  ===========  ===========  ===========
``StreamChannel.recv_into`` (in place, this module)      0.27         0.30         0.17         0.23
``StreamChannel.recv`` (one more copy per message)       0.24         0.29         0.17         0.19
``StreamReader.readexactly(4 MiB)`` + copy               0.22         0.21         0.17         0.18
``StreamReader.readexactly`` in 1 MiB pieces + copy      0.23         0.22         0.18         0.21
======================================================  ===========  ===========  ===========  ===========

The daemons are the bottleneck: each ``p2pd`` keeps 0.4-0.57 of a core busy, while the receiving Python process
needs 0.27-0.29 of a core for ``recv_into`` and 0.38-0.48 for the ``StreamReader`` variants (their copies take CPU
from the daemons on a small machine). One huge ``readexactly`` is the slowest; in-place reads are never slower.
98.7 % of a large message's bytes are read in place; socket reads return 32-240 KiB each.

Behaviour of hivemind streams worth knowing (measured, hivemind 1.1.12 / its bundled ``p2pd``):

- backpressure is tight: a writer whose peer does not read blocks after ~1 MiB in flight (unix socket
  buffers plus the yamux window), so both sides of a large exchange must run concurrently;
- closing our unix socket makes the daemon flush what it has and close the libp2p stream; the peer then sees
  EOF after the last byte (data is not lost), so a clean ``aclose`` after ``send`` delivers the message;
- there is no half-close: EOF from the daemon means the stream is gone in both directions, and shutting down
  our write side (``write_eof``) tears the whole stream down (the peer's next write fails);
- a stream to a protocol the peer does not serve fails at open ("protocols not supported"), and a peer whose
  address the daemon does not know fails at once ("routing: not found"): call :meth:`Host.connect` first.

Errors follow :class:`SecureChannel`: :class:`ProtocolError` for a bad CRC, an oversized or truncated message;
:class:`ChannelClosedError` after a clean EOF at a message boundary, after ``aclose``, and for every call after
a failure (the first failure itself is raised to the next caller if nobody was receiving). A ``recv`` cancelled
before any byte of its message was consumed leaves the channel usable; cancelled inside a message (or a
``send`` cancelled with part of its message written) closes it, as the stream would be out of step.
"""

from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from crc32c import crc32c
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from legion_swarm.errors import ChannelClosedError, ProtocolError
from legion_swarm.transport.channel import MessageChannel, Receive
from legion_swarm.transport.record_layer import BytesLike

if TYPE_CHECKING:
    from legion_swarm.transport.host import Host

MAX_MESSAGE_BYTES = 256 << 20
"""Largest message sent or accepted (bytes), whatever the receiver's buffer: a corrupt length cannot make a
``recv`` allocate gigabytes."""

READ_PIECE_BYTES = 1 << 20
"""Largest single socket read into a destination buffer (bytes); the CRC is updated per piece, while it is hot
in cache. The unix socket rarely holds more than ~200 KiB, so this only bounds the worst case."""

HEADER = struct.Struct(">II")  # payload length (bytes), crc32c(payload)

_STAGE_BYTES = 64 * 1024  # read-ahead buffer: headers and small messages, several per read syscall
_SMALL_MESSAGE = 64 * 1024  # up to this, header and payload leave in one write (one syscall, one copy)
_WRITE_PIECE = 1 << 20  # payload bytes handed to the transport at once (uvloop keeps a view of what is unsent)
_WRITE_HIGH_WATER = 2 << 20  # transport buffer (bytes) above which send waits ...
_WRITE_LOW_WATER = 512 * 1024  # ... until it drains below this: the pipe stays full, memory stays bounded


@dataclass
class _Receive(Receive):
    """Where a ``recv`` / ``recv_into``'s payload goes, and how far its header and CRC are."""

    into: memoryview | None = field(kw_only=True)  # recv_into's buffer; None: recv allocates once the length is known
    length: int = -1  # payload length once the header is consumed; -1 before
    expected_crc: int = 0
    crc: int = 0  # CRC-32C of the payload bytes received so far
    out: memoryview = field(default_factory=lambda: memoryview(b""))  # where the payload goes (received: bytes in it)
    small: bytes | None = None  # recv: a payload found whole in the stage, taken without a second copy

    @property
    def started(self) -> bool:
        return self.length >= 0  # its header is consumed: the next bytes are its payload


class StreamChannel(MessageChannel[_Receive]):
    """A message-oriented duplex channel over one libp2p stream, built by :func:`open_stream_channel` (dialer)
    or :meth:`accepted` (inside a stream handler). One task may send while another receives; concurrent sends
    (or recvs) queue. Same interface and error semantics as :class:`SecureChannel`."""

    remote_peer_id: str
    """The peer's libp2p id, as its daemon authenticated it (Noise / TLS handshake between the daemons)."""

    _transport_kind = "stream"

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, local_peer_id: str, remote_peer_id: str
    ):
        super().__init__(reader, writer, local_peer_id=local_peer_id, remote_peer_id=remote_peer_id)
        self._direct: memoryview | None = None  # the destination slice handed out by the last get_buffer

        # hivemind read the daemon's protobuf preamble (StreamInfo / the open response) through ``reader``; bytes
        # the peer sent right after it may already sit in the reader's buffer (CPython's private ``_buffer``).
        leftover = bytes(getattr(reader, "_buffer", b""))
        self._stage = memoryview(bytearray(max(_STAGE_BYTES, len(leftover))))
        self._stage[: len(leftover)] = leftover
        self._start, self._filled = 0, len(leftover)  # unconsumed stage bytes are [_start, _filled)

        transport = self._transport
        if transport.is_closing() or reader.exception() is not None:
            self._eof = True
            self._lost.set_result(reader.exception())
            transport.set_protocol(self)  # a connection_lost still pending must reach us, not the reader
        elif getattr(reader, "_eof", False):  # the daemon closed the stream before we took it over
            self._eof = True
            transport.set_protocol(self)
            transport.close()
        else:
            self._take_over_transport()
            transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER, low=_WRITE_LOW_WATER)  # its callbacks reach us
            self._flow()  # the reader's leftover may fill the stage

    @classmethod
    def accepted(
        cls, local_peer_id: str, stream_info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> StreamChannel:
        """Wrap a stream accepted by a handler registered with :meth:`Host.add_stream_handler`.

        Call it before anything else reads from ``reader`` (bytes hivemind already buffered there are kept). The
        channel then owns the stream: the handler may return while the channel lives on."""
        return cls(reader, writer, local_peer_id=local_peer_id, remote_peer_id=stream_info.peer_id.to_base58())

    # ---------------------------------------------------------------------------------------- sending

    async def send(self, data: BytesLike) -> None:
        """Send one message (any C-contiguous buffer); returns once it is written and the transport has drained
        below its low-water mark. Raises ``ValueError`` (channel untouched) above ``MAX_MESSAGE_BYTES``.

        uvloop's transport keeps views of the bytes the socket has not taken yet, not copies: a buffer changed
        before the peer has it fails the peer's CRC check (it is never delivered altered)."""
        view = memoryview(data).cast("B")
        total = len(view)
        if total > MAX_MESSAGE_BYTES:
            raise ValueError(f"message of {total} bytes exceeds MAX_MESSAGE_BYTES ({MAX_MESSAGE_BYTES})")
        async with self._send_lock:
            self._check_usable()
            self._check_connected()
            header = HEADER.pack(total, crc32c(view))
            partial = False
            try:
                if total <= _SMALL_MESSAGE:
                    self._transport.write(header + view)
                else:
                    self._transport.write(header)
                    for offset in range(0, total, _WRITE_PIECE):
                        self._check_connected()
                        self._transport.write(view[offset : offset + _WRITE_PIECE])
                        partial = offset + _WRITE_PIECE < total
                        await self._writable.wait()  # cleared above the transport's high-water mark
                await self._writable.wait()
                self._check_connected()
            except BaseException as e:
                if isinstance(e, Exception):
                    self._fail(e, reported=True)  # this caller is told; later ones learn "closed"
                elif partial:  # cancelled (or interrupted) with part of the message written: out of step
                    self._fail(ChannelClosedError(f"{self._tag} a send was cancelled inside a message"))
                raise

    # -------------------------------------------------------------------------------------- receiving

    async def recv(self, max_bytes: int) -> bytes:
        """Receive one message of at most ``max_bytes`` bytes (a longer one is a ``ProtocolError`` before its
        body is read). A message that arrived whole in the read-ahead buffer costs one copy, a larger one two
        (use :meth:`recv_into` for tensors)."""
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, not {max_bytes}")
        receive = self._new_receive(min(max_bytes, MAX_MESSAGE_BYTES), None)
        await self._receive_message(receive)
        return receive.small if receive.small is not None else bytes(receive.out)

    async def recv_into(self, buffer: BytesLike) -> int:
        """Receive one message into ``buffer`` (writable, C-contiguous); return its length in bytes.

        The payload is read from the socket straight into ``buffer``. If this raises (bad CRC, truncation,
        cancellation inside the message), the bytes written so far are zeroed: no unverified data is left."""
        out = self._writable_view(buffer)
        receive = self._new_receive(min(len(out), MAX_MESSAGE_BYTES), out)
        try:
            return await self._receive_message(receive)
        except BaseException:
            out[: receive.received] = bytes(receive.received)
            raise

    def _new_receive(self, capacity: int, into: memoryview | None) -> _Receive:
        return _Receive(capacity, asyncio.get_running_loop().create_future(), into=into)

    def _pump(self) -> None:
        """Move staged bytes into the waiting receive, finish it when its payload is complete, adjust reading."""
        try:
            receive = self._receive
            if receive is not None and self._error is None:
                if receive.length < 0 and self._filled - self._start >= HEADER.size:
                    self._begin(receive)
                if receive.length >= 0:
                    available = self._filled - self._start
                    if receive.received == 0 and available >= receive.length and receive.into is None:
                        # recv of a message that arrived whole: one copy, straight into the bytes returned.
                        receive.small = self._stage[self._start : self._start + receive.length].tobytes()
                        receive.crc = crc32c(receive.small)
                        receive.received = receive.length
                        self._start += receive.length
                    elif available:
                        take = min(available, receive.length - receive.received)
                        piece = self._stage[self._start : self._start + take]
                        receive.out[receive.received : receive.received + take] = piece
                        receive.crc = crc32c(piece, receive.crc)
                        receive.received += take
                        self._start += take
                    if receive.received == receive.length:
                        self._finish(receive)
                if self._start == self._filled:
                    self._start = self._filled = 0
                if self._receive is not None and self._eof:
                    if self._receive.length < 0 and self._start == self._filled:
                        raise ChannelClosedError(f"{self._tag} peer closed the stream")
                    raise ProtocolError(f"{self._tag} stream ended inside a message (truncated)")
        except Exception as e:  # inside a transport callback: anything unexpected must still reach the receiver
            self._fail(e)
        self._flow()

    def _begin(self, receive: _Receive) -> None:
        """Consume a message header: check the length before a byte of the body is read."""
        length, receive.expected_crc = HEADER.unpack_from(self._stage, self._start)
        if length > receive.capacity:
            limit = "MAX_MESSAGE_BYTES" if receive.capacity == MAX_MESSAGE_BYTES else "the receive buffer"
            raise ProtocolError(f"{self._tag} message of {length} bytes exceeds {limit} ({receive.capacity} bytes)")
        self._start += HEADER.size
        receive.length = length
        if receive.into is not None:
            receive.out = receive.into[:length]
        elif self._filled - self._start < length:  # recv, not all here yet: read the rest in place
            receive.out = memoryview(bytearray(length))

    def _finish(self, receive: _Receive) -> None:
        if receive.crc != receive.expected_crc:  # raised into _pump, whose _fail delivers it to this receive
            raise ProtocolError(
                f"{self._tag} CRC mismatch in a {receive.length}-byte message "
                f"(got {receive.crc:#010x}, header says {receive.expected_crc:#010x})"
            )
        self._receive = None
        if not receive.future.done():
            receive.future.set_result(receive.length)

    def _flow(self) -> None:
        """Read while someone waits for bytes or the stage has room; pause when it is full and nobody takes it."""
        pause = self._error is None and self._receive is None and self._filled - self._start == len(self._stage)
        if pause != self._paused and not self._lost.done() and not self._transport.is_closing():
            self._paused = pause
            (self._transport.pause_reading if pause else self._transport.resume_reading)()

    def get_buffer(self, sizehint: int) -> memoryview:
        receive = self._receive
        if receive is not None and receive.received < receive.length and self._start == self._filled:
            # Inside a payload with nothing staged: read straight into the destination.
            end = min(receive.length, receive.received + READ_PIECE_BYTES)
            self._direct = receive.out[receive.received : end]
            return self._direct
        self._direct = None
        if self._filled == len(self._stage):  # move the unconsumed tail (< one header or small message) forward
            kept = self._filled - self._start
            self._stage[:kept] = self._stage[self._start : self._filled].tobytes()  # tobytes: ranges may overlap
            self._start, self._filled = 0, kept
        return self._stage[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            receive = self._receive
            assert receive is not None  # get_buffer and buffer_updated run back to back in one callback
            receive.crc = crc32c(direct[:nbytes], receive.crc)
            receive.received += nbytes  # _pump finishes the message when this completes it
        else:
            self._filled += nbytes
        self._pump()

    def __repr__(self) -> str:
        return f"StreamChannel({self.local_peer_id} ↔ {self.remote_peer_id}, closed={self.closed})"


# ------------------------------------------------------------------------------------------------ opening


async def open_stream_channel(host: Host, peer_id: str, protocol: str, timeout: float) -> StreamChannel:
    """Open a libp2p stream to ``peer_id``'s handler for ``protocol`` and wrap it, within ``timeout`` seconds.

    The daemon must know an address of the peer (an existing connection, the DHT, or :meth:`Host.connect`).
    Raises :class:`PeerUnreachableError` if the daemon cannot reach the peer, :class:`ProtocolError` if the peer
    does not serve ``protocol``, ``TimeoutError`` past ``timeout`` (the daemon connection is closed either
    way), ``ValueError`` for a malformed peer id."""
    reader, writer = await asyncio.wait_for(host.open_stream(peer_id, protocol), timeout)
    return StreamChannel(reader, writer, local_peer_id=host.peer_id, remote_peer_id=peer_id)
