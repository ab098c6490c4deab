"""The signed-subkey rule: only the holder of a peer id's key can write that peer's subkey."""

import dataclasses

import msgpack
import pytest
from hivemind.dht.validation import DHTRecord

from legion_swarm.dht.validator import ENVELOPE_VERSION, SignedSubkeyValidator, open_envelope
from legion_swarm.errors import RecordError
from legion_swarm.transport.identity import Identity
from tests.helpers.records import make_record

KEY = b"\x01" * 20  # validators see hashed keys


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.generate()


def signed(identity: Identity, payload: dict, *, subkey_owner: Identity | None = None, exp: float = 100.0):
    owner = subkey_owner or identity
    record = DHTRecord(KEY, msgpack.packb(owner.peer_id), msgpack.packb(payload), exp)
    return dataclasses.replace(record, value=SignedSubkeyValidator(identity).sign_value(record))


def test_own_record_validates_and_strips_to_payload(alice: Identity) -> None:
    record = signed(alice, make_record(peer_id=alice.peer_id))
    validator = SignedSubkeyValidator(Identity.generate())  # any other node checks it
    assert validator.validate(record)
    assert msgpack.unpackb(validator.strip_value(record))["peer_id"] == alice.peer_id


def test_cannot_sign_someone_elses_subkey(alice: Identity, mallory: Identity) -> None:
    # Mallory's validator refuses to sign Alice's subkey: the value goes out unsigned and is rejected.
    forged = signed(mallory, make_record(peer_id=alice.peer_id), subkey_owner=alice)
    assert not SignedSubkeyValidator(alice).validate(forged)


def test_forged_envelope_with_attackers_key_is_rejected(alice: Identity, mallory: Identity) -> None:
    payload = msgpack.packb(make_record(peer_id=alice.peer_id))
    record = DHTRecord(KEY, msgpack.packb(alice.peer_id), payload, 100.0)
    from legion_swarm.dht.validator import _signed_bytes

    envelope = [ENVELOPE_VERSION, payload, mallory.public_key, mallory.sign(_signed_bytes(record, payload))]
    forged = dataclasses.replace(record, value=msgpack.packb(envelope))
    with pytest.raises(RecordError, match="not the signer's peer id"):
        open_envelope(forged)
    envelope[2] = alice.public_key  # claim Alice's key, keep Mallory's signature
    with pytest.raises(RecordError, match="bad signature"):
        open_envelope(dataclasses.replace(record, value=msgpack.packb(envelope)))


def test_replays_with_other_expiry_or_key_are_rejected(alice: Identity) -> None:
    record = signed(alice, make_record(peer_id=alice.peer_id), exp=100.0)
    validator = SignedSubkeyValidator(alice)
    assert not validator.validate(dataclasses.replace(record, expiration_time=1e12))
    assert not validator.validate(dataclasses.replace(record, key=b"\x02" * 20))


def test_tampered_payload_is_rejected(alice: Identity) -> None:
    record = signed(alice, make_record(peer_id=alice.peer_id))
    version, payload, key, signature = msgpack.unpackb(record.value)
    tampered = payload.replace(b"peer", b"boot")
    value = msgpack.packb([version, tampered, key, signature])
    assert not SignedSubkeyValidator(alice).validate(dataclasses.replace(record, value=value))


def test_signed_but_off_schema_or_mislabelled_records_are_rejected(alice: Identity) -> None:
    assert not SignedSubkeyValidator(alice).validate(signed(alice, {"kind": "peer", "junk": 1}))
    other_id = make_record(peer_id="QmSomebodyElse")
    with pytest.raises(RecordError, match="differs from its owner"):
        open_envelope(signed(alice, other_id))


@pytest.mark.parametrize(
    "value",
    [b"", b"\xc1", msgpack.packb([1, 2, 3]), msgpack.packb([9, b"", b"", b""]), msgpack.packb("x" * 70000)],
)
def test_garbage_values_never_validate_and_strip_to_none(alice: Identity, value: bytes) -> None:
    record = DHTRecord(KEY, msgpack.packb(alice.peer_id), value, 100.0)
    validator = SignedSubkeyValidator(alice)
    assert not validator.validate(record)
    assert msgpack.unpackb(validator.strip_value(record)) is None


def test_plain_values_without_subkey_are_rejected(alice: Identity) -> None:
    plain = DHTRecord(KEY, msgpack.packb(None), msgpack.packb({"a": 1}), 100.0)
    assert not SignedSubkeyValidator(alice).validate(plain)


def test_remembered_records_still_fail_when_any_field_changes(alice: Identity) -> None:
    validator = SignedSubkeyValidator(alice)
    record = signed(alice, make_record(peer_id=alice.peer_id), exp=100.0)
    assert validator.validate(record)
    assert validator.validate(record)  # now from the cache
    assert not validator.validate(dataclasses.replace(record, expiration_time=101.0))
    assert not validator.validate(dataclasses.replace(record, key=b"\x03" * 20))
    version, payload, key, signature = msgpack.unpackb(record.value)
    flipped = msgpack.packb([version, payload.replace(b"peer", b"boot"), key, signature])
    assert not validator.validate(dataclasses.replace(record, value=flipped))
