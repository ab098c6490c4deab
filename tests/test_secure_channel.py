"""The secure channel: handshake authentication, record integrity and framing, over real loopback sockets.

Attacks are played by :class:`Relay`, a proxy between initiator and responder that sees every frame
(handshake frames and records share the uint32 length prefix) and may rewrite, drop, duplicate,
reorder or cut them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import struct
from collections.abc import AsyncIterator, Callable

import msgpack
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from legion_swarm.errors import AuthenticationError, ChannelClosedError, ProtocolError
from legion_swarm.transport.framing import read_message, write_message
from legion_swarm.transport.identity import Identity, verify
from legion_swarm.transport.record_layer import (
    FLAG_END,
    MAX_RECORD_PLAINTEXT,
    TAG_BYTES,
    RecordCipher,
    derive_traffic_secrets,
    parse_header,
    record_size,
    signature_payload,
    transcript_hash,
)
from legion_swarm.transport.secure import RECORD_BUFFERS, RecordBuffers, SecureChannel, secure_accept, secure_connect
from tests.helpers.polling import eventually

pytestmark = pytest.mark.timeout(30)

HOST = "127.0.0.1"
MiB = 1 << 20
CUT = b"<cut>"  # in a Relay rewrite: close the stream towards the receiver here (compared by identity)


@pytest.fixture(scope="module")
def ids() -> dict[str, Identity]:
    """A initiates, B responds, C is another honest peer, M (mallory) attacks."""
    return {name: Identity.generate() for name in "ABCM"}


def payload(n: int, seed: int = 0) -> bytes:
    return random.Random(seed * 1_000_003 + n).randbytes(n)


class Responder:
    """A listening peer; each accepted handshake's channel, or its exception, lands in ``results``."""

    def __init__(self, identity: Identity, authorize: Callable[[str], bool] = lambda _: True, timeout: float = 5.0):
        self.identity, self.authorize, self.timeout = identity, authorize, timeout
        self.results: asyncio.Queue[SecureChannel | BaseException] = asyncio.Queue()
        self.channels: list[SecureChannel] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            channel = await secure_accept(reader, writer, self.identity, self.authorize, self.timeout)
        except Exception as e:
            self.results.put_nowait(e)
            return
        self.channels.append(channel)
        self.results.put_nowait(channel)

    async def result(self) -> SecureChannel | BaseException:
        return await asyncio.wait_for(self.results.get(), 5)

    async def channel(self) -> SecureChannel:
        result = await self.result()
        assert isinstance(result, SecureChannel), result
        return result


@contextlib.asynccontextmanager
async def responding(identity: Identity, **kwargs: object) -> AsyncIterator[tuple[Responder, int]]:
    responder = Responder(identity, **kwargs)  # type: ignore[arg-type]
    server = await asyncio.start_server(responder._handle, HOST, 0)
    try:
        yield responder, server.sockets[0].getsockname()[1]
    finally:
        for channel in responder.channels:
            await channel.aclose()
        server.close()
        await server.wait_closed()


Rewrite = Callable[[str, int, bytes], list[bytes]]


class Relay:
    """Forwards frames both ways; ``rewrite(direction, index, frame)`` returns what to send instead.

    ``direction`` is ``"c2s"`` (initiator → responder) or ``"s2c"``; ``index`` counts frames per direction:
    c2s 0 = hello, 1 = finish, 2.. = records; s2c 0 = responder's reply, 1.. = records. Frames after a
    ``CUT`` (or after the receiver went away) are read and dropped, so senders never block on the relay.
    """

    def __init__(self, target_port: int, rewrite: Rewrite):
        self.target_port, self.rewrite = target_port, rewrite
        self.tasks: list[asyncio.Task[None]] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        server_reader, server_writer = await asyncio.open_connection(HOST, self.target_port, limit=4 * MiB)
        self.writers += [client_writer, server_writer]
        self.tasks.append(asyncio.create_task(self._pump("c2s", client_reader, server_writer)))
        self.tasks.append(asyncio.create_task(self._pump("s2c", server_reader, client_writer)))

    async def _pump(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index, open_ = 0, True
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                header = await reader.readexactly(4)
                frame = header + await reader.readexactly(struct.unpack(">I", header)[0] & 0x3FFF_FFFF)
                for out in self.rewrite(direction, index, frame) if open_ else ():
                    if out is CUT:
                        open_ = False
                        writer.close()
                        break
                    writer.write(out)
                index += 1
                if open_:
                    try:
                        await writer.drain()
                    except ConnectionError:
                        open_ = False
        writer.close()

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for writer in self.writers:
            writer.close()


@contextlib.asynccontextmanager
async def relaying(target_port: int, rewrite: Rewrite) -> AsyncIterator[int]:
    relay = Relay(target_port, rewrite)
    server = await asyncio.start_server(relay._handle, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        await relay.aclose()
        server.close()
        await server.wait_closed()


def on(direction: str, index: int, change: Callable[[bytes], list[bytes]]) -> Rewrite:
    """A rewrite that applies ``change`` to one frame and forwards everything else unchanged."""
    return lambda d, i, frame: change(frame) if (d, i) == (direction, index) else [frame]


def replace_field(name: str, value: bytes) -> Callable[[bytes], list[bytes]]:
    def change(frame: bytes) -> list[bytes]:
        message = msgpack.unpackb(frame[4:])
        message[name] = value
        body = msgpack.packb(message)
        return [struct.pack(">I", len(body)) + body]

    return change


async def connect(port: int, identity: Identity, expected: Identity, timeout: float = 5.0) -> SecureChannel:
    return await secure_connect(HOST, port, identity, expected.peer_id, timeout)


@contextlib.asynccontextmanager
async def paired(ids: dict[str, Identity], rewrite: Rewrite) -> AsyncIterator[tuple[SecureChannel, SecureChannel]]:
    """A (initiator) and B (responder) connected through a relay applying ``rewrite``."""
    async with responding(ids["B"]) as (responder, port), relaying(port, rewrite) as relay_port:
        a = await connect(relay_port, ids["A"], ids["B"])
        b = await responder.channel()
        try:
            yield a, b
        finally:
            await a.aclose()


async def expect_dead(channel: SecureChannel) -> None:
    """Once failed, a channel refuses everything."""
    assert channel.closed
    with pytest.raises(ChannelClosedError):
        await channel.recv(10)
    with pytest.raises(ChannelClosedError):
        await channel.send(b"x")


# ------------------------------------------------------------------------------------------- happy paths


async def test_round_trip_of_record_boundary_sizes_both_ways(ids: dict[str, Identity]) -> None:
    sizes = [0, 1, MiB - 1, MiB, 5 * MiB + 3]
    async with responding(ids["B"]) as (responder, port):
        a = await connect(port, ids["A"], ids["B"])
        b = await responder.channel()
        assert (a.remote_peer_id, b.remote_peer_id) == (ids["B"].peer_id, ids["A"].peer_id)
        for n in sizes:
            data = payload(n)
            _, got = await asyncio.gather(a.send(data), b.recv(6 * MiB))
            assert got == data
            buffer = bytearray(6 * MiB)
            _, length = await asyncio.gather(b.send(memoryview(data)), a.recv_into(buffer))
            assert length == n and buffer[:n] == data
        await a.aclose()
        with pytest.raises(ChannelClosedError, match="peer closed"):
            await b.recv(10)


async def test_messages_sent_ahead_of_the_receiver_arrive_in_order_before_the_close(ids: dict[str, Identity]) -> None:
    # Many small records arrive in one read and are parsed out of the read-ahead; large ones interleave.
    messages = [payload(n, seed=i) for i, n in enumerate([3, 0, 200, MiB + 7, 1, 40_000] * 5)]
    async with responding(ids["B"]) as (responder, port):
        a = await connect(port, ids["A"], ids["B"])
        b = await responder.channel()
        sending = asyncio.create_task(_send_all_then_close(a, messages))
        received = [await b.recv(2 * MiB) for _ in messages]
        await sending
        assert received == messages
        with pytest.raises(ChannelClosedError, match="peer closed"):
            await b.recv(10)


def test_a_sealed_record_buffer_is_reused_only_once_nothing_else_holds_it() -> None:
    pool = RecordBuffers(keep=3)
    held = memoryview(pool.take())  # what a transport keeps of a record it could not send yet
    other = pool.take()
    assert other is not held.obj and len(pool) == 2
    third = pool.take()  # both still referenced: a third buffer
    assert third is not other and third is not held.obj
    fourth = pool.take()  # past ``keep``: handed out, not pooled
    assert len(pool) == 3 and all(fourth is not b for b in (held.obj, other, third))
    del held, other, third, fourth
    again = pool.take()
    assert len(pool) == 3 and len(again) == record_size(MAX_RECORD_PLAINTEXT)
    assert pool.take() is not again  # ``again`` is still referenced here


async def test_channels_share_sealed_record_buffers(ids: dict[str, Identity]) -> None:
    pooled = []
    async with responding(ids["B"]) as (responder, port):
        for _ in range(3):  # a new channel per round, as collectives open them
            a = await connect(port, ids["A"], ids["B"])
            b = await responder.channel()
            data = payload(12 * MiB + 5)  # 13 records
            _, got = await asyncio.gather(a.send(data), b.recv(13 * MiB))
            assert got == data
            pooled.append({id(buffer) for buffer in RECORD_BUFFERS._pool})
            await a.aclose()
            await b.aclose()
    assert 0 < len(pooled[0]) <= RECORD_BUFFERS.keep
    assert pooled[0] == pooled[1] == pooled[2]  # later channels sealed into the first one's buffers


async def _send_all_then_close(channel: SecureChannel, messages: list[bytes]) -> None:
    for message in messages:
        await channel.send(message)
    await channel.aclose()


async def test_timed_out_recv_between_messages_leaves_the_channel_usable(ids: dict[str, Identity]) -> None:
    async with responding(ids["B"]) as (responder, port):
        async with await connect(port, ids["A"], ids["B"]) as a:
            b = await responder.channel()
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(b.recv(10), 0.05)
            await a.send(b"still in step")
            assert await b.recv(100) == b"still in step" and not b.closed


async def test_receive_cancelled_inside_a_message_closes_the_channel(ids: dict[str, Identity]) -> None:
    async with paired(ids, on("c2s", 3, lambda frame: [])) as (a, b):  # the second record never arrives
        await a.send(payload(2 * MiB))
        buffer = bytearray(2 * MiB)
        receiving = asyncio.create_task(b.recv_into(buffer))

        async def first_record_decrypted() -> bool:
            return buffer[:MiB] == payload(2 * MiB)[:MiB]

        await eventually(first_record_decrypted, timeout=5, interval=0.01)
        receiving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiving
        assert buffer == bytes(2 * MiB)  # the authentic first half was zeroed too: the message is void
        await expect_dead(b)


# ------------------------------------------------------------------------------------------ authentication


async def test_initiator_reaching_the_wrong_peer_fails(ids: dict[str, Identity]) -> None:
    async with responding(ids["C"]) as (responder, port):
        with pytest.raises(AuthenticationError, match="instead of the expected"):
            await connect(port, ids["A"], ids["B"])
        assert isinstance(await responder.result(), AuthenticationError)


async def test_unauthorized_initiator_fails_on_both_sides(ids: dict[str, Identity]) -> None:
    asked: list[str] = []

    def authorize(peer_id: str) -> bool:
        asked.append(peer_id)
        return False

    async with responding(ids["B"], authorize=authorize) as (responder, port):
        with pytest.raises(AuthenticationError, match="not authorized"):
            await connect(port, ids["A"], ids["B"])
        result = await responder.result()
        assert isinstance(result, AuthenticationError) and "not authorized" in str(result)
    assert asked == [ids["A"].peer_id]


@pytest.mark.parametrize(
    ("direction", "index", "field"),
    [("c2s", 0, "eph"), ("c2s", 0, "key"), ("c2s", 0, "nonce"), ("s2c", 0, "eph"), ("s2c", 0, "key"),
     ("s2c", 0, "nonce"), ("s2c", 0, "sig")],
)  # fmt: skip
async def test_man_in_the_middle_rewriting_the_handshake_fails(
    ids: dict[str, Identity], direction: str, index: int, field: str
) -> None:
    value = {
        "eph": X25519PrivateKey.generate().public_key().public_bytes_raw(),
        "key": ids["M"].public_key,
        "nonce": os.urandom(32),
        "sig": ids["M"].sign(b"anything"),
    }[field]
    async with responding(ids["B"]) as (responder, port):
        async with relaying(port, on(direction, index, replace_field(field, value))) as relay_port:
            with pytest.raises(AuthenticationError):
                await connect(relay_port, ids["A"], ids["B"])
            assert isinstance(await responder.result(), AuthenticationError)  # told by the initiator's refusal


async def test_forged_initiator_signature_is_rejected_and_the_initiator_is_not_confirmed(
    ids: dict[str, Identity],
) -> None:
    async with responding(ids["B"]) as (responder, port):
        async with relaying(port, on("c2s", 1, replace_field("sig", ids["M"].sign(b"x")))) as relay_port:
            with pytest.raises(AuthenticationError, match="did not confirm"):
                await connect(relay_port, ids["A"], ids["B"])
            result = await responder.result()
            assert isinstance(result, AuthenticationError) and "did not sign" in str(result)


async def test_handshake_with_another_protocol_version_is_refused(ids: dict[str, Identity]) -> None:
    async with responding(ids["B"]) as (responder, port):
        reader, writer = await asyncio.open_connection(HOST, port)
        await write_message(writer, {"v": "legion-swarm/secure/0", "eph": bytes(32), "nonce": bytes(32), "key": b""})
        reply = await read_message(reader)
        writer.close()
        assert "unsupported protocol" in reply["error"]
        assert isinstance(await responder.result(), ProtocolError)


async def test_initiator_times_out_when_the_responder_is_silent(ids: dict[str, Identity]) -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(silent, HOST, 0)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await secure_connect(HOST, server.sockets[0].getsockname()[1], ids["A"], ids["B"].peer_id, 0.2)
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_responder_times_out_when_the_initiator_is_silent(ids: dict[str, Identity]) -> None:
    async with responding(ids["B"], timeout=0.2) as (responder, port):
        _, writer = await asyncio.open_connection(HOST, port)
        assert isinstance(await responder.result(), asyncio.TimeoutError)
        writer.close()


# ------------------------------------------------------------------------------------------------ records


def flip_byte(position: int) -> Callable[[bytes], list[bytes]]:
    def change(frame: bytes) -> list[bytes]:
        tampered = bytearray(frame)
        tampered[position] ^= 0x01
        return [bytes(tampered)]

    return change


def set_end_flag(frame: bytes) -> list[bytes]:
    return [struct.pack(">I", struct.unpack(">I", frame[:4])[0] | FLAG_END) + frame[4:]]


@pytest.mark.parametrize("change", [flip_byte(4 + 12345), flip_byte(-1), set_end_flag], ids=["body", "tag", "flag"])
async def test_tampered_record_fails_and_leaves_no_plaintext(
    ids: dict[str, Identity], change: Callable[[bytes], list[bytes]]
) -> None:
    async with paired(ids, on("c2s", 3, change)) as (a, b):  # the second record of a 3-record message
        send = asyncio.create_task(a.send(payload(3 * MiB)))
        buffer = bytearray(b"\xaa" * 4 * MiB)
        with pytest.raises(AuthenticationError):
            await b.recv_into(buffer)
        assert buffer[: 2 * MiB] == bytes(2 * MiB) and buffer[2 * MiB :] == b"\xaa" * 2 * MiB
        await send
        await expect_dead(b)


@pytest.mark.parametrize("attack", ["replay", "reorder", "drop"])
async def test_replayed_reordered_or_dropped_record_fails(ids: dict[str, Identity], attack: str) -> None:
    held: list[bytes] = []

    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if (direction, index) != ("c2s", 2) and not (attack == "reorder" and (direction, index) == ("c2s", 3)):
            return [frame]
        if attack == "replay":
            return [frame, frame]
        if attack == "drop":
            return []
        held.append(frame)
        return held[::-1] if len(held) == 2 else []

    async with paired(ids, rewrite) as (a, b):
        await a.send(b"first")
        await a.send(b"second")
        if attack == "replay":
            assert await b.recv(100) == b"first"
        with pytest.raises(AuthenticationError, match="failed authentication"):
            await b.recv(100)
        await expect_dead(b)


@pytest.mark.parametrize("cut_at", ["record_start", "mid_record", "between_messages"])
async def test_truncated_stream_is_a_protocol_error(ids: dict[str, Identity], cut_at: str) -> None:
    def rewrite(direction: str, index: int, frame: bytes) -> list[bytes]:
        if (direction, index) != ("c2s", 3):
            return [frame]
        return {"record_start": [CUT], "mid_record": [frame[:1000], CUT], "between_messages": [CUT]}[cut_at]

    async with paired(ids, rewrite) as (a, b):
        await a.send(payload(2 * MiB) if cut_at != "between_messages" else b"one record")
        await a.send(b"next")
        if cut_at == "between_messages":
            assert await b.recv(100) == b"one record"
        with pytest.raises(ProtocolError, match="truncated") as caught:
            await b.recv(3 * MiB)
        assert not isinstance(caught.value, AuthenticationError)
        await expect_dead(b)


async def test_oversized_declared_record_is_rejected_before_reading_it(ids: dict[str, Identity]) -> None:
    huge = struct.pack(">I", MAX_RECORD_PLAINTEXT + TAG_BYTES + 1)
    async with paired(ids, on("c2s", 2, lambda frame: [huge])) as (a, b):
        await a.send(b"x")
        with pytest.raises(ProtocolError, match="declares"):
            await b.recv(10 * MiB)  # returns at once although the declared body never comes
        await expect_dead(b)


@pytest.mark.parametrize("into", [False, True])
async def test_message_over_the_receivers_limit_is_rejected(ids: dict[str, Identity], into: bool) -> None:
    async with paired(ids, lambda d, i, frame: [frame]) as (a, b):
        send = asyncio.create_task(a.send(payload(3 * MiB)))
        with pytest.raises(ProtocolError, match="exceeds 2097152 bytes"):
            await (b.recv_into(bytearray(2 * MiB)) if into else b.recv(2 * MiB))
        await send
        await expect_dead(b)


# ------------------------------------------------------------------------------------------------ pure core


def test_record_counter_is_monotonic_and_both_ends_stay_in_step() -> None:
    secret = bytes(range(32))
    sealer, opener = RecordCipher(secret, rekey_every=3), RecordCipher(secret, rekey_every=3)
    records = [sealer.seal(bytes([i]) * 10, FLAG_END) for i in range(8)]  # crosses two key updates
    assert sealer.counter == 8
    assert len({bytes(r[4:]) for r in records}) == 8
    for i, record in enumerate(records):
        assert opener.open(bytes(record[:4]), bytes(record[4:])) == bytes([i]) * 10
    nonces = [RecordCipher(secret).next_nonce() for _ in range(2)]
    assert nonces[0] == nonces[1]  # deterministic from the secret, so a fresh cipher must never be reused ...
    cipher = RecordCipher(secret)
    assert len({cipher.next_nonce() for _ in range(1000)}) == 1000  # ... but one cipher never repeats
    cipher.counter = (1 << 64) - 1
    with pytest.raises(ProtocolError, match="exhausted"):
        cipher.next_nonce()


def test_key_updates_must_happen_in_step() -> None:
    secret = bytes(32)
    sealer, opener = RecordCipher(secret, rekey_every=2), RecordCipher(secret, rekey_every=4)
    records = [sealer.seal(b"x", FLAG_END) for _ in range(3)]
    for record in records[:2]:
        assert opener.open(bytes(record[:4]), bytes(record[4:])) == b"x"
    with pytest.raises(AuthenticationError):
        opener.open(bytes(records[2][:4]), bytes(records[2][4:]))


def test_directional_keys_differ_and_depend_on_the_transcript() -> None:
    i2r, r2i = derive_traffic_secrets(b"\x01" * 32, b"t" * 32)
    assert i2r != r2i and len(i2r) == len(r2i) == 32
    assert derive_traffic_secrets(b"\x01" * 32, b"u" * 32) != (i2r, r2i)
    record = RecordCipher(i2r).seal(b"hello", FLAG_END)
    with pytest.raises(AuthenticationError):
        RecordCipher(r2i).open(bytes(record[:4]), bytes(record[4:]))


def test_transcript_binds_roles(ids: dict[str, Identity]) -> None:
    a, b = ids["A"].peer_id, ids["B"].peer_id
    e1, e2, n1, n2 = b"\x01" * 32, b"\x02" * 32, b"\x03" * 32, b"\x04" * 32
    th = transcript_hash(initiator=a, responder=b, initiator_ephemeral=e1, responder_ephemeral=e2,
                         initiator_nonce=n1, responder_nonce=n2)  # fmt: skip
    swapped = transcript_hash(initiator=b, responder=a, initiator_ephemeral=e2, responder_ephemeral=e1,
                              initiator_nonce=n2, responder_nonce=n1)  # fmt: skip
    assert th != swapped
    signature = ids["A"].sign(signature_payload(th, "initiator"))
    assert verify(ids["A"].public_key, signature_payload(th, "initiator"), signature)
    assert not verify(ids["A"].public_key, signature_payload(th, "responder"), signature)  # no reflection


def test_record_headers_are_checked_before_anything_is_read() -> None:
    assert parse_header(struct.pack(">I", FLAG_END | TAG_BYTES)) == (FLAG_END, 0)
    assert parse_header(struct.pack(">I", MAX_RECORD_PLAINTEXT + TAG_BYTES)) == (0, MAX_RECORD_PLAINTEXT)
    for word in (MAX_RECORD_PLAINTEXT + TAG_BYTES + 1, 0x3FFF_FFFF, TAG_BYTES - 1, TAG_BYTES, 0xC000_0000 | TAG_BYTES):
        with pytest.raises(ProtocolError):
            parse_header(struct.pack(">I", word))
