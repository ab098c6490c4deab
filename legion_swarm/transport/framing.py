"""Length-prefixed msgpack messages over asyncio streams (libp2p streams have no half-close).

Frame: ``uint32 big-endian length`` then ``length`` bytes of msgpack. Used for small control messages
(handshakes, pings); bulk tensor data gets its own framing in the collectives' data plane.
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import msgpack

from legion_swarm.errors import ProtocolError

MAX_CONTROL_BYTES = 1 << 20
"""Largest control message accepted; a longer length prefix is treated as garbage."""

_LEN = struct.Struct(">I")


def pack_message(obj: Any) -> bytes:
    body = msgpack.packb(obj)
    if len(body) > MAX_CONTROL_BYTES:
        raise ValueError(f"control message of {len(body)} bytes exceeds {MAX_CONTROL_BYTES}")
    return _LEN.pack(len(body)) + body


async def write_message(writer: asyncio.StreamWriter, obj: Any) -> None:
    writer.write(pack_message(obj))
    await writer.drain()


async def read_message(reader: asyncio.StreamReader, *, max_bytes: int = MAX_CONTROL_BYTES) -> Any:
    """Read one message; raise :class:`ProtocolError` on an oversized, truncated or undecodable frame."""
    try:
        (length,) = _LEN.unpack(await reader.readexactly(_LEN.size))
        if length > max_bytes:
            raise ProtocolError(f"frame of {length} bytes exceeds the {max_bytes}-byte limit")
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError as e:
        raise ProtocolError(f"stream ended inside a frame ({len(e.partial)} bytes read)") from None
    try:
        return msgpack.unpackb(body)
    except (ValueError, msgpack.UnpackException) as e:
        raise ProtocolError(f"undecodable frame: {e}") from None
