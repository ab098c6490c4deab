import asyncio
import random
import struct

import msgpack
import pytest

from legion_swarm.errors import ProtocolError
from legion_swarm.transport.framing import pack_message, read_message


def reader_of(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_round_trip_of_several_messages() -> None:
    messages = [{"swarm": "x", "n": 1}, [1, 2, 3], b"\x00" * 1000, "é"]
    reader = reader_of(b"".join(pack_message(m) for m in messages))
    assert [await read_message(reader) for _ in messages] == messages


async def test_oversized_truncated_and_garbage_frames_are_rejected() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        await read_message(reader_of(struct.pack(">I", 10_000) + b"x" * 10_000), max_bytes=100)
    with pytest.raises(ProtocolError, match="ended inside"):
        await read_message(reader_of(pack_message({"a": 1})[:-2]))
    with pytest.raises(ProtocolError, match="ended inside"):
        await read_message(reader_of(b"\x00\x00"))
    with pytest.raises(ProtocolError, match="undecodable"):
        await read_message(reader_of(struct.pack(">I", 1) + b"\xc1"))  # 0xc1 is never valid msgpack


async def test_random_bytes_never_escape_as_other_exceptions() -> None:
    rng = random.Random(1234)
    for _ in range(500):
        blob = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 64)))
        try:
            value = await read_message(reader_of(blob), max_bytes=1 << 16)
        except ProtocolError:
            continue
        # Anything accepted was a complete frame whose body decodes to exactly that value.
        (length,) = struct.unpack(">I", blob[:4])
        assert length <= len(blob) - 4
        assert msgpack.unpackb(blob[4 : 4 + length]) == value
