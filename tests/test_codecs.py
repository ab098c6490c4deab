"""Codecs against exact values within their declared bounds, the wire format, error feedback, and fuzzing.

The declared bounds are recomputed here from the formulas in the codec docstrings (numpy, float64),
independently of ``Codec.error_bound``, and both are checked.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import torch

from legion_swarm.codecs import (
    CodecError,
    Encoded,
    ErrorFeedback,
    SparseCodec,
    TopKCodec,
    available_codecs,
    decode,
    from_wire,
    get_codec,
    to_wire,
)
from legion_swarm.codecs.base import all_finite, check_finite_range
from legion_swarm.errors import ConfigError
from tests.helpers.codecs import CODEC_OPTS

ROOT = Path(__file__).resolve().parent.parent
LENGTHS = [0, 1, 7, 255, 1000, 4097]


def sample(dist: str, n: int, seed: int) -> torch.Tensor:
    """float32 test data; every distribution stays within fp16 range so all codecs accept it."""
    rng = np.random.default_rng(seed)
    if dist == "normal":
        x = rng.standard_normal(n)
    elif dist == "heavy":  # Student t with 1.5 degrees of freedom: occasional huge outliers
        x = np.clip(rng.standard_t(1.5, n) * 100, -6e4, 6e4)
    elif dist == "zero_block":  # the first 300 elements (a whole int8/int4 block and more) are zero
        x = rng.standard_normal(n)
        x[:300] = 0
    elif dist == "tiny":
        x = rng.standard_normal(n) * 1e-30
    elif dist == "subnormal":  # float32 subnormals: exercises the int8/int4 float64 path
        x = rng.standard_normal(n) * 1e-40
    elif dist == "scales":  # magnitudes from 1e-20 to 1e4 across the tensor
        x = rng.standard_normal(n) * 10.0 ** rng.uniform(-20, 4, n)
    else:
        raise AssertionError(dist)
    return torch.from_numpy(x.astype(np.float32))


def declared_bound(name: str, x: torch.Tensor, opts: dict) -> np.ndarray:
    """The bound each codec's docstring declares, in float64."""
    a = np.abs(x.numpy().astype(np.float64))
    if name == "none":
        return np.zeros_like(a)
    if name == "fp16":
        return np.maximum(a * 2.0**-11, 2.0**-25)
    if name == "bf16":
        return np.maximum(a * 2.0**-8, 2.0**-134)
    if name in ("int8", "int4"):
        qmax, block = (127 if name == "int8" else 7), opts["block"]
        padded = np.zeros(-(-len(a) // block) * block)
        padded[: len(a)] = a
        absmax = np.repeat(padded.reshape(-1, block).max(axis=1), block)[: len(a)]
        return absmax * (0.5 / qmax + 2.0**-20) + 2.0**-140
    if name == "topk":  # exact where kept; the rest decodes to 0, which never exceeds the k-th largest |x|
        k = TopKCodec(**opts).k_for(len(a))
        return np.full_like(a, np.sort(a)[-k] if k else 0.0)
    if name == "sparse":  # per block: the top-k within half a step of the block's absmax; the rest decodes to 0
        block, m, k = opts["block"], 2 ** (opts["bits"] - 1), SparseCodec(**opts).k
        bound = a.copy()
        for start in range(0, len(a), block):
            seg = a[start : start + block]
            kept = k if len(seg) == block else -(-k * len(seg) // block)
            threshold = np.sort(seg)[-kept]
            limit = seg.max() * (0.5 / m + 2.0**-20) + 2.0**-140
            # A tie at the threshold may be kept or dropped: either bound holds there.
            tie = np.maximum(limit, seg)
            bound[start : start + block] = np.where(seg > threshold, limit, np.where(seg < threshold, seg, tie))
        return bound
    raise AssertionError(name)


@pytest.mark.parametrize("name", sorted(CODEC_OPTS))
@pytest.mark.parametrize("dist", ["normal", "heavy", "zero_block", "tiny", "subnormal", "scales"])
def test_codec_within_declared_bound(name: str, dist: str) -> None:
    codec = get_codec(name, **CODEC_OPTS[name])
    for seed, n in enumerate(LENGTHS):
        x = sample(dist, n, seed)
        enc = codec.encode(x)
        out = codec.decode(enc)
        assert out.dtype == torch.float32 and out.shape == x.shape
        assert bool(torch.isfinite(out).all())
        err = (x.double() - out.double()).abs().numpy()
        assert (err <= declared_bound(name, x, CODEC_OPTS[name])).all(), f"{name}/{dist}/n={n}: max err {err.max()}"
        assert (err <= codec.error_bound(x).double().numpy()).all()
        if dist == "zero_block" and n >= 300 and name != "topk":
            assert bool((out[:256] == 0).all())


def test_bounds_are_tight_enough_to_mean_something() -> None:
    # A codec that returned zeros would fail the bound tests; these check the error is near the step.
    x = sample("normal", 1 << 16, 1)
    for name, lo in [("fp16", 2.0**-13), ("int8", 1 / 600), ("int4", 1 / 40)]:
        codec = get_codec(name)
        err = float((x - codec.decode(codec.encode(x))).abs().max())
        assert 0 < err <= codec.max_abs_error(x) and err > lo * float(x.abs().max()) / 4


def test_ratios_match_payload() -> None:
    x = sample("normal", 1 << 16, 2)
    for name in available_codecs():
        codec = get_codec(name)
        enc = codec.encode(x)
        assert abs(x.numel() * 4 / enc.nbytes - codec.ratio) / codec.ratio < 0.01, name
    assert get_codec("int8").ratio > 3.9 and get_codec("int4").ratio > 7.4 and get_codec("topk").ratio == 50


def test_fp16_overflow_is_rejected_not_clamped() -> None:
    fp16 = get_codec("fp16")
    edge = torch.tensor([65504.0, -65504.0, 1.0])
    assert torch.equal(fp16.decode(fp16.encode(edge)), edge)
    for bad in (65505.0, -7e4, 1e30):
        with pytest.raises(CodecError, match="range"):
            fp16.encode(torch.tensor([0.0, bad]))
    with pytest.raises(CodecError, match="range"):
        get_codec("bf16").encode(torch.tensor([3.4e38]))
    with pytest.raises(CodecError, match="range"):
        get_codec("topk", fraction=1.0, values="fp16").encode(torch.tensor([1e5, 1.0]))


@pytest.mark.parametrize("name", sorted(CODEC_OPTS))
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("where", [0, 700, 1000])
def test_non_finite_input_raises(name: str, bad: float, where: int) -> None:
    x = sample("normal", 1001, 3)  # index 1000 sits in the short tail block
    x[where] = bad
    with pytest.raises(CodecError, match=r"NaN|inf"):
        get_codec(name).encode(x)


def test_bad_input_types() -> None:
    for bad in (torch.zeros(4, dtype=torch.float64), torch.zeros(2, 2), np.zeros(4, dtype=np.float32)):
        with pytest.raises(CodecError):
            get_codec("int8").encode(bad)  # type: ignore[arg-type]
    # non-contiguous 1-D input is fine
    x = sample("normal", 2000, 4)[::2]
    assert torch.equal(get_codec("none").decode(get_codec("none").encode(x)), x)


def test_quant_near_float32_max_encodes_finite_or_refuses() -> None:
    x = torch.tensor([3.4028235e38, -1.0, 2.0e38] + [1.0] * 300)
    for name in ("int8", "int4"):
        codec = get_codec(name)
        try:
            out = codec.decode(codec.encode(x))
        except CodecError:
            continue
        assert bool(torch.isfinite(out).all())
        assert bool(((x.double() - out.double()).abs() <= codec.error_bound(x).double()).all())


def test_registry_and_options() -> None:
    assert set(available_codecs()) == {"none", "fp16", "bf16", "int8", "int4", "topk", "sparse"}
    with pytest.raises(ConfigError, match="unknown codec"):
        get_codec("zstd")
    for name, opts in [
        ("int8", {"block": 4}),
        ("int8", {"block": 3.0}),
        ("int4", {"block": 1 << 21}),
        ("topk", {"fraction": 0}),
        ("topk", {"fraction": 1.5}),
        ("topk", {"values": "fp8"}),
        ("sparse", {"density": 0}),
        ("sparse", {"bits": 3}),
        ("sparse", {"bits": 4, "block": 8192}),
        ("fp16", {"block": 256}),
    ]:
        with pytest.raises(ConfigError):
            get_codec(name, **opts)


def test_topk_keeps_exactly_the_largest() -> None:
    x = sample("heavy", 5000, 5)
    codec = get_codec("topk", fraction=0.01)
    enc = codec.encode(x)
    idx, kept = enc.buffers
    assert idx.numel() == 50 and torch.equal(kept, x[idx.long()])
    assert float(x.abs()[idx.long()].min()) >= float(x.abs().sort().values[-50])
    out = codec.decode(enc)
    mask = torch.zeros(5000, dtype=torch.bool)
    mask[idx.long()] = True
    assert bool((out[~mask] == 0).all()) and torch.equal(out[mask], x[mask])


@pytest.mark.parametrize("dist", ["normal", "ties", "adversarial"])
def test_topk_sampled_selection_is_exact(dist: str) -> None:
    # 2**19 elements takes the sampled-threshold path; it must select magnitudes identical to torch.topk.
    x = sample("normal", 1 << 19, 6)
    if dist == "ties":
        x = x.mul(4).round()  # only a few distinct magnitudes: lots of ties at the threshold
    elif dist == "adversarial":  # every sampled position (stride 8 from 4) is huge: threshold far too high
        x[4::8] += 1000.0
    for fraction in (0.001, 0.01, 0.2):
        codec = TopKCodec(fraction=fraction)
        k = codec.k_for(x.numel())
        chosen = codec.select(x)
        assert chosen.numel() == k and bool((chosen[1:] > chosen[:-1]).all())
        expected = torch.topk(x.abs(), k).values.sort().values
        assert torch.equal(x.abs()[chosen].sort().values, expected)


@pytest.mark.parametrize("name", sorted(CODEC_OPTS))
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "unaligned"])
def test_wire_round_trip_equals_direct_decode(name: str, kind: str) -> None:
    codec = get_codec(name, **CODEC_OPTS[name])
    for seed, n in enumerate(LENGTHS):
        x = sample("scales", n, seed)
        enc = codec.encode(x)
        header, views = to_wire(enc)
        assert msgpack.unpackb(header)["v"] == 1
        if kind == "bytes":
            buffers: list = [bytes(v) for v in views]
        elif kind == "bytearray":
            buffers = [bytearray(v) for v in views]
        elif kind == "memoryview":
            buffers = list(views)
        else:  # one byte off any alignment: must be copied, still decode exactly
            buffers = [memoryview(bytearray(b"\0" + bytes(v)))[1:] for v in views]
        received = from_wire(header, buffers)
        assert received.codec == enc.codec and received.numel == n and dict(received.params) == dict(enc.params)
        assert torch.equal(decode(received), codec.decode(enc))
        reused = torch.full((n,), 7.0)  # stale contents must be overwritten everywhere (top-k zeros too)
        assert decode(received, out=reused) is reused and torch.equal(reused, codec.decode(enc))


def test_from_wire_is_zero_copy_for_writable_aligned_buffers() -> None:
    enc = get_codec("int8").encode(sample("normal", 4096, 7))
    header, views = to_wire(enc)
    buffers = [bytearray(v) for v in views]
    received = from_wire(header, buffers)
    for tensor, buf in zip(received.buffers, buffers, strict=True):
        assert tensor.data_ptr() == np.frombuffer(buf, dtype=np.uint8).ctypes.data
    assert to_wire(enc)[1][0].obj is not None  # views of the encoded storage, not copies
    assert np.shares_memory(np.asarray(views[0]), enc.buffers[0].numpy())


def test_decode_into_wrong_buffer_is_refused() -> None:
    enc = get_codec("int8").encode(sample("normal", 100, 11))
    for bad in (torch.empty(99), torch.empty(100, dtype=torch.float64), torch.empty(200)[::2], torch.empty(10, 10)):
        with pytest.raises(CodecError, match="output"):
            decode(enc, out=bad)


def test_from_wire_checks_expected_numel() -> None:
    header, views = to_wire(get_codec("topk").encode(sample("normal", 500, 10)))
    assert from_wire(header, views, numel=500).numel == 500
    with pytest.raises(CodecError, match="expected"):
        from_wire(header, views, numel=499)


@pytest.mark.parametrize(("fraction", "limit"), [(0.01, 0.3), (0.05, 0.06)])
def test_error_feedback_tracks_the_sum_of_inputs(fraction: float, limit: float) -> None:
    # 200 rounds of a fixed "gradient" plus noise through top-k: decoded sums trail input sums by exactly
    # the residual, which stays bounded, so the relative gap shrinks like 1/rounds. Measured at round 200:
    # 0.215 (fraction 0.01) and 0.042 (0.05), both halving from round 100; without feedback ~0.9.
    gen = torch.Generator().manual_seed(8)
    n, rounds, key = 4096, 200, ("shard0", "peerA")
    signal = torch.randn(n, generator=gen)
    noise = [0.5 * torch.randn(n, generator=gen) for _ in range(rounds)]
    ef = ErrorFeedback(get_codec("topk", fraction=fraction))
    sum_in, sum_out = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    norms, gaps = [], []
    for r in range(rounds):
        x = signal + noise[r]
        sum_in += x
        sum_out += decode(ef.encode(x, key=key))
        norms.append(float(ef.residual(key).norm()))
        gaps.append(float((sum_in - sum_out).norm() / sum_in.norm()))
    assert torch.allclose(sum_in, sum_out + ef.residual(key).double(), rtol=0, atol=1e-3)
    assert gaps[-1] < limit, gaps[-1]
    assert gaps[-1] < 0.6 * gaps[99]  # shrinking like 1/rounds
    assert max(norms[100:]) < 1.2 * max(norms[:100])  # residual bounded, not growing
    naive = get_codec("topk", fraction=fraction)
    naive_out = sum(naive.decode(naive.encode(signal + noise[r])).double() for r in range(rounds))
    assert float((sum_in - naive_out).norm() / sum_in.norm()) > 0.5


def test_error_feedback_with_int4_and_keys() -> None:
    gen = torch.Generator().manual_seed(9)
    ef = ErrorFeedback(get_codec("int4"))
    total_in = torch.zeros(1000, dtype=torch.float64)
    total_out = torch.zeros(1000, dtype=torch.float64)
    naive, total_naive = get_codec("int4"), torch.zeros(1000, dtype=torch.float64)
    for _ in range(50):
        x = (torch.rand(1000, generator=gen) * 2 - 1) * 1e-3
        total_in += x
        total_out += decode(ef.encode(x, key=(0, "b")))
        total_naive += naive.decode(naive.encode(x))
        ef.encode(torch.ones(10), key=(1, "b"))
    assert len(ef) == 2
    # |x| <= 1e-3 and |r| <= (1e-3 + |r|) / 14 give |r| <= 1e-3 / 13: the gap never exceeds one half-step.
    gap = float((total_in - total_out).abs().max())
    assert gap <= 1e-3 / 13 + 1e-9
    assert float((total_in - total_naive).abs().max()) > 2 * gap
    with pytest.raises(ValueError, match="reset"):
        ef.encode(torch.ones(11), key=(1, "b"))
    before = ef.residual((0, "b")).clone()
    bad = torch.randn(1000, generator=gen)
    bad[3] = float("nan")
    with pytest.raises(CodecError):
        ef.encode(bad, key=(0, "b"))
    assert torch.equal(ef.residual((0, "b")), before)  # a refused input leaves the state untouched
    ef.reset((1, "b"))
    assert len(ef) == 1
    lossless = ErrorFeedback(get_codec("none"))
    lossless.encode(torch.ones(3), key="k")
    assert len(lossless) == 0


# ---- fuzzing: malformed wire messages must raise CodecError, nothing else, and never return ----


def valid_messages() -> list[tuple[bytes, list[bytes], Encoded]]:
    out = []
    for name in sorted(CODEC_OPTS):
        for seed, n in enumerate([1, 7, 300, 1001]):
            enc = get_codec(name, **CODEC_OPTS[name]).encode(sample("normal", n, 100 + seed))
            header, views = to_wire(enc)
            out.append((header, [bytes(v) for v in views], enc))
    return out


def _edit_header(header: bytes, edit) -> bytes:
    fields = msgpack.unpackb(header)
    edit(fields)
    return msgpack.packb(fields)


HEADER_EDITS = [
    lambda f: f.update(v=2),
    lambda f: f.update(v=0),
    lambda f: f.update(v="1"),
    lambda f: f.update(codec="zstd"),
    lambda f: f.update(codec=7),
    lambda f: f.update(numel=f["numel"] + 1),
    lambda f: f.update(numel=f["numel"] * 2 + 2),
    lambda f: f.update(numel=-1),
    lambda f: f.update(numel=1 << 62),
    lambda f: f.update(numel=float(f["numel"])),
    lambda f: f.update(numel=True),
    lambda f: f.update(params={**f["params"], "extra": 1}),
    lambda f: f.update(params={"block": 0}),
    lambda f: f.update(params={"block": 3}),
    lambda f: f.update(params={"block": 1 << 30}),
    lambda f: f.update(params={"k": -1, "vbits": 32}),
    lambda f: f.update(params={"k": 1, "vbits": 8}),
    lambda f: f.update(params=[1, 2]),
    lambda f: f.update(params={"block": 256.0}),
    lambda f: f.update(buffers=f["buffers"][:-1]),
    lambda f: f.update(buffers=[*f["buffers"], ["int8", 1]]),
    lambda f: f.update(buffers=[["float64", b[1]] for b in f["buffers"]]),
    lambda f: f.update(buffers=[[b[0], b[1] + 1] for b in f["buffers"]]),
    lambda f: f.update(buffers="int8"),
    lambda f: f.pop("v"),
    lambda f: f.pop("buffers"),
    lambda f: f.update(extra=1),
    lambda f: f.update(numel=0),
]
NUMEL_GROWS = (HEADER_EDITS[5], HEADER_EDITS[6])


def corrupt_content(enc: Encoded, rng: random.Random) -> list[bytes]:
    """Copies of the buffers with contents that break one of the codec's rules (layout intact)."""
    arrays = [
        b.view(torch.int16).numpy().copy() if b.dtype == torch.bfloat16 else b.numpy().copy() for b in enc.buffers
    ]
    i = rng.randrange(enc.numel)
    if enc.codec in ("none", "fp16"):
        arrays[0][i % len(arrays[0])] = rng.choice([np.nan, np.inf, -np.inf])
    elif enc.codec == "bf16":
        arrays[0][i] = rng.choice([0x7FC0, 0x7F80, -128])  # NaN, +inf, -inf (0xFF80 as int16)
    elif enc.codec in ("int8", "int4"):
        choice = rng.randrange(4)
        scales = arrays[1]
        if choice == 0:
            scales[rng.randrange(len(scales))] = rng.choice([np.nan, np.inf, -1.0, -1e-30, 3e38])
        elif choice == 1 and enc.codec == "int8":
            arrays[0][i] = -128
        elif enc.codec == "int4" and choice == 1:
            arrays[0][i // 2] &= 0xF0  # low nibble 0
        elif enc.codec == "int4" and choice == 2:
            arrays[0][i // 2] &= 0x0F  # high nibble 0
        else:
            scales[:] = np.nan
    elif enc.codec == "sparse":  # words: offset | code << 14 (bits 2), one per kept entry, block by block
        words, scales = arrays
        unsigned = words.astype(np.int64) & 0xFFFF
        choice = rng.randrange(4)
        if choice == 0:  # the last entry's offset one past its block's end
            block, k = enc.params["block"], enc.params["k"]
            last = (len(words) - 1) // k
            end = min(block, enc.numel - last * block)
            words[-1] = np.int16(np.uint16(end | (unsigned[-1] & ~0x3FFF)).view(np.int16))
        elif choice == 1 and enc.numel >= 64:
            words[1] = words[0]  # a duplicate within the first block
        elif choice == 2 and enc.numel >= 64:
            words[0], words[1] = words[1], words[0]  # unsorted
        else:
            scales[rng.randrange(len(scales))] = rng.choice([np.nan, np.inf, -1.0, 3e38])
    elif enc.codec == "topk":
        idx, values = arrays
        choice = rng.randrange(5)
        if choice == 0:
            idx[rng.randrange(len(idx))] = rng.choice([enc.numel, enc.numel + 5, -1, 2**31 - 1])
            if len(idx) == 1 or (idx[-1] < enc.numel and idx[0] >= 0):
                idx[-1] = enc.numel
        elif choice == 1 and len(idx) > 1:
            idx[1] = idx[0]  # duplicate
        elif choice == 2 and len(idx) > 1:
            idx[0], idx[1] = idx[1], idx[0]  # unsorted
        else:
            values[rng.randrange(len(values))] = rng.choice([np.nan, np.inf])
    return [a.tobytes() for a in arrays]


def test_fuzz_malformed_messages_always_codec_error() -> None:
    rng = random.Random(1234)
    messages = valid_messages()
    cases = 0
    for round_ in range(1200):
        header, buffers, enc = messages[round_ % len(messages)]
        kind = rng.randrange(8)
        bufs = list(buffers)
        hdr = header
        if kind == 0:  # truncated buffer
            j = rng.randrange(len(bufs))
            bufs[j] = bufs[j][: rng.randrange(len(bufs[j]))] if bufs[j] else b""
            if len(bufs[j]) == len(buffers[j]):
                bufs[j] += b"\0"
        elif kind == 1:  # garbage appended
            j = rng.randrange(len(bufs))
            bufs[j] = bufs[j] + rng.randbytes(rng.randrange(1, 9))
        elif kind == 2:  # missing or extra buffer
            bufs = bufs[:-1] if rng.random() < 0.5 else [*bufs, b"\0" * 4]
        elif kind == 3:  # one header field changed
            edit = rng.choice(HEADER_EDITS)
            if enc.codec in ("topk", "sparse") and edit in NUMEL_GROWS:
                edit = HEADER_EDITS[-1]  # a larger numel keeps (top-k, sparse) indices in range: still valid
            hdr = _edit_header(header, edit)
        elif kind == 4:  # garbage header
            hdr = rng.randbytes(rng.randrange(0, 200))
        elif kind == 5:  # truncated header
            hdr = header[: rng.randrange(len(header))]
        elif kind == 6:  # invalid contents
            bufs = corrupt_content(enc, rng)
        else:  # not bytes at all
            hdr, bufs = rng.choice([(None, bufs), (header, [None] * len(bufs)), (header, [12] * len(bufs))])
        cases += 1
        try:
            result = from_wire(hdr, bufs)  # type: ignore[arg-type]
        except CodecError:
            continue
        except Exception as e:  # any other exception type is a bug
            raise AssertionError(f"case {round_} kind {kind}: {type(e).__name__}: {e}") from e
        raise AssertionError(f"case {round_} kind {kind}: malformed message accepted: {result}")
    assert cases >= 1000


def test_fuzz_random_header_and_buffer_flips_never_crash() -> None:
    # Random bit flips can land on a still-valid message; then it must decode to numel finite values.
    rng = random.Random(99)
    messages = valid_messages()
    for round_ in range(600):
        header, buffers, _ = messages[round_ % len(messages)]
        target = rng.randrange(1 + len(buffers))
        if target == 0:
            mutated = bytearray(header)
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            hdr, bufs = bytes(mutated), buffers
        else:
            mutated = bytearray(buffers[target - 1])
            if not mutated:
                continue
            mutated[rng.randrange(len(mutated))] ^= 1 << rng.randrange(8)
            hdr, bufs = header, [*buffers[: target - 1], bytes(mutated), *buffers[target:]]
        try:
            enc = from_wire(hdr, bufs)
        except CodecError:
            continue
        out = decode(enc)
        assert out.shape == (enc.numel,) and bool(torch.isfinite(out).all())


@pytest.mark.usefixtures("real_processes")
def test_benchmark_script_runs_small() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_codecs.py"), "--numel", "100000", "--repeats", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    report = json.loads(result.stdout)
    for name in available_codecs():
        entry = report["codecs"][name]
        assert entry["encode_gbps"] > 0 and entry["decode_gbps"] > 0 and entry["ratio"] >= 1
    assert report["codecs"]["none"]["max_abs_err"] == 0
    assert "hivemind_fp16" in report and "hivemind_8bit" in report
    assert "int8_encode_vs_hivemind_8bit" in report["ratios"]


@pytest.mark.parametrize("seed", range(20))
def test_one_pass_finiteness_and_range_checks_agree_with_an_exact_oracle(seed: int) -> None:
    # The fast path decides from x·x; huge finite values (whose squares overflow) and values a hair from the
    # limit go to min / max. Either way the answer must be exactly torch's.
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(5000, generator=gen) * 10.0 ** float(torch.randint(-30, 39, (1,), generator=gen))
    picks = [
        float("nan"),
        float("inf"),
        float("-inf"),
        float(torch.finfo(torch.float32).max),
        -2e19,
        65504.0,
        65505.0,
        -65504.0,
        1e-40,
    ]
    for i in torch.randint(0, 5000, (int(torch.randint(0, 3, (1,), generator=gen)),), generator=gen).tolist():
        x[i] = picks[int(torch.randint(0, len(picks), (1,), generator=gen))]
    assert all_finite(x) == bool(torch.isfinite(x).all())
    for limit in (65504.0, float(torch.finfo(torch.bfloat16).max), float(torch.finfo(torch.float32).max)):
        ok = bool(torch.isfinite(x).all()) and float(x.abs().max()) <= limit
        try:
            check_finite_range(x, limit, "x")
            assert ok, f"accepted a tensor outside ±{limit}"
        except CodecError:
            assert not ok, f"refused a tensor within ±{limit}"


def test_finite_values_whose_squares_overflow_are_still_accepted() -> None:
    x = torch.tensor([3e38, -3e38, 1.0])
    none = get_codec("none")
    enc = none.encode(x)
    header, buffers = to_wire(enc)
    assert torch.equal(none.decode(from_wire(header, [bytearray(b) for b in buffers], numel=3)), x)


@pytest.mark.parametrize("name", ["fp16", "int8", "topk", "sparse"])
def test_error_feedback_reuses_its_buffers_across_encodes(name: str) -> None:
    ef = ErrorFeedback(get_codec(name, **CODEC_OPTS.get(name, {})))
    gen = torch.Generator().manual_seed(7)
    homes = set()
    for step in range(8):
        for key in ("a", "b"):  # two residuals of one length share the spare buffers
            ef.encode(torch.randn(4096, generator=gen), key=key)
            if step >= 2:
                homes.add(ef.residual(key).data_ptr())
    # Steady state: the two residuals, a scratch buffer and one spare take turns; nothing new is allocated.
    assert len(homes) <= 4
