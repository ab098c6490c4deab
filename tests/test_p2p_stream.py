"""StreamChannel over real p2pd daemons: framing, CRC, truncation, cancellation and close semantics.

Two hosts live for the whole module (starting daemons dominates the run time); every test opens its own
streams from ``b`` to ``a``. Malformed input is written on a raw hivemind stream (``Host.open_stream``),
bypassing StreamChannel on the sending side, while ``a`` wraps its end as a StreamChannel.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio
import uvloop
from crc32c import crc32c

from legion_swarm.config import HostConfig
from legion_swarm.errors import ChannelClosedError, PeerUnreachableError, ProtocolError
from legion_swarm.transport.host import Host
from legion_swarm.transport.identity import Identity
from legion_swarm.transport.p2p_stream import HEADER, MAX_MESSAGE_BYTES, StreamChannel, open_stream_channel
from tests.helpers.polling import eventually

pytestmark = [pytest.mark.timeout(30), pytest.mark.asyncio(loop_scope="module")]

CHANNEL = "/legion-test/stream/1"
LATE = "/legion-test/stream-late/1"  # the handler waits before wrapping: bytes pile up in hivemind's reader
MiB = 1 << 20
BIG = 20_000_000  # bytes: "tens of MB", > MAX stage and > many read pieces


@dataclass
class Hosts:
    a: Host
    b: Host
    accepted: asyncio.Queue[StreamChannel]

    async def pair(self, protocol: str = CHANNEL) -> tuple[StreamChannel, StreamChannel]:
        """(dialer on b, acceptor on a)."""
        dialer = await open_stream_channel(self.b, self.a.peer_id, protocol, timeout=5)
        return dialer, await asyncio.wait_for(self.accepted.get(), 5)

    async def raw(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, StreamChannel]:
        """A raw stream on b, whose other end on a is a StreamChannel."""
        reader, writer = await self.b.open_stream(self.a.peer_id, CHANNEL)
        return reader, writer, await asyncio.wait_for(self.accepted.get(), 5)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def hosts(real_processes: None) -> AsyncIterator[Hosts]:
    a = await Host.create(HostConfig(host="127.0.0.1"))
    b = None
    try:
        b = await Host.create(HostConfig(host="127.0.0.1"))
        accepted: asyncio.Queue[StreamChannel] = asyncio.Queue()

        async def handle(info, reader, writer) -> None:
            accepted.put_nowait(StreamChannel.accepted(a.peer_id, info, reader, writer))

        async def handle_late(info, reader, writer) -> None:
            async def buffered() -> bool:  # the dialer's first messages wait in hivemind's reader
                return len(getattr(reader, "_buffer", b"")) >= 3 * 1024

            await eventually(buffered, timeout=5, interval=0.01)
            accepted.put_nowait(StreamChannel.accepted(a.peer_id, info, reader, writer))

        await a.add_stream_handler(CHANNEL, handle)
        await a.add_stream_handler(LATE, handle_late)
        await b.connect(a.peer_id, await a.maddrs())
        yield Hosts(a, b, accepted)
    finally:
        await asyncio.gather(a.aclose(), *([b.aclose()] if b else []))


def frame(payload: bytes, crc: int | None = None) -> bytes:
    return HEADER.pack(len(payload), crc32c(payload) if crc is None else crc) + payload


async def test_messages_round_trip_both_ways(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with dialer, acceptor:
        assert (dialer.local_peer_id, dialer.remote_peer_id) == (hosts.b.peer_id, hosts.a.peer_id)
        assert (acceptor.local_peer_id, acceptor.remote_peer_id) == (hosts.a.peer_id, hosts.b.peer_id)
        big = os.urandom(BIG)
        for sender, receiver in ((dialer, acceptor), (acceptor, dialer)):
            for message in (b"hello", b"", big, b"after the big one"):
                # Backpressure stops a sender after ~1 MiB in flight, so the receiver must run alongside.
                _, got = await asyncio.gather(sender.send(message), receiver.recv(BIG))
                assert got == message
                assert type(got) is bytes
        assert not dialer.closed and not acceptor.closed
    assert dialer.closed and acceptor.closed


async def test_recv_into_numpy_and_many_small_messages(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with dialer, acceptor:
        tensor = np.random.default_rng(0).standard_normal(BIG // 4, dtype=np.float32)  # float32: BIG bytes
        out = np.zeros(BIG // 4 + 7, dtype=np.float32)  # larger than the message: its length is returned
        _, n = await asyncio.gather(dialer.send(tensor), acceptor.recv_into(out))
        assert n == tensor.nbytes
        np.testing.assert_array_equal(out[: tensor.size], tensor)

        small = [os.urandom(i * 37) for i in range(200)]  # many per read syscall: the read-ahead path

        async def send_all() -> None:
            for m in small:
                await acceptor.send(m)

        async def recv_all() -> list[bytes]:
            buffer = bytearray(10_000)
            got = []
            for _ in small:
                n = await dialer.recv_into(buffer)
                got.append(bytes(buffer[:n]))
            return got

        assert (await asyncio.gather(send_all(), recv_all()))[1] == small


async def test_bytes_sent_before_the_channel_takes_over_are_kept(hosts: Hosts) -> None:
    dialer = await open_stream_channel(hosts.b, hosts.a.peer_id, LATE, timeout=5)
    async with dialer:
        messages = [os.urandom(1000), os.urandom(3000), os.urandom(3 * MiB)]
        sending = asyncio.gather(*(dialer.send(m) for m in messages))
        acceptor = await asyncio.wait_for(hosts.accepted.get(), 5)
        async with acceptor:
            assert [await acceptor.recv(4 * MiB) for _ in messages] == messages
        await sending


async def test_message_longer_than_the_buffer_is_refused_before_its_body(hosts: Hosts) -> None:
    for receive in ("recv_into", "recv"):
        dialer, acceptor = await hosts.pair()
        async with dialer, acceptor:
            await dialer.send(b"x" * 100)
            with pytest.raises(ProtocolError, match="exceeds"):
                if receive == "recv":
                    await acceptor.recv(99)
                else:
                    await acceptor.recv_into(bytearray(99))
            assert acceptor.closed
            with pytest.raises(ChannelClosedError):
                await acceptor.recv(1000)
            with pytest.raises(ChannelClosedError):
                await acceptor.send(b"y")


async def test_hard_cap_applies_whatever_the_buffer(hosts: Hosts) -> None:
    _, writer, acceptor = await hosts.raw()
    async with acceptor:
        writer.write(HEADER.pack(MAX_MESSAGE_BYTES + 1, 0))
        with pytest.raises(ProtocolError, match="MAX_MESSAGE_BYTES"):
            await acceptor.recv(1 << 40)
        with pytest.raises(ValueError, match="MAX_MESSAGE_BYTES"):
            await acceptor.send(memoryview(np.empty(MAX_MESSAGE_BYTES + 1, np.uint8)))
    writer.close()


@pytest.mark.parametrize("size", [100, 3 * MiB])  # read-ahead path, in-place path
async def test_corrupt_frame_is_a_protocol_error_then_the_channel_is_closed(hosts: Hosts, size: int) -> None:
    _, writer, acceptor = await hosts.raw()
    async with acceptor:
        payload = os.urandom(size)
        writer.write(frame(b"fine") + frame(payload, crc=crc32c(payload) ^ 1))
        assert await acceptor.recv(10) == b"fine"
        out = bytearray(b"\xff" * (size + 10))
        with pytest.raises(ProtocolError, match="CRC"):
            await acceptor.recv_into(out)
        assert out == bytearray(size) + b"\xff" * 10  # what was written is zeroed, the rest untouched
        with pytest.raises(ChannelClosedError):
            await acceptor.recv_into(out)
    writer.close()


async def test_an_error_is_reported_once_then_every_call_says_closed(hosts: Hosts) -> None:
    _, writer, acceptor = await hosts.raw()
    async with acceptor:
        writer.write(frame(b"bad", crc=0))
        with pytest.raises(ProtocolError):
            await acceptor.recv(10)
        for _ in range(2):  # either direction
            with pytest.raises(ChannelClosedError, match="CRC mismatch"):  # and says why
                await acceptor.send(b"z")
            with pytest.raises(ChannelClosedError, match="CRC mismatch"):
                await acceptor.recv(10)
    writer.close()


@pytest.mark.parametrize("cut", ["header", "small body", "big body"])
async def test_stream_ending_inside_a_message_is_truncation(hosts: Hosts, cut: str) -> None:
    _, writer, acceptor = await hosts.raw()
    async with acceptor:
        whole = frame(os.urandom(3 * MiB if cut == "big body" else 500))
        writer.write(frame(b"complete") + whole[: {"header": 5, "small body": 300, "big body": 2 * MiB}[cut]])
        writer.close()  # flushes (no drain: backpressure would block it with nobody reading); then EOF
        assert await acceptor.recv(100) == b"complete"
        with pytest.raises(ProtocolError, match="truncated"):
            await acceptor.recv(4 * MiB)
        with pytest.raises(ChannelClosedError):
            await acceptor.recv(4 * MiB)


async def test_cancelled_idle_recv_leaves_the_channel_usable(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with dialer, acceptor:
        for receive in (acceptor.recv(100), acceptor.recv_into(bytearray(100))):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(receive, 0.05)
        assert not acceptor.closed
        reader_task = asyncio.create_task(acceptor.recv(100))
        await asyncio.sleep(0.05)
        reader_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader_task
        await dialer.send(b"still in step")
        assert await acceptor.recv(100) == b"still in step"


async def test_recv_cancelled_inside_a_message_closes_the_channel(hosts: Hosts) -> None:
    _, writer, acceptor = await hosts.raw()
    async with acceptor:
        payload = os.urandom(2 * MiB)
        writer.write(frame(payload)[:MiB])  # half of it, the rest never comes
        out = bytearray(2 * MiB)
        receive = asyncio.create_task(acceptor.recv_into(out))

        async def started() -> bool:
            return any(out)  # bytes are landing in place

        await eventually(started, timeout=5, interval=0.01)
        receive.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receive
        assert acceptor.closed and not any(out)
        with pytest.raises(ChannelClosedError):
            await acceptor.recv(10)
    writer.close()


async def test_send_cancelled_inside_a_message_closes_the_channel(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with dialer, acceptor:
        sending = asyncio.create_task(dialer.send(os.urandom(8 * MiB)))  # blocks: nobody reads
        await asyncio.sleep(0.2)
        assert not sending.done()
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        assert dialer.closed
        with pytest.raises(ChannelClosedError):
            await dialer.send(b"x")
        with pytest.raises(ProtocolError, match="truncated"):  # the peer sees a cut message, not a clean close
            await acceptor.recv_into(bytearray(8 * MiB))


async def test_remote_close_after_send_delivers_then_reports_closed(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with acceptor:
        last = os.urandom(3 * MiB)
        sending = asyncio.create_task(dialer.send(last))
        assert await acceptor.recv(4 * MiB) == last
        await sending
        await dialer.aclose()
        await dialer.aclose()  # idempotent
        with pytest.raises(ChannelClosedError):
            await dialer.send(b"x")
        with pytest.raises(ChannelClosedError, match="peer closed"):
            await acceptor.recv(100)

        async def noticed() -> bool:
            return acceptor.closed

        await eventually(noticed, timeout=5, interval=0.01)
        with pytest.raises(ChannelClosedError):
            await acceptor.send(b"to nobody")


async def test_local_close_wakes_a_waiting_recv(hosts: Hosts) -> None:
    dialer, acceptor = await hosts.pair()
    async with dialer:
        waiting = asyncio.create_task(acceptor.recv(100))
        await asyncio.sleep(0.05)
        await acceptor.aclose()
        with pytest.raises(ChannelClosedError, match="closed locally"):
            await waiting
        with pytest.raises(ChannelClosedError):
            await dialer.recv(100)


async def test_open_and_connect_failures_are_typed(hosts: Hosts) -> None:
    with pytest.raises(ProtocolError, match="not supported"):
        await open_stream_channel(hosts.b, hosts.a.peer_id, "/legion-test/nobody-serves-this", timeout=5)
    stranger = Identity.generate().peer_id
    with pytest.raises(PeerUnreachableError):
        await open_stream_channel(hosts.b, stranger, CHANNEL, timeout=5)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PeerUnreachableError, match="cannot connect"):
        await hosts.b.connect(stranger, [f"/ip4/127.0.0.1/tcp/{port}"])
    with pytest.raises(ValueError, match="another peer"):
        await hosts.b.connect(stranger, [f"/ip4/127.0.0.1/tcp/{port}/p2p/{hosts.a.peer_id}"])
    with pytest.raises(ValueError):
        await hosts.b.connect(stranger, ["/ip4/not-an-ip/tcp/1"])


async def test_open_timeout_leaves_nothing_behind(hosts: Hosts) -> None:
    with pytest.raises(TimeoutError):
        await open_stream_channel(hosts.b, hosts.a.peer_id, CHANNEL, timeout=1e-4)
    # Had the daemon opened the stream anyway, its other end arrives at a's handler: it must end at once.
    try:
        stray = await asyncio.wait_for(hosts.accepted.get(), 0.5)
    except TimeoutError:
        return
    async with stray:
        with pytest.raises(ChannelClosedError):
            await stray.recv(10)


async def test_header_layout() -> None:
    assert HEADER.size == 8
    assert frame(b"abc")[:8] == struct.pack(">II", 3, crc32c(b"abc"))
    assert crc32c(b"123456789") == 0xE3069283  # CRC-32C's check value (RFC 3720): the polynomial peers agree on


async def uvloop_scenario() -> None:
    """The main paths again on uvloop (the CLI's loop), whose buffered-protocol reads differ from asyncio's."""
    a = await Host.create(HostConfig(host="127.0.0.1"))
    b = await Host.create(HostConfig(host="127.0.0.1"))
    try:
        accepted: asyncio.Queue[StreamChannel] = asyncio.Queue()

        async def handle(info, reader, writer) -> None:
            accepted.put_nowait(StreamChannel.accepted(a.peer_id, info, reader, writer))

        await a.add_stream_handler(CHANNEL, handle)
        await b.connect(a.peer_id, await a.maddrs())
        hosts = Hosts(a, b, accepted)
        await test_messages_round_trip_both_ways(hosts)
        await test_recv_into_numpy_and_many_small_messages(hosts)
        await test_corrupt_frame_is_a_protocol_error_then_the_channel_is_closed(hosts, 3 * MiB)
        await test_stream_ending_inside_a_message_is_truncation(hosts, "big body")
        await test_cancelled_idle_recv_leaves_the_channel_usable(hosts)
        await test_recv_cancelled_inside_a_message_closes_the_channel(hosts)
        await test_send_cancelled_inside_a_message_closes_the_channel(hosts)
    finally:
        await asyncio.gather(a.aclose(), b.aclose())


@pytest.mark.usefixtures("real_processes")
async def test_on_uvloop() -> None:
    # On a thread of its own: pytest-asyncio picks one loop type per session, and a child process would spend
    # seconds importing hivemind (and torch) again. The daemons die with that thread, after the hosts close.
    await asyncio.wait_for(asyncio.to_thread(uvloop.run, uvloop_scenario()), 20)
