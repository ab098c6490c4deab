"""The secure channel's record layer: handshake transcript, key schedule, and sealed records (pure).

Synchronous and socket-free, so every rule is unit-testable: :mod:`legion_swarm.transport.secure` runs the
handshake and moves records; this module decides what is signed, which keys come out, what a record header
may say, and that no nonce is ever reused. See :mod:`legion_swarm.transport.secure` for the protocol picture.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Literal

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESOCB3
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand

from legion_swarm.errors import AuthenticationError, ProtocolError

PROTOCOL = "legion-swarm/secure/3"
"""Version string; bound into the transcript, so peers of different versions never agree on keys."""

MAX_RECORD_PLAINTEXT = 1 << 20
"""Largest plaintext in one record (bytes); what a receiver buffers per record at most."""

REKEY_RECORDS = 1 << 16
"""Records per key before the implicit key update (64 GiB at full records)."""

TAG_BYTES = 16
KEY_BYTES = 16
"""AES-128: 128-bit security, as TLS 1.3's default suite; 10 rounds against AES-256's 14 (1.5x the speed here)."""
FLAG_END = 1 << 31
FLAG_CLOSE = 1 << 30
_LENGTH_MASK = FLAG_CLOSE - 1
_HEADER = struct.Struct(">I")
HEADER_BYTES = _HEADER.size
_MAX_COUNTER = (1 << 64) - 1
_SIGNATURE_DOMAIN = b"legion-swarm secure channel handshake signature\x00"

Role = Literal["initiator", "responder"]
BytesLike = bytes | bytearray | memoryview
"""What ``send`` takes (wrap numpy arrays and tensors in ``memoryview``); any C-contiguous buffer."""


def transcript_hash(
    *, initiator: str, responder: str, initiator_ephemeral: bytes, responder_ephemeral: bytes,
    initiator_nonce: bytes, responder_nonce: bytes,
) -> bytes:  # fmt: skip
    """SHA-256 over the version and both sides' peer ids, ephemeral keys and nonces, each in its role's slot."""
    h = hashlib.sha256()
    fields = (PROTOCOL.encode(), initiator.encode(), responder.encode(), initiator_ephemeral, responder_ephemeral,
              initiator_nonce, responder_nonce)  # fmt: skip
    for field in fields:  # length prefixes: no two different field lists hash the same bytes
        h.update(_HEADER.pack(len(field)))
        h.update(field)
    return h.digest()


def signature_payload(transcript: bytes, signer: Role) -> bytes:
    """What ``signer`` signs: its role is part of it, so a signature can never be reflected as the other role's."""
    return _SIGNATURE_DOMAIN + signer.encode() + b"\x00" + transcript


def derive_traffic_secrets(shared_secret: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(initiator→responder, responder→initiator) 32-byte secrets from the X25519 output and the transcript."""
    okm = HKDF(hashes.SHA256(), 64, salt=transcript, info=PROTOCOL.encode() + b" traffic").derive(shared_secret)
    return okm[:32], okm[32:]


def _expand(secret: bytes, label: bytes, length: int) -> bytes:
    return HKDFExpand(hashes.SHA256(), length, info=PROTOCOL.encode() + b" " + label).derive(secret)


def record_size(plaintext_bytes: int) -> int:
    """Bytes on the wire of a record carrying ``plaintext_bytes``."""
    return HEADER_BYTES + plaintext_bytes + TAG_BYTES


def parse_header(header: BytesLike) -> tuple[int, int]:
    """(flags, plaintext length) of a record header; ``ProtocolError`` before anything is read or allocated."""
    (word,) = _HEADER.unpack(header)
    flags, length = word & ~_LENGTH_MASK, word & _LENGTH_MASK
    if not TAG_BYTES <= length <= MAX_RECORD_PLAINTEXT + TAG_BYTES:
        raise ProtocolError(f"record declares {length} bytes (allowed {TAG_BYTES}..{MAX_RECORD_PLAINTEXT + TAG_BYTES})")
    if flags & FLAG_CLOSE and (flags & FLAG_END or length != TAG_BYTES):
        raise ProtocolError("malformed close record")
    if not flags and length == TAG_BYTES:
        raise ProtocolError("empty record in the middle of a message")
    return flags, length - TAG_BYTES


class RecordCipher:
    """One direction's record protection: AES-128-OCB3 key, IV, record counter and implicit key updates.

    Sender and receiver of a direction build one each from the same secret; their counters advance in step.
    """

    def __init__(self, secret: bytes, *, rekey_every: int = REKEY_RECORDS):
        self._secret = secret
        self._rekey_every = rekey_every
        self.counter = 0
        """Records sealed or opened so far; the nonce of the next one."""
        self._install()

    def _install(self) -> None:
        self._aead = AESOCB3(_expand(self._secret, b"key", KEY_BYTES))
        self._iv = int.from_bytes(_expand(self._secret, b"iv", 12), "big")

    def next_nonce(self) -> bytes:
        """The nonce of the next record; advances the counter (so no nonce is ever used twice with one key)."""
        if self.counter >= _MAX_COUNTER:
            raise ProtocolError("record counter exhausted; open a new channel")
        if self.counter and self.counter % self._rekey_every == 0:
            self._secret = _expand(self._secret, b"key update", 32)
            self._install()
        nonce = (self._iv ^ self.counter).to_bytes(12, "big")
        self.counter += 1
        return nonce

    def seal(self, plaintext: BytesLike, flags: int, into: bytearray | None = None) -> memoryview:
        """Header + ciphertext + tag of one record: the first :func:`record_size` bytes of ``into`` (a buffer no
        transport holds any more), or of a fresh buffer."""
        n = len(memoryview(plaintext))
        if n > MAX_RECORD_PLAINTEXT:
            raise ValueError(f"record plaintext of {n} bytes exceeds {MAX_RECORD_PLAINTEXT}")
        size = record_size(n)
        if into is None:
            into = bytearray(size)
        elif len(into) < size:
            raise ValueError(f"a record of {size} bytes does not fit a buffer of {len(into)}")
        record = memoryview(into)[:size]
        header = _HEADER.pack(flags | (n + TAG_BYTES))
        record[:HEADER_BYTES] = header
        self._aead.encrypt_into(self.next_nonce(), plaintext, header, record[HEADER_BYTES:])
        return record

    def open(self, header: BytesLike, ciphertext: BytesLike) -> bytes:
        """Plaintext of one record, or :class:`AuthenticationError` if it was forged, replayed or reordered."""
        try:
            return self._aead.decrypt(self.next_nonce(), ciphertext, header)
        except InvalidTag:
            raise AuthenticationError(f"record {self.counter - 1} failed authentication") from None

    def open_into(self, header: BytesLike, ciphertext: BytesLike, out: memoryview) -> None:
        """Like :meth:`open`, into ``out`` (exactly the plaintext length). ``out`` holds garbage after a failure:
        cryptography writes the plaintext before it checks the tag."""
        try:
            self._aead.decrypt_into(self.next_nonce(), ciphertext, header, out)
        except InvalidTag:
            raise AuthenticationError(f"record {self.counter - 1} failed authentication") from None
