"""The data layer: tokenizer, built-in corpus and its cache, synthetic language, local files, the Hub offline,
splits and shards, deterministic resumable batches, evaluation, and a tiny model learning from it."""

from __future__ import annotations

import json
import math
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from legion_swarm.config import DataConfig, ModelConfig
from legion_swarm.errors import ConfigError, DataError
from legion_swarm.train import corpus
from legion_swarm.train.data import (
    ShardReader,
    SplitTokens,
    StreamTokens,
    _is_local,
    _probe_hub,
    evaluate,
    held_out_ranges,
    load_tokens,
    split_tokens,
    val_batches,
)
from legion_swarm.train.model import build_model
from legion_swarm.train.tokenizer import EOS_ID, ByteTokenizer, get_tokenizer, token_fingerprint

pytestmark = pytest.mark.timeout(60)

TOK = ByteTokenizer()


def documents_of(tokens: np.ndarray) -> list[str]:
    """Decode a token stream back into its documents."""
    cuts = np.flatnonzero(tokens == EOS_ID)
    starts = np.concatenate(([0], cuts[:-1] + 1))
    return [TOK.decode(tokens[s:e]) for s, e in zip(starts, cuts, strict=True)]


# --------------------------------------------------------------------------------------------- tokenizer


def test_byte_tokenizer_round_trip_including_non_ascii() -> None:
    text = "héllo wörld — naïve café, 日本語, emoji 🚀\n\ttabs and NUL \x00 too"
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16 and ids.max() < 256
    assert len(ids) == len(text.encode("utf-8")) > len(text)  # multi-byte characters are several ids
    assert TOK.decode(ids) == text
    assert TOK.decode(list(ids)) == text
    # The end-of-document id separates documents and disappears on decode.
    assert TOK.decode(np.concatenate((TOK.encode("ab"), [EOS_ID], TOK.encode("cd")))) == "abcd"
    assert TOK.decode([0xE6, 0x97]) == "\ufffd"  # a truncated multi-byte character
    assert TOK.decode(TOK.encode("x\ud800y")) == "x?y"  # a lone surrogate cannot be UTF-8
    assert TOK.vocab_size == 257 and TOK.eos_id == 256
    with pytest.raises(ValueError, match=r"\[0, 256\]"):
        TOK.decode([257])


def test_hf_tokenizer_without_transformers_raises_data_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DataError, match="needs the transformers package: pip install transformers"):
        get_tokenizer("hf:gpt2")
    with pytest.raises(DataError, match="transformers"):
        load_tokens(DataConfig(source="dummy", tokenizer="hf:gpt2"))


# ------------------------------------------------------------------------------------------------ config


def test_data_config_round_trip_and_validation() -> None:
    cfg = DataConfig(source="dummy", batch_size=4, num_shards=3, val_fraction=0.1, seed=2, fingerprint="a" * 64)
    assert DataConfig.from_dict(cfg.to_dict()) == cfg
    assert DataConfig.from_dict({}) == DataConfig()
    with pytest.raises(DataError, match=r"unknown \[data\] keys: shards .*known: source"):
        DataConfig.from_dict({"shards": 4})
    for kwargs, message in [
        ({"source": ""}, "source must be a non-empty string"),
        ({"tokenizer": "gpt2"}, "expected 'bytes' or 'hf:<name or path>'"),
        ({"batch_size": 0}, "batch_size must be >= 1"),
        ({"num_shards": 5000}, r"num_shards must be in \[1, 4096\]"),
        ({"val_fraction": 0}, r"val_fraction must be in \(0, 0.5\]"),
        ({"val_fraction": 0.6}, r"val_fraction must be in \(0, 0.5\]"),
        ({"dummy_tokens": 5}, "dummy_tokens must be >= 10000"),
        ({"fingerprint": "abc"}, "fingerprint must be 64 lowercase hex"),
    ]:
        with pytest.raises(DataError, match=message) as info:
            DataConfig(**kwargs)
        assert isinstance(info.value, ConfigError)
    # Numbers are normalised to their declared type, so equal configs serialise (and hash) equally.
    assert DataConfig.from_dict({"val_fraction": 0.5}) == DataConfig(val_fraction=0.5)


def test_sources_are_told_apart() -> None:
    for hub in ("roneneldan/TinyStories", "HuggingFaceFW/fineweb-edu", "tiny_shakespeare"):
        assert not _is_local(hub)
    for local in ("./corpus", "/data/x", "~/notes", "book.txt", "rows.jsonl", "t.parquet", "README.md"):
        assert _is_local(local)


# ------------------------------------------------------------------------------------------------ corpus


@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory: pytest.TempPathFactory, real_processes: None) -> Iterator[Path]:
    """A private XDG cache directory, so the tests build (and corrupt) their own corpus cache."""
    root = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        corpus.clear_memory_cache()
        yield root
    corpus.clear_memory_cache()


def test_module_list_is_sorted_and_safe() -> None:
    assert list(corpus.MODULES) == sorted(corpus.MODULES)
    assert not set(corpus.MODULES) & corpus.EXCLUDED
    assert set(corpus.MODULES) <= set(sys.stdlib_module_names)
    assert {"this", "antigravity", "idlelib", "tkinter", "turtle", "turtledemo"} <= corpus.EXCLUDED


@pytest.mark.timeout(120)
def test_corpus_is_built_cached_and_loaded(corpus_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = corpus.cache_path()
    assert path.parent == corpus_cache / "legion-swarm"
    path.unlink(missing_ok=True)  # whichever corpus test runs first builds it
    corpus.clear_memory_cache()
    started = time.perf_counter()
    tokens = corpus.corpus_tokens()
    built_s = time.perf_counter() - started
    fingerprint = corpus.corpus_fingerprint()
    assert fingerprint == token_fingerprint(tokens)
    assert tokens.dtype == np.uint16 and int(tokens.max()) == EOS_ID and tokens[-1] == EOS_ID
    assert 1_500_000 <= len(tokens) <= 6_000_000, len(tokens)  # about 2 MB of text
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left behind
    assert f"{sys.version_info.major}.{sys.version_info.minor}.{sys.version_info.micro}" in path.name

    # A new process (simulated: the in-memory copy dropped) loads the file instead of building.
    corpus.clear_memory_cache()

    def no_build() -> np.ndarray:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(corpus, "build_corpus_tokens", no_build)
    started = time.perf_counter()
    again = corpus.corpus_tokens()
    loaded_s = time.perf_counter() - started
    assert np.array_equal(again, tokens) and corpus.corpus_fingerprint() == fingerprint
    assert not again.flags.writeable
    print(f"corpus: {len(tokens)} tokens, built in {built_s:.2f} s, loaded from cache in {loaded_s * 1000:.1f} ms")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_a_corrupted_cache_is_rebuilt(corpus_cache: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    expected = corpus.corpus_fingerprint()  # builds or loads a good cache first
    path = corpus.cache_path()
    data = bytearray(path.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01  # one bit of one token
    elif damage == "truncate":
        del data[len(data) - 3 :]  # as a crash mid-write would leave it, were the write not atomic
    else:
        data[:] = b"not a cache at all"
    path.write_bytes(bytes(data))
    corpus.clear_memory_cache()
    builds = []
    real_build = corpus.build_corpus_tokens

    def counting_build() -> np.ndarray:
        builds.append(1)
        return real_build()

    monkeypatch.setattr(corpus, "build_corpus_tokens", counting_build)
    assert corpus.corpus_fingerprint() == expected
    assert builds == [1]
    corpus.clear_memory_cache()
    assert corpus.corpus_fingerprint() == expected
    assert builds == [1]  # the rebuilt file is intact again


@pytest.mark.timeout(120)
def test_corpus_is_deterministic(corpus_cache: Path) -> None:
    # Each build runs in a fresh interpreter with its own random hash seed, whatever this process imported.
    first = corpus.corpus_documents()
    second = corpus.corpus_documents()
    assert first == second
    tokens = np.concatenate([np.concatenate((TOK.encode(d), [EOS_ID])) for d in first]).astype(np.uint16)
    assert token_fingerprint(tokens) == corpus.corpus_fingerprint()
    titles = [d.split("\n", 1)[0] for d in first]
    assert titles[0] == "__future__" and "json.dumps" in titles and "str.split" not in titles
    assert "builtins.str.split" in titles and "with" in titles  # docstrings of C types, reference topics
    assert len(set(first)) == len(first)
    assert not any(" at 0x" in d for d in first)


# ------------------------------------------------------------------------------------------------- dummy


def test_dummy_language_is_seeded_and_well_formed() -> None:
    a = corpus.dummy_tokens(50_000, seed=1)
    assert len(a) == 50_000 and a.dtype == np.uint16
    assert np.array_equal(a, corpus.dummy_tokens(50_000, seed=1))
    assert not np.array_equal(a, corpus.dummy_tokens(50_000, seed=2))
    assert set(np.unique(a).tolist()) <= set(corpus.DUMMY_ALPHABET) | {EOS_ID}
    lengths = np.diff(np.flatnonzero(a == EOS_ID)) - 1
    low, high = corpus.DUMMY_DOC_LENGTHS
    assert lengths.min() >= low and lengths.max() < high
    # Inside a document (after its two random first symbols) each symbol is followed by at most
    # DUMMY_BRANCHING distinct symbols: the structure a model can learn.
    prev, cur, nxt = a[:-2], a[1:-1], a[2:]
    drawn = (prev != EOS_ID) & (cur != EOS_ID) & (nxt != EOS_ID)
    followers: dict[int, set[int]] = {}
    for x, y in zip(cur[drawn].tolist(), nxt[drawn].tolist(), strict=True):
        followers.setdefault(x, set()).add(y)
    assert len(followers) == len(corpus.DUMMY_ALPHABET)
    assert all(len(v) <= corpus.DUMMY_BRANCHING for v in followers.values())


# ------------------------------------------------------------------------------------------ splits, shards


def test_split_holds_out_validation_and_shards_cover_the_rest() -> None:
    n = 400_000
    tokens = np.arange(n, dtype=np.uint32)  # every token unique: positions can be told apart
    data = split_tokens(tokens, num_shards=7, val_fraction=0.05, vocab_size=n, eos_id=0)
    val, train = data.val, data.train
    assert len(val) == 20_000 and len(train) == n - 20_000
    assert len(held_out_ranges(n, 0.05)) == 20_000 // 4096
    assert not np.intersect1d(val, train).size
    assert np.array_equal(np.sort(np.concatenate((val, train))), tokens)
    shards = [data.shard(i) for i in range(7)]
    assert np.array_equal(np.concatenate(shards), train)  # contiguous, in order, nothing lost
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert all(np.all(np.diff(s.astype(np.int64)) >= 1) for s in shards)
    # The validation tokens come from blocks spread over the whole data, not one end of it.
    assert val.min() < n * 0.2 and val.max() > n * 0.8
    assert data.fingerprint == token_fingerprint(tokens)
    with pytest.raises(IndexError):
        data.shard(7)
    with pytest.raises(DataError, match="too few"):
        split_tokens(tokens[:20], num_shards=16, val_fraction=0.1, vocab_size=n, eos_id=0)


def test_load_tokens_dummy_and_fingerprint_pinning() -> None:
    cfg = DataConfig(source="dummy", dummy_tokens=60_000, num_shards=4, val_fraction=0.1, seed=3)
    data = load_tokens(cfg)
    assert isinstance(data, SplitTokens)
    assert data.num_shards == 4 and data.vocab_size == 257 and data.eos_id == EOS_ID
    assert len(data.val) == 6_000 and sum(len(data.shard(i)) for i in range(4)) == 54_000
    assert data.fingerprint == token_fingerprint(corpus.dummy_tokens(60_000, 3))
    assert load_tokens(DataConfig(**{**cfg.to_dict(), "fingerprint": data.fingerprint})).fingerprint == data.fingerprint
    with pytest.raises(DataError, match="the swarm expects"):
        load_tokens(DataConfig(**{**cfg.to_dict(), "fingerprint": "0" * 64}))
    data.check_vocab(257)
    with pytest.raises(DataError, match="smaller than the tokenizer's vocabulary"):
        data.check_vocab(256)
    with pytest.raises(ValueError, match="read-only"):
        data.shard(0)[0] = 1


def test_load_tokens_builtin_matches_the_corpus(corpus_cache: Path) -> None:
    data = load_tokens(DataConfig(num_shards=16))
    assert data.fingerprint == corpus.corpus_fingerprint()
    assert len(data.val) == round(0.02 * len(corpus.corpus_tokens()))
    assert min(len(data.shard(i)) for i in range(16)) > 100_000


# ------------------------------------------------------------------------------------------- local files


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep the Arrow files ``datasets`` writes for local JSON / Parquet inside the test's directory."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    return tmp_path / "hf-cache"


TEXTS = ["Première ligne.\nSecond line — ünïcödé.", "short", "Ein dritter Text mit 🚀 und mehr Wörtern. " * 50]


def test_local_text_file_and_directory(tmp_path: Path) -> None:
    one = tmp_path / "book.txt"
    one.write_text(TEXTS[2] * 40, encoding="utf-8")
    data = load_tokens(DataConfig(source=str(one), num_shards=2))
    assert documents_of(reassemble(data)) == [TEXTS[2] * 40]
    assert len(data.val) == round(0.02 * (len((TEXTS[2] * 40).encode()) + 1))

    folder = tmp_path / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.md").write_text(TEXTS[1], encoding="utf-8")
    (folder / "a.txt").write_text(TEXTS[0], encoding="utf-8")
    (folder / "sub" / "c.txt").write_text(TEXTS[2], encoding="utf-8")
    (folder / "ignored.csv").write_text("x,y\n1,2\n", encoding="utf-8")
    data = load_tokens(DataConfig(source=str(folder), num_shards=1))
    # Files in sorted path order, each one document.
    assert documents_of(reassemble(data)) == [TEXTS[0], TEXTS[1], TEXTS[2]]


def reassemble(data: object) -> np.ndarray:
    """The token stream a SplitTokens was cut from: training tokens with the validation blocks put back."""
    assert isinstance(data, SplitTokens)
    n = len(data.train) + len(data.val)
    keep = np.ones(n, dtype=bool)
    for start, end in held_out_ranges(n, 0.02):
        keep[start:end] = False
    tokens = np.empty(n, dtype=data.train.dtype)
    tokens[keep], tokens[~keep] = data.train, data.val
    return tokens


def test_local_jsonl_and_parquet(tmp_path: Path, hf_cache: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "id": i} for i, t in enumerate(TEXTS)] + [{"text": None, "id": 9}]
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows), encoding="utf-8")
    data = load_tokens(DataConfig(source=str(jsonl), num_shards=1))
    assert documents_of(reassemble(data)) == TEXTS  # the row without text is skipped

    parquet = tmp_path / "rows.parquet"
    pq.write_table(pa.table({"body": TEXTS, "n": [1, 2, 3]}), parquet)
    data = load_tokens(DataConfig(source=str(parquet), text_field="body", num_shards=1))
    assert documents_of(reassemble(data)) == TEXTS
    assert any(hf_cache.iterdir())  # datasets kept its Arrow files where the fixture put them


def test_missing_files_and_fields_are_named(tmp_path: Path, hf_cache: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=f"data file not found: {re.escape(str(missing))}"):
        load_tokens(DataConfig(source=str(missing)))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "hello"}\n{"content": "world"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"rows.jsonl has no field 'text' \(fields: content\)"):
        load_tokens(DataConfig(source=str(rows)))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": 1}\n{"text": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match="row 0 holds int, not text"):
        load_tokens(DataConfig(source=str(bad)))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no \.txt or \.md files in directory"):
        load_tokens(DataConfig(source=str(tmp_path / "empty")))
    odd = tmp_path / "data.csv"
    odd.write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"unknown file type '\.csv'"):
        load_tokens(DataConfig(source=str(odd)))


# ---------------------------------------------------------------------------------------------- the Hub


@pytest.mark.timeout(30)
def test_hub_name_offline_fails_fast_with_a_clear_error() -> None:
    started = time.perf_counter()
    try:
        load_tokens(DataConfig(source="roneneldan/TinyStories"))
    except DataError as e:
        elapsed = time.perf_counter() - started
        assert "roneneldan/TinyStories" in str(e) and "could not be reached" in str(e)
    else:
        pytest.skip("the Hugging Face Hub is reachable from this machine")
    print(f"offline hub failure after {elapsed * 1000:.1f} ms")
    assert elapsed < 10  # datasets alone retries for ~20 s


@pytest.mark.timeout(30)
def test_unreachable_hub_endpoint_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"dataset 'someone/some-data': the Hugging Face Hub .*could not be reached"):
        load_tokens(DataConfig(source="someone/some-data"))
    assert time.perf_counter() - started < 10


@pytest.mark.timeout(30)
def test_a_silent_network_is_cut_off_by_the_probe_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.utils

    release = threading.Event()

    class Blackhole:
        def head(self, url: str, timeout: float) -> None:
            release.wait(20)  # a dropped SYN, or a DNS server that never answers

    monkeypatch.setattr(huggingface_hub.utils, "get_session", Blackhole)
    started = time.perf_counter()
    try:
        with pytest.raises(DataError, match=r"could not be reached \(no answer in 0.5 s\)"):
            _probe_hub("someone/some-data", timeout_s=0.5)
    finally:
        release.set()
    assert time.perf_counter() - started < 2


@pytest.mark.timeout(30)
def test_hf_hub_offline_mode_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    started = time.perf_counter()
    with pytest.raises(DataError, match=r"'roneneldan/TinyStories'.*offline"):
        load_tokens(DataConfig(source="roneneldan/TinyStories"))
    assert time.perf_counter() - started < 5


def test_streamed_tokens_are_read_lazily_round_robin() -> None:
    consumed = []

    def documents() -> Iterator[str]:
        for i in range(200):
            consumed.append(i)
            yield f"document {i:03d} " + "x" * 30  # 43 bytes + EOS = 44 tokens

    data = StreamTokens(documents(), TOK, num_shards=4, shard_tokens=440, val_tokens=100, source="stream")
    assert len(data.val) == 100  # documents 0 and 1, and the first 12 tokens of document 2
    assert documents_of(data.val) == ["document 000 " + "x" * 30, "document 001 " + "x" * 30]
    assert data.fingerprint == token_fingerprint(data.val)
    assert len(consumed) == 3  # only what the validation prefix needed
    shard1 = data.shard(1)
    # Documents after the validation prefix are dealt 0, 1, 2, 3, 0, ...: shard 1 holds documents 4, 8, 12, ...
    assert documents_of(shard1)[:3] == [f"document {i:03d} " + "x" * 30 for i in (4, 8, 12)]
    assert len(shard1) == 440 and len(consumed) < 60  # 10 documents per shard, ~40 read, not all 200
    assert documents_of(data.shard(0))[0].startswith("document 003")
    assert data.shard(1) is shard1  # fixed once read
    # A second reader of the same stream deals the same documents to the same shards.
    again = StreamTokens(documents(), TOK, num_shards=4, shard_tokens=440, val_tokens=100, source="stream")
    assert np.array_equal(again.shard(1), shard1) and again.fingerprint == data.fingerprint
    short = StreamTokens(iter(["a", "b", "c"]), TOK, num_shards=4, shard_tokens=440, val_tokens=2, source="short")
    assert TOK.decode(short.shard(0)) == "b"
    with pytest.raises(DataError, match="ended before shard 3"):
        short.shard(3)


# ------------------------------------------------------------------------------------------------ batches


def test_reader_batches_are_shifted_windows_of_the_shard() -> None:
    shard = corpus.dummy_tokens(20_000, seed=0)
    reader = ShardReader(shard, 32, 8, seed=1)
    x, y = next(reader)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    text = shard.astype(np.int64)
    for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True):
        starts = np.flatnonzero(text[: len(text) - 32] == row_x[0])
        assert any(np.array_equal(text[s : s + 32], row_x) and text[s + 32] == row_y[-1] for s in starts)
    assert reader.position == 1


def test_reader_is_deterministic_covers_each_epoch_and_resumes() -> None:
    shard = np.arange(3_000, dtype=np.uint16)  # unique tokens: a window is identified by its first token
    seq, batch = 50, 4
    a = ShardReader(shard, seq, batch, seed=7)
    windows = a.windows
    assert windows == (3_000 - 1) // 50 - 1  # one window of slack for the per-epoch offset
    first = [next(a) for _ in range(60)]  # 240 windows: 4.1 epochs of 58, crossing epoch boundaries mid-batch
    b = ShardReader(shard, seq, batch, seed=7)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(first, b, strict=False))
    starts = torch.cat([x[:, 0] for x, _ in first]).numpy()
    orders = []
    for e in range(4):
        epoch = starts[e * windows : (e + 1) * windows]
        offset = epoch.min() % seq
        assert sorted(epoch.tolist()) == [offset + k * seq for k in range(windows)]  # every window once
        orders.append(tuple((epoch - offset) // seq))
    assert len(set(orders)) == 4  # a new order every epoch
    assert len({int(starts[e * windows]) % seq for e in range(4)}) > 1  # and (almost surely) a new offset
    # A peer taking over the shard at batch 23 continues exactly where the previous holder stopped.
    resumed = ShardReader(shard, seq, batch, seed=7, position=23)
    for expected in first[23:]:
        x, y = next(resumed)
        assert torch.equal(x, expected[0]) and torch.equal(y, expected[1])
    assert resumed.position == 60
    other = ShardReader(shard, seq, batch, seed=8)
    assert not torch.equal(next(other)[0], first[0][0])


def test_reader_on_a_short_shard() -> None:
    tiny = np.arange(70, dtype=np.uint16)
    reader = ShardReader(tiny, 50, 3)  # one window, no room to shift it
    x, _ = next(reader)
    assert torch.equal(x[0], x[1]) and int(x[0, 0]) == 0
    with pytest.raises(DataError, match="shorter than seq_len"):
        ShardReader(tiny[:50], 50, 3)


def test_val_batches_and_evaluate() -> None:
    val = corpus.dummy_tokens(10_000, seed=5)
    batches = val_batches(val, 64, 8, 4)
    assert len(batches) == 4 and all(x.shape == (8, 64) for x, _ in batches)
    again = val_batches(val, 64, 8, 4)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(batches, again, strict=True))
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in batches)
    short = val_batches(val[:1000], 64, 8, 4)  # 15 windows: one full batch and one of 7
    assert [len(x) for x, _ in short] == [8, 7]
    with pytest.raises(DataError, match="validation split of 64 tokens"):
        val_batches(val[:64], 64, 8, 4)

    model = build_model(ModelConfig(preset="custom", n_layer=1, n_head=2, d_model=16, seq_len=64, dropout=0.1))
    model.train()
    loss = evaluate(model, batches)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        manual = sum(float(model(x, y)[1]) * y.numel() for x, y in batches) / sum(y.numel() for _, y in batches)
    assert loss == pytest.approx(manual, rel=1e-6)
    assert abs(loss - math.log(257)) < 0.3
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="at least one batch"):
        evaluate(model, [])


# ---------------------------------------------------------------------------------------------- learning


@pytest.mark.timeout(60)
def test_a_tiny_model_learns_the_dummy_language() -> None:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        data = load_tokens(DataConfig(source="dummy", dummy_tokens=200_000, num_shards=2, batch_size=16))
        cfg = ModelConfig(preset="custom", n_layer=2, n_head=4, d_model=64, seq_len=64, seed=0)
        model = build_model(cfg)
        evals = val_batches(data.val, cfg.seq_len, 16, 4)
        before = evaluate(model, evals)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        reader = ShardReader(data.shard(0), cfg.seq_len, 16, seed=0)
        losses = []
        for _ in range(150):
            x, y = next(reader)
            _, loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        after = evaluate(model, evals)
        elapsed = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    print(f"dummy: validation loss {before:.3f} -> {after:.3f} in 150 steps, {elapsed:.1f} s")
    assert before == pytest.approx(math.log(257), abs=0.2)
    # Symbol frequencies alone give 2.65 nats; below 2 the model has learned which symbols follow which.
    assert after < 2.0
    assert np.mean(losses[-10:]) < 2.0 < np.mean(losses[:10])
