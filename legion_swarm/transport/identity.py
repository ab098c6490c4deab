"""A peer's identity: an RSA key in libp2p's file format, its peer id, and signatures.

The same key file is handed to ``p2pd`` (so the libp2p peer id and ours agree) and used to sign
DHT records, which ties every record to the transport identity that other peers authenticate.

File format (libp2p ``crypto.pb``): ``PrivateKey{key_type=RSA, data=<PKCS#1 DER>}``. Public keys travel as
``PublicKey{key_type=RSA, data=<SubjectPublicKeyInfo DER>}``, and a peer id is the base58 multihash
(sha2-256) of those public-key bytes. Both messages have two fields, so we encode them by hand rather
than import hivemind's protobuf modules (which would pull torch into every CLI start).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from legion_swarm.errors import IdentityError

_KEY_TYPE_RSA = 0
_RSA_BITS = 2048
_PADDING = padding.PKCS1v15()  # deterministic, and what libp2p itself uses for RSA signatures
_HASH = hashes.SHA256()
_MULTIHASH_SHA256 = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(buf) or shift > 35:
            raise ValueError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def encode_key_message(key_type: int, data: bytes) -> bytes:
    """Serialize libp2p's ``PrivateKey`` / ``PublicKey`` message: field 1 varint, field 2 bytes."""
    return b"\x08" + _varint(key_type) + b"\x12" + _varint(len(data)) + data


def decode_key_message(buf: bytes) -> tuple[int, bytes]:
    """Inverse of :func:`encode_key_message`; raises ``ValueError`` on anything else."""
    if len(buf) < 4 or buf[0] != 0x08:
        raise ValueError("not a libp2p key message")
    key_type, pos = _read_varint(buf, 1)
    if pos >= len(buf) or buf[pos] != 0x12:
        raise ValueError("not a libp2p key message")
    length, pos = _read_varint(buf, pos + 1)
    if pos + length != len(buf):
        raise ValueError("libp2p key message has trailing or missing bytes")
    return key_type, buf[pos:]


def short_peer_id(peer_id: str) -> str:
    """Last 8 characters of a peer id: enough to tell peers apart in logs and tables."""
    return peer_id[-8:]


@functools.lru_cache(maxsize=4096)
def peer_id_of(public_key_message: bytes) -> str:
    """Base58 libp2p peer id of a serialized ``PublicKey`` message (RSA keys are always hashed).

    Cached: every record a peer reads carries its writer's key, and base58 is pure Python (~50 µs).
    """
    return base58.b58encode(_MULTIHASH_SHA256 + hashlib.sha256(public_key_message).digest()).decode()


@functools.lru_cache(maxsize=4096)
def _load_public_key(public_key_message: bytes) -> rsa.RSAPublicKey:
    key_type, der = decode_key_message(public_key_message)
    if key_type != _KEY_TYPE_RSA:
        raise ValueError(f"unsupported key type {key_type}")
    key = serialization.load_der_public_key(der)
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise ValueError("expected an RSA public key of at least 2048 bits")
    return key


def verify(public_key_message: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` over ``data`` was made by the holder of this public key."""
    try:
        _load_public_key(public_key_message).verify(signature, data, _PADDING, _HASH)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


class Identity:
    """An RSA private key with its libp2p peer id. Build with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, private_key: rsa.RSAPrivateKey):
        self._key = private_key
        spki = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.public_key = encode_key_message(_KEY_TYPE_RSA, spki)
        """Serialized libp2p ``PublicKey`` message (what records carry)."""
        self.peer_id = peer_id_of(self.public_key)
        """Base58 libp2p peer id, identical to the one ``p2pd`` derives from the same file."""

    @classmethod
    def generate(cls) -> Identity:
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS))

    @classmethod
    def from_bytes(cls, blob: bytes, *, source: str = "<bytes>") -> Identity:
        try:
            key_type, der = decode_key_message(blob)
            if key_type != _KEY_TYPE_RSA:
                raise ValueError(f"key type {key_type} is not RSA (the only type legion-swarm signs with)")
            key = serialization.load_der_private_key(der, password=None)
            if not isinstance(key, rsa.RSAPrivateKey):
                raise ValueError("not an RSA private key")
        except ValueError as e:
            raise IdentityError(f"identity file {source} is not a libp2p RSA private key: {e}") from None
        return cls(key)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Identity:
        try:
            blob = Path(path).read_bytes()
        except OSError as e:
            raise IdentityError(f"cannot read identity file {path}: {e.strerror or e}") from None
        return cls.from_bytes(blob, source=str(path))

    @classmethod
    def load_or_create(cls, path: str | os.PathLike[str]) -> Identity:
        """Load the key at ``path``, or create it (mode 0600, written atomically) if it does not exist."""
        if os.path.lexists(path):
            return cls.load(path)
        identity = cls.generate()
        identity.save(path)
        return identity

    def to_bytes(self) -> bytes:
        der = self._key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return encode_key_message(_KEY_TYPE_RSA, der)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the key with mode 0600 via a temporary file and rename: never a torn or world-readable key.

        Refuses to replace an existing file: losing a key changes the peer id behind every published address.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # created 0600
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.to_bytes())
                    f.flush()
                    os.fsync(f.fileno())
                os.link(tmp, path)  # atomic, and fails if ``path`` appeared meanwhile
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        except FileExistsError:
            raise IdentityError(f"identity file {path} already exists; not overwriting it") from None
        except OSError as e:
            raise IdentityError(f"cannot write identity file {path}: {e.strerror or e}") from None

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data, _PADDING, _HASH)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
