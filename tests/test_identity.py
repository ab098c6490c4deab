import os
import stat

import pytest
from hivemind.p2p import PeerID

from legion_swarm.errors import IdentityError
from legion_swarm.transport.identity import Identity, decode_key_message, encode_key_message, peer_id_of, verify


@pytest.fixture(scope="module", params=["ed25519", "rsa"])
def identity(request: pytest.FixtureRequest) -> Identity:
    return Identity.generate() if request.param == "ed25519" else Identity.generate_rsa()


def test_rsa_peer_id_matches_hiveminds_derivation() -> None:
    # hivemind derives an RSA key file's peer id as p2pd does (it has no Ed25519 equivalent; for those,
    # Host.create checks our peer id against the one the running daemon reports).
    rsa_identity = Identity.generate_rsa()
    assert PeerID.from_identity(rsa_identity.to_bytes()).to_base58() == rsa_identity.peer_id
    assert rsa_identity.peer_id.startswith("Qm")


def test_ed25519_peer_ids_inline_the_key() -> None:
    identity = Identity.generate()
    assert identity.peer_id.startswith("12D3KooW")  # identity multihash of a 36-byte key message
    assert peer_id_of(identity.public_key) == identity.peer_id
    assert Identity.from_bytes(identity.to_bytes()).peer_id == identity.peer_id


def test_key_message_round_trip() -> None:
    for data in (b"", b"x", b"y" * 300, b"z" * 70000):
        assert decode_key_message(encode_key_message(0, data)) == (0, data)
    with pytest.raises(ValueError):
        decode_key_message(encode_key_message(0, b"abc") + b"trailing")


def test_load_or_create_is_stable_and_private(tmp_path, identity: Identity) -> None:
    path = tmp_path / "keys" / "node.key"
    first = Identity.load_or_create(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert Identity.load_or_create(path).peer_id == first.peer_id
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]  # no temporary file left


def test_save_never_overwrites(tmp_path, identity: Identity) -> None:
    path = tmp_path / "node.key"
    identity.save(path)
    with pytest.raises(IdentityError, match="already exists"):
        Identity.generate().save(path)
    assert Identity.load(path).peer_id == identity.peer_id


def test_bad_identity_files_raise_identity_error(tmp_path) -> None:
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"\x00not a key at all")
    with pytest.raises(IdentityError, match="not a libp2p private key"):
        Identity.load(garbage)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path)  # a directory
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "missing.key")
    mismatched = tmp_path / "ed.key"
    mismatched.write_bytes(encode_key_message(1, b"\x01" * 64))  # Ed25519 whose public half is wrong
    with pytest.raises(IdentityError, match="does not match"):
        Identity.load(mismatched)
    secp256k1 = tmp_path / "k1.key"
    secp256k1.write_bytes(encode_key_message(2, b"\x01" * 32))
    with pytest.raises(IdentityError, match="not supported"):
        Identity.load(secp256k1)


def test_signatures_bind_key_and_data(identity: Identity) -> None:
    other = Identity.generate_rsa() if identity.peer_id.startswith("12D3") else Identity.generate()
    signature = identity.sign(b"payload")
    assert verify(identity.public_key, b"payload", signature)
    assert not verify(identity.public_key, b"payload!", signature)
    assert not verify(other.public_key, b"payload", signature)
    assert not verify(b"not a key", b"payload", signature)
