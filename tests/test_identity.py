import os
import stat

import pytest
from hivemind.p2p import PeerID

from legion_swarm.errors import IdentityError
from legion_swarm.transport.identity import Identity, decode_key_message, encode_key_message, peer_id_of, verify


@pytest.fixture(scope="module")
def identity() -> Identity:
    return Identity.generate()


def test_peer_id_matches_libp2p_derivation(identity: Identity) -> None:
    # hivemind derives the peer id from the key file exactly as p2pd does.
    assert PeerID.from_identity(identity.to_bytes()).to_base58() == identity.peer_id
    assert peer_id_of(identity.public_key) == identity.peer_id


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
    with pytest.raises(IdentityError, match="not a libp2p RSA private key"):
        Identity.load(garbage)
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path)  # a directory
    with pytest.raises(IdentityError, match="cannot read"):
        Identity.load(tmp_path / "missing.key")
    ed25519 = tmp_path / "ed.key"
    ed25519.write_bytes(encode_key_message(1, b"\x01" * 64))
    with pytest.raises(IdentityError, match="not RSA"):
        Identity.load(ed25519)


def test_signatures_bind_key_and_data(identity: Identity) -> None:
    other = Identity.generate()
    signature = identity.sign(b"payload")
    assert verify(identity.public_key, b"payload", signature)
    assert not verify(identity.public_key, b"payload!", signature)
    assert not verify(other.public_key, b"payload", signature)
    assert not verify(b"not a key", b"payload", signature)
