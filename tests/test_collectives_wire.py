"""The round protocol's validators (:mod:`legion_swarm.collectives.wire`) and :func:`faulty_members`, as pure units.

Every validator is the only thing between a peer's bytes and a member's state, so each must accept exactly the
message its caller expects and turn every other one into a :class:`ProtocolError` (never another exception,
never a silent acceptance). Each test builds the valid message with the module's own builders, then changes
one thing at a time through msgpack, so that a failure names the one field a validator let through.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any

import msgpack
import pytest
import torch

from legion_swarm.codecs import get_codec, to_wire
from legion_swarm.collectives import wire
from legion_swarm.collectives.result import faulty_members
from legion_swarm.errors import ProtocolError
from tests.helpers.codecs import CODEC_OPTS

DIGEST = bytes(range(32))
SETUP = ["none", "none", 1024, True, True]
DROP = object()
"""A field value meaning: remove the field."""


def repack(raw: bytes, **changes: object) -> bytes:
    """``raw`` (a valid message) with some fields replaced, added or (value :data:`DROP`) removed."""
    message = msgpack.unpackb(raw)
    for key, value in changes.items():
        if value is DROP:
            del message[key]
        else:
            message[key] = value
    return msgpack.packb(message)


def codec_header(codec: str, numel: int, **opts: Any) -> bytes:
    """A genuine codec header of ``numel`` elements (what a peer's encoder would put in a chunk)."""
    return to_wire(get_codec(codec, **opts).encode(torch.linspace(-1.0, 1.0, numel)))[0]


def header_fields(header: bytes, **changes: object) -> bytes:
    """A codec header with some fields changed (same :data:`DROP` convention as :func:`repack`)."""
    return repack(header, **changes)


# Values a msgpack peer can put where the protocol wants something else; each test picks the relevant ones.
NOT_INTS = [True, False, 1.0, 0.0, "1", None, b"\x01", [1], {"a": 1}]
BAD_WEIGHTS = [
    math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-300, wire.MAX_WEIGHT * 2, 1e300, 1, 0, True, False, None,
    "1.0", b"1", [1.0],
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------- parse


@pytest.mark.parametrize("kind", ["hello", "chunk", "result", "vote"])
def test_parse_accepts_each_builder_output(kind: str) -> None:
    raw = {
        "hello": wire.hello(DIGEST, 0, SETUP),
        "chunk": wire.chunk_header("rs", 1, 0, codec_header("none", 4), 1.0),
        "result": wire.result_header(0, [0, 1], 2.0),
        "vote": wire.vote(1, frozenset({(0, 1)})),
    }[kind]
    message = wire.parse(raw, kind)
    assert message["t"] == kind and message["v"] == wire.VERSION
    assert set(message) == wire._KEYS[kind]


@pytest.mark.parametrize(
    "raw",
    [
        b"", b"\xc1", b"\x81", b"\xde\xff\xff", bytes(range(256)), msgpack.packb({"v": 1, "t": "vote"})[:-1],
        msgpack.packb({"v": 1}) + b"\x00",  # trailing bytes after a complete map
        msgpack.packb({1: 2}),  # integer keys (strict_map_key)
        msgpack.packb({"v": 1, "t": "vote", "stage": 1, "edges": []})[:-3],
        b"\xa2\xff\xfe",  # a str that is not UTF-8
        msgpack.packb(msgpack.ExtType(5, b"x")),
    ],
)  # fmt: skip
def test_parse_rejects_undecodable_bytes(raw: bytes) -> None:
    with pytest.raises(ProtocolError):
        wire.parse(raw, "vote")


@pytest.mark.parametrize("value", [[], 1, "vote", None, b"vote", 1.5, True, [["v", 1]]])
def test_parse_rejects_a_message_that_is_not_a_map(value: object) -> None:
    with pytest.raises(ProtocolError, match="not a map"):
        wire.parse(msgpack.packb(value), "vote")


@pytest.mark.parametrize("version", [0, 2, -1, 1.0, True, "1", None, b"\x01", [1]])
def test_parse_rejects_other_versions(version: object) -> None:
    with pytest.raises(ProtocolError, match="version"):
        wire.parse(repack(wire.vote(1, frozenset()), v=version), "vote")


def test_parse_rejects_a_missing_version() -> None:
    with pytest.raises(ProtocolError, match="version"):
        wire.parse(repack(wire.vote(1, frozenset()), v=DROP), "vote")


@pytest.mark.parametrize("kind", ["hello", "chunk", "result", "Vote", "", None, 1, b"vote", ["vote"]])
def test_parse_rejects_a_message_of_another_type(kind: object) -> None:
    with pytest.raises(ProtocolError, match="expected a vote message"):
        wire.parse(repack(wire.vote(1, frozenset()), t=kind), "vote")


def test_parse_rejects_a_missing_type() -> None:
    with pytest.raises(ProtocolError):
        wire.parse(repack(wire.vote(1, frozenset()), t=DROP), "vote")


@pytest.mark.parametrize(
    ("kind", "raw"),
    [
        ("hello", wire.hello(DIGEST, 0, SETUP)),
        ("chunk", wire.chunk_header("rs", 1, 0, codec_header("none", 4), 1.0)),
        ("result", wire.result_header(0, [0], 1.0)),
        ("vote", wire.vote(2, frozenset())),
    ],
)
def test_parse_rejects_extra_and_missing_fields(kind: str, raw: bytes) -> None:
    for extra in ({"x": 0}, {"pad": b""}, {"T": kind}):
        with pytest.raises(ProtocolError, match="fields"):
            wire.parse(repack(raw, **extra), kind)
    with pytest.raises(ProtocolError, match="fields"):  # a bytes key that spells a real field is not that field
        wire.parse(msgpack.packb({**msgpack.unpackb(raw), b"x": 1}), kind)
    for field in sorted(wire._KEYS[kind] - {"v", "t"}):
        with pytest.raises(ProtocolError, match="fields"):
            wire.parse(repack(raw, **{field: DROP}), kind)


def test_parse_rejects_an_oversized_binary_field() -> None:
    """A bin field longer than a whole control message may be is refused while decoding, before it is built."""
    raw = repack(wire.hello(DIGEST, 0, SETUP), group=bytes(wire.MAX_CONTROL_BYTES + 1))
    with pytest.raises(ProtocolError, match="undecodable"):
        wire.parse(raw, "hello")
    assert wire.parse(repack(wire.hello(DIGEST, 0, SETUP), group=bytes(wire.MAX_CONTROL_BYTES - 64)), "hello")


# ----------------------------------------------------------------------------------------------------- hello


def check_hello(raw: bytes) -> None:
    wire.check_hello(raw, group_digest=DIGEST, rank=0, setup=SETUP)


def test_check_hello_accepts_the_expected_hello() -> None:
    check_hello(wire.hello(DIGEST, 0, SETUP))
    check_hello(wire.hello(DIGEST, 0, tuple(SETUP)))  # msgpack has no tuples: a sequence is a list on the wire


@pytest.mark.parametrize(
    "group", [DIGEST[:-1], DIGEST + b"\x00", bytes(32), DIGEST[::-1], DIGEST.hex(), None, b"", 0, [DIGEST]]
)
def test_check_hello_rejects_another_group_or_round(group: object) -> None:
    with pytest.raises(ProtocolError, match="different view"):
        check_hello(repack(wire.hello(DIGEST, 0, SETUP), group=group))


@pytest.mark.parametrize("rank", [1, -1, 2, 256, 2**63, *NOT_INTS])
def test_check_hello_rejects_another_rank(rank: object) -> None:
    """Rank 0 claimed as ``False`` or ``0.0`` is still refused: ranks index arrays, only integers will do."""
    with pytest.raises(ProtocolError, match="rank"):
        check_hello(repack(wire.hello(DIGEST, 0, SETUP), rank=rank))


@pytest.mark.parametrize(
    "setup",
    [
        ["fp16", "none", 1024, True, True], ["none", "fp16", 1024, True, True], ["none", "none", 2048, True, True],
        ["none", "none", 1024, False, True], ["none", "none", 1024, True, False], SETUP[:-1], [*SETUP, True], [],
        None, "setup", SETUP[::-1], {"codec": "none"},
    ],
)  # fmt: skip
def test_check_hello_rejects_another_setup(setup: object) -> None:
    with pytest.raises(ProtocolError, match="setup"):
        check_hello(repack(wire.hello(DIGEST, 0, SETUP), setup=setup))


def test_check_hello_rejects_malformed_envelopes() -> None:
    raw = wire.hello(DIGEST, 0, SETUP)
    for bad in (repack(raw, v=2), repack(raw, t="vote"), repack(raw, extra=1), repack(raw, setup=DROP), raw[:-1]):
        with pytest.raises(ProtocolError):
            check_hello(bad)


# ----------------------------------------------------------------------------------------------------- chunks

CHUNK_CODECS = CODEC_OPTS  # every codec, with the options the codec tests use


def check_chunk(raw: bytes, *, phase: str = "rs", numel: int = 1000, codec: str = "none") -> Any:
    return wire.check_chunk(raw, phase=phase, shard=1, offset=2048, numel=numel, codec=codec)


def rs_chunk(codec: str = "none", numel: int = 1000, weight: float = 0.75) -> bytes:
    return wire.chunk_header("rs", 1, 2048, codec_header(codec, numel, **CHUNK_CODECS[codec]), weight)


@pytest.mark.parametrize("codec", sorted(CHUNK_CODECS))
@pytest.mark.parametrize("numel", [1, 7, 1000, 1024])
def test_check_chunk_accepts_a_chunk_of_every_codec_and_returns_its_layout(codec: str, numel: int) -> None:
    instance = get_codec(codec, **CHUNK_CODECS[codec])
    header, _ = to_wire(instance.encode(torch.linspace(-1.0, 1.0, numel)))
    message, layout = check_chunk(wire.chunk_header("rs", 1, 2048, header, 0.75), numel=numel, codec=codec)
    assert message["weight"] == 0.75 and message["codec"] == header
    assert layout == type(instance).layout(numel, msgpack.unpackb(header)["params"])
    message, layout2 = check_chunk(wire.chunk_header("ag", 1, 2048, header, None), phase="ag", numel=numel, codec=codec)
    assert message["weight"] is None and layout2 == layout


def test_check_chunk_accepts_an_empty_chunk() -> None:
    """An empty shard still sends one empty chunk (it carries the weight)."""
    _, layout = wire.check_chunk(
        wire.chunk_header("rs", 0, 0, codec_header("none", 0), 2.0), phase="rs", shard=0, offset=0, numel=0,
        codec="none",
    )  # fmt: skip
    assert layout == [("float32", 0)]


@pytest.mark.parametrize("phase", ["ag", "RS", "", "rs ", None, 0, b"rs", ["rs"]])
def test_check_chunk_rejects_another_phase(phase: object) -> None:
    with pytest.raises(ProtocolError, match="expected rs chunk"):
        check_chunk(repack(rs_chunk(), phase=phase))


@pytest.mark.parametrize("shard", [0, 2, -1, 2**64 - 1, *NOT_INTS])
def test_check_chunk_rejects_another_shard(shard: object) -> None:
    with pytest.raises(ProtocolError, match="shard"):
        check_chunk(repack(rs_chunk(), shard=shard))


@pytest.mark.parametrize("offset", [0, 2047, 2049, 3072, -2048, 2048.0, True, "2048", None, [2048]])
def test_check_chunk_rejects_another_offset(offset: object) -> None:
    with pytest.raises(ProtocolError, match=r"offset|at"):
        check_chunk(repack(rs_chunk(), offset=offset))


def test_check_chunk_rejects_a_bool_offset_equal_to_the_expected_one() -> None:
    """``False == 0`` in Python: an offset of 0 must still be an integer, not a boolean."""
    raw = wire.chunk_header("rs", 1, 0, codec_header("none", 4), 1.0)
    wire.check_chunk(raw, phase="rs", shard=1, offset=0, numel=4, codec="none")
    with pytest.raises(ProtocolError, match="integer"):
        wire.check_chunk(repack(raw, offset=False), phase="rs", shard=1, offset=0, numel=4, codec="none")
    with pytest.raises(ProtocolError, match="integer"):
        wire.check_chunk(repack(raw, shard=True), phase="rs", shard=1, offset=0, numel=4, codec="none")


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_check_chunk_rejects_a_bad_reduce_weight(weight: object) -> None:
    with pytest.raises(ProtocolError, match="weight"):
        check_chunk(repack(rs_chunk(), weight=weight))


@pytest.mark.parametrize("weight", [5e-324, 1e-300, 0.5, 1.0, 123.25, wire.MAX_WEIGHT])
def test_check_chunk_accepts_the_whole_range_of_weights(weight: float) -> None:
    message, _ = check_chunk(rs_chunk(weight=weight))
    assert message["weight"] == weight


@pytest.mark.parametrize("weight", [0.75, 1.0, 0.0, math.nan, 1, 0, True, False, "", b"", []])
def test_check_chunk_rejects_any_weight_on_an_all_gather_chunk(weight: object) -> None:
    raw = wire.chunk_header("ag", 1, 2048, codec_header("none", 1000), None)
    check_chunk(raw, phase="ag")
    with pytest.raises(ProtocolError, match="no weight"):
        check_chunk(repack(raw, weight=weight), phase="ag")


@pytest.mark.parametrize("header", ["codec", None, 0, [], {"v": 1}, True, 1.5])
def test_check_chunk_rejects_a_codec_header_that_is_not_bytes(header: object) -> None:
    with pytest.raises(ProtocolError, match="must be bytes"):
        check_chunk(repack(rs_chunk(), codec=header))


@pytest.mark.parametrize("codec", sorted(CHUNK_CODECS))
@pytest.mark.parametrize("numel", [999, 1001, 0, 2000, 1024])
def test_check_chunk_rejects_a_codec_header_for_another_numel(codec: str, numel: int) -> None:
    """A genuine, self-consistent header of another length: the receiver's plan fixes the length."""
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(rs_chunk(codec, numel), codec=codec)


@pytest.mark.parametrize("numel", [999, 2**41, -1, 1000.0, True, None, "1000"])
def test_check_chunk_rejects_a_declared_numel_other_than_the_expected_one(numel: object) -> None:
    header = header_fields(codec_header("none", 1000), numel=numel)
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(), codec=header))


@pytest.mark.parametrize("name", ["zstd", "", "NONE", None, 1, b"none", ["none"]])
def test_check_chunk_rejects_an_unknown_codec(name: object) -> None:
    header = header_fields(codec_header("none", 1000), codec=name)
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(), codec=header))


@pytest.mark.parametrize(("sent", "expected"), list(itertools.permutations(sorted(CHUNK_CODECS), 2)))
def test_check_chunk_rejects_a_valid_header_of_another_codec(sent: str, expected: str) -> None:
    with pytest.raises(ProtocolError, match=f"uses codec '{sent}'"):
        check_chunk(rs_chunk(sent), codec=expected)


@pytest.mark.parametrize(
    ("codec", "buffers"),
    [
        ("none", [["float16", 1000]]), ("none", [["float32", 999]]), ("none", [["float32", 1001]]), ("none", []),
        ("none", [["float32", 1000], ["float32", 1]]), ("none", [["float64", 1000]]), ("none", [["float32"]]),
        ("none", [[1000, "float32"]]), ("none", [["float32", 1000, 0]]), ("none", None), ("none", "float32"),
        ("none", [{"float32": 1000}]), ("int8", [["int8", 1000]]), ("int8", [["int8", 1000], ["float32", 3]]),
        ("int8", [["uint8", 1000], ["float32", 4]]), ("int8", [["float32", 4], ["int8", 1000]]),
        ("topk", [["int32", 50]]), ("topk", [["int32", 50], ["float16", 50]]),
        ("topk", [["int32", 49], ["float32", 50]]), ("topk", [["int64", 50], ["float32", 50]]),
    ],
)  # fmt: skip
def test_check_chunk_rejects_buffer_declarations_that_do_not_match_the_layout(codec: str, buffers: object) -> None:
    header = header_fields(codec_header(codec, 1000, **CHUNK_CODECS[codec]), buffers=buffers)
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(codec), codec=header), codec=codec)


@pytest.mark.parametrize(
    ("codec", "params"),
    [
        ("none", {"block": 256}), ("none", {"": 0}), ("none", None), ("none", []), ("int8", {"block": 7}),
        ("int8", {"block": 0}), ("int8", {"block": -8}), ("int8", {"block": 12}), ("int8", {"block": 2**21}),
        ("int8", {"block": 256.0}), ("int8", {"block": True}), ("int8", {"block": "256"}), ("int8", {}),
        ("int8", {"block": 256, "x": 1}), ("topk", {"k": -1, "vbits": 32}), ("topk", {"k": 50, "vbits": 8}),
        ("topk", {"k": 50, "vbits": 32.0}), ("topk", {"k": 50.0, "vbits": 32}), ("topk", {"k": 50}),
        ("topk", {"vbits": 32}), ("topk", {"k": 51, "vbits": 32}), ("topk", {"k": 50, "vbits": 16}),
    ],
)  # fmt: skip
def test_check_chunk_rejects_bad_codec_params(codec: str, params: object) -> None:
    header = header_fields(codec_header(codec, 1000, **CHUNK_CODECS[codec]), params=params)
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(codec), codec=header), codec=codec)


ENVELOPE_CHANGES = [
    {"v": 2}, {"v": 0}, {"v": 1.0}, {"v": True}, {"v": DROP}, {"x": 1}, {"numel": DROP}, {"params": DROP},
]  # fmt: skip


@pytest.mark.parametrize("change", ENVELOPE_CHANGES)
def test_check_chunk_rejects_a_codec_header_with_a_bad_envelope(change: dict[str, object]) -> None:
    header = header_fields(codec_header("none", 1000), **change)
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(), codec=header))


@pytest.mark.parametrize(
    "header", [b"", b"\xc1", codec_header("none", 1000)[:-1], bytes(5000), msgpack.packb({"pad": bytes(4200)})]
)
def test_check_chunk_rejects_an_undecodable_or_oversized_codec_header(header: bytes) -> None:
    with pytest.raises(ProtocolError, match="bad codec header"):
        check_chunk(repack(rs_chunk(), codec=header))


def test_check_chunk_rejects_a_topk_header_declaring_more_entries_than_the_chunk() -> None:
    """A top-k chunk of ``numel`` elements keeps at most ``numel`` entries, and the receiver allocates what the
    layout says before reading a byte: ``k = 2**40`` would ask for 4 TiB, ``k = 2**30`` reserve 4 GiB for a
    1000-element chunk. (Found by this test: ``k`` used to be unbounded.)"""
    for k in (1001, 2**30, 2**40):
        header = header_fields(
            codec_header("topk", 1000, fraction=0.05), params={"k": k, "vbits": 32},
            buffers=[["int32", k], ["float32", k]],
        )  # fmt: skip
        with pytest.raises(ProtocolError, match="bad codec header"):
            check_chunk(repack(rs_chunk("topk"), codec=header), codec="topk")


def test_check_chunk_accepts_a_topk_header_keeping_every_entry() -> None:
    """``k == numel`` is the largest valid top-k chunk (fraction 1): the bound above must not refuse it."""
    header = codec_header("topk", 1000, fraction=1.0)
    _, layout = check_chunk(repack(rs_chunk("topk"), codec=header), codec="topk")
    assert layout == [("int32", 1000), ("float32", 1000)]


# ----------------------------------------------------------------------------------------------------- weight


@pytest.mark.parametrize("weight", [5e-324, 1e-12, 1.0, 3.5, wire.MAX_WEIGHT])
def test_check_weight_returns_a_valid_weight(weight: float) -> None:
    assert wire.check_weight(weight) == weight


@pytest.mark.parametrize("weight", [*BAD_WEIGHTS, math.nextafter(wire.MAX_WEIGHT, math.inf), -5e-324])
def test_check_weight_rejects_anything_else(weight: object) -> None:
    """Integers too (``1``, ``True``): the wire carries weights as floats and a validator does not convert."""
    with pytest.raises(ProtocolError, match="weight"):
        wire.check_weight(weight)


# ----------------------------------------------------------------------------------------------------- result


def check_result(raw: bytes, shard: int = 1, group_size: int = 4) -> tuple[tuple[int, ...], float]:
    return wire.check_result(raw, shard=shard, group_size=group_size)


@pytest.mark.parametrize("contributors", [[1], [0, 1], [1, 3], [0, 1, 2, 3], (1, 2)])
def test_check_result_returns_contributors_and_weight(contributors: list[int]) -> None:
    assert check_result(wire.result_header(1, contributors, 2.5)) == (tuple(contributors), 2.5)


def test_check_result_accepts_every_rank_of_a_maximal_group() -> None:
    everyone = list(range(256))
    assert check_result(wire.result_header(255, everyone, 1.0), shard=255, group_size=256)[0] == tuple(everyone)


@pytest.mark.parametrize("shard", [0, 2, 4, -1, *NOT_INTS])
def test_check_result_rejects_another_shard(shard: object) -> None:
    with pytest.raises(ProtocolError, match=r"shard|integer"):
        check_result(repack(wire.result_header(1, [0, 1], 2.0), shard=shard))


@pytest.mark.parametrize(
    "contributors",
    [
        [1, 0], [2, 1], [3, 2, 1],  # unsorted
        [1, 1], [0, 1, 1], [1, 1, 2],  # duplicated
        [1, 4], [-1, 1], [1, 2**63], [1, 256],  # out of range for a group of 4
        [], [0], [0, 2], [2, 3],  # missing the owner
        [1.0], [0, 1.0], [True], [0, True], [False, 1], ["1"], [None], [[1]], [1, None],  # not integers
        None, 1, "1", b"\x01", {"1": 1},  # not a list
    ],
)  # fmt: skip
def test_check_result_rejects_bad_contributors(contributors: object) -> None:
    with pytest.raises(ProtocolError, match="contributor"):
        check_result(repack(wire.result_header(1, [0, 1], 2.0), contributors=contributors))


@pytest.mark.parametrize("weight", BAD_WEIGHTS)
def test_check_result_rejects_a_bad_weight(weight: object) -> None:
    with pytest.raises(ProtocolError, match="weight"):
        check_result(repack(wire.result_header(1, [0, 1], 2.0), weight=weight))


def test_check_result_rejects_malformed_envelopes() -> None:
    raw = wire.result_header(1, [1], 1.0)
    for bad in (repack(raw, v=0), repack(raw, t="chunk"), repack(raw, extra=1), repack(raw, weight=DROP), raw[:-1]):
        with pytest.raises(ProtocolError):
            check_result(bad)


# ------------------------------------------------------------------------------------------------------- vote


def check_vote(raw: bytes, stage: int = 1, group_size: int = 4) -> frozenset[wire.Edge]:
    return wire.check_vote(raw, stage=stage, group_size=group_size)


@pytest.mark.parametrize("stage", [1, 2])
def test_check_vote_returns_the_edges(stage: int) -> None:
    assert check_vote(wire.vote(stage, frozenset()), stage) == frozenset()
    every = frozenset(itertools.combinations(range(4), 2))
    assert check_vote(wire.vote(stage, every), stage) == every
    assert check_vote(wire.vote(stage, frozenset({(2, 3), (0, 1)})), stage) == {(0, 1), (2, 3)}


def test_check_vote_accepts_edges_in_any_order() -> None:
    assert check_vote(repack(wire.vote(1, frozenset()), edges=[[2, 3], [0, 1]])) == {(0, 1), (2, 3)}


@pytest.mark.parametrize("stage", [2, 0, 3, -1, 1.0, True, "1", None, [1]])
def test_check_vote_rejects_another_stage(stage: object) -> None:
    with pytest.raises(ProtocolError, match="stage"):
        check_vote(repack(wire.vote(1, frozenset()), stage=stage), stage=1)


def test_check_vote_rejects_a_stage_1_vote_where_stage_2_is_expected() -> None:
    with pytest.raises(ProtocolError, match="stage"):
        check_vote(wire.vote(1, frozenset()), stage=2)


@pytest.mark.parametrize(
    "edges",
    [
        [[1, 0]], [[3, 2]], [[1, 1]], [[0, 0]],  # a >= b
        [[0, 4]], [[-1, 0]], [[3, 4]], [[0, 2**64 - 1]],  # out of range for a group of 4
        [[0]], [[0, 1, 2]], [[]], [0, 1], [[0, 1], 2], [None], ["01"], [{"0": 1}],  # not pairs
        [[0.0, 1]], [[0, 1.0]], [[False, 1]], [[0, True]], [["0", 1]], [[None, 1]], [[b"", 1]],  # not integers
        None, "01", 1, {"0": 1}, b"\x00\x01",  # not a list
    ],
)  # fmt: skip
def test_check_vote_rejects_malformed_edges(edges: object) -> None:
    with pytest.raises(ProtocolError, match="edge"):
        check_vote(repack(wire.vote(1, frozenset()), edges=edges))


def test_check_vote_rejects_more_edges_than_a_group_has() -> None:
    """A group of G has G(G-1)/2 links: a longer list (duplicates included) is refused before it is read."""
    every = [list(edge) for edge in itertools.combinations(range(4), 2)]
    assert check_vote(repack(wire.vote(1, frozenset()), edges=every)) == frozenset(map(tuple, every))
    for edges in ([*every, [0, 1]], every * 2, [[0, 1]] * 7):
        with pytest.raises(ProtocolError, match="edge list"):
            check_vote(repack(wire.vote(1, frozenset()), edges=edges))
    with pytest.raises(ProtocolError, match="edge list"):
        check_vote(repack(wire.vote(1, frozenset()), edges=[[0, 1], [0, 1]]), group_size=2)


def test_check_vote_rejects_malformed_envelopes() -> None:
    raw = wire.vote(1, frozenset())
    for bad in (repack(raw, v=2), repack(raw, t="result"), repack(raw, extra=1), repack(raw, edges=DROP), raw[:-1]):
        with pytest.raises(ProtocolError):
            check_vote(bad)


# ------------------------------------------------------------------------------------------- faulty_members


def edges(*pairs: tuple[int, int]) -> frozenset[wire.Edge]:
    return frozenset(pairs)


def test_faulty_members_of_no_edge_is_nobody() -> None:
    assert faulty_members(frozenset()) == frozenset()


@pytest.mark.parametrize(("center", "size"), [(0, 3), (0, 5), (3, 5), (7, 8), (2, 3)])
def test_faulty_members_of_a_star_is_its_center(center: int, size: int) -> None:
    """One member broke its links with several others: it is the one culprit that explains every edge."""
    others = [r for r in range(size) if r != center]
    for n_spokes in range(2, len(others) + 1):
        star = frozenset((min(center, r), max(center, r)) for r in others[:n_spokes])
        assert faulty_members(star) == {center}


@pytest.mark.parametrize("edge", [(0, 1), (2, 5), (6, 7)])
def test_faulty_members_of_a_single_edge_is_both_ends(edge: wire.Edge) -> None:
    """One broken link cannot tell who failed."""
    assert faulty_members(edges(edge)) == set(edge)


def test_faulty_members_of_two_disjoint_edges_is_all_four_ends() -> None:
    assert faulty_members(edges((0, 1), (2, 3))) == {0, 1, 2, 3}
    assert faulty_members(edges((1, 4), (0, 7))) == {0, 1, 4, 7}


def test_faulty_members_of_a_triangle_is_everyone_in_it() -> None:
    """No member touches every edge of a triangle: all three are suspects."""
    assert faulty_members(edges((0, 1), (1, 2), (0, 2))) == {0, 1, 2}


def test_faulty_members_covers_every_edge_of_random_edge_sets() -> None:
    """The property the commit relies on: every broken link has a faulty end, so no survivor lacks a shard it
    must commit; and a single culprit, when there is one, is all that is declared."""
    rng = random.Random(20240611)
    for _ in range(500):
        size = rng.randint(2, 8)
        pairs = list(itertools.combinations(range(size), 2))
        edge_set = frozenset(rng.sample(pairs, rng.randint(0, len(pairs))))
        faulty = faulty_members(edge_set)
        assert all(a in faulty or b in faulty for a, b in edge_set), (edge_set, faulty)
        touching = {r for edge in edge_set for r in edge}
        assert faulty <= touching
        covering = [r for r in range(size) if edge_set and all(r in edge for edge in edge_set)]
        assert faulty == ({covering[0]} if len(covering) == 1 else touching)
