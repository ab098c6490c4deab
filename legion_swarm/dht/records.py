"""Typed DHT records: schemas, keys, and conversion to and from msgpack-able dicts.

Every record lives under a swarm-scoped key and one subkey per owner (the owner's base58 peer id);
:mod:`legion_swarm.dht.validator` proves ownership of the subkey. Readers call :func:`parse_record`,
which raises :class:`~legion_swarm.errors.RecordError` on anything off-schema; unknown extra fields are
kept out of the typed object so newer peers can add fields without breaking older readers.
"""

from __future__ import annotations

import math
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
}
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


_PARSERS = {PeerRecord.kind: parse_peer_record}


def parse_record(obj: Any) -> PeerRecord:
    """Dispatch on the ``kind`` field; raise :class:`RecordError` for unknown kinds or bad fields."""
    kind = obj.get("kind") if isinstance(obj, dict) else None
    parser = _PARSERS.get(kind) if isinstance(kind, str) else None
    if parser is None:
        raise RecordError(f"unknown record kind {kind!r}")
    return parser(obj)
