"""Model and data settings of a swarm: frozen dataclasses that round-trip through plain dicts.

Every training member of a swarm must use the same values, so these configs are part of the swarm's signed
config (:mod:`legion_swarm.train.swarm_config`, its ``[model]`` and ``[data]`` tables): they are turned into a
plain dict (:meth:`ModelConfig.to_dict`), serialised canonically, hashed and signed. Two rules follow:

- ``__post_init__`` *normalises* as well as validates: preset sizes are resolved into the explicit fields and
  numbers get their declared type (``dropout = 0`` from TOML becomes ``0.0``), so two configs that mean the same
  thing serialise to the same bytes and hash equal;
- ``from_dict`` refuses unknown keys, so a typo in a swarm file or a config from a newer version fails loudly
  instead of being silently ignored.

Validation is pure Python (no torch, datasets or transformers import): a bad value fails before anything heavy
is loaded.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Self

from legion_swarm.config.flags import cli
from legion_swarm.errors import ConfigError, DataError, ModelError

PRESETS: dict[str, dict[str, int]] = {
    # Sizes with the 257-token byte vocabulary, tied embeddings counted once:
    # 12 d^2 + 13 d per block, plus (vocab + seq_len) * d embeddings.
    "tiny": {"n_layer": 5, "n_head": 4, "d_model": 128, "seq_len": 128},  # 1.04 M parameters
    "small": {"n_layer": 6, "n_head": 6, "d_model": 384, "seq_len": 256},  # 10.8 M
    "medium": {"n_layer": 10, "n_head": 10, "d_model": 640, "seq_len": 256},  # 49.5 M
}
"""Built-in TinyGPT geometries, named by their approximate parameter count (1 M / 10 M / 50 M)."""

HF_PREFIX = "hf:"
"""A preset ``hf:<model_type>`` builds a randomly initialised Hugging Face causal LM (``hf:gpt2``, ``hf:llama``)."""
HF_DEFAULT_GEOMETRY = "small"
"""Preset whose sizes an ``hf:`` model takes for the fields left unset."""

_SIZE_FIELDS = ("n_layer", "n_head", "d_model", "seq_len")
_HF_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")


def _check_int(error: type[ConfigError], name: str, value: object, low: int, high: int | None = None) -> None:
    # bool is an int subclass; ``n_layer = true`` in a TOML file is a mistake, not 1.
    if not isinstance(value, int) or isinstance(value, bool):
        raise error(f"{name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise error(f"{name} must be {bound}, got {value}")


def _as_float(error: type[ConfigError], name: str, value: object) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise error(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_str(error: type[ConfigError], name: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise error(f"{name} must be a non-empty string, got {value!r}")
    return value


def _from_dict(cls: type, error: type[ConfigError], section: str, obj: object) -> Any:
    if not isinstance(obj, Mapping):
        raise error(f"[{section}] must be a table of settings, got {type(obj).__name__}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(obj) - set(names))
    if unknown:
        raise error(f"unknown [{section}] keys: {', '.join(map(str, unknown))} (known: {', '.join(names)})")
    return cls(**obj)


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Which model the swarm trains. Any field left ``None`` takes the preset's value.

    ``preset`` names a TinyGPT geometry (``tiny`` / ``small`` / ``medium``, about 1 M / 10 M / 50 M
    parameters), ``custom`` (all sizes given explicitly) or ``hf:<model_type>`` (a Hugging Face causal LM of
    that architecture, built from scratch with these sizes; needs ``transformers``). After construction every
    size field holds an integer, so ``dataclasses.replace(cfg, preset=...)`` keeps the old sizes: build a new
    config to switch presets.
    """

    preset: str = field(default="tiny", metadata=cli("model", metavar="PRESET"))
    """``tiny``, ``small``, ``medium``, ``custom`` or ``hf:<model_type>``."""
    n_layer: int | None = None
    """Transformer blocks."""
    n_head: int | None = None
    """Attention heads per block; must divide ``d_model``."""
    d_model: int | None = None
    """Width of the residual stream (embedding size)."""
    seq_len: int | None = None
    """Context length in tokens: the longest sequence the model accepts and the length of training windows."""
    vocab_size: int = 257
    """Token ids the model embeds; at least the tokenizer's vocabulary (257 for the byte tokenizer)."""
    dropout: float = 0.0
    """Dropout probability on attention and residual branches while training (0 is usual for small data)."""
    seed: int = 0
    """Seed of the initial parameters: every member builds bit-identical weights from it."""

    def __post_init__(self) -> None:
        preset = _check_str(ModelError, "preset", self.preset)
        if preset.startswith(HF_PREFIX):
            if not _HF_NAME_RE.match(preset[len(HF_PREFIX) :]):
                raise ModelError(f"bad preset {preset!r}: expected hf:<model_type>, e.g. hf:gpt2 or hf:llama")
            defaults: dict[str, int] = PRESETS[HF_DEFAULT_GEOMETRY]
        elif preset == "custom":
            missing = [name for name in _SIZE_FIELDS if getattr(self, name) is None]
            if missing:
                raise ModelError(f"preset 'custom' needs explicit {', '.join(missing)}")
            defaults = {}
        elif preset in PRESETS:
            defaults = PRESETS[preset]
        else:
            choices = ", ".join([*PRESETS, "custom", "hf:<model_type>"])
            raise ModelError(f"unknown model preset {preset!r}: expected one of {choices}")
        for name in _SIZE_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, defaults[name])
            _check_int(ModelError, name, getattr(self, name), 1)
        assert self.d_model is not None and self.n_head is not None  # resolved above; for the type checker
        if self.d_model % self.n_head:
            raise ModelError(f"d_model ({self.d_model}) must be a multiple of n_head ({self.n_head})")
        _check_int(ModelError, "vocab_size", self.vocab_size, 2)
        dropout = _as_float(ModelError, "dropout", self.dropout)
        if not 0.0 <= dropout < 1.0:
            raise ModelError(f"dropout must be in [0, 1), got {dropout}")
        object.__setattr__(self, "dropout", dropout)
        _check_int(ModelError, "seed", self.seed, 0, 2**63 - 1)

    @property
    def is_hf(self) -> bool:
        """Whether this is a Hugging Face architecture (``hf:<model_type>``) rather than TinyGPT."""
        return self.preset.startswith(HF_PREFIX)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field (sizes resolved): what the swarm config publishes and hashes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise :class:`ModelError`."""
        return _from_dict(cls, ModelError, "model", obj)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the swarm's tokens come from and how they are split, sharded and batched.

    ``source`` is ``builtin`` (the offline corpus derived from the standard library's docstrings), ``dummy``
    (a seeded synthetic language, quick to learn), a local ``.txt`` / ``.md`` file or directory of them, a
    ``.json`` / ``.jsonl`` / ``.parquet`` file, or a Hugging Face Hub dataset name (streamed).
    The sequence length comes from :attr:`ModelConfig.seq_len`.
    """

    source: str = field(default="builtin", metadata=cli("data", metavar="SOURCE"))
    """``builtin``, ``dummy``, a local path, or a Hub dataset name such as ``roneneldan/TinyStories``."""
    tokenizer: str = "bytes"
    """``bytes`` (UTF-8 bytes plus an end-of-document id, 257 ids) or ``hf:<name or path>`` (needs
    ``transformers``)."""
    text_field: str = "text"
    """Column holding the text in JSON, Parquet and Hub datasets."""
    split: str = "train"
    """Split of a Hub dataset to stream (the validation split is always carved out of it)."""
    batch_size: int = field(default=8, metadata=cli("batch-size", metavar="N"))
    """Sequences per local step on each peer."""
    num_shards: int = 16
    """Contiguous shards the training tokens are cut into and leased to peers; at least the number of peers."""
    val_fraction: float = 0.02
    """Fraction of the tokens held out for validation, never part of any training shard."""
    seed: int = 0
    """Seed of the synthetic language and of the batch order (each shard reader adds its shard index)."""
    dummy_tokens: int = 1_000_000
    """Size of the ``dummy`` source in tokens."""
    stream_shard_tokens: int = 1_000_000
    """Hub datasets: tokens buffered per shard (each shard is the first this-many tokens of its documents)."""
    fingerprint: str | None = None
    """Expected sha256 (hex) of the loaded tokens; a peer whose data differ refuses to train. ``None``: not
    checked. For ``builtin`` this pins the corpus, which depends on the Python version."""

    def __post_init__(self) -> None:
        _check_str(DataError, "source", self.source)
        tokenizer = _check_str(DataError, "tokenizer", self.tokenizer)
        if tokenizer != "bytes" and not (tokenizer.startswith(HF_PREFIX) and tokenizer[len(HF_PREFIX) :].strip()):
            raise DataError(f"bad tokenizer {tokenizer!r}: expected 'bytes' or 'hf:<name or path>'")
        _check_str(DataError, "text_field", self.text_field)
        _check_str(DataError, "split", self.split)
        _check_int(DataError, "batch_size", self.batch_size, 1)
        _check_int(DataError, "num_shards", self.num_shards, 1, 4096)
        val_fraction = _as_float(DataError, "val_fraction", self.val_fraction)
        if not 0.0 < val_fraction <= 0.5:
            raise DataError(f"val_fraction must be in (0, 0.5], got {val_fraction}")
        object.__setattr__(self, "val_fraction", val_fraction)
        _check_int(DataError, "seed", self.seed, 0, 2**63 - 1)
        _check_int(DataError, "dummy_tokens", self.dummy_tokens, 10_000)
        _check_int(DataError, "stream_shard_tokens", self.stream_shard_tokens, 1024)
        if self.fingerprint is not None and not (
            isinstance(self.fingerprint, str) and _FINGERPRINT_RE.match(self.fingerprint)
        ):
            raise DataError(f"fingerprint must be 64 lowercase hex digits (a sha256), got {self.fingerprint!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of every field: what the swarm config publishes and hashes."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, obj: Mapping[str, Any]) -> Self:
        """Inverse of :meth:`to_dict`; missing keys take their defaults, unknown keys raise :class:`DataError`."""
        return _from_dict(cls, DataError, "data", obj)
