"""Fuzzing a round's receiver: over a thousand malformed frames, none accepted, and the receiver still serves.

The victim is a real :class:`Collectives` on a real :class:`DataPlane`. The fuzzer is rank 0 of a two-member
group, written by hand against :mod:`legion_swarm.collectives.wire`: it opens the channel as rank 0 does,
speaks the protocol correctly up to a seeded random message of its stream, and puts one malformed message in
its place (or closes the channel there, or in the middle of that message); after a malformed message it goes
on with the honest rest of its stream, so a receiver that let the message through would finish the round with
the fuzzer included, where the test sees it.

Whether a mutated message is malformed is decided by an oracle written here from the protocol's description
(wire.py's docstring and constants, the codec wire format), not by the library's validators: a mutation that
happens to produce a valid message is drawn again (and counted), so every frame sent must be rejected.

A two-member round makes every outcome exact. An exclusion before the commit vote leaves one broken link,
whose two ends are both declared faulty, so the victim commits nothing: its tensors keep their pre-round
values bit for bit (no fuzzed byte anywhere). An exclusion during the vote is too late to matter by design:
the victim then holds the fuzzer's complete, valid result and commits the honest outcome, bit for bit.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from legion_swarm.codecs import Encoded, decode, get_codec, to_wire
from legion_swarm.codecs.base import MAX_HEADER_BYTES
from legion_swarm.collectives import Collectives, RoundResult, wire
from legion_swarm.collectives.partition import flatten, plan_partition
from legion_swarm.collectives.reference import reference_all_reduce, weighted_average
from legion_swarm.config import CollectiveConfig
from legion_swarm.errors import NetworkError
from legion_swarm.groups import GroupInfo, GroupMember
from legion_swarm.transport.dataplane import DataPlane
from legion_swarm.transport.identity import Identity
from legion_swarm.transport.record_layer import MAX_RECORD_PLAINTEXT
from legion_swarm.transport.secure import SecureChannel

ROUNDS_LOGGER = "legion_swarm.collectives.rounds"
SIZES = [2500, 1700]
"""The victim's tensors: shard 0 is [0, 2048) (two chunks), shard 1 is [2048, 4200) (three, the last short),
and shard 1 spans both tensors."""
CHUNK = 1024
VICTIM_WEIGHT = 1.5
FUZZER_WEIGHT = 0.75
CODECS = ("none", "fp16", "int8", "topk")
ROUNDS_PER_CODEC = 400
"""4 x 400 = 1600 malformed frames in all."""
TIMEOUTS = {
    "connect_timeout_s": 1.0, "reduce_timeout_s": 2.0, "gather_timeout_s": 2.0, "commit_timeout_s": 1.0,
    "stall_timeout_s": 1.0,
}  # fmt: skip
NP_DTYPES = {"float32": np.dtype("<f4"), "float16": np.dtype("<f2"), "int8": np.dtype("i1"), "int32": np.dtype("<i4")}


def config_for(codec: str) -> CollectiveConfig:
    return CollectiveConfig(codec=codec, chunk_elems=CHUNK, **TIMEOUTS)  # type: ignore[arg-type]


def identity_from(rng: random.Random) -> Identity:
    """A reproducible Ed25519 identity: the peer ids, hence the group digests the fuzzer sends, are seeded too."""
    return Identity(Ed25519PrivateKey.from_private_bytes(rng.randbytes(32)))


def chunks_of(size: int) -> list[tuple[int, int]]:
    return [(o, min(CHUNK, size - o)) for o in range(0, size, CHUNK)]


# ------------------------------------------------------------------------------------- the honest stream


@dataclass(frozen=True)
class Chunk:
    """One chunk the fuzzer sends: what the victim's plan fixes (codec, offset, length) and its honest encoding."""

    codec: str
    offset: int
    numel: int
    layout: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Slot:
    """One message of the fuzzer's honest stream, with what the victim expects there."""

    kind: str
    """hello, rs_header, rs_buffer, result, ag_header, ag_buffer, vote1 or vote2."""
    phase: str
    """The victim's phase while it reads this message (its exclusion reasons start with it)."""
    payload: bytes
    chunk: Chunk | None = None
    buffer: int = -1
    """Index in ``chunk.layout`` (buffer slots)."""

    @property
    def control(self) -> bool:
        return not self.kind.endswith("_buffer")


def encode_chunks(
    codec_name: str, values: torch.Tensor, kind: str, shard: int, weight: float | None
) -> tuple[list[Slot], list[Encoded]]:
    """Header and buffer slots of ``values`` cut in chunks, and their encodings (to compute what they decode to)."""
    codec = get_codec(codec_name, **config_for(codec_name).codec_options(codec_name))
    phase = "reduce" if kind == "rs" else "gather"
    slots: list[Slot] = []
    encodings: list[Encoded] = []
    for offset, length in chunks_of(values.numel()):
        enc = codec.encode(values[offset : offset + length])
        header, buffers = to_wire(enc)
        layout = tuple((dtype, n) for dtype, n in msgpack.unpackb(header)["buffers"])
        chunk = Chunk(codec_name, offset, length, layout)
        slots.append(Slot(f"{kind}_header", phase, wire.chunk_header(kind, shard, offset, header, weight), chunk))
        slots.extend(Slot(f"{kind}_buffer", phase, bytes(b), chunk, i) for i, b in enumerate(buffers))
        encodings.append(enc)
    return slots, encodings


@dataclass
class Scenario:
    """Everything fixed for one victim codec: the victim's input, the fuzzer's honest stream (but its hello,
    which depends on the round and on the victim's setup) and the honest outcome of a round."""

    codec: str
    x: list[torch.Tensor]
    body: list[Slot]
    honest: torch.Tensor
    """The victim's flattened tensors after a round with the honest fuzzer."""

    @classmethod
    def build(cls, codec: str, seed: int) -> Scenario:
        gen = torch.Generator().manual_seed(seed)
        x = [torch.randn(size, generator=gen) for size in SIZES]
        (s0, e0), (s1, e1) = plan_partition(SIZES, 2).bounds
        contribution = torch.randn(e1 - s1, generator=gen)  # the fuzzer's part of the victim's shard
        result = torch.randn(e0 - s0, generator=gen)  # the fuzzer's "reduced" shard: any values are valid
        gather_codec = config_for(codec).resolved_gather_codec
        rs_slots, rs_encodings = encode_chunks(codec, contribution, "rs", 1, FUZZER_WEIGHT)
        ag_slots, ag_encodings = encode_chunks(gather_codec, result, "ag", 0, None)
        body = [
            *rs_slots,
            Slot("result", "gather", wire.result_header(0, [0, 1], FUZZER_WEIGHT + VICTIM_WEIGHT)),
            *ag_slots,
            Slot("vote1", "vote1", wire.vote(1, frozenset())),
            Slot("vote2", "vote2", wire.vote(2, frozenset())),
        ]
        # The victim's view of an honest round: average in rank order (fuzzer first), encode its result once and
        # keep the decoded value, as every receiver of it does.
        received = torch.cat([decode(enc) for enc in rs_encodings])
        averaged = weighted_average([(received, FUZZER_WEIGHT), (flatten(x)[s1:e1], VICTIM_WEIGHT)])
        gather = get_codec(gather_codec, **config_for(codec).codec_options(gather_codec))
        own = torch.cat([decode(gather.encode(averaged[o : o + n])) for o, n in chunks_of(averaged.numel())])
        honest = torch.cat([torch.cat([decode(enc) for enc in ag_encodings]), own])
        return cls(codec, x, body, honest)

    def stream(self, group: GroupInfo, setup: list[Any]) -> list[Slot]:
        """The whole honest stream of a round of ``group``; ``setup`` is the victim's (see :meth:`Fuzzer.run`)."""
        return [Slot("hello", "connect", wire.hello(group.digest, 0, setup)), *self.body]


# ------------------------------------------------------------------------------------------------ the oracle
# The protocol's rules, stated independently of wire.py's validators: strict types (msgpack keeps 1, 1.0 and
# True apart, so a message that says ``True`` where a rank goes is not rank 1), except where the protocol compares
# by value (the hello's setup list and a codec header's buffer declarations, which only restate the layout).


def strict_equal(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, list):
        return len(a) == len(b) and all(map(strict_equal, a, b))  # type: ignore[arg-type]
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(strict_equal(a[k], b[k]) for k in a)  # type: ignore[attr-defined,index]
    return a == b


def decoded(raw: bytes, limit: int) -> dict[Any, Any] | None:
    if len(raw) > limit:
        return None
    try:
        message = msgpack.unpackb(raw, strict_map_key=False)
    except Exception:
        return None
    return message if isinstance(message, dict) else None


def fields_are(message: dict[Any, Any], expected: dict[str, object], free: set[str]) -> bool:
    """Exactly the keys of ``expected`` plus ``free``, the former strictly equal to their expected values."""
    return set(message) == set(expected) | free and all(strict_equal(message[k], v) for k, v in expected.items())


def valid_weight(weight: object) -> bool:
    return type(weight) is float and math.isfinite(weight) and 0 < weight <= wire.MAX_WEIGHT


def header_layout(raw: object, numel: int, codec: str) -> list[list[object]] | None:
    """The buffers a valid codec header of ``numel`` elements of ``codec`` announces; None if it is not one."""
    if not isinstance(raw, bytes):
        return None
    header = decoded(raw, MAX_HEADER_BYTES)
    if header is None or not fields_are(header, {"v": 1, "codec": codec, "numel": numel}, {"params", "buffers"}):
        return None
    params = header["params"]
    if not isinstance(params, dict) or not all(type(v) is int for v in params.values()):
        return None
    if codec in ("none", "fp16"):
        layout = [["float32" if codec == "none" else "float16", numel]] if params == {} else None
    elif codec == "int8":
        block = params.get("block", 0)
        ok = set(params) == {"block"} and 8 <= block <= 1 << 20 and block % 8 == 0
        layout = [["int8", numel], ["float32", -(-numel // block)]] if ok else None
    else:  # topk: at most every entry of the chunk
        k, vbits = params.get("k", -1), params.get("vbits")
        ok = set(params) == {"k", "vbits"} and 0 <= k <= numel and vbits in (16, 32)
        layout = [["int32", k], ["float32" if vbits == 32 else "float16", k]] if ok else None
    return layout if layout is not None and header["buffers"] == layout else None


def control_valid(slot: Slot, raw: bytes) -> bool:
    """Would the protocol accept ``raw`` in place of ``slot`` (a control message), the stream before it honest?"""
    message = decoded(raw, wire.MAX_CONTROL_BYTES)
    if message is None:
        return False
    if slot.kind == "hello":
        honest = msgpack.unpackb(slot.payload)
        expected = {"v": 1, "t": "hello", "group": honest["group"], "rank": 0}
        return fields_are(message, expected, {"setup"}) and message["setup"] == honest["setup"]
    if slot.kind in ("rs_header", "ag_header"):
        chunk = slot.chunk
        assert chunk is not None
        rs = slot.kind == "rs_header"
        phase, shard = ("rs", 1) if rs else ("ag", 0)
        expected = {"v": 1, "t": "chunk", "phase": phase, "shard": shard, "offset": chunk.offset}
        if not fields_are(message, expected, {"codec", "weight"}):
            return False
        weight = message["weight"]
        # Within a contribution the weight is that of its first chunk (honest here, when this is not the first).
        weight_ok = (valid_weight(weight) and (chunk.offset == 0 or weight == FUZZER_WEIGHT)) if rs else weight is None
        return weight_ok and header_layout(message["codec"], chunk.numel, chunk.codec) is not None
    if slot.kind == "result":
        if not fields_are(message, {"v": 1, "t": "result", "shard": 0}, {"contributors", "weight"}):
            return False
        ranks = message["contributors"]
        return (
            isinstance(ranks, list) and all(type(r) is int and 0 <= r < 2 for r in ranks)
            and ranks == sorted(set(ranks)) and 0 in ranks and valid_weight(message["weight"])
        )  # fmt: skip
    stage = int(slot.kind[-1])
    if not fields_are(message, {"v": 1, "t": "vote", "stage": stage}, {"edges"}):
        return False
    edges = message["edges"]
    return isinstance(edges, list) and len(edges) <= 1 and all(strict_equal(e, [0, 1]) for e in edges)


def buffer_valid(slot: Slot, raw: bytes) -> bool:
    """Would the protocol accept ``raw`` as buffer ``slot.buffer`` of its chunk (the other buffers honest)?"""
    chunk = slot.chunk
    assert chunk is not None
    dtype, length = chunk.layout[slot.buffer]
    if len(raw) != length * NP_DTYPES[dtype].itemsize:
        return False
    values = np.frombuffer(raw, NP_DTYPES[dtype])
    if not length:
        return True
    with np.errstate(over="ignore", invalid="ignore"):
        if chunk.codec == "int8":
            if dtype == "int8":
                return bool((values >= -127).all())  # the encoder's symmetric range
            return bool(np.isfinite(values * np.float32(127)).all() and (values >= 0).all())  # scales
        if dtype == "int32":  # top-k indices: sorted, unique, inside the chunk
            return bool(values[0] >= 0 and values[-1] < chunk.numel and (np.diff(values) > 0).all())
        return bool(np.isfinite(values).all())  # values of none, fp16 and top-k


# --------------------------------------------------------------------------------------------- the mutations


@dataclass(frozen=True)
class Mutation:
    """What the fuzzer does at ``position`` of its stream instead of sending the honest message."""

    position: int
    family: str
    action: str
    """send (``payload`` instead of the message), close (the channel, cleanly), or abort_mid / close_mid
    (``payload`` is a proper prefix of the message, sent as a record that does not end it, then an abort or
    a close record)."""
    payload: bytes = b""
    detail: str = ""
    """Which variant of the family: the field groups changed, the buffer's role, ..."""


DROP = object()
BAD_WEIGHTS: list[object] = [
    math.nan, math.inf, -math.inf, 0.0, -0.0, -FUZZER_WEIGHT, -1e-300, 2 * wire.MAX_WEIGHT, 1e300, 1, 0, True, False,
    None, "0.75", b"", [FUZZER_WEIGHT],
]  # fmt: skip
NOT_INTS: list[object] = [True, False, 0.0, 1.0, "0", "1", None, b"", [0], {"a": 0}]
OTHER_CODECS = ("none", "fp16", "bf16", "int8", "int4", "topk")


def changed(message: dict[str, Any], changes: dict[str, object]) -> bytes:
    out = dict(message)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return msgpack.packb(out)


Changes = dict[str, object]
"""Fields of a message to replace (or, with the value :data:`DROP`, to remove)."""


Cell = tuple[str, str, str]
"""(kind of message, family of mutation, group or buffer role): one thing every run fuzzes at least once."""
GROUPED = ("fields", "codec_header", "content")
"""The families whose mutations come in groups (their ``Mutation.detail``)."""


class Mutator:
    """Seeded generator of malformed replacements for any message of the fuzzer's stream.

    It first goes through a schedule that covers every cell (every family of mutation on every kind of message,
    every group of field changes and of codec headers, malformed contents of every kind of buffer) once, then
    draws at random: a kind of message (each as likely), one of its messages, a family by weight. Deterministic:
    everything comes from ``rng`` (and redraws from the oracle, itself a function of what was drawn)."""

    CONTROL: ClassVar[dict[str, int]] = {
        "fields": 6, "random_bytes": 1, "truncated": 1, "bitflip": 2, "oversized": 1, "wrong_message": 1,
        "close": 1, "close_mid": 1,
    }  # fmt: skip
    BUFFER: ClassVar[dict[str, int]] = {
        "content": 5, "length": 2, "random_bytes": 1, "bitflip": 1, "oversized": 1, "wrong_message": 1, "close": 1,
        "close_mid": 1,
    }  # fmt: skip

    def __init__(self, rng: random.Random, scenario: Scenario) -> None:
        self.rng = rng
        self.scenario = scenario
        self.discarded: collections.Counter[str] = collections.Counter()
        """Draws that turned out valid (and were drawn again), by family."""
        self.schedule: list[Cell] | None = None

    def cells(self, stream: list[Slot]) -> list[Cell]:
        """Every cell of a stream, in a fixed order. (Bit flips in buffers are left to chance: most flips of
        a float are another valid float.)"""
        cells: list[Cell] = []
        for kind in sorted({slot.kind for slot in stream}):
            slots = [slot for slot in stream if slot.kind == kind]
            message = msgpack.unpackb(slots[0].payload) if slots[0].control else None
            for family in self.families(slots[0]):
                if family == "fields":
                    groups: list[str] = sorted(self.field_groups(slots[0], message))
                elif family == "codec_header":
                    groups = sorted(self.codec_headers(slots[0], message["codec"]))  # type: ignore[index]
                elif family == "content":
                    groups = sorted({self.role(slot) for slot in slots})
                elif family == "bitflip" and message is None:
                    continue
                else:
                    groups = [""]
                cells += [(kind, family, group) for group in groups]
        return cells

    def draw(self, stream: list[Slot]) -> Mutation:
        if self.schedule is None:
            self.schedule = self.cells(stream)
        while self.schedule:
            cell = self.schedule.pop(0)
            for _ in range(100):  # a cell whose every draw is valid would show as uncovered
                mutation = self.attempt(stream, *cell)
                if mutation is not None:
                    return mutation
        kinds = sorted({slot.kind for slot in stream})
        while True:
            kind = self.rng.choice(kinds)
            families = self.families(next(slot for slot in stream if slot.kind == kind))
            family = self.rng.choices(list(families), weights=list(families.values()))[0]
            mutation = self.attempt(stream, kind, family, "")
            if mutation is not None:
                return mutation

    def attempt(self, stream: list[Slot], kind: str, family: str, group: str) -> Mutation | None:
        """A malformed message of ``family`` (``group``: of that group, or for a buffer of that role) in place
        of a random message of ``kind``, or None if the draw happened to be valid."""
        positions = [
            i for i, slot in enumerate(stream)
            if slot.kind == kind and not (family == "content" and group and self.role(slot) != group)
        ]  # fmt: skip
        position = self.rng.choice(positions)
        slot = stream[position]
        if family in ("close", "close_mid"):
            return self.close(position, family, slot)
        payload, detail = getattr(self, family)(slot, stream, group)
        if control_valid(slot, payload) if slot.control else buffer_valid(slot, payload):
            self.discarded[family] += 1
            return None
        return Mutation(position, family, "send", payload, detail)

    @classmethod
    def families(cls, slot: Slot) -> dict[str, int]:
        """The families of mutation that apply to ``slot``, with their weights."""
        if not slot.control:
            return cls.BUFFER
        return {**cls.CONTROL, "codec_header": 8} if slot.kind.endswith("_header") else cls.CONTROL

    def close(self, position: int, family: str, slot: Slot) -> Mutation:
        if family == "close":
            return Mutation(position, family, "close")
        cut = self.rng.randrange(1, len(slot.payload))
        return Mutation(position, family, self.rng.choice(["abort_mid", "close_mid"]), slot.payload[:cut])

    # -- families common to every message

    def random_bytes(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        return self.rng.randbytes(len(slot.payload) if not slot.control else self.rng.randrange(0, 300)), ""

    def truncated(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        return slot.payload[: self.rng.randrange(len(slot.payload))], ""

    def bitflip(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        data = bytearray(slot.payload)
        for _ in range(self.rng.choice([1, 1, 2, 3])):
            data[self.rng.randrange(len(data))] ^= 1 << self.rng.randrange(8)
        return bytes(data), ""

    def oversized(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        """Longer than any message the victim expects there: a whole control message's limit, or several records."""
        size = self.rng.choice([wire.MAX_CONTROL_BYTES + 1, wire.MAX_CONTROL_BYTES + self.rng.randrange(2, 70_000)])
        if self.rng.random() < 0.05:
            size = MAX_RECORD_PLAINTEXT + self.rng.randrange(1, 300_000)
        if slot.control and self.rng.random() < 0.5:  # a well-formed message, but too long
            return changed(msgpack.unpackb(slot.payload), {"pad": bytes(size)}), "padded"
        return slot.payload + self.rng.randbytes(16) * (size // 16 + 1), "extended"

    def wrong_message(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        """A genuine message of the stream, at the wrong place."""
        other = self.rng.choice([s for s in stream if s.control and s.payload != slot.payload])
        return other.payload, other.kind

    # -- control messages: one or two groups of fields of the honest message changed

    def fields(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        """One group of field changes (``group``, or a random one), sometimes with a second random one."""
        message = msgpack.unpackb(slot.payload)
        groups = self.field_groups(slot, message)
        names = sorted(groups)
        first = group or self.rng.choice(names)
        changes: Changes = dict(self.rng.choice(groups[first]))
        if self.rng.random() < 0.25:
            changes.update(self.rng.choice(groups[self.rng.choice(names)]))
        return changed(message, changes), first

    def field_groups(self, slot: Slot, message: dict[str, Any]) -> dict[str, list[Changes]]:
        """Every named group of malformed field changes for a control message of ``slot``'s kind."""
        kind = message["t"]
        groups: dict[str, list[Changes]] = {
            "v": [{"v": v} for v in (0, 2, -1, 1.0, True, "1", None)],
            "t": [{"t": t} for t in ("hello", "chunk", "result", "vote", "", None, 1, kind.encode()) if t != kind],
            "missing": [{key: DROP} for key in sorted(message)],
            "extra": [{"x": 0}, {"pad": b"\x00"}, {kind.upper(): kind}],
        }
        if slot.kind == "hello":
            groups.update(self.hello_fields(message))
        elif slot.kind == "rs_header":
            assert slot.chunk is not None
            # Past the first chunk, a valid weight that differs from the first chunk's is malformed too.
            changed_weight = [FUZZER_WEIGHT * 2, math.nextafter(FUZZER_WEIGHT, 1.0)] if slot.chunk.offset else []
            groups.update(self.chunk_fields(slot, message, 1, "ag", [*BAD_WEIGHTS, *changed_weight]))
        elif slot.kind == "ag_header":
            weights = [FUZZER_WEIGHT, 1.0, 0.0, math.nan, True, False, 0, 1, "", b"", []]
            groups.update(self.chunk_fields(slot, message, 0, "rs", weights))
        elif slot.kind == "result":
            groups.update(self.result_fields())
        else:
            groups.update(self.vote_fields(message["stage"]))
        return groups

    def hello_fields(self, message: dict[str, Any]) -> dict[str, list[Changes]]:
        digest, setup = message["group"], message["setup"]
        flipped = bytes([digest[0] ^ 1]) + digest[1:]
        other = [c for c in OTHER_CODECS if c != setup[0]]
        setups = [
            [self.rng.choice(other), *setup[1:]], [setup[0], "bf16", *setup[2:]], [*setup[:2], 2048, *setup[3:]],
            [*setup[:2], 512, *setup[3:]], [*setup[:3], False, True], [*setup[:4], False], setup[:-1], [*setup, 0],
            [], None, "setup", setup[::-1], {"codec": setup[0]},
        ]  # fmt: skip
        return {
            "group": [
                {"group": g} for g in (digest[:-1], digest + b"\x00", flipped, digest.hex(), None, b"", bytes(32))
            ],
            "rank": [{"rank": r} for r in (1, -1, 2, 255, *NOT_INTS)],
            "setup": [{"setup": s} for s in setups],
        }

    def chunk_fields(
        self, slot: Slot, message: dict[str, Any], shard: int, other_phase: str, weights: list[object]
    ) -> dict[str, list[Changes]]:
        offset = message["offset"]
        offsets = [offset + 1, offset - 1, offset + CHUNK, offset + 2 * CHUNK, -1, float(offset), str(offset), None]
        offsets.append(bool(offset) if offset in (0, 1) else 2**63)
        return {
            "phase": [{"phase": p} for p in (other_phase, "RS", "", None, 0, b"rs", [other_phase])],
            "shard": [{"shard": s} for s in (1 - shard, 2, -1, 2**64 - 1, *NOT_INTS)],
            "offset": [{"offset": o} for o in offsets],
            "weight": [{"weight": w} for w in weights],
            "codec": [{"codec": h} for hs in self.codec_headers(slot, message["codec"]).values() for h in hs],
        }

    def codec_headers(self, slot: Slot, raw: bytes) -> dict[str, list[object]]:
        """Named groups of codec headers the victim must refuse for this chunk (and of non-headers)."""
        chunk = slot.chunk
        assert chunk is not None
        header = msgpack.unpackb(raw)
        n, params, buffers = chunk.numel, header["params"], header["buffers"]
        other = self.rng.choice([c for c in OTHER_CODECS if c != chunk.codec])
        param_changes: list[object] = [{"block": 256}, {"k": 1}, None, [], {"": 0}]
        if chunk.codec == "int8":
            blocks = (7, 0, -8, 12, 1 << 21, 256.0, True, "256", 128, 512)
            param_changes = [*({"block": b} for b in blocks), {}, {"block": 256, "x": 1}]
        elif chunk.codec == "topk":  # (a consistent k above numel has its own test, below)
            k = params["k"]
            param_changes = [
                {"k": -1, "vbits": 32}, {"k": k, "vbits": 8}, {"k": k, "vbits": 32.0}, {"k": float(k), "vbits": 32},
                {"k": k}, {"vbits": 32}, {"k": k + 1, "vbits": 32}, {"k": k - 1, "vbits": 32}, {"k": k, "vbits": 16},
            ]  # fmt: skip
        dtype, length = buffers[0]
        swapped = {"float32": "float16", "float16": "float32", "int8": "uint8", "int32": "int64"}[dtype]
        firsts: list[object] = [
            [swapped, length], [dtype, length + 1], [dtype, length - 1], [dtype, length, 0], [length, dtype],
            [dtype, "x"], {"d": 1}, None,
        ]  # fmt: skip
        buffer_changes = [[], None, "float32", buffers[:-1], [*buffers, ["float32", 1]]]
        buffer_changes += [[first, *buffers[1:]] for first in firsts]
        changes: dict[str, list[Changes]] = {
            "numel": [{"numel": v} for v in (n + 1, n - 1, 0, 2 * n, -1, float(n), None, str(n), 2**41)],
            "unknown codec": [{"codec": c} for c in ("zstd", "", None, 1, b"none", chunk.codec.upper())],
            "codec mismatch": [{"codec": other}],
            "version": [{"v": v} for v in (0, 2, 1.0, True, None)],
            "keys": [*({key: DROP} for key in sorted(header)), {"x": 0}, {"pad": bytes(MAX_HEADER_BYTES)}],
            "params": [{"params": p} for p in param_changes],
            "buffers": [{"buffers": b} for b in buffer_changes],
        }
        groups: dict[str, list[object]] = {name: [changed(header, c) for c in cs] for name, cs in changes.items()}
        # A genuine header of another codec (self-consistent, of the right length).
        groups["codec mismatch"].append(to_wire(get_codec(other).encode(torch.linspace(-1.0, 1.0, n)))[0])
        groups["undecodable"] = [raw[:-1], raw[1:], b"", self.rng.randbytes(40), bytes(MAX_HEADER_BYTES + 1)]
        groups["not bytes"] = ["codec", None, 0, [], {"v": 1}, True]
        return groups

    def codec_header(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        """A chunk header whose codec header is refused: one of ``group`` (or of a random group)."""
        message = msgpack.unpackb(slot.payload)
        groups = self.codec_headers(slot, message["codec"])
        name = group or self.rng.choice(sorted(groups))
        return changed(message, {"codec": self.rng.choice(groups[name])}), name

    def result_fields(self) -> dict[str, list[Changes]]:
        contributors: list[object] = [
            [], [1], [1, 0], [0, 0], [0, 0, 1], [0, 1, 1], [0, 2], [-1, 0], [0, 1, 2], [0, 1.0], [0.0, 1], [False, 1],
            [0, True], [True], "01", None, 0, [[0]], [0, None], {"0": 1}, b"\x00",
        ]  # fmt: skip
        return {
            "shard": [{"shard": s} for s in (1, -1, 2, 2**63, *NOT_INTS)],
            "contributors": [{"contributors": c} for c in contributors],
            "weight": [{"weight": w} for w in BAD_WEIGHTS],
        }

    def vote_fields(self, stage: int) -> dict[str, list[Changes]]:
        edges: list[object] = [
            [[1, 0]], [[0, 0]], [[1, 1]], [[0, 2]], [[-1, 0]], [[0, 1], [0, 1]], [[0]], [0, 1], [[0, 1, 2]],
            [[0.0, 1]], [[0, 1.0]], [[False, 1]], [[0, True]], [["0", 1]], None, "01", {"a": 1}, [[0, 1], [0, 2]],
            [[]], [None], [[0, 1.5]], [[0, 2**64 - 1]], b"\x00\x01",
        ]  # fmt: skip
        stages = (3 - stage, 0, 3, -1, bool(stage), float(stage), None, str(stage), [stage])
        return {"stage": [{"stage": s} for s in stages], "edges": [{"edges": e} for e in edges]}

    # -- buffers: contents the codec can never have produced

    @staticmethod
    def role(slot: Slot) -> str:
        """What a buffer holds: int8 codes / scales, top-k indices / values, or the float payload."""
        assert slot.chunk is not None
        codec, dtype = slot.chunk.codec, slot.chunk.layout[slot.buffer][0]
        if codec == "int8":
            return "int8 codes" if dtype == "int8" else "int8 scales"
        if codec == "topk":
            return "topk indices" if dtype == "int32" else "topk values"
        return f"{dtype} values"

    def content(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        chunk = slot.chunk
        assert chunk is not None
        dtype, length = chunk.layout[slot.buffer]
        values = np.frombuffer(slot.payload, NP_DTYPES[dtype]).copy()
        where = [self.rng.randrange(length) for _ in range(self.rng.choice([1, 1, 2, 5]))]
        if self.rng.random() < 0.3:
            where.append(self.rng.choice([0, length - 1]))
        role = self.role(slot)
        if role == "int8 codes":
            values[where] = -128  # outside the encoder's symmetric range
        elif role == "int8 scales":
            max32 = float(np.finfo(np.float32).max)
            values[where] = self.rng.choice([math.nan, math.inf, -math.inf, -self.rng.uniform(1e-3, 1e3), 3e38, max32])
        elif role == "topk indices":
            kind = self.rng.choice(["high", "negative", "duplicate", "swap", "reverse"])
            if kind == "high":
                values[where] = chunk.numel + self.rng.choice([0, 1, 1000, 2**31 - 1 - chunk.numel])
            elif kind == "negative":
                values[where] = -self.rng.choice([1, 2**31])
            elif kind == "duplicate":
                i = self.rng.randrange(1, length)
                values[i] = values[i - 1]
            elif kind == "swap":
                i = self.rng.randrange(1, length)
                values[[i - 1, i]] = values[[i, i - 1]]
            else:
                values = values[::-1].copy()
        elif self.rng.random() < 0.5:  # float payloads: an infinity or a NaN...
            values[where] = self.rng.choice([math.nan, math.inf, -math.inf])
        else:  # ...with any of its payloads
            bits = values.view(np.uint32 if dtype == "float32" else np.uint16)
            exponent, mantissa_bits, sign = (0x7F800000, 23, 31) if dtype == "float32" else (0x7C00, 10, 15)
            for i in where:
                bits[i] = exponent | self.rng.randrange(1, 1 << mantissa_bits) | self.rng.randrange(2) << sign
        return values.tobytes(), role

    def length(self, slot: Slot, stream: list[Slot], group: str) -> tuple[bytes, str]:
        size = len(slot.payload)
        item = NP_DTYPES[self.dtype(slot)].itemsize
        new = self.rng.choice(sorted({0, 1, size - 1, size - item, size + 1, size + item, 2 * size} - {size}))
        return slot.payload[:new] + self.rng.randbytes(max(0, new - size)), "longer" if new > size else "shorter"

    @staticmethod
    def dtype(slot: Slot) -> str:
        assert slot.chunk is not None
        return slot.chunk.layout[slot.buffer][0]


# ------------------------------------------------------------------------------------------------ the fuzzer


class Drain:
    """Reads (and drops) everything the victim sends, so that its sends never stall; notes its hello and votes."""

    def __init__(self, channel: SecureChannel) -> None:
        self.seen = {"hello": asyncio.Event(), "vote1": asyncio.Event(), "vote2": asyncio.Event()}
        self.hello: dict[Any, Any] | None = None
        self.task = asyncio.create_task(self._run(channel))

    async def _run(self, channel: SecureChannel) -> None:
        with contextlib.suppress(NetworkError, OSError):
            while True:
                message = decoded(await channel.recv(1 << 22), 256)
                if message is not None:
                    kind = f"{message.get('t')}{message.get('stage', '')}"
                    if kind == "hello" and self.hello is None:
                        self.hello = message
                    if kind in self.seen:
                        self.seen[kind].set()


@dataclass
class Outcome:
    """One round as the victim saw it, and what the fuzzer did in it."""

    mutation: Mutation | None
    slot: Slot | None
    result: RoundResult
    seconds: float
    out: torch.Tensor
    """The victim's tensors after the round, flattened."""


class Fuzzer:
    """Rank 0 of two-member rounds with ``victim``, on a data plane of its own (it opens every channel)."""

    def __init__(self, plane: DataPlane, victim_plane: DataPlane, victim: Collectives, scenario: Scenario) -> None:
        self.plane, self.victim_plane, self.victim, self.scenario = plane, victim_plane, victim, scenario
        self.setup: list[Any] = []
        """The victim's setup, as its latest hello said."""

    def group(self, rng: random.Random) -> GroupInfo:
        members = (
            GroupMember(peer_id=self.plane.identity.peer_id),
            GroupMember(peer_id=self.victim_plane.identity.peer_id, direct=self.victim_plane.endpoint),
        )
        return GroupInfo(round_id=rng.randbytes(16), members=members)

    async def run(self, group: GroupInfo, choose: Callable[[list[Slot]], Mutation | None]) -> Outcome:
        """One round: the victim's ``all_reduce`` against this fuzzer, which sends its stream with the mutation
        ``choose`` picks (None: all honest), once both are done."""
        work = [t.clone() for t in self.scenario.x]
        config = self.victim.config
        started = time.perf_counter()
        victim = asyncio.create_task(self.victim.all_reduce(group, work, weight=VICTIM_WEIGHT))
        try:
            async with asyncio.timeout(config.round_timeout_s + 2):
                channel = await self.plane.connect(
                    self.victim_plane.identity.peer_id, group.round_id + group.digest[:8],
                    direct=self.victim_plane.endpoint, plane="direct", timeout=config.connect_timeout_s,
                )  # fmt: skip
                assert isinstance(channel, SecureChannel)
                drain = Drain(channel)
                try:
                    # Rank 0 echoes the victim's setup (its codecs, chunking and a digest of the tensor layout):
                    # what the round agrees on is the library's business, what the fuzzer sends is ours.
                    async with asyncio.timeout(config.connect_timeout_s):
                        await drain.seen["hello"].wait()
                    hello = drain.hello
                    assert hello is not None and hello["group"] == group.digest and hello["rank"] == 1
                    self.setup = hello["setup"]
                    stream = self.scenario.stream(group, self.setup)
                    mutation = choose(stream)
                    await self._send(channel, drain, stream, mutation)
                    result = await victim
                finally:
                    await channel.aclose()
                    await drain.task
        finally:
            if not victim.done():
                victim.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await victim
        slot = None if mutation is None else stream[mutation.position]
        return Outcome(mutation, slot, result, time.perf_counter() - started, flatten(work))

    async def _send(self, channel: SecureChannel, drain: Drain, stream: list[Slot], mutation: Mutation | None) -> None:
        position = len(stream) if mutation is None else mutation.position
        for slot in stream[:position]:
            await channel.send(slot.payload)
        if mutation is None:
            return
        slot = stream[position]
        if mutation.action != "send" and slot.phase in drain.seen:
            # Hanging up in a vote slot must fail the victim in that vote, not earlier (its sending of its result
            # could be what fails): wait for its vote of that stage, which it sends once it has read all our
            # messages before this one. (It has sent its hello already, so hanging up cannot fail that either.)
            async with asyncio.timeout(3.0):
                await drain.seen[slot.phase].wait()
        try:
            if mutation.action == "send":
                await channel.send(mutation.payload)
                for rest in stream[position + 1 :]:  # carry on as if it were fine: an acceptance would show
                    await channel.send(rest.payload)
            elif mutation.action == "close":
                await channel.aclose()
            else:
                # The channel's API only sends whole messages: write one record of the message that does not end
                # it, then end the stream without the rest (abort) or with a close record (close_mid).
                channel._transport.write(channel._tx.seal(mutation.payload, 0))
                if mutation.action == "abort_mid":
                    channel._transport.abort()
                else:
                    await channel.aclose()
        except (NetworkError, OSError):
            pass  # the victim hung up on us: what it should do


@contextlib.asynccontextmanager
async def fuzzing(codec: str, seed: int) -> AsyncIterator[tuple[Fuzzer, random.Random]]:
    rng = random.Random(f"legion-swarm fuzz {codec} {seed}")
    victim_plane = await DataPlane.create(identity_from(rng))
    fuzzer_plane = await DataPlane.create(identity_from(rng), listen=None)
    try:
        victim = Collectives(victim_plane, config_for(codec))
        yield Fuzzer(fuzzer_plane, victim_plane, victim, Scenario.build(codec, seed)), rng
    finally:
        await fuzzer_plane.aclose()
        await victim_plane.aclose()


# ------------------------------------------------------------------------------------------------------ checks


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def check_rejected(outcome: Outcome, scenario: Scenario, config: CollectiveConfig, warnings: Sequence[str]) -> None:
    """The victim excluded the fuzzer for this very message (not for a timeout), in time, and holds no fuzzed data."""
    mutation, slot, result = outcome.mutation, outcome.slot, outcome.result
    assert mutation is not None and slot is not None
    where = f"{mutation.family}/{mutation.action} at {slot.kind} #{mutation.position}"
    assert 0 in result.excluded, f"malformed frame accepted: {where}"
    reason = result.excluded[0]
    assert reason.split(":")[0] in (slot.phase, "send"), f"{where}: excluded for {reason!r}"
    assert "Timeout" not in reason and "deadline" not in reason, f"{where}: not rejected, timed out: {reason!r}"
    assert outcome.seconds < config.round_timeout_s, where
    tag = result.group.round_id.hex()[:8]
    assert any(tag in w and "excluded rank 0" in w for w in warnings), f"{where}: no warning logged"
    x = flatten(scenario.x)
    if slot.phase in ("vote1", "vote2"):  # too late to matter: the fuzzer's valid data is committed
        assert result.committed == (0, 1) and result.faulty == (), where
        assert torch.equal(bits(outcome.out), bits(scenario.honest)), where
    else:  # one broken link: both ends declared faulty, nothing committed, not one bit changed
        assert result.committed == () and result.missing_shards == (0, 1) and result.faulty == (0, 1), where
        assert torch.equal(bits(outcome.out), bits(x)), where


async def good_round(victim_plane: DataPlane, victim: Collectives, seed: int) -> None:
    """A real second member joins the victim (as rank 0, so the victim accepts the channel again): the round is
    complete, and with the lossless codec it equals the naive average exactly."""
    helper_plane = await DataPlane.create(Identity.generate())
    try:
        gen = torch.Generator().manual_seed(seed)
        inputs = [[torch.randn(size, generator=gen) for size in SIZES] for _ in range(2)]
        weights = [2.0, VICTIM_WEIGHT]
        work = [[t.clone() for t in ts] for ts in inputs]
        planes = (helper_plane, victim_plane)
        members = tuple(GroupMember(peer_id=p.identity.peer_id, direct=p.endpoint) for p in planes)
        group = GroupInfo(round_id=bytes(range(16)) + seed.to_bytes(4, "big"), members=members)
        helper = Collectives(helper_plane, victim.config)
        results = await asyncio.gather(
            helper.all_reduce(group, work[0], weight=weights[0]), victim.all_reduce(group, work[1], weight=weights[1])
        )
        assert all(r.complete and not r.excluded for r in results)
        for a, b in zip(work[0], work[1], strict=True):
            assert torch.equal(bits(a), bits(b))
        if victim.config.codec == "none":
            for got, want in zip(work[1], reference_all_reduce(inputs, weights), strict=True):
                assert torch.equal(got, want)
    finally:
        await helper_plane.aclose()


# ------------------------------------------------------------------------------------------------------- tests


async def test_the_honest_fuzzer_completes_rounds_with_the_expected_outcome() -> None:
    """The fuzzer's honest stream is a valid one (else the exclusions below could come from it), and the honest
    outcome the vote-phase checks compare against is what the victim commits, bit for bit."""
    for seed, codec in enumerate(CODECS):
        async with fuzzing(codec, seed) as (fuzzer, rng):
            outcome = await fuzzer.run(fuzzer.group(rng), lambda stream: None)
            result = outcome.result
            assert result.complete and not result.excluded and result.committed == (0, 1)
            assert torch.equal(bits(outcome.out), bits(fuzzer.scenario.honest))


@pytest.mark.parametrize("codec", CODECS)
async def test_malformed_frames_are_all_rejected_and_the_receiver_still_serves(
    codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's fuzz test: ``ROUNDS_PER_CODEC`` malformed frames per victim codec (over 1000 in all), each in
    a round of its own at a seeded random place of an otherwise honest stream; none is accepted, every round
    ends normally with the fuzzer excluded, a logged reason and no fuzzed data in the victim's tensors; then
    the same victim serves good rounds."""
    caplog.set_level(logging.WARNING, logger=ROUNDS_LOGGER)
    seed = CODECS.index(codec)
    async with fuzzing(codec, seed) as (fuzzer, rng):
        mutator = Mutator(rng, fuzzer.scenario)
        seen: collections.Counter[Cell] = collections.Counter()
        actions: collections.Counter[str] = collections.Counter()
        started = time.perf_counter()
        for _ in range(ROUNDS_PER_CODEC):
            caplog.clear()
            outcome = await fuzzer.run(fuzzer.group(rng), mutator.draw)
            warnings = [
                r.getMessage() for r in caplog.records if r.name == ROUNDS_LOGGER and r.levelno == logging.WARNING
            ]
            check_rejected(outcome, fuzzer.scenario, fuzzer.victim.config, warnings)
            mutation, slot = outcome.mutation, outcome.slot
            assert mutation is not None and slot is not None
            seen[slot.kind, mutation.family, mutation.detail if mutation.family in GROUPED else ""] += 1
            actions[mutation.action] += 1
        elapsed = time.perf_counter() - started
        cells = mutator.cells(fuzzer.scenario.stream(fuzzer.group(rng), fuzzer.setup))
        lossless = fuzzer.victim if codec == "none" else Collectives(fuzzer.victim_plane, config_for("none"))
        await good_round(fuzzer.victim_plane, lossless, seed)
        if codec != "none":
            await good_round(fuzzer.victim_plane, fuzzer.victim, seed + 100)
    frames = sum(seen.values())
    assert frames == ROUNDS_PER_CODEC and frames * len(CODECS) >= 1000
    # Everything listed was fuzzed (and rejected), every way of hanging up too.
    assert set(cells) <= set(seen), sorted(set(cells) - set(seen))
    assert set(actions) == {"send", "close", "abort_mid", "close_mid"}
    families = collections.Counter(family for _, family, _ in seen.elements())
    print(
        f"\n{codec}: {frames} malformed frames in {elapsed:.1f} s, {len(cells)} cells covered; {dict(families)}; "
        f"{dict(actions)}; valid draws redrawn: {dict(mutator.discarded)}"
    )


async def test_a_topk_header_with_k_above_numel_excludes_the_sender() -> None:
    """A top-k chunk header of 1024 elements declaring ``k = 2**40`` (and, consistently, buffers of ``2**40``
    int32 and float32) is refused before anything is allocated: the sender is excluded and the round returns.
    (Found by this test: the receiver used to allocate 4 TiB and the round raised the allocator's error.)"""
    async with fuzzing("topk", 7) as (fuzzer, rng):
        group = fuzzer.group(rng)

        def huge_k(stream: list[Slot]) -> Mutation:
            position = next(i for i, s in enumerate(stream) if s.kind == "rs_header")
            message = msgpack.unpackb(stream[position].payload)
            k = 2**40
            header = changed(msgpack.unpackb(message["codec"]), {"params": {"k": k, "vbits": 32}})
            header = changed(msgpack.unpackb(header), {"buffers": [["int32", k], ["float32", k]]})
            return Mutation(position, "huge_k", "send", changed(message, {"codec": header}))

        outcome = await fuzzer.run(group, huge_k)
        assert 0 in outcome.result.excluded and outcome.result.committed == ()
        assert torch.equal(outcome.out, flatten(fuzzer.scenario.x))
