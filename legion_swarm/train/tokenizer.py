"""Tokenizers: text to token ids and back.

The default, :class:`ByteTokenizer`, needs no vocabulary file and no download: ids 0..255 are the UTF-8 bytes of
the text and id 256 separates documents, so every peer tokenizes identically on any machine. A Hugging Face
tokenizer (``DataConfig(tokenizer="hf:NAME_OR_PATH")``) is loaded lazily through ``transformers``; its
end-of-sequence token separates documents.

Token arrays are ``uint16`` when the vocabulary fits (half the memory of int32 for the corpus and the shards)
and ``uint32`` otherwise; batches are widened to int64 only when they are cut.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from legion_swarm.errors import DataError

logger = logging.getLogger(__name__)

BYTE_VOCAB_SIZE = 257
"""256 byte values plus the end-of-document id."""
EOS_ID = 256
"""End-of-document id of the byte tokenizer."""


def token_dtype(vocab_size: int) -> type[np.unsignedinteger]:
    """The narrowest unsigned dtype holding ids ``0 .. vocab_size - 1``."""
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


class Tokenizer(Protocol):
    """What the data layer needs from a tokenizer."""

    vocab_size: int
    """Ids are ``0 .. vocab_size - 1``."""
    eos_id: int
    """Id appended after every document."""

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` (no end-of-document id), as an unsigned integer array."""
        ...

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; end-of-document ids are dropped."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, and 256 as the end-of-document separator."""

    vocab_size = BYTE_VOCAB_SIZE
    eos_id = EOS_ID
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        """``uint16`` ids of the UTF-8 bytes of ``text`` (a lone surrogate, not encodable, becomes ``?``)."""
        return np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``: end-of-document ids are dropped, invalid UTF-8 becomes U+FFFD."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() > EOS_ID):
            raise ValueError(f"byte token ids must be in [0, {EOS_ID}], got {arr.min()}..{arr.max()}")
        return arr[arr != EOS_ID].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer behind the :class:`Tokenizer` interface."""

    def __init__(self, name: str, tokenizer: object) -> None:
        self.name = name
        self._tok = tokenizer
        # len() counts added special tokens, which vocab_size omits.
        self.vocab_size = len(tokenizer)  # type: ignore[arg-type]
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(tokenizer, "sep_token_id", None)
        if eos is None:
            raise DataError(f"tokenizer {name!r} has no end-of-sequence (or separator) token to separate documents")
        self.eos_id = int(eos)
        self._dtype = token_dtype(self.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        ids = self._tok.encode(text, add_special_tokens=False)  # type: ignore[attr-defined]
        return np.asarray(ids, dtype=self._dtype)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = np.asarray(ids)
        return self._tok.decode([int(i) for i in arr[arr != self.eos_id]])  # type: ignore[attr-defined]


def get_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """The tokenizer named by ``DataConfig.tokenizer``: ``bytes`` or ``hf:<name or path>``."""
    if spec == "bytes":
        return ByteTokenizer()
    if not spec.startswith("hf:") or not spec[3:].strip():
        raise DataError(f"bad tokenizer {spec!r}: expected 'bytes' or 'hf:<name or path>'")
    name = spec[3:].strip()
    try:
        from transformers import AutoTokenizer  # heavy and optional: only for hf: tokenizers
    except ImportError:
        raise DataError(
            f"tokenizer {spec!r} needs the transformers package: pip install transformers "
            "(or use the built-in byte tokenizer: tokenizer = 'bytes')"
        ) from None
    try:
        tok = AutoTokenizer.from_pretrained(name)
    except Exception as e:  # OSError for a missing name, network errors, bad files: all mean "cannot load"
        raise DataError(f"cannot load tokenizer {name!r}: {e}") from None
    logger.info("loaded tokenizer %s (%d ids)", name, len(tok))
    return HFTokenizer(name, tok)


def token_fingerprint(tokens: np.ndarray) -> str:
    """sha256 (hex) of the tokens as little-endian bytes of their dtype: equal on every machine for equal data."""
    arr = np.ascontiguousarray(tokens, dtype=tokens.dtype.newbyteorder("<"))
    return hashlib.sha256(arr.tobytes()).hexdigest()
