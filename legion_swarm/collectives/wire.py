"""Messages of a collective round, and their validation: pure functions, no I/O.

Each direction of a member pair's channel carries, in this order (``→`` from member i to member j)::

    hello    {v, t:"hello", group, rank, setup}        group digest, i's rank, codecs + chunk size
    chunk*   {v, t:"chunk", phase:"rs", shard:j, offset, weight, codec}  + one message per codec buffer
    result   {v, t:"result", shard:i, contributors, weight}    i's reduced shard: who is in it
    chunk*   {v, t:"chunk", phase:"ag", shard:i, offset, codec}          + buffers
    vote     {v, t:"vote", stage:1, edges}             [i, k] for each k that i excluded or lacks the result of
    vote     {v, t:"vote", stage:2, edges}             union of the stage-1 edges i heard

``codec`` is a :func:`legion_swarm.codecs.to_wire` header; the buffers follow as separate messages so
that each lands, decrypted, in a buffer of exactly the size the header declares (zero copy for ``none``).
The receiver knows what comes next (its plan fixes every shard, offset and length), so every field is
checked against an expectation: anything else is a :class:`ProtocolError` that excludes the sender for the
round. Nothing a peer sends can make a receiver allocate more than the chunk it expects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import msgpack

from legion_swarm.codecs.base import wire_layout
from legion_swarm.errors import CodecError, ProtocolError

VERSION = 1
MAX_CONTROL_BYTES = 64 * 1024
"""Largest control message (hello, chunk header, result, vote); a 256-member result is ~1 KiB."""
MAX_WEIGHT = 1e12

_KEYS = {
    "hello": {"v", "t", "group", "rank", "setup"},
    "chunk": {"v", "t", "phase", "shard", "offset", "codec", "weight"},
    "result": {"v", "t", "shard", "contributors", "weight"},
    "vote": {"v", "t", "stage", "edges"},
}


def pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message)


def hello(group_digest: bytes, rank: int, setup: Sequence[Any]) -> bytes:
    return pack({"v": VERSION, "t": "hello", "group": group_digest, "rank": rank, "setup": list(setup)})


def chunk_header(phase: str, shard: int, offset: int, codec_header: bytes, weight: float | None) -> bytes:
    return pack(
        {"v": VERSION, "t": "chunk", "phase": phase, "shard": shard, "offset": offset, "codec": codec_header,
         "weight": weight}
    )  # fmt: skip


def result_header(shard: int, contributors: Sequence[int], weight: float) -> bytes:
    return pack({"v": VERSION, "t": "result", "shard": shard, "contributors": list(contributors), "weight": weight})


Edge = tuple[int, int]
"""A broken link between two ranks of a round (lower rank first): one of them misbehaved."""


def vote(stage: int, edges: frozenset[Edge]) -> bytes:
    return pack({"v": VERSION, "t": "vote", "stage": stage, "edges": sorted(edges)})


def parse(raw: bytes, kind: str) -> dict[str, Any]:
    """Decode a control message that must be of type ``kind``; ProtocolError otherwise."""
    try:
        message = msgpack.unpackb(raw, strict_map_key=True, max_bin_len=MAX_CONTROL_BYTES)
    except Exception as e:
        raise ProtocolError(f"undecodable {kind} message: {type(e).__name__}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"{kind} message is not a map")
    if message.get("v") != VERSION or type(message.get("v")) is not int:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r} (this peer speaks {VERSION})")
    if message.get("t") != kind:
        raise ProtocolError(f"expected a {kind} message, got {message.get('t')!r}")
    if set(message) != _KEYS[kind]:
        raise ProtocolError(f"{kind} message has fields {sorted(map(str, message))}, expected {sorted(_KEYS[kind])}")
    return message


def _int(message: dict[str, Any], name: str) -> int:
    value = message[name]
    if type(value) is not int:
        raise ProtocolError(f"{name} must be an integer, got {value!r}")
    return value


def check_hello(raw: bytes, *, group_digest: bytes, rank: int, setup: Sequence[Any]) -> None:
    """The peer must be in the same round of the same group, at the rank we expect, with our setup."""
    message = parse(raw, "hello")
    if message["group"] != group_digest:
        raise ProtocolError("peer has a different view of the group or round")
    if _int(message, "rank") != rank:
        raise ProtocolError(f"peer claims rank {message['rank']!r}, expected {rank}")
    if message["setup"] != list(setup):
        raise ProtocolError(f"peer's round setup {message['setup']!r} differs from ours {list(setup)!r}")


def check_chunk(
    raw: bytes, *, phase: str, shard: int, offset: int, numel: int, codec: str
) -> tuple[dict[str, Any], list[tuple[str, int]]]:
    """Validate a chunk header against what must come next; return it and its codec buffer layout."""
    message = parse(raw, "chunk")
    if message["phase"] != phase or _int(message, "shard") != shard or _int(message, "offset") != offset:
        raise ProtocolError(
            f"expected {phase} chunk of shard {shard} at {offset}, got {message['phase']!r} chunk of shard "
            f"{message['shard']!r} at {message['offset']!r}"
        )
    if phase == "rs":
        check_weight(message["weight"])
    elif message["weight"] is not None:
        raise ProtocolError("an all-gather chunk carries no weight")
    if not isinstance(message["codec"], bytes):
        raise ProtocolError("codec header must be bytes")
    try:
        name, layout = wire_layout(message["codec"], numel=numel)
    except CodecError as e:
        raise ProtocolError(f"bad codec header: {e}") from None
    if name != codec:
        raise ProtocolError(f"chunk uses codec {name!r}, the round uses {codec!r}")
    return message, layout


def check_weight(weight: object) -> float:
    if type(weight) is not float or not math.isfinite(weight) or not 0 < weight <= MAX_WEIGHT:
        raise ProtocolError(f"weight must be a float in (0, {MAX_WEIGHT:g}], got {weight!r}")
    return weight


def check_result(raw: bytes, *, shard: int, group_size: int) -> tuple[tuple[int, ...], float]:
    """Validate an owner's result announcement; return its contributor ranks and total weight."""
    message = parse(raw, "result")
    if _int(message, "shard") != shard:
        raise ProtocolError(f"expected the result of shard {shard}, got shard {message['shard']!r}")
    contributors = message["contributors"]
    if (
        not isinstance(contributors, list)
        or not all(type(r) is int and 0 <= r < group_size for r in contributors)
        or contributors != sorted(set(contributors))
        or shard not in contributors
    ):
        raise ProtocolError(f"bad contributor list {contributors!r} for shard {shard} of a group of {group_size}")
    return tuple(contributors), check_weight(message["weight"])


def check_vote(raw: bytes, *, stage: int, group_size: int) -> frozenset[Edge]:
    """Validate a vote of ``stage``; return the broken links it reports."""
    message = parse(raw, "vote")
    if message["stage"] != stage or type(message["stage"]) is not int:
        raise ProtocolError(f"expected a stage-{stage} vote, got stage {message['stage']!r}")
    edges = message["edges"]
    if not isinstance(edges, list) or len(edges) > group_size * (group_size - 1) // 2:
        raise ProtocolError(f"bad edge list in a vote of a group of {group_size}")
    for edge in edges:
        if not (
            isinstance(edge, list) and len(edge) == 2 and all(type(r) is int for r in edge)
            and 0 <= edge[0] < edge[1] < group_size
        ):  # fmt: skip
            raise ProtocolError(f"bad edge {edge!r} in a vote of a group of {group_size}")
    return frozenset((a, b) for a, b in edges)
