"""The ``sparse`` codec against a dense reference, under error feedback, on the wire, fuzzed, and in the config.

The reference (numpy, float64) recomputes from the module docstring which entries each block keeps and the
declared bound, independently of the codec. The fuzzer builds each malformed message so that it breaks one of
the format's rules by construction (header fields, params, buffer lengths, offsets out of a block, duplicated or
unsorted, bad scales); every one must raise :class:`CodecError`. Codes cannot be out of range: every 2- or 4-bit
pattern is a level, so :func:`test_any_code_bits_decode_on_the_grid` checks that flipping them stays valid.
"""

from __future__ import annotations

import argparse
import math
import random

import msgpack
import numpy as np
import pytest
import torch

from legion_swarm.codecs import CodecError, ErrorFeedback, SparseCodec, TopKCodec, decode, from_wire, get_codec, to_wire
from legion_swarm.codecs.quant import CHUNK_ELEMENTS
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.errors import ConfigError

FP32_MAX = float(torch.finfo(torch.float32).max)


def randn(n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.from_numpy((np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32))


def kept_per_block(n: int, block: int, k: int) -> list[int]:
    """Entries each block keeps: k in a full block, ceil(k * t / block) in a short tail of t."""
    full, tail = divmod(n, block)
    return [k] * full + ([-(-k * tail // block)] if tail else [])


def reference(x: torch.Tensor, block: int, k: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """The kept mask (top-k of |x| per block; ``x`` without ties) and the declared bound, in float64."""
    a = np.abs(x.numpy().astype(np.float64))
    mask = np.zeros(len(a), dtype=bool)
    bound = a.copy()
    m = 2 ** (bits - 1)
    for b, kept in enumerate(kept_per_block(len(a), block, k)):
        seg = slice(b * block, min(len(a), (b + 1) * block))
        top = np.argsort(a[seg])[::-1][:kept] + b * block
        mask[top] = True
        bound[top] = a[seg].max() * (0.5 / m + 2.0**-20) + 2.0**-140
    return mask, bound


CASES = [  # (n, block, density, bits)
    (0, 4096, 0.02, 2), (1, 4096, 0.02, 2), (7, 64, 0.05, 4), (63, 64, 0.05, 2), (64, 64, 0.05, 2),
    (65, 64, 0.05, 4), (5096, 4096, 0.02, 2), (20000, 4096, 0.02, 4), (20000, 16384, 0.01, 2),
    (3000, 8, 0.3, 2), (3001, 1024, 1.0, 4), (10000, 4096, 0.001, 2), (4096 * 3, 4096, 0.5, 4),
]  # fmt: skip


@pytest.mark.parametrize(("n", "block", "density", "bits"), CASES)
def test_kept_set_is_exact_and_values_within_the_declared_bound(n: int, block: int, density: float, bits: int) -> None:
    x = randn(n, seed=n + bits, scale=3.0)
    codec = SparseCodec(density=density, bits=bits, block=block)
    assert codec.k == min(block, max(1, math.ceil(density * block)))
    enc = codec.encode(x)
    assert [tuple(b.shape) for b in enc.buffers] == [(length,) for _, length in codec.layout(n, enc.params)]
    assert enc.buffers[0].numel() == sum(kept_per_block(n, block, codec.k))
    out = codec.decode(enc)
    mask, bound = reference(x, block, codec.k, bits)
    assert torch.equal(out != 0, torch.from_numpy(mask))  # exactly the top-k are nonzero (no kept value decodes 0)
    err = (x.double() - out.double()).abs().numpy()
    assert (err[~mask] == np.abs(x.numpy()[~mask])).all()  # dropped entries decode to exactly 0
    assert (err <= bound).all(), float((err - bound).max())
    assert (err <= codec.error_bound(x).double().numpy()).all()
    assert np.allclose(codec.error_bound(x).double().numpy(), bound, rtol=2**-20, atol=0)
    # On the grid: x̂ / scale is an odd multiple of 1/2 within ±(m - 1/2) (up to the product's float32 rounding).
    scales = enc.buffers[1]
    m = 2 ** (bits - 1)
    for b in range(scales.numel()):
        seg = out[b * block : (b + 1) * block]
        levels = (seg[seg != 0].double() / float(scales[b])).numpy()
        assert np.abs((levels * 2).round() - levels * 2).max() <= 2**-20
        assert np.abs(levels).max() <= (m - 0.5) * (1 + 2**-23)
        assert float(scales[b]) == float(x[b * block : (b + 1) * block].abs().max()) / m


def test_ties_keep_the_largest_magnitudes() -> None:
    x = randn(8192, seed=3).mul(2).round()  # a handful of distinct magnitudes: ties at every threshold
    codec = SparseCodec(density=0.1, bits=4, block=1024)
    out = codec.decode(codec.encode(x))
    for b in range(8):
        seg, got = x[b * 1024 : (b + 1) * 1024].abs(), out[b * 1024 : (b + 1) * 1024]
        kept = seg[got != 0]
        assert kept.numel() == codec.k == 103
        assert torch.equal(kept.sort().values, torch.topk(seg, codec.k).values.sort().values)


def test_across_several_work_chunks_and_extreme_values() -> None:
    n = CHUNK_ELEMENTS * 2 + 4096 * 3 + 17  # three chunks of whole blocks and a short tail
    x = randn(n, seed=5)
    x[10], x[5000], x[n - 1] = FP32_MAX, -FP32_MAX, 1e-40  # absmax at float32's edge, a subnormal in the tail
    x[8192 : 8192 + 4096] = 0  # an all-zero block: scale 0, decoded zeros
    codec = get_codec("sparse")
    enc = codec.encode(x)
    out = codec.decode(enc)
    assert bool(torch.isfinite(out).all()) and bool((out[8192 : 8192 + 4096] == 0).all())
    assert bool(((x.double() - out.double()).abs() <= codec.error_bound(x).double()).all())
    assert float(enc.buffers[1][2]) == 0.0
    header, buffers = to_wire(enc)
    assert torch.equal(decode(from_wire(header, buffers, numel=n)), out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_is_refused(bad: float) -> None:
    x = randn(9000, seed=6)
    x[8999] = bad
    with pytest.raises(CodecError, match=r"NaN|inf"):
        get_codec("sparse").encode(x)


# ------------------------------------------------------------------------------------------ ratio and bytes


def test_ratio_and_bytes_per_kept_entry() -> None:
    codec = get_codec("sparse")  # density 0.02, bits 2, block 4096
    assert (codec.k, codec.bits, codec.block) == (82, 2, 4096)
    assert codec.bytes_per_entry == 2 + 4 / 82  # one int16 word + the block's float32 scale over 82 entries
    assert codec.ratio == 4 * 4096 / (2 * 82 + 4) and 97.5 < codec.ratio < 97.6
    x = randn(1 << 16, seed=7)
    enc = codec.encode(x)
    assert enc.nbytes == 16 * (82 * 2 + 4) == 2688 and 4 * x.numel() / enc.nbytes == codec.ratio
    # fp32 top-k at the same density sends 8 bytes per entry: 25x; the int16 word is 3.9x smaller per entry.
    assert TopKCodec(fraction=0.02).ratio == 25 and codec.ratio / 25 > 3.9
    # The word packs a 12-bit offset with the code: 4 bits cost what 2 bits cost at this block; bits=2 allows
    # blocks of up to 16384 (14-bit offsets).
    assert SparseCodec(bits=4).ratio == codec.ratio
    assert SparseCodec(bits=2, block=16384).bytes_per_entry == 2 + 4 / 328
    for n in (1, 4095, 4097, 123457):
        enc = codec.encode(randn(n, seed=n))
        entries = sum(kept_per_block(n, 4096, 82))
        assert enc.nbytes == 2 * entries + 4 * -(-n // 4096)


# --------------------------------------------------------------------------------------------- error feedback


def test_error_feedback_carries_what_is_not_sent_and_tracks_the_sum_of_inputs() -> None:
    # A fixed "gradient" plus noise through 2% / 2-bit sparse: the decoded sums trail the input sums by exactly
    # the residual (per key), which stays bounded, so the relative gap shrinks like 1 / rounds. Measured: 0.93
    # after one round, 0.28 after 100, 0.15 after 200; without feedback 0.88. An entry waits ~1 / density = 50
    # rounds to be among its block's largest, so the residual settles near 50 rounds of signal (max norm 2.7e3
    # in rounds 1-100, 3.0e3 in 101-200).
    gen = torch.Generator().manual_seed(8)
    n, rounds = 8192 + 1000, 200
    keys = [("shard0", "peerA"), ("shard1", "peerA")]
    signal = {key: torch.randn(n, generator=gen) for key in keys}
    ef = ErrorFeedback(get_codec("sparse"))
    sum_in = {key: torch.zeros(n, dtype=torch.float64) for key in keys}
    sum_out = {key: torch.zeros(n, dtype=torch.float64) for key in keys}
    norms, gaps = [], []
    for _ in range(rounds):
        for key in keys:
            x = signal[key] + 0.5 * torch.randn(n, generator=gen)
            before = x + (ef.residual(key) if ef.residual(key) is not None else 0)
            enc = ef.encode(x, key=key)
            decoded = decode(enc)
            # The sparse residual update equals the dense one: residual = (x + old residual) - decoded.
            assert torch.equal(ef.residual(key), before - decoded)
            sum_in[key] += x
            sum_out[key] += decoded
        key = keys[0]
        norms.append(float(ef.residual(key).norm()))
        gaps.append(float((sum_in[key] - sum_out[key]).norm() / sum_in[key].norm()))
    for key in keys:
        assert torch.allclose(sum_in[key], sum_out[key] + ef.residual(key).double(), rtol=0, atol=1e-3)
    assert gaps[-1] < 0.2, gaps[-1]
    assert gaps[-1] < 0.65 * gaps[99]  # shrinking like 1/rounds
    assert max(norms[100:]) < 1.25 * max(norms[:100])  # residual bounded (~50 rounds of signal), not growing
    naive = get_codec("sparse")
    naive_out = sum(naive.decode(naive.encode(signal[keys[0]] + 0.5 * torch.randn(n, generator=gen))).double()
                    for _ in range(rounds))  # fmt: skip
    assert float((sum_in[keys[0]] - naive_out).norm() / sum_in[keys[0]].norm()) > 0.8


# --------------------------------------------------------------------------------------------------- fuzzing


def valid_messages() -> list[tuple[bytes, list[bytes], SparseCodec, int]]:
    out = []
    configs = [(0.02, 2, 4096), (0.05, 4, 64), (0.3, 2, 8), (0.25, 4, 4096), (0.1, 2, 16384), (1.0, 4, 16)]
    for i, (density, bits, block) in enumerate(configs):
        codec = SparseCodec(density=density, bits=bits, block=block)
        for j, n in enumerate([1, 7, 65, 300, 4097, 9000]):
            header, views = to_wire(codec.encode(randn(n, seed=100 + 10 * i + j)))
            out.append((header, [bytes(v) for v in views], codec, n))
    return out


def _header(header: bytes, **changes: object) -> bytes:
    fields = msgpack.unpackb(header)
    fields.update(changes)
    return msgpack.packb(fields)


def _params(header: bytes, **changes: object) -> bytes:
    fields = msgpack.unpackb(header)
    return _header(header, params={**fields["params"], **changes})


BAD_PARAMS = [
    {"k": 0}, {"k": -1}, {"k": 1 << 20}, {"k": 2.0}, {"k": True}, {"bits": 3}, {"bits": 8}, {"bits": 1},
    {"bits": 2.0}, {"block": 0}, {"block": 12}, {"block": 1 << 15}, {"block": 1 << 17}, {"block": "64"},
    {"extra": 1},
]  # fmt: skip


def _words(buffers: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    return np.frombuffer(buffers[0], dtype="<i2").copy(), np.frombuffer(buffers[1], dtype="<f4").copy()


def _entries(words: np.ndarray, codec: SparseCodec, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Block, offset, code and block length of every entry, decoded by hand from the module docstring."""
    shift = 16 - codec.bits
    unsigned = words.astype(np.int64) & 0xFFFF
    blocks = np.arange(len(words)) // codec.k
    lengths = np.minimum(codec.block, n - blocks * codec.block)
    return blocks, unsigned & ((1 << shift) - 1), unsigned >> shift, lengths


def _pack(offset: np.ndarray | int, code: np.ndarray | int, codec: SparseCodec) -> np.ndarray:
    return np.asarray(np.asarray(offset) | (np.asarray(code) << (16 - codec.bits)), dtype=np.uint16).view(np.int16)


def corrupt(buffers: list[bytes], codec: SparseCodec, n: int, kind: str, rng: random.Random) -> list[bytes] | None:
    """A copy of the buffers breaking ``kind``'s rule, or None when this message cannot (e.g. one entry only)."""
    words, scales = _words(buffers)
    blocks, offsets, codes, lengths = _entries(words, codec, n)
    if kind == "offset_out_of_range":
        room = np.nonzero(lengths < 1 << (16 - codec.bits))[0]  # entries whose block leaves offsets unused
        if not len(room):
            return None
        i = int(rng.choice(room))
        offsets[i] = rng.randrange(int(lengths[i]), 1 << (16 - codec.bits))
    elif kind in ("duplicate", "unsorted"):
        pairs = np.nonzero(blocks[1:] == blocks[:-1])[0]  # neighbours in one block
        if not len(pairs):
            return None
        i = int(rng.choice(pairs))
        if kind == "duplicate":
            offsets[i + 1] = offsets[i]
        else:  # two distinct offsets of one block swapped
            j = rng.choice([e for e in range(i + 1, len(words)) if blocks[e] == blocks[i]])
            offsets[i], offsets[j] = offsets[j], offsets[i]
    elif kind == "scale":
        scales[rng.randrange(len(scales))] = rng.choice([np.nan, np.inf, -np.inf, -1.0, -1e-30, 3e38, FP32_MAX])
    else:
        raise AssertionError(kind)
    return [_pack(offsets, codes, codec).tobytes(), scales.tobytes()]


KINDS = [
    "header", "params", "truncated", "extended", "buffer_count", "declared", "offset_out_of_range", "duplicate",
    "unsorted", "scale", "garbage_header", "not_bytes",
]  # fmt: skip


def test_fuzz_malformed_messages_always_codec_error() -> None:
    rng = random.Random(2024)
    messages = valid_messages()
    counts = dict.fromkeys(KINDS, 0)
    for case in range(1500):
        header, buffers, codec, n = messages[case % len(messages)]
        kind = KINDS[case % len(KINDS)] if case < len(KINDS) * 10 else rng.choice(KINDS)
        hdr, bufs = header, list(buffers)
        if kind == "header":
            hdr = _header(header, **rng.choice([
                {"v": 2}, {"v": "1"}, {"codec": "topk"}, {"codec": "Sparse"}, {"numel": n + 1 + n * 4096},
                {"numel": -1}, {"numel": float(n)}, {"numel": 1 << 41}, {"params": []}, {"buffers": "int16"},
                {"extra": 0},
            ]))  # fmt: skip
        elif kind == "params":
            hdr = _params(header, **rng.choice(BAD_PARAMS))
            if rng.random() < 0.2:  # or a parameter missing
                missing = rng.choice(["k", "block", "bits"])
                params = msgpack.unpackb(header)["params"]
                hdr = _header(header, params={k: v for k, v in params.items() if k != missing})
        elif kind == "truncated":
            j = rng.randrange(2)
            if not bufs[j]:
                bufs[j] = b"\0\0\0\0"
            else:
                bufs[j] = bufs[j][: rng.randrange(len(bufs[j]))]
        elif kind == "extended":
            j = rng.randrange(2)
            bufs[j] += rng.randbytes(rng.choice([1, 2, 4, 8]))
        elif kind == "buffer_count":
            bufs = bufs[:1] if rng.random() < 0.5 else [*bufs, b"\0" * 4]
        elif kind == "declared":  # the header declares another layout (the buffers follow it)
            fields = msgpack.unpackb(header)
            (wd, wn), (sd, sn) = fields["buffers"]
            declared = rng.choice([[["int32", wn], [sd, sn]], [[wd, wn + 1], [sd, sn]], [[wd, wn], [sd, sn - 1]],
                                   [[sd, sn], [wd, wn]], [[wd, wn]]])  # fmt: skip
            hdr = _header(header, buffers=declared)
        elif kind in ("offset_out_of_range", "duplicate", "unsorted", "scale"):
            corrupted = corrupt(bufs, codec, n, kind, rng)
            if corrupted is None:
                corrupted = corrupt(bufs, codec, n, "scale", rng)
                kind = "scale"
            bufs = corrupted
        elif kind == "garbage_header":
            hdr = rng.choice([rng.randbytes(rng.randrange(0, 64)), header[: rng.randrange(len(header))]])
        else:
            hdr, bufs = rng.choice([(None, bufs), (header, [None, None]), (header, [7, 7]), (header, bufs[0])])
        assert (hdr, bufs) != (header, list(buffers)), kind
        counts[kind] += 1
        try:
            result = from_wire(hdr, bufs, numel=n if rng.random() < 0.5 else None)  # type: ignore[arg-type]
        except CodecError:
            continue
        except Exception as e:  # any other exception type is a bug
            raise AssertionError(f"case {case} ({kind}): {type(e).__name__}: {e}") from e
        raise AssertionError(f"case {case} ({kind}): malformed message accepted: {result.params}")
    assert sum(counts.values()) >= 1000
    assert all(c >= 50 for c in counts.values()), counts


def test_any_code_bits_decode_on_the_grid() -> None:
    """Every code is a level: rewriting codes (offsets kept) gives a valid message that decodes finite, on the
    grid of its block's scale, at exactly the same positions."""
    rng = random.Random(5)
    for header, buffers, codec, n in valid_messages():
        words, scales = _words(buffers)
        _, offsets, _, _ = _entries(words, codec, n)
        codes = np.array([rng.randrange(1 << codec.bits) for _ in range(len(words))], dtype=np.int64)
        scales[: rng.randrange(len(scales) + 1)] = FP32_MAX / 2**codec.bits  # the largest accepted scale, or so
        received = from_wire(header, [_pack(offsets, codes, codec).tobytes(), scales.tobytes()], numel=n)
        out = decode(received)
        original = decode(from_wire(header, buffers, numel=n))
        assert bool(torch.isfinite(out).all())
        m = 2 ** (codec.bits - 1)
        blocks = np.arange(len(words)) // codec.k
        index = blocks * codec.block + offsets
        expected = (codes - m + 0.5) * scales[blocks].astype(np.float64)
        assert np.allclose(out.numpy()[index].astype(np.float64), expected, rtol=2**-23, atol=0)
        assert torch.equal(out != 0, original != 0)  # the same entries, whatever their codes


def test_a_valid_message_that_keeps_every_entry_is_accepted() -> None:
    codec = SparseCodec(density=1.0, bits=4, block=4096)
    x = randn(5000, seed=9)
    header, views = to_wire(codec.encode(x))
    assert msgpack.unpackb(header)["buffers"] == [["int16", 5000], ["float32", 2]]
    out = decode(from_wire(header, views, numel=5000))
    assert bool(((x - out).abs() <= codec.error_bound(x)).all())


# ---------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"density": 0}, "density"), ({"density": 0.0}, "density"), ({"density": -0.1}, "density"),
        ({"density": 1.01}, "density"), ({"density": float("nan")}, "density"), ({"density": True}, "density"),
        ({"density": "0.02"}, "density"), ({"bits": 3}, "bits"), ({"bits": 8}, "bits"), ({"bits": 2.0}, "bits"),
        ({"bits": True}, "bits"), ({"block": 4}, "block"), ({"block": 100}, "block"),
        ({"bits": 4, "block": 8192}, "block"), ({"bits": 2, "block": 32768}, "block"), ({"block": 64.0}, "block"),
        ({"fraction": 0.1}, "bad options"),
    ],
)  # fmt: skip
def test_bad_codec_options_are_refused(opts: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        get_codec("sparse", **opts)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"sparse_density": 0.0}, r"sparse_density must be in \(0, 1\], got 0.0"),
        ({"sparse_density": 1.5}, r"sparse_density must be in \(0, 1\], got 1.5"),
        ({"sparse_density": float("nan")}, "sparse_density must be in"),
        ({"sparse_bits": 3}, "sparse_bits must be 2 or 4, got 3"),
        ({"sparse_bits": 8}, "sparse_bits must be 2 or 4, got 8"),
        ({"sparse_bits": 2.0}, "sparse_bits must be 2 or 4, got 2.0"),
        ({"gather_codec": "sparse"}, "gather_codec cannot be sparse"),
    ],
)
def test_bad_sparse_config_is_refused(fields: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        CollectiveConfig(codec="sparse", **fields)


def test_config_builds_the_codec_and_an_int8_gather() -> None:
    config = CollectiveConfig(codec="sparse", sparse_density=0.05, sparse_bits=4)
    codec = get_codec(config.codec, **config.codec_options(config.codec))
    assert isinstance(codec, SparseCodec) and (codec.density, codec.bits, codec.k) == (0.05, 4, 205)
    assert config.resolved_gather_codec == "int8"  # dense results: not sparsified, nor 30x larger than int8
    assert CollectiveConfig(codec="sparse", gather_codec="none").resolved_gather_codec == "none"
    assert CollectiveConfig(codec="topk").resolved_gather_codec == "none"
    assert TrainConfig(codec="sparse").resolved_codec == "sparse"


def test_compress_sparse_through_the_generated_flags() -> None:
    from legion_swarm.cli.train import add_spec_flags, spec_argv, spec_from_args
    from legion_swarm.errors import SwarmConfigError

    parser = argparse.ArgumentParser()
    add_spec_flags(parser, creator=True)
    argv = ["--compress", "sparse", "--collective-sparse-density", "0.01", "--collective-sparse-bits", "4"]
    args = parser.parse_args(argv)
    config = spec_from_args(args).collective_config()
    assert (config.codec, config.sparse_density, config.sparse_bits) == ("sparse", 0.01, 4)
    assert config.resolved_gather_codec == "int8"
    assert get_codec(config.codec, **config.codec_options("sparse")).k == 41
    assert spec_argv(args) == ["--compress", "sparse", "--collective-sparse-density", "0.01",
                               "--collective-sparse-bits", "4"]  # fmt: skip
    for bad, match in [("--collective-sparse-bits", "sparse_bits must be 2 or 4"),
                       ("--collective-sparse-density", "sparse_density must be in")]:  # fmt: skip
        with pytest.raises(SwarmConfigError, match=match):
            spec_from_args(parser.parse_args(["--compress", "sparse", bad, "3"]))
    with pytest.raises(SystemExit):  # not an integer: argparse refuses it
        parser.parse_args(["--collective-sparse-bits", "two"])
