"""Signed-subkey records: only the holder of a peer id's key can write that peer's subkey.

hivemind hands validators the *hashed* key, so ownership cannot live in the key; it lives in the
subkey, which must be the writer's base58 peer id. The stored value is an envelope::

    msgpack([ENVELOPE_VERSION, payload: bytes, public_key: bytes, signature: bytes])

where ``payload`` is the msgpack record, ``public_key`` the writer's libp2p public key (whose hash must be
the subkey) and ``signature`` covers ``msgpack([key, subkey, payload, expiration_time])``. Binding the
expiration stops anyone from re-publishing an old record with a later expiry; binding the key stops a
record being replayed under another swarm's key.

Every record in a legion DHT must be of this form and pass its schema: unsigned values, foreign subkeys,
bad signatures, oversized or off-schema payloads are refused by every honest node, on store and on read.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from legion_swarm.dht.records import MAX_RECORD_BYTES, parse_record
from legion_swarm.errors import RecordError
from legion_swarm.transport.identity import Identity, peer_id_of, verify

logger = logging.getLogger(__name__)

ENVELOPE_VERSION = 1
_NIL = msgpack.packb(None)  # what a reader gets for an envelope that does not parse


def _signed_bytes(record: DHTRecord, payload: bytes) -> bytes:
    return msgpack.packb([record.key, record.subkey, payload, float(record.expiration_time)])


def open_envelope(record: DHTRecord) -> tuple[bytes, str]:
    """Check ``record`` fully; return ``(payload bytes, owner peer id)`` or raise :class:`RecordError`."""
    if len(record.value) > MAX_RECORD_BYTES:
        raise RecordError(f"record of {len(record.value)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        subkey = msgpack.unpackb(record.subkey)
        envelope = msgpack.unpackb(record.value)
    except (ValueError, msgpack.UnpackException) as e:
        raise RecordError(f"undecodable record: {e}") from None
    if not isinstance(subkey, str):
        raise RecordError("record has no owner subkey (plain values are not allowed)")
    if not (isinstance(envelope, list) and len(envelope) == 4 and envelope[0] == ENVELOPE_VERSION):
        raise RecordError("record is not a signed envelope of a known version")
    _, payload, public_key, signature = envelope
    if not all(isinstance(part, bytes) for part in (payload, public_key, signature)):
        raise RecordError("signed envelope has fields of the wrong type")
    if peer_id_of(public_key) != subkey:
        raise RecordError(f"subkey {subkey[:16]}… is not the signer's peer id")
    if not verify(public_key, _signed_bytes(record, payload), signature):
        raise RecordError(f"bad signature on the record of {subkey[:16]}…")
    try:
        obj = msgpack.unpackb(payload)
    except (ValueError, msgpack.UnpackException) as e:
        raise RecordError(f"undecodable payload: {e}") from None
    parsed = parse_record(obj)
    if parsed.peer_id != subkey:
        raise RecordError("record's peer_id field differs from its owner subkey")
    return payload, subkey


class SignedSubkeyValidator(RecordValidatorBase):
    """hivemind record validator that signs this peer's subkeys and checks everyone's."""

    CACHE_SIZE = 4096
    """Records remembered as valid. The same record is checked again and again (every replica's answer,
    every Kademlia hand-over to a new node); re-checking costs a signature check plus a schema pass."""

    def __init__(self, identity: Identity):
        self._identity = identity
        self._own_subkey = msgpack.packb(identity.peer_id)
        self._valid: OrderedDict[tuple[bytes, bytes, float, bytes], None] = OrderedDict()

    def sign_value(self, record: DHTRecord) -> bytes:
        if record.subkey != self._own_subkey:
            # Not ours to sign: leave it unsigned so that every node, this one included, refuses it.
            return record.value
        signature = self._identity.sign(_signed_bytes(record, record.value))
        return msgpack.packb([ENVELOPE_VERSION, record.value, self._identity.public_key, signature])

    def validate(self, record: DHTRecord) -> bool:
        # Only successes are remembered: nobody can fill the cache without valid signatures of their own.
        digest = hashlib.blake2b(record.value, digest_size=16).digest()
        fingerprint = (record.key, record.subkey, float(record.expiration_time), digest)
        if fingerprint in self._valid:
            self._valid.move_to_end(fingerprint)
            return True
        try:
            open_envelope(record)
        except RecordError as e:
            logger.debug("rejected DHT record: %s", e)
            return False
        self._valid[fingerprint] = None
        if len(self._valid) > self.CACHE_SIZE:
            self._valid.popitem(last=False)
        return True

    def strip_value(self, record: DHTRecord) -> bytes:
        # Called on values about to be returned to the application. They were validated when stored,
        # but a reader must never crash on one that was not: anything odd decodes to None.
        try:
            envelope = msgpack.unpackb(record.value)
            payload = envelope[1]
            msgpack.unpackb(payload)
        except Exception:  # any malformation: the reader drops None values
            return _NIL
        return payload if isinstance(payload, bytes) else _NIL

    @property
    def priority(self) -> int:
        return 10

    def merge_with(self, other: RecordValidatorBase) -> bool:
        return False
