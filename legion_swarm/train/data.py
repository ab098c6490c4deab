"""Training data: load the tokens, hold out validation, cut shards, and batch a shard deterministically.

**Sources** (``DataConfig.source``):

- ``builtin``: the offline corpus of standard-library docstrings (:mod:`legion_swarm.train.corpus`);
- ``dummy``: a seeded synthetic language of ``dummy_tokens`` tokens, quick to learn (tests, demos);
- a local path: a ``.txt`` / ``.md`` file or a directory of them (each file one document), or a ``.json`` /
  ``.jsonl`` / ``.parquet`` file read with ``datasets`` (each row's ``text_field`` one document);
- anything else is a Hugging Face Hub dataset, streamed with ``datasets.load_dataset(name, streaming=True)``.
  Before streaming, one HTTP request to the Hub endpoint (bounded by :data:`HUB_PROBE_TIMEOUT_S`) checks that it
  is reachable: offline, ``datasets`` would retry for some 20 s before failing, while here the failure is a
  :class:`DataError` within seconds. With ``HF_HUB_OFFLINE=1`` the probe is skipped and ``datasets`` serves its
  local cache.

**Splits and shards.** Documents are tokenized and joined, each followed by the end-of-document id. Of an
in-memory source, ``val_fraction`` of the tokens, in a few blocks spread evenly through the data, is held out
for validation; the remaining tokens, in order, are cut into ``num_shards`` contiguous shards that peers lease.
No token of the validation split is in any shard. A streamed source is read lazily: its first tokens are the
validation split, and the documents after them are dealt round-robin to the shards, each shard keeping the
first ``stream_shard_tokens`` of its documents. Filling one shard therefore reads about ``num_shards`` times as
much of the stream, and a shard is fixed once read: streamed data suits datasets far larger than what a swarm
trains on, read once per peer.

**Batching.** A :class:`ShardReader` cuts its shard into windows of ``seq_len + 1`` tokens and yields them in a
seeded random order, epoch after epoch, as ``(x, y)`` int64 batches of shape [B, T] with ``y`` = ``x`` shifted by
one. Its state is one integer, :attr:`ShardReader.position` (batches yielded so far), so a peer that takes over
a shard lease continues exactly where the previous holder stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from legion_swarm.config import DataConfig
from legion_swarm.errors import DataError
from legion_swarm.train.corpus import corpus_documents, corpus_tokens, dummy_tokens
from legion_swarm.train.tokenizer import ByteTokenizer, HFTokenizer, get_tokenizer, token_dtype, token_fingerprint

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
"""``(x, y)``: int64 token ids of shape [B, T]; ``y[:, t]`` is the token after ``x[:, t]``."""

TEXT_SUFFIXES = (".txt", ".md")
"""Files read directly as text, alone or found (recursively) in a directory."""
TABLE_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
"""Files read through ``datasets``, by suffix: the name of the ``datasets`` builder."""
VAL_BLOCK_TOKENS = 4096
"""Target size of one held-out validation block: a few blocks, spread out, sample the whole data."""
HUB_PROBE_TIMEOUT_S = 5.0
"""How long the reachability check of the Hugging Face Hub may take (DNS included) before we call it offline."""


class TokenData:
    """The tokens of a swarm's data source: a validation split and ``num_shards`` training shards."""

    def __init__(self, *, num_shards: int, fingerprint: str, vocab_size: int, eos_id: int, source: str) -> None:
        self.num_shards = num_shards
        """Training shards, ids ``0 .. num_shards - 1``."""
        self.fingerprint = fingerprint
        """sha256 (hex) of the tokens (of a streamed source: of its validation prefix); equal data, equal value."""
        self.vocab_size = vocab_size
        """Size of the tokenizer's vocabulary: the model's ``vocab_size`` must be at least this."""
        self.eos_id = eos_id
        """End-of-document id."""
        self.source = source
        """``DataConfig.source``, for messages."""

    def shard(self, index: int) -> np.ndarray:
        """Tokens of training shard ``index`` (read-only)."""
        raise NotImplementedError

    @property
    def val(self) -> np.ndarray:
        """Tokens of the validation split (read-only); in no shard."""
        raise NotImplementedError

    def check_vocab(self, vocab_size: int) -> None:
        """Raise :class:`DataError` if a model embedding ``vocab_size`` ids cannot take these tokens."""
        if vocab_size < self.vocab_size:
            raise DataError(
                f"the model's vocab_size {vocab_size} is smaller than the tokenizer's vocabulary {self.vocab_size}"
            )

    def _check_index(self, index: int) -> None:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range: the data has {self.num_shards} shards")


class SplitTokens(TokenData):
    """An in-memory source: the held-out validation tokens and the training tokens cut into contiguous shards."""

    def __init__(
        self, train: np.ndarray, val: np.ndarray, *, num_shards: int, fingerprint: str, vocab_size: int, eos_id: int,
        source: str,
    ) -> None:  # fmt: skip
        super().__init__(
            num_shards=num_shards, fingerprint=fingerprint, vocab_size=vocab_size, eos_id=eos_id, source=source
        )
        for arr in (train, val):
            arr.setflags(write=False)
        self.train = train
        """All training tokens; shard ``i`` is ``train[bounds[i]:bounds[i + 1]]``."""
        self._val = val
        self.bounds = [i * len(train) // self.num_shards for i in range(self.num_shards + 1)]

    def shard(self, index: int) -> np.ndarray:
        self._check_index(index)
        return self.train[self.bounds[index] : self.bounds[index + 1]]

    @property
    def val(self) -> np.ndarray:
        return self._val


def held_out_ranges(n: int, val_fraction: float) -> list[tuple[int, int]]:
    """``[start, end)`` ranges of the validation blocks among ``n`` tokens: ``val_fraction`` of them (at least one
    token) in blocks of about :data:`VAL_BLOCK_TOKENS`, each centred in its equal stretch of the data."""
    n_val = max(1, round(n * val_fraction))
    n_blocks = max(1, n_val // VAL_BLOCK_TOKENS)
    ranges = []
    for j in range(n_blocks):
        # Stretches are at least twice a block long (val_fraction <= 0.5), so blocks never touch.
        size = (j + 1) * n_val // n_blocks - j * n_val // n_blocks
        start = (2 * j + 1) * n // (2 * n_blocks) - size // 2
        ranges.append((start, start + size))
    return ranges


def split_tokens(
    tokens: np.ndarray, *, num_shards: int, val_fraction: float, vocab_size: int, eos_id: int, source: str = "?"
) -> SplitTokens:
    """Hold out ``val_fraction`` of ``tokens`` (:func:`held_out_ranges`) and shard the rest (pure; no I/O)."""
    ranges = held_out_ranges(len(tokens), val_fraction)
    n_val = sum(end - start for start, end in ranges)
    if len(tokens) - n_val < 2 * num_shards:
        raise DataError(f"{source}: {len(tokens)} tokens are too few for {num_shards} shards and a validation split")
    keep = np.ones(len(tokens), dtype=bool)
    for start, end in ranges:
        keep[start:end] = False
    return SplitTokens(
        tokens[keep], tokens[~keep], num_shards=num_shards, fingerprint=token_fingerprint(tokens),
        vocab_size=vocab_size, eos_id=eos_id, source=source,
    )  # fmt: skip


def load_tokens(config: DataConfig) -> TokenData:
    """Load ``config.source``, tokenize, split and shard it. Raises :class:`DataError` on any failure, and if
    ``config.fingerprint`` is set and the data differ. Slow (I/O, tokenization): call it off the event loop."""
    started = time.perf_counter()
    tokenizer = get_tokenizer(config.tokenizer)
    source = config.source
    if source == "builtin":
        if isinstance(tokenizer, ByteTokenizer):
            tokens = corpus_tokens()
        else:
            tokens = _tokenize(corpus_documents(), tokenizer)
    elif source == "dummy":
        if not isinstance(tokenizer, ByteTokenizer):
            raise DataError("the dummy source is a language over bytes: use tokenizer = 'bytes'")
        tokens = dummy_tokens(config.dummy_tokens, config.seed)
    elif _is_local(source):
        tokens = _tokenize(_local_documents(Path(source).expanduser(), config.text_field), tokenizer)
    else:
        data: TokenData = _stream_hub(config, tokenizer)
        _check_fingerprint(config, data)
        return data
    data = split_tokens(
        tokens, num_shards=config.num_shards, val_fraction=config.val_fraction, vocab_size=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id, source=source,
    )  # fmt: skip
    _check_fingerprint(config, data)
    logger.info(
        "data %s: %d tokens (%d validation, %d shards), fingerprint %s, loaded in %.2f s", source, len(tokens),
        len(data.val), data.num_shards, data.fingerprint[:16], time.perf_counter() - started,
    )  # fmt: skip
    return data


def _check_fingerprint(config: DataConfig, data: TokenData) -> None:
    if config.fingerprint is not None and data.fingerprint != config.fingerprint:
        raise DataError(
            f"data {config.source!r} has fingerprint {data.fingerprint[:16]}..., but the swarm expects "
            f"{config.fingerprint[:16]}...: this peer's copy differs (for 'builtin': another Python version)"
        )


def _tokenize(documents: Iterable[str], tokenizer: ByteTokenizer | HFTokenizer) -> np.ndarray:
    eos = np.array([tokenizer.eos_id], dtype=token_dtype(tokenizer.vocab_size))
    parts: list[np.ndarray] = []
    for doc in documents:
        parts.extend((tokenizer.encode(doc), eos))
    if not parts:
        raise DataError("the data source holds no documents")
    return np.concatenate(parts)


# ------------------------------------------------------------------------------------------------ local files


def _is_local(source: str) -> bool:
    """A path (existing, path-like, or with a known suffix) rather than a Hub name like ``owner/name``."""
    suffix = Path(source).suffix.lower()
    return (
        os.path.exists(os.path.expanduser(source))
        or source.startswith(("/", ".", "~"))
        or suffix in TEXT_SUFFIXES
        or suffix in TABLE_FORMATS
    )


def _local_documents(path: Path, text_field: str) -> Iterator[str]:
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not files:
            raise DataError(f"no {' or '.join(TEXT_SUFFIXES)} files in directory {path}")
        return (_read_text(p) for p in files)
    suffix = path.suffix.lower()
    if suffix in TABLE_FORMATS:
        return _table_documents(path, TABLE_FORMATS[suffix], text_field)
    if suffix not in TEXT_SUFFIXES:
        known = ", ".join([*TEXT_SUFFIXES, *TABLE_FORMATS])
        raise DataError(f"cannot read {path}: unknown file type {suffix or '(none)'!r} (known: {known})")
    return iter([_read_text(path)])


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _table_documents(path: Path, builder: str, text_field: str) -> Iterator[str]:
    import datasets  # slow to import: only for table files and the Hub

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # datasets wraps parse errors in several types; all mean "this file is unreadable"
        raise DataError(f"cannot read {path} as {builder}: {type(e).__name__}: {e}") from None
    if text_field not in table.column_names:
        raise DataError(f"{path} has no field {text_field!r} (fields: {', '.join(table.column_names)})")
    return _texts(table[text_field], f"{path} field {text_field!r}")


def _texts(values: Iterable[object], where: str) -> Iterator[str]:
    for i, value in enumerate(values):
        if value is None:
            continue  # a row without text contributes nothing
        if not isinstance(value, str):
            raise DataError(f"{where}: row {i} holds {type(value).__name__}, not text")
        yield value


# ---------------------------------------------------------------------------------------- Hub (streamed)


class StreamTokens(TokenData):
    """A streamed source, read lazily: a validation prefix, then documents dealt round-robin to shards.

    ``documents`` is iterated once, from one thread at a time: reading stops as soon as the shard asked for
    holds ``shard_tokens`` tokens (or the stream ends); tokens of other shards read on the way are kept, up to
    their own cap. Memory is bounded by ``(num_shards + 1) * shard_tokens`` tokens.
    """

    def __init__(
        self, documents: Iterable[str], tokenizer: ByteTokenizer | HFTokenizer, *, num_shards: int,
        shard_tokens: int, val_tokens: int, source: str,
    ) -> None:  # fmt: skip
        super().__init__(
            num_shards=num_shards, fingerprint="", vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eos_id,
            source=source,
        )  # fmt: skip
        self._docs = iter(documents)
        self._tokenizer = tokenizer
        self._dtype = token_dtype(tokenizer.vocab_size)
        self._cap = shard_tokens
        self._lock = threading.Lock()
        self._parts: list[list[np.ndarray]] = [[] for _ in range(num_shards)]
        self._sizes = [0] * num_shards
        self._next_shard = 0
        self._exhausted = False
        self._done: dict[int, np.ndarray] = {}
        val_parts: list[np.ndarray] = []
        have = 0
        while have < val_tokens and (doc := self._next_document()) is not None:
            val_parts.append(doc[: val_tokens - have])
            have += len(val_parts[-1])
        if not have:
            raise DataError(f"{source}: the stream holds no documents")
        self._val = np.concatenate(val_parts)
        self._val.setflags(write=False)
        self.fingerprint = token_fingerprint(self._val)

    def _next_document(self) -> np.ndarray | None:
        """The next document's ids followed by the end-of-document id; None at the end of the stream."""
        if self._exhausted:
            return None
        try:
            text = next(self._docs, None)
        except DataError:
            raise
        except Exception as e:  # the connection dropped, a file of the dataset is malformed, ...
            raise DataError(f"{self.source}: reading the stream failed: {type(e).__name__}: {e}") from e
        if text is None:
            self._exhausted = True
            return None
        ids = self._tokenizer.encode(text)
        doc = np.empty(len(ids) + 1, dtype=self._dtype)
        doc[:-1] = ids
        doc[-1] = self.eos_id
        return doc

    @property
    def val(self) -> np.ndarray:
        return self._val

    def shard(self, index: int) -> np.ndarray:
        """Tokens of shard ``index``: reads the stream until it is full. Blocks on the network when it reads."""
        self._check_index(index)
        with self._lock:
            if index not in self._done:
                while self._sizes[index] < self._cap:
                    doc = self._next_document()
                    if doc is None:
                        break
                    target = self._next_shard
                    self._next_shard = (self._next_shard + 1) % self.num_shards
                    room = self._cap - self._sizes[target]
                    if room > 0:
                        self._parts[target].append(doc[:room])
                        self._sizes[target] += min(room, len(doc))
                if not self._sizes[index]:
                    raise DataError(f"{self.source}: the stream ended before shard {index} got any document")
                done = np.concatenate(self._parts[index])
                done.setflags(write=False)
                self._done[index] = done
                self._parts[index] = []
            return self._done[index]


def _stream_hub(config: DataConfig, tokenizer: ByteTokenizer | HFTokenizer) -> StreamTokens:
    import datasets  # slow to import: only for table files and the Hub

    name = config.source
    if not datasets.config.HF_HUB_OFFLINE:
        _probe_hub(name)
    try:
        stream = datasets.load_dataset(name, split=config.split, streaming=True)
    except ConnectionError as e:
        raise DataError(f"dataset {name!r}: the Hugging Face Hub could not be reached (offline?): {e}") from None
    except Exception as e:  # not found, gated, no such split, unsupported format: all mean "cannot load"
        raise DataError(f"cannot load dataset {name!r} (split {config.split!r}): {type(e).__name__}: {e}") from None
    columns = getattr(stream, "column_names", None)
    if columns is not None and config.text_field not in columns:
        raise DataError(f"dataset {name!r} has no field {config.text_field!r} (fields: {', '.join(columns)})")

    def documents() -> Iterator[str]:
        for i, row in enumerate(stream):
            if config.text_field not in row:
                raise DataError(f"dataset {name!r}: row {i} has no field {config.text_field!r}")
            yield from _texts([row[config.text_field]], f"dataset {name!r}")

    val_tokens = max(VAL_BLOCK_TOKENS, round(config.val_fraction * config.num_shards * config.stream_shard_tokens))
    data = StreamTokens(
        documents(), tokenizer, num_shards=config.num_shards, shard_tokens=config.stream_shard_tokens,
        val_tokens=val_tokens, source=name,
    )  # fmt: skip
    logger.info("data %s: streaming, %d validation tokens read, fingerprint %s", name, len(data.val), data.fingerprint)
    return data


def _probe_hub(name: str, timeout_s: float = HUB_PROBE_TIMEOUT_S) -> None:
    """Raise :class:`DataError` unless the Hub endpoint answers an HTTP request within ``timeout_s``.

    Goes through ``huggingface_hub``'s own HTTP session, so its proxy settings and endpoint
    (``HF_ENDPOINT``) apply. It runs in a daemon thread because a DNS lookup ignores socket timeouts.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    outcome: list[BaseException | None] = []

    def probe() -> None:
        try:
            get_session().head(constants.ENDPOINT, timeout=timeout_s)
            outcome.append(None)  # any HTTP answer, even an error status, means the Hub is reachable
        except Exception as e:
            outcome.append(e)

    thread = threading.Thread(target=probe, name="hub-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if not outcome or outcome[0] is not None:
        reason = f"{type(outcome[0]).__name__}: {outcome[0]}" if outcome else f"no answer in {timeout_s:g} s"
        raise DataError(
            f"dataset {name!r}: the Hugging Face Hub at {constants.ENDPOINT} could not be reached ({reason}). "
            "Offline? Use a local file, source = 'builtin' or 'dummy', or set HF_HUB_OFFLINE=1 to read a cached copy"
        )


# ---------------------------------------------------------------------------------------------- batching


class ShardReader:
    """Deterministic, resumable batches of one shard: ``(x, y)`` int64 [batch_size, seq_len].

    Epoch ``e`` cuts the shard into windows of ``seq_len + 1`` tokens starting at a seeded offset and visits them
    in a seeded random order; batches run on across epoch boundaries. Everything follows from ``(seed, e)``, so
    batch ``p`` is the same for every reader of the same shard, and a reader created with ``position=p`` yields
    exactly what the original yielded from its ``p``-th batch on.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, batch_size: int, *, seed: int = 0, position: int = 0) -> None:
        if seq_len < 1 or batch_size < 1 or position < 0 or seed < 0:
            raise ValueError("seq_len and batch_size must be >= 1, position and seed >= 0")
        self.tokens = tokens
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.position = position
        """Batches yielded so far (counting from the start of the shard, across readers)."""
        # Windows start at offset + k * seq_len. Keeping one window of slack lets every epoch shift the grid by
        # a random offset in [0, seq_len) with the same window count, so later epochs see other token alignments.
        if len(tokens) >= 2 * seq_len + 1:
            self.windows = (len(tokens) - 1) // seq_len - 1
            self._shifted = True
        else:
            self.windows = (len(tokens) - 1) // seq_len
            self._shifted = False
        if self.windows < 1:
            raise DataError(f"a shard of {len(tokens)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
        self._epochs: dict[int, tuple[int, np.ndarray]] = {}
        self._span = np.arange(seq_len + 1)

    @property
    def epoch(self) -> float:
        """Passes over the shard so far (fractional)."""
        return self.position * self.batch_size / self.windows

    def _epoch(self, epoch: int) -> tuple[int, np.ndarray]:
        """(offset, window order) of ``epoch``."""
        if epoch not in self._epochs:
            rng = np.random.default_rng([self.seed, epoch])
            offset = int(rng.integers(0, self.seq_len)) if self._shifted else 0
            order = rng.permutation(self.windows)
            if len(self._epochs) > 2:  # batches touch at most a few consecutive epochs
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = (offset, order)
        return self._epochs[epoch]

    def __iter__(self) -> ShardReader:
        return self

    def __next__(self) -> Batch:
        first = self.position * self.batch_size
        starts = np.empty(self.batch_size, dtype=np.int64)
        for i, w in enumerate(range(first, first + self.batch_size)):
            offset, order = self._epoch(w // self.windows)
            starts[i] = offset + order[w % self.windows] * self.seq_len
        self.position += 1
        return _cut(self.tokens, starts, self._span)


def _cut(tokens: np.ndarray, starts: np.ndarray, span: np.ndarray) -> Batch:
    """Windows ``tokens[s : s + T + 1]`` for each start ``s`` -> (x, y) int64 [len(starts), T]."""
    windows = torch.from_numpy(tokens[starts[:, None] + span[None, :]].astype(np.int64))
    return windows[:, :-1], windows[:, 1:]


def val_batches(tokens: np.ndarray, seq_len: int, batch_size: int, n: int) -> list[Batch]:
    """Up to ``n`` deterministic batches of non-overlapping windows spread evenly over ``tokens`` (the last batch
    may be smaller when the split is short)."""
    windows = (len(tokens) - 1) // seq_len
    if windows < 1:
        raise DataError(f"the validation split of {len(tokens)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
    count = min(n * batch_size, windows)
    # Spacing (windows - 1) / (count - 1) >= 1, so the rounded indices are distinct.
    starts = np.round(np.linspace(0, windows - 1, count)).astype(np.int64) * seq_len
    span = np.arange(seq_len + 1)
    return [_cut(tokens, starts[i : i + batch_size], span) for i in range(0, count, batch_size)]


def evaluate(model: torch.nn.Module, batches: Sequence[Batch]) -> float:
    """Mean loss of ``model`` over ``batches`` (weighted by tokens), in eval mode and without gradients.

    Batches are moved to the model's device; the model's train/eval mode is restored afterwards.
    """
    if not batches:
        raise ValueError("evaluate() needs at least one batch")
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for batch in batches:
                x, y = batch[0].to(device), batch[1].to(device)
                _, loss = model(x, y)
                if loss is None:
                    raise ValueError("the model returned no loss for targets: see the forward contract in model.py")
                total += float(loss) * y.numel()
                count += y.numel()
    finally:
        model.train(was_training)
    return total / count
