"""A peer's identity: a key in libp2p's file format, its peer id, and signatures.

The same key file is handed to ``p2pd`` (so the libp2p peer id and ours agree) and used to sign
DHT records, which ties every record to the transport identity that other peers authenticate.

New identities are Ed25519 (libp2p's default: key generation in microseconds, 64-byte signatures, 36-byte
public keys, and cheaper connection handshakes between daemons than RSA); RSA-2048 key files (hivemind's
format) still load, sign and verify. File format (libp2p ``crypto.pb``): ``PrivateKey{key_type, data}``
with ``data`` = PKCS#1 DER for RSA, ``seed || public key`` (64 bytes) for Ed25519. Public keys travel as
``PublicKey{key_type, data}`` (SubjectPublicKeyInfo DER for RSA, the raw 32 bytes for Ed25519), and a peer id
is the base58 multihash of those public-key bytes: the bytes themselves (identity hash) when they fit in
42 bytes, as for Ed25519, else their sha2-256. Both messages have two fields, so we encode them by hand
rather than import hivemind's protobuf modules (which would pull torch into every CLI start).
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
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from legion_swarm.errors import IdentityError

_KEY_TYPE_RSA = 0
_KEY_TYPE_ED25519 = 1
_RSA_BITS = 2048
_MAX_INLINE_KEY = 42  # libp2p: public keys up to this many bytes are inlined in the peer id
_PADDING = padding.PKCS1v15()  # deterministic, and what libp2p itself uses for RSA signatures
_HASH = hashes.SHA256()
_MULTIHASH_SHA256 = b"\x12\x20"  # multihash code 0x12 (sha2-256), digest length 32
_MULTIHASH_IDENTITY = b"\x00"  # multihash code 0x00: the bytes themselves, length-prefixed


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
    """Base58 libp2p peer id of a serialized ``PublicKey`` message.

    Cached: every record a peer reads carries its writer's key, and base58 is pure Python (~50 µs).
    """
    if len(public_key_message) <= _MAX_INLINE_KEY:
        digest = _MULTIHASH_IDENTITY + _varint(len(public_key_message)) + public_key_message
    else:
        digest = _MULTIHASH_SHA256 + hashlib.sha256(public_key_message).digest()
    return base58.b58encode(digest).decode()


PublicKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey
PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey


@functools.lru_cache(maxsize=4096)
def _load_public_key(public_key_message: bytes) -> PublicKey:
    key_type, data = decode_key_message(public_key_message)
    if key_type == _KEY_TYPE_ED25519:
        return ed25519.Ed25519PublicKey.from_public_bytes(data)
    if key_type != _KEY_TYPE_RSA:
        raise ValueError(f"unsupported key type {key_type}")
    key = serialization.load_der_public_key(data)
    if not isinstance(key, rsa.RSAPublicKey) or key.key_size < 2048:
        raise ValueError("expected an RSA public key of at least 2048 bits")
    return key


def verify(public_key_message: bytes, data: bytes, signature: bytes) -> bool:
    """True iff ``signature`` over ``data`` was made by the holder of this public key."""
    try:
        key = _load_public_key(public_key_message)
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
        else:
            key.verify(signature, data, _PADDING, _HASH)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _public_key_message(key: PrivateKey) -> bytes:
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return encode_key_message(_KEY_TYPE_ED25519, raw)
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return encode_key_message(_KEY_TYPE_RSA, spki)


def _load_private_key(key_type: int, data: bytes) -> PrivateKey:
    if key_type == _KEY_TYPE_ED25519:
        # 64 bytes: seed || public key (older libp2p wrote 96, with the public key twice).
        if len(data) not in (64, 96):
            raise ValueError(f"an Ed25519 key holds 64 bytes, not {len(data)}")
        key = ed25519.Ed25519PrivateKey.from_private_bytes(data[:32])
        public = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if data[32:64] != public:
            raise ValueError("the Ed25519 key's public half does not match its seed")
        return key
    if key_type != _KEY_TYPE_RSA:
        raise ValueError(f"key type {key_type} is not supported (Ed25519 or RSA)")
    key = serialization.load_der_private_key(data, password=None)
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError("not an RSA private key")
    return key


class Identity:
    """A private key with its libp2p peer id. Build with :meth:`generate` or :meth:`load_or_create`."""

    def __init__(self, private_key: PrivateKey):
        self._key = private_key
        self.public_key = _public_key_message(private_key)
        """Serialized libp2p ``PublicKey`` message (what records carry)."""
        self.peer_id = peer_id_of(self.public_key)
        """Base58 libp2p peer id, identical to the one ``p2pd`` derives from the same file."""

    @classmethod
    def generate(cls) -> Identity:
        """A fresh Ed25519 identity."""
        return cls(ed25519.Ed25519PrivateKey.generate())

    @classmethod
    def generate_rsa(cls) -> Identity:
        """A fresh RSA-2048 identity, as hivemind creates them (~0.1 s of prime search)."""
        return cls(rsa.generate_private_key(public_exponent=65537, key_size=_RSA_BITS))

    @classmethod
    def from_bytes(cls, blob: bytes, *, source: str = "<bytes>") -> Identity:
        try:
            key_type, data = decode_key_message(blob)
            key = _load_private_key(key_type, data)
        except ValueError as e:
            raise IdentityError(f"identity file {source} is not a libp2p private key: {e}") from None
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
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            seed = self._key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            return encode_key_message(_KEY_TYPE_ED25519, seed + decode_key_message(self.public_key)[1])
        der = self._key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
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
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return self._key.sign(data, _PADDING, _HASH)

    def __repr__(self) -> str:
        return f"Identity({self.peer_id})"
