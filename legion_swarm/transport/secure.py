"""An authenticated, encrypted, message-oriented channel over a direct TCP connection.

The sharded collectives move tensors over plain TCP when two peers can reach each other; this module
makes that connection as trustworthy as a libp2p stream: each side proves its libp2p identity (the
key behind its peer id) and everything after the handshake is encrypted and authenticated.

Handshake (three length-prefixed msgpack frames, :mod:`~legion_swarm.transport.framing`, then one record)::

    I → R   {v, eph_i, nonce_i, key_i}              X25519 ephemeral key, 32 random bytes, libp2p public key
    R → I   {v, eph_r, nonce_r, key_r, sig_r}       or {v, error} if R refuses I
    I → R   {sig_i}                                 or {v, error} if I refuses R
    R → I   first record, an empty message          confirmation: R accepted I, and the keys agree

    th    = SHA-256(version, peer_i, peer_r, eph_i, eph_r, nonce_i, nonce_r)   (length-prefixed fields)
    sig_x = sign(DOMAIN | role_x | th)                                         the role binds who signs
    i2r, r2i = HKDF-SHA256(ikm=X25519(eph), salt=th, info=version)             one secret per direction

The initiator checks ``peer_id_of(key_r) == expected_peer_id`` and ``sig_r``; the responder asks
``authorize(peer_i)`` before spending a signature, then checks ``sig_i``. A man in the middle that
swaps an ephemeral key or a nonce breaks a signature; one that swaps a libp2p key changes a peer id.

Records (after the handshake, each direction independently)::

    uint32 big-endian header = END (bit 31) | CLOSE (bit 30) | ciphertext length (tag included)
    AES-128-OCB3(key, nonce = iv XOR counter, plaintext ≤ 1 MiB, aad = header)

A message is a run of records, the last with END, so one ``send`` is one ``recv``, and memory stays bounded
by one record per direction. The counter is implicit (a replayed, dropped or reordered record fails its tag),
never wraps, and every ``REKEY_RECORDS`` records both sides step the direction's secret through HKDF (an
implicit key update, well below the usage bound of the AEAD). ``aclose`` sends an
authenticated CLOSE record, so a stream that ends without one is a truncation
(:class:`~legion_swarm.errors.ProtocolError`), not a clean close (:class:`ChannelClosedError`).

AES-128-OCB3 (RFC 7253; one pass, no separate GHASH) rather than GCM or ChaCha20-Poly1305: on one core of
these machines it seals / opens 1 MiB records at 8.5 GB/s, AES-256-OCB3 at 6.0, AES-128-GCM at 4.3 and
ChaCha20-Poly1305 at 2.2 (``benchmarks/bench_secure_channel.py``). The cipher is most of the direct plane's
CPU cost: moving from GCM to OCB3 took a 4 x 100 MB all-reduce from 0.60 s to 0.51 s on two cores. A 128-bit
key is TLS 1.3's default suite's; the implicit key updates keep each key far below OCB's usage bound.

After any error, and after a ``send`` / ``recv`` cancelled half-way through a message (the stream would be
out of step), the channel is closed and every later call raises :class:`ChannelClosedError`. A ``recv``
cancelled while no record of its message has arrived yet (a timeout while waiting) leaves it usable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from legion_swarm.errors import AuthenticationError, ChannelClosedError, NetworkError, ProtocolError
from legion_swarm.transport.channel import MessageChannel, Receive
from legion_swarm.transport.framing import pack_message, read_message, write_message
from legion_swarm.transport.identity import Identity, peer_id_of, short_peer_id, verify
from legion_swarm.transport.netsim import Shaper
from legion_swarm.transport.record_layer import (
    FLAG_CLOSE,
    FLAG_END,
    HEADER_BYTES,
    MAX_RECORD_PLAINTEXT,
    PROTOCOL,
    TAG_BYTES,
    BytesLike,
    RecordCipher,
    Role,
    derive_traffic_secrets,
    parse_header,
    record_size,
    signature_payload,
    transcript_hash,
)

logger = logging.getLogger(__name__)


HANDSHAKE_MAX_BYTES = 8192
"""Largest handshake frame (an RSA-2048 key and signature take ~600 bytes; Ed25519 ~100)."""

_NONCE_BYTES = 32
_EPHEMERAL_BYTES = 32
_READ_AHEAD = 64 * 1024  # bytes read past the current record: several small records per read syscall


class RecordBuffers:
    """Buffers records are sealed into, shared by every channel of a process and reused once free.

    A transport keeps (a view of) what it could not send at once until it has sent it; CPython's reference
    count says when that is over. Reuse saves zero-filling, and often faulting in, a fresh MiB per record, and
    a collective opens new channels every round: a pool per channel started empty each time (measured: ~2 % of
    a member's CPU in a 4 x 100 MB all-reduce). At most ``keep`` buffers stay pooled."""

    def __init__(self, keep: int = 16) -> None:
        self.keep = keep
        self._pool: deque[bytearray] = deque()
        self._lock = threading.Lock()  # channels on event loops in different threads share the pool

    def take(self) -> bytearray:
        """A buffer of ``record_size(MAX_RECORD_PLAINTEXT)`` bytes that nothing else references, new if none is."""
        with self._lock:
            pool = self._pool
            for _ in range(len(pool)):
                if sys.getrefcount(pool[0]) == 2:  # the pool's reference and getrefcount's argument
                    return pool[0]  # the caller's reference makes it busy before the lock is released
                pool.rotate(-1)
            buffer = bytearray(record_size(MAX_RECORD_PLAINTEXT))
            if len(pool) < self.keep:
                pool.appendleft(buffer)
            return buffer

    def __len__(self) -> int:
        return len(self._pool)


RECORD_BUFFERS = RecordBuffers()


# ------------------------------------------------------------------------------------------------ channel


@dataclass
class _Receive(Receive):
    """Where a ``recv`` / ``recv_into``'s records go."""

    # (header, ciphertext, offset, length): opens one record and puts its plaintext where the receive wants it
    deliver: Callable[[memoryview, memoryview, int, int], None] = field(kw_only=True)


class SecureChannel(MessageChannel[_Receive]):
    """An authenticated, encrypted, message-oriented duplex channel; built by :func:`secure_connect` or
    :func:`secure_accept`. One task may send while another receives; concurrent sends (or recvs) queue.

    The channel is its connection's protocol once the handshake is over (asyncio's ``StreamReader`` copies
    every byte twice more and reads 4 MiB messages at 0.3 GB/s here, against 2-3 GB/s): socket bytes land in one
    preallocated record buffer, and a complete record is decrypted straight into the waiting receiver's
    destination inside the read callback. At most one record (+ ``_READ_AHEAD``) is read ahead of the receiver.
    """

    remote_peer_id: str
    """The peer's libp2p id, proven by its signature over this channel's handshake."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, local_peer_id: str,
        remote_peer_id: str, role: Role, tx: RecordCipher, rx: RecordCipher,
    ):  # fmt: skip
        super().__init__(reader, writer, local_peer_id=local_peer_id, remote_peer_id=remote_peer_id)
        self.role = role
        self._tx, self._rx = tx, rx
        self._buffer = memoryview(bytearray(HEADER_BYTES + MAX_RECORD_PLAINTEXT + TAG_BYTES + _READ_AHEAD))
        self._filled = 0  # bytes in _buffer; the current record starts at 0
        self._header: tuple[int, int] | None = None  # (flags, plaintext length) once 4 bytes are in
        self._need = HEADER_BYTES  # bytes of the current record, known once its header is parsed
        # Take the connection over from the StreamReaderProtocol that carried the handshake. Nothing is
        # buffered there: the handshake is lock-step until this side's first record.
        self._take_over_transport()

    # ---------------------------------------------------------------------------------------- sending

    async def send(self, data: BytesLike) -> None:
        """Send one message (any C-contiguous buffer, split into ≤ 1 MiB records); returns once it is buffered."""
        view = memoryview(data).cast("B")
        async with self._send_lock:
            self._check_usable()
            offset, total, partial = 0, len(view), False
            try:
                while True:
                    self._check_connected()
                    chunk = view[offset : offset + MAX_RECORD_PLAINTEXT]
                    offset += len(chunk)
                    record = self._tx.seal(chunk, FLAG_END if offset == total else 0, RECORD_BUFFERS.take())
                    self._transport.write(record)
                    del record  # the transport's reference alone tells whether the buffer is still in use
                    partial = offset != total
                    await self._writable.wait()  # cleared above the transport's high-water mark
                    if not partial:
                        break
                self._check_connected()
            except BaseException as e:
                # Cancelled with the whole message (or nothing) written: the stream is still in step.
                if isinstance(e, asyncio.CancelledError):
                    if partial:  # the next caller must see a closed channel, not someone else's cancellation
                        self._fail(ChannelClosedError(f"{self._tag} a send was cancelled inside a message"))
                else:
                    self._fail(e)
                raise

    # -------------------------------------------------------------------------------------- receiving

    async def recv(self, max_bytes: int) -> bytes:
        """Receive one message of at most ``max_bytes`` bytes (a longer one is a ``ProtocolError`` before its
        excess is read). One copy more than :meth:`recv_into` for messages of several records."""
        chunks: list[bytes] = []

        def deliver(header: memoryview, ciphertext: memoryview, offset: int, length: int) -> None:
            chunks.append(self._rx.open(header, ciphertext))

        await self._receive_message(self._new_receive(max_bytes, deliver))
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def recv_into(self, buffer: BytesLike) -> int:
        """Receive one message into ``buffer`` (writable, C-contiguous); return its length in bytes.

        Records are decrypted straight into ``buffer``. If this raises, the bytes written so far are zeroed,
        so no unauthenticated plaintext is left behind."""
        out = self._writable_view(buffer)
        written = 0

        def deliver(header: memoryview, ciphertext: memoryview, offset: int, length: int) -> None:
            nonlocal written
            written = offset + length
            self._rx.open_into(header, ciphertext, out[offset:written])

        try:
            return await self._receive_message(self._new_receive(len(out), deliver))
        except BaseException:
            out[:written] = bytes(written)
            raise

    def _new_receive(self, capacity: int, deliver: Callable[[memoryview, memoryview, int, int], None]) -> _Receive:
        return _Receive(capacity, asyncio.get_running_loop().create_future(), deliver=deliver)

    def _pump(self) -> None:
        """Parse headers as they arrive, hand complete records to the waiting receive, then adjust reading."""
        try:
            while self._error is None:
                if self._header is None:
                    if self._filled < HEADER_BYTES:
                        break
                    self._header = parse_header(self._buffer[:HEADER_BYTES])
                    self._need = HEADER_BYTES + self._header[1] + TAG_BYTES
                receive = self._receive
                if receive is None:
                    break
                flags, length = self._header
                if receive.received + length > receive.capacity:  # before the body is even read
                    raise ProtocolError(f"message exceeds {receive.capacity} bytes ({receive.received + length}+)")
                if self._filled < self._need:
                    break
                header, ciphertext = self._buffer[:HEADER_BYTES], self._buffer[HEADER_BYTES : self._need]
                if flags & FLAG_CLOSE:
                    if receive.received:
                        raise ProtocolError("close record inside a message")
                    self._rx.open(header, ciphertext)
                    raise ChannelClosedError(f"{self._tag} peer closed the channel")
                receive.deliver(header, ciphertext, receive.received, length)
                receive.received += length
                self._consume_record()
                if flags & FLAG_END:
                    self._receive = None
                    if not receive.future.done():
                        receive.future.set_result(receive.received)
            if self._receive is not None and self._eof and self._error is None:
                where = "inside a message" if self._filled or self._receive.received else "without a close record"
                raise ProtocolError(f"{self._tag} stream ended {where} (truncated)")
        except Exception as e:  # inside a transport callback: anything unexpected must still reach the receiver
            self._fail(e)
        self._flow()

    def _consume_record(self) -> None:
        extra = self._filled - self._need  # read-ahead bytes of the next record(s), at most _READ_AHEAD
        if extra:
            self._buffer[:extra] = self._buffer[self._need : self._filled].tobytes()  # tobytes: ranges may overlap
        self._filled, self._header, self._need = extra, None, HEADER_BYTES

    def _flow(self) -> None:
        """Read while the current record is incomplete; pause when it is complete and nobody takes it."""
        waiting = self._filled >= self._need and self._header is not None
        pause = self._error is None and (waiting or self._filled == len(self._buffer))
        if pause != self._paused and not self._lost.done():
            self._paused = pause
            (self._transport.pause_reading if pause else self._transport.resume_reading)()

    def get_buffer(self, sizehint: int) -> memoryview:
        end = min(len(self._buffer), max(self._need, self._filled + _READ_AHEAD))
        return self._buffer[self._filled : end]

    def buffer_updated(self, nbytes: int) -> None:
        self._filled += nbytes
        self._pump()

    # ---------------------------------------------------------------------------------------- closing

    def _write_close_record(self) -> None:
        """An authenticated close record, so the peer tells a clean close from a truncation; best effort: not while
        a send is under way (it would land inside that message), nor once the connection is gone."""
        if not self._send_lock.locked() and not self._lost.done():
            self._transport.write(self._tx.seal(b"", FLAG_CLOSE))

    def __repr__(self) -> str:
        return f"SecureChannel({self.role}, {self.local_peer_id} ↔ {self.remote_peer_id}, closed={self.closed})"


# ---------------------------------------------------------------------------------------------- handshake


async def secure_connect(
    host: str, port: int, identity: Identity, expected_peer_id: str, timeout: float, *, shaper: Shaper | None = None
) -> SecureChannel:
    """Connect to ``host:port`` and authenticate it as ``expected_peer_id`` within ``timeout`` seconds.

    ``shaper`` (netsim) delays what we send, from our first handshake message on.

    Raises :class:`AuthenticationError` if it is someone else or refuses us, ``ProtocolError`` on a
    malformed handshake, ``asyncio.TimeoutError`` past ``timeout``, ``OSError`` if the connection fails."""

    async def connect() -> SecureChannel:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            wrapped = shaper.wrap(writer, expected_peer_id) if shaper is not None else writer
            return await _initiate(reader, wrapped, identity, expected_peer_id)
        except BaseException:
            writer.transport.abort()
            raise

    return await asyncio.wait_for(connect(), timeout)


async def secure_accept(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity,
    authorize: Callable[[str], bool], timeout: float, *, shaper: Shaper | None = None,
) -> SecureChannel:  # fmt: skip
    """Run the responder's handshake on an accepted connection; the channel owns the streams from now on.

    ``authorize(peer_id)`` decides whether the (claimed, then verified) initiator may connect. On any
    failure the connection is closed and the error raised, as for :func:`secure_connect`. ``shaper`` (netsim)
    delays what we send once the initiator has named itself."""
    try:
        return await asyncio.wait_for(_respond(reader, writer, identity, authorize, shaper), timeout)
    except BaseException:
        writer.transport.abort()
        raise


async def _initiate(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity, expected_peer_id: str
) -> SecureChannel:
    ephemeral, nonce = X25519PrivateKey.generate(), os.urandom(_NONCE_BYTES)
    my_ephemeral = ephemeral.public_key().public_bytes_raw()
    await write_message(writer, {"v": PROTOCOL, "eph": my_ephemeral, "nonce": nonce, "key": identity.public_key})

    reply = await _read_handshake(reader, "responder", version=True)
    their_key = _field(reply, "key", bytes)
    their_id = peer_id_of(their_key)
    if their_id != expected_peer_id:
        await _refuse(writer, "wrong peer")
        raise AuthenticationError(f"reached peer {their_id} instead of the expected {expected_peer_id}")
    th = transcript_hash(
        initiator=identity.peer_id, responder=their_id, initiator_ephemeral=my_ephemeral,
        responder_ephemeral=_field(reply, "eph", bytes, _EPHEMERAL_BYTES), initiator_nonce=nonce,
        responder_nonce=_field(reply, "nonce", bytes, _NONCE_BYTES),
    )  # fmt: skip
    if not verify(their_key, signature_payload(th, "responder"), _field(reply, "sig", bytes)):
        await _refuse(writer, "bad signature")
        raise AuthenticationError(f"peer {their_id} did not sign this handshake")
    i2r, r2i = derive_traffic_secrets(_exchange(ephemeral, reply["eph"]), th)
    channel = SecureChannel(
        reader, writer, local_peer_id=identity.peer_id, remote_peer_id=their_id, role="initiator",
        tx=RecordCipher(i2r), rx=RecordCipher(r2i),
    )  # fmt: skip
    # The channel owns the connection before our signature leaves, so the confirmation (or an EOF) reaches it.
    writer.transport.write(pack_message({"sig": identity.sign(signature_payload(th, "initiator"))}))
    try:
        await channel.recv(0)  # the responder's first record, an empty message: it accepted us, keys agree
    except NetworkError as e:
        raise AuthenticationError(f"peer {their_id} did not confirm the handshake: {e}") from None
    logger.debug("[%s] secure channel to %s established", short_peer_id(identity.peer_id), short_peer_id(their_id))
    return channel


async def _respond(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity, authorize: Callable[[str], bool],
    shaper: Shaper | None,
) -> SecureChannel:  # fmt: skip
    hello = await _read_handshake(reader, "initiator", version=False)
    if hello.get("v") != PROTOCOL:
        await _refuse(writer, f"unsupported protocol {hello.get('v')!r}, this peer speaks {PROTOCOL}")
        raise ProtocolError(f"initiator speaks {hello.get('v')!r}, not {PROTOCOL}")
    their_key = _field(hello, "key", bytes)
    their_ephemeral = _field(hello, "eph", bytes, _EPHEMERAL_BYTES)
    their_nonce = _field(hello, "nonce", bytes, _NONCE_BYTES)
    their_id = peer_id_of(their_key)
    if not authorize(their_id):  # before our signature: unauthorized peers cost us no private-key work
        await _refuse(writer, "not authorized")
        raise AuthenticationError(f"peer {their_id} is not authorized")
    if shaper is not None:
        writer = shaper.wrap(writer, their_id)

    ephemeral, nonce = X25519PrivateKey.generate(), os.urandom(_NONCE_BYTES)
    my_ephemeral = ephemeral.public_key().public_bytes_raw()
    th = transcript_hash(
        initiator=their_id, responder=identity.peer_id, initiator_ephemeral=their_ephemeral,
        responder_ephemeral=my_ephemeral, initiator_nonce=their_nonce, responder_nonce=nonce,
    )  # fmt: skip
    i2r, r2i = derive_traffic_secrets(_exchange(ephemeral, their_ephemeral), th)
    signature = identity.sign(signature_payload(th, "responder"))
    await write_message(
        writer, {"v": PROTOCOL, "eph": my_ephemeral, "nonce": nonce, "key": identity.public_key, "sig": signature}
    )
    finish = await _read_handshake(reader, "initiator", version=False)
    if not verify(their_key, signature_payload(th, "initiator"), _field(finish, "sig", bytes)):
        raise AuthenticationError(f"peer {their_id} did not sign this handshake")
    if reader.at_eof():  # an EOF seen by the StreamReader would never reach the channel
        raise ProtocolError(f"peer {their_id} closed the connection during the handshake")
    channel = SecureChannel(
        reader, writer, local_peer_id=identity.peer_id, remote_peer_id=their_id, role="responder",
        tx=RecordCipher(r2i), rx=RecordCipher(i2r),
    )  # fmt: skip
    await channel.send(b"")  # confirmation; the initiator sends nothing before it, so nothing is left unread
    logger.debug("[%s] secure channel from %s established", short_peer_id(identity.peer_id), short_peer_id(their_id))
    return channel


async def _read_handshake(reader: asyncio.StreamReader, sender: Role, *, version: bool) -> dict[str, Any]:
    message = await read_message(reader, max_bytes=HANDSHAKE_MAX_BYTES)
    if not isinstance(message, dict):
        raise ProtocolError(f"{sender}'s handshake message is not a map")
    if isinstance(message.get("error"), str):
        raise AuthenticationError(f"the {sender} refused the handshake: {message['error']}")
    if version and message.get("v") != PROTOCOL:
        raise ProtocolError(f"{sender} speaks {message.get('v')!r}, not {PROTOCOL}")
    return message


def _field(message: dict[str, Any], name: str, kind: type, size: int | None = None) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (size is not None and len(value) != size):
        raise ProtocolError(f"handshake field {name!r} is missing or malformed")
    return value


def _exchange(ephemeral: X25519PrivateKey, their_public: bytes) -> bytes:
    try:
        return ephemeral.exchange(X25519PublicKey.from_public_bytes(their_public))
    except ValueError:  # a low-order point gives an all-zero secret, which cryptography refuses
        raise ProtocolError("peer's ephemeral key is invalid") from None


async def _refuse(writer: asyncio.StreamWriter, reason: str) -> None:
    """Tell the peer why we stop (unauthenticated, so it only saves the peer a timeout), best effort."""
    with contextlib.suppress(ConnectionError):
        await write_message(writer, {"v": PROTOCOL, "error": reason})
