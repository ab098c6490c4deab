"""Typed DHT records: schemas, keys, and conversion to and from msgpack-able dicts.

Every record lives under a swarm-scoped key and one subkey per owner (the owner's base58 peer id);
:mod:`legion_swarm.dht.validator` proves ownership of the subkey. Readers call :func:`parse_record`,
which raises :class:`~legion_swarm.errors.RecordError` on anything off-schema; unknown extra fields are
kept out of the typed object so newer peers can add fields without breaking older readers.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from legion_swarm.errors import RecordError

MAX_RECORD_BYTES = 64 * 1024
"""Upper bound on one signed record; the DHT itself fails somewhere above 4 MiB per value."""

_NUMBER = (int, float)
_OPTIONAL_NUMBER = (int, float, type(None))


def peers_key(swarm: str) -> str:
    """DHT key whose subkeys are the member records of ``swarm``."""
    return f"legion/{swarm}/peers"


def leases_key(swarm: str) -> str:
    """DHT key whose subkeys are each peer's data-shard leases."""
    return f"legion/{swarm}/leases"


def config_key(swarm: str) -> str:
    """DHT key whose subkeys are copies of the swarm's creator-signed config, one per peer that serves it."""
    return f"legion/{swarm}/config"


def rtt_key(swarm: str) -> str:
    """DHT key whose subkeys are each member's measured RTTs (one :class:`RttRecord` per prober)."""
    return f"legion/{swarm}/rtt"


@dataclass(frozen=True, kw_only=True)
class Hardware:
    """What a peer brings: logical CPUs, RAM in GiB, and the first GPU's name if any."""

    cpus: int
    ram_gb: float
    gpu: str | None = None


@dataclass(frozen=True, kw_only=True)
class PeerRecord:
    """A member's heartbeat: who it is, how to reach it, what it runs, how far it got."""

    swarm: str
    peer_id: str
    addrs: tuple[str, ...]
    role: str
    version: str
    hardware: Hardware
    started_at: float
    """Unix time the peer process started."""
    sent_at: float
    """Unix time (DHT time) this heartbeat was written; readers show ``now - sent_at`` as the age."""
    state: str = "alive"
    """``alive``, or ``left`` for the departure notice a peer writes as it shuts down cleanly."""
    step: int | None = None
    loss: float | None = None
    tokens_per_s: float | None = None
    group: str | None = None
    data: tuple[str, int] | None = None
    """``(ip, port)`` of the peer's direct data plane (authenticated, encrypted TCP), if it serves one."""
    round: int | None = None
    """Global round this peer last committed (every step in ``sync``, every outer step in ``diloco``)."""
    bytes_sent: int | None = None
    """Payload bytes this peer sent on its data plane since it started."""
    bytes_received: int | None = None
    """Payload bytes this peer received on its data plane since it started."""
    mode: str | None = None
    """``sync`` or ``diloco`` for a training peer."""
    state_id: str | None = None
    """Hex prefix of the id of the state this peer holds after ``round``: peers with equal ids hold
    bit-identical parameters."""
    committed: int | None = None
    """Rounds this process committed since it started."""
    failed: int | None = None
    """Round attempts of this process that committed nothing (no group formed, or every shard lost)."""
    sample: bytes | None = None
    """The parameters at fixed, seeded positions (float32, at most ``MAX_SAMPLE_BYTES``): readers compare the
    samples of peers at one round to estimate how far apart the swarm's copies of the model are."""
    device: str | None = None
    """Where a training peer computes and in what precision, e.g. ``cuda:0/bf16`` or ``cpu/fp32``."""
    samples_per_s: float | None = None
    """Samples per second of this peer's local work (compute only): members size rounds by samples with it."""
    bandwidth: float | None = None
    """This peer's measured data-plane throughput in MB/s (bytes it sent per second of its rounds' transfers);
    the partition of a round gives it a shard in proportion."""

    kind = "peer"

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["addrs"] = list(self.addrs)
        wire["data"] = list(self.data) if self.data is not None else None
        wire["kind"] = self.kind
        return wire


_PEER_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "swarm": ((str,), True),
    "peer_id": ((str,), True),
    "addrs": ((list,), True),
    "role": ((str,), True),
    "version": ((str,), True),
    "hardware": ((dict,), True),
    "started_at": (_NUMBER, True),
    "sent_at": (_NUMBER, True),
    "state": ((str,), False),
    "step": ((int, type(None)), False),
    "loss": (_OPTIONAL_NUMBER, False),
    "tokens_per_s": (_OPTIONAL_NUMBER, False),
    "group": ((str, type(None)), False),
    "data": ((list, type(None)), False),
    "round": ((int, type(None)), False),
    "bytes_sent": ((int, type(None)), False),
    "bytes_received": ((int, type(None)), False),
    "mode": ((str, type(None)), False),
    "state_id": ((str, type(None)), False),
    "committed": ((int, type(None)), False),
    "failed": ((int, type(None)), False),
    "sample": ((bytes, type(None)), False),
    "device": ((str, type(None)), False),
    "samples_per_s": (_OPTIONAL_NUMBER, False),
    "bandwidth": (_OPTIONAL_NUMBER, False),
}
MAX_SAMPLE_BYTES = 1024
_HARDWARE_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "cpus": ((int,), True),
    "ram_gb": (_NUMBER, True),
    "gpu": ((str, type(None)), False),
}
_STATES = ("alive", "left")


def _check(obj: Any, schema: dict[str, tuple[tuple[type, ...], bool]], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise RecordError(f"{what}: expected a map, got {type(obj).__name__}")
    out = {}
    for name, (types, required) in schema.items():
        if name not in obj:
            if required:
                raise RecordError(f"{what}: missing field {name!r}")
            continue
        value = obj[name]
        # bool is an int subclass; a bool where a number belongs is a schema error, not a 0/1.
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            raise RecordError(f"{what}: field {name!r} has type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):
            raise RecordError(f"{what}: field {name!r} is not finite")
        out[name] = value
    return out


def parse_peer_record(obj: Any) -> PeerRecord:
    """Validate a decoded peer record; raise :class:`RecordError` if it is off-schema."""
    fields = _check(obj, _PEER_SCHEMA, "peer record")
    if obj.get("kind") != PeerRecord.kind:
        raise RecordError(f"peer record: kind is {obj.get('kind')!r}")
    if fields.get("mode") not in (None, "sync", "diloco"):
        raise RecordError(f"peer record: unknown mode {fields['mode']!r}")
    for name in ("bytes_sent", "bytes_received", "round", "committed", "failed"):
        if fields.get(name) is not None and fields[name] < 0:
            raise RecordError(f"peer record: {name} is negative")
    sample = fields.get("sample")
    if sample is not None and (len(sample) > MAX_SAMPLE_BYTES or len(sample) % 4):
        raise RecordError(f"peer record: sample must be at most {MAX_SAMPLE_BYTES} bytes of float32")
    for name in ("samples_per_s", "bandwidth"):
        if fields.get(name) is not None and fields[name] < 0:
            raise RecordError(f"peer record: {name} is negative")
    if fields.get("device") is not None and len(fields["device"]) > 32:
        raise RecordError("peer record: device is too long")
    if fields.get("state_id") is not None and len(fields["state_id"]) > 64:
        raise RecordError("peer record: state_id is too long")
    addrs = fields["addrs"]
    if len(addrs) > 32 or not all(isinstance(a, str) and len(a) < 512 for a in addrs):
        raise RecordError("peer record: addrs must be at most 32 strings")
    if fields.get("state", "alive") not in _STATES:
        raise RecordError(f"peer record: unknown state {fields['state']!r}")
    fields["addrs"] = tuple(addrs)
    data = fields.get("data")
    if data is not None:
        if not (
            len(data) == 2 and isinstance(data[0], str) and len(data[0]) <= 64
            and type(data[1]) is int and 0 < data[1] <= 65535
        ):  # fmt: skip
            raise RecordError("peer record: data must be [ip, port]")
        fields["data"] = (data[0], data[1])
    fields["hardware"] = Hardware(**_check(fields["hardware"], _HARDWARE_SCHEMA, "hardware"))
    return PeerRecord(**fields)


@dataclass(frozen=True, kw_only=True)
class Lease:
    """One data shard held by a peer: since when (DHT time) and how far its reader got."""

    shard: int
    since: float
    position: int = 0
    """Batches of this shard trained so far, so a peer that takes the shard over continues from there."""


@dataclass(frozen=True, kw_only=True)
class LeaseRecord:
    """The data shards a peer holds. The record expires with the leases: a dead peer's shards come free."""

    swarm: str
    peer_id: str
    sent_at: float
    leases: tuple[Lease, ...] = ()

    kind = "lease"

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "swarm": self.swarm,
            "peer_id": self.peer_id,
            "sent_at": self.sent_at,
            "leases": [[lease.shard, lease.since, lease.position] for lease in self.leases],
        }


MAX_LEASES = 1024

_LEASE_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "swarm": ((str,), True),
    "peer_id": ((str,), True),
    "sent_at": (_NUMBER, True),
    "leases": ((list,), True),
}


def parse_lease_record(obj: Any) -> LeaseRecord:
    fields = _check(obj, _LEASE_SCHEMA, "lease record")
    leases = fields["leases"]
    if len(leases) > MAX_LEASES:
        raise RecordError(f"lease record: more than {MAX_LEASES} leases")
    parsed = []
    for item in leases:
        if not (
            isinstance(item, list) and len(item) == 3 and type(item[0]) is int and item[0] >= 0
            and isinstance(item[1], _NUMBER) and not isinstance(item[1], bool) and math.isfinite(item[1])
            and type(item[2]) is int and item[2] >= 0
        ):  # fmt: skip
            raise RecordError("lease record: each lease must be [shard, since, position]")
        parsed.append(Lease(shard=item[0], since=float(item[1]), position=item[2]))
    fields["leases"] = tuple(parsed)
    return LeaseRecord(**fields)


@dataclass(frozen=True, kw_only=True)
class ConfigRecord:
    """A copy of the swarm's config as its creator signed it; any peer may serve one under its own subkey.

    The DHT envelope proves who *wrote* this copy; ``signature`` (by ``creator_key``, over ``config``) proves
    who *made* the config, and readers check it against the creator they trust (the entry peer names it).
    """

    swarm: str
    peer_id: str
    sent_at: float
    creator: str
    creator_key: bytes
    config: bytes
    """Canonical msgpack of the config map; its sha256 is the config hash."""
    signature: bytes

    kind = "config"

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["kind"] = self.kind
        return wire


_CONFIG_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "swarm": ((str,), True),
    "peer_id": ((str,), True),
    "sent_at": (_NUMBER, True),
    "creator": ((str,), True),
    "creator_key": ((bytes,), True),
    "config": ((bytes,), True),
    "signature": ((bytes,), True),
}


def parse_config_record(obj: Any) -> ConfigRecord:
    return ConfigRecord(**_check(obj, _CONFIG_SCHEMA, "config record"))


MAX_RTT_ENTRIES = 64
"""Most peers one RTT record may name: a record stays a few kB whatever the swarm's size."""
_PEER_ID_RE = re.compile(r"^[1-9A-HJ-NP-Za-km-z]{20,128}$")  # base58, like every libp2p peer id


@dataclass(frozen=True, kw_only=True)
class RttRecord:
    """One member's latest RTT medians to the peers it probed (:mod:`legion_swarm.groups.probe`).

    Wire: ``{"kind": "rtt", "swarm", "peer_id", "sent_at", "rtts": {peer id: median RTT in ms}}``, at most
    ``MAX_RTT_ENTRIES`` entries, each a finite non-negative number about another, valid-looking peer id.
    """

    swarm: str
    peer_id: str
    sent_at: float
    """DHT time the record was written."""
    rtts: dict[str, float]
    """Peer id -> median round-trip time in milliseconds, as this peer measured it. Do not mutate."""

    kind = "rtt"

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "swarm": self.swarm,
            "peer_id": self.peer_id,
            "sent_at": self.sent_at,
            "rtts": dict(self.rtts),
        }


_RTT_SCHEMA: dict[str, tuple[tuple[type, ...], bool]] = {
    "swarm": ((str,), True),
    "peer_id": ((str,), True),
    "sent_at": (_NUMBER, True),
    "rtts": ((dict,), True),
}


def parse_rtt_record(obj: Any) -> RttRecord:
    fields = _check(obj, _RTT_SCHEMA, "rtt record")
    rtts = fields["rtts"]
    if len(rtts) > MAX_RTT_ENTRIES:
        raise RecordError(f"rtt record: more than {MAX_RTT_ENTRIES} entries")
    parsed: dict[str, float] = {}
    for peer, value in rtts.items():
        if not (isinstance(peer, str) and _PEER_ID_RE.match(peer)):
            raise RecordError(f"rtt record: {str(peer)[:20]!r} is not a peer id")
        if peer == fields["peer_id"]:
            raise RecordError("rtt record: an RTT to the writer itself")
        if not isinstance(value, _NUMBER) or isinstance(value, bool):
            raise RecordError(f"rtt record: the RTT to {peer[:16]} has type {type(value).__name__}")
        if not (math.isfinite(value) and value >= 0):
            raise RecordError(f"rtt record: the RTT to {peer[:16]} is {value}, not a finite number >= 0")
        parsed[peer] = float(value)
    fields["rtts"] = parsed
    return RttRecord(**fields)


Record = PeerRecord | LeaseRecord | ConfigRecord | RttRecord

_PARSERS = {
    PeerRecord.kind: parse_peer_record,
    LeaseRecord.kind: parse_lease_record,
    ConfigRecord.kind: parse_config_record,
    RttRecord.kind: parse_rtt_record,
}


def parse_record(obj: Any) -> Record:
    """Dispatch on the ``kind`` field; raise :class:`RecordError` for unknown kinds or bad fields."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise RecordError(f"unknown record kind {kind!r}")
    return parser(obj)
