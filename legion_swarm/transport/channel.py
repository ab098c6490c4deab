"""The lifecycle a message channel shares whatever its framing: one asyncio protocol over one transport.

:class:`~legion_swarm.transport.secure.SecureChannel` (encrypted records over TCP) and
:class:`~legion_swarm.transport.p2p_stream.StreamChannel` (CRC frames over a p2pd stream) differ in how a
message travels, but live and die alike, which is what lets the collectives use either:

- the first failure closes the channel for good; it is raised once, to the waiting receive or else to the next
  caller, and every later call raises :class:`ChannelClosedError` naming it;
- a receive cancelled before it consumed any of its message leaves the channel usable; cancelled inside a
  message it closes the channel, as the stream would be out of step (:attr:`Receive.started` says which);
- a lost connection wakes a blocked send; bytes already buffered stay receivable;
- ``aclose`` is idempotent: it fails a waiting receive, flushes what was sent, and cuts the transport off after
  ``_CLOSE_TIMEOUT_S`` if the peer does not let it close.

A subclass owns its framing: ``send`` / ``recv`` / ``recv_into``, the read callbacks (``get_buffer``,
``buffer_updated``), :meth:`MessageChannel._pump` and :meth:`MessageChannel._flow`, and taking the transport over
in its ``__init__``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar, Generic, Self, TypeVar

from legion_swarm.errors import ChannelClosedError
from legion_swarm.transport.identity import short_peer_id
from legion_swarm.transport.record_layer import BytesLike

_CLOSE_TIMEOUT_S = 1.0  # how long aclose lets the transport flush before it aborts


@dataclass
class Receive:
    """One ``recv`` / ``recv_into`` in progress; a subclass adds where its bytes go."""

    capacity: int  # largest message it accepts (bytes)
    future: asyncio.Future[int]  # the message's length, or the error that ended the receive
    received: int = 0  # bytes of the message delivered so far

    @property
    def started(self) -> bool:
        """Whether part of its message was consumed from the stream, so that giving up would break the framing."""
        return self.received > 0


ReceiveT = TypeVar("ReceiveT", bound=Receive)


class MessageChannel(asyncio.BufferedProtocol, Generic[ReceiveT]):
    """A message-oriented duplex channel that is its transport's protocol; see the module docstring.

    One task may send while another receives; concurrent sends (or recvs) queue on their lock.
    """

    _transport_kind: ClassVar[str] = "connection"  # what "... lost" errors call the transport

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, local_peer_id: str, remote_peer_id: str
    ):
        self.local_peer_id = local_peer_id
        self.remote_peer_id = remote_peer_id
        self._tag = f"[{short_peer_id(local_peer_id)}↔{short_peer_id(remote_peer_id)}]"
        self._send_lock, self._recv_lock = asyncio.Lock(), asyncio.Lock()
        self._error: BaseException | None = None  # first failure: the channel is dead
        self._error_reported = False
        self._lost: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self._writable = asyncio.Event()  # cleared above the transport's high-water mark
        self._writable.set()
        self._receive: ReceiveT | None = None
        self._paused = False  # whether _flow paused reading
        self._eof = False
        # The streams stay referenced: a collected StreamWriter closes its transport.
        self._streams = (reader, writer)
        self._transport = writer.transport

    def _take_over_transport(self) -> None:
        """Become the transport's protocol. uvloop picks its read callbacks (buffered or not) when reading starts,
        so reading pauses around the switch."""
        self._transport.pause_reading()
        self._transport.set_protocol(self)
        self._transport.resume_reading()

    @property
    def closed(self) -> bool:
        """True once the channel failed or was closed, or its transport is gone (buffered messages stay receivable)."""
        return self._error is not None or self._lost.done()

    # ------------------------------------------------------------------------------------- framing hooks

    def _pump(self) -> None:
        """Move buffered bytes into the waiting receive and finish it, or fail the channel; then call ``_flow``.
        Runs inside transport callbacks, so it must not raise."""
        raise NotImplementedError

    def _flow(self) -> None:
        """Pause or resume reading, depending on whether anybody will take what is read."""
        raise NotImplementedError

    def _write_close_record(self) -> None:
        """Write what tells the peer this is a clean close (called once, by the first ``aclose`` of a healthy
        channel). Nothing by default: the end of the stream says it."""

    # ----------------------------------------------------------------------------------- send and receive

    def _check_connected(self) -> None:
        if self._lost.done():
            raise ChannelClosedError(f"{self._tag} {self._transport_kind} lost: {self._lost.result()!r}")

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    @staticmethod
    def _writable_view(buffer: BytesLike) -> memoryview:
        """``recv_into``'s destination as bytes; raises ``TypeError`` before anything is received if read-only."""
        out = memoryview(buffer).cast("B")
        if out.readonly:
            raise TypeError("recv_into needs a writable buffer")
        return out

    async def _receive_message(self, receive: ReceiveT) -> int:
        """Make ``receive`` the waiting one (after earlier receives) and return its message's length."""
        async with self._recv_lock:
            self._check_usable()
            self._receive = receive
            self._pump()
            try:
                return await receive.future
            except asyncio.CancelledError:
                if self._receive is receive and not receive.started:  # nothing consumed yet: still in step
                    self._receive = None
                    self._flow()
                else:
                    self._fail(ChannelClosedError(f"{self._tag} a receive was cancelled inside a message"))
                raise

    def eof_received(self) -> None:
        # Returning None lets the transport close (neither channel half-closes); buffered bytes stay receivable.
        self._eof = True
        self._pump()

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        if not self._lost.done():
            self._lost.set_result(exc)
        self._writable.set()  # wake a blocked send, which sees the loss
        self._pump()

    # ------------------------------------------------------------------------------------------- closing

    def _check_usable(self) -> None:
        if self._error is not None:
            if not self._error_reported:  # a failure found while nobody was receiving reaches the next caller
                self._error_reported = True
                raise self._error
            raise ChannelClosedError(f"{self._tag} channel is closed ({self._error!r})")

    def _fail(self, error: BaseException, *, reported: bool = False) -> None:
        """Close the channel for good; ``error`` goes to the waiting receive, or else (unless ``reported``: the
        caller raises it itself) to the next caller."""
        if self._error is None:
            self._error, self._error_reported = error, reported
            # The subclass's module logger, so that its log configuration keeps covering these lines.
            logging.getLogger(type(self).__module__).debug("%s channel closed: %r", self._tag, error)
        receive, self._receive = self._receive, None
        if receive is not None and not receive.future.done():
            self._error_reported = True
            receive.future.set_exception(error)
        self._transport.abort()

    async def aclose(self) -> None:
        """Close the channel (idempotent): a waiting receive fails with :class:`ChannelClosedError`, what was sent
        is flushed (the subclass's close record last), then the transport closes."""
        if self._error is None:
            self._write_close_record()
            self._error, self._error_reported = ChannelClosedError(f"{self._tag} closed locally"), True
        receive, self._receive = self._receive, None
        if receive is not None and not receive.future.done():
            receive.future.set_exception(self._error)
        self._transport.close()  # flushes the write buffer, then closes
        try:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._lost), _CLOSE_TIMEOUT_S)
        finally:
            self._transport.abort()  # a peer that does not read (or our cancellation) must not keep it open

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()
