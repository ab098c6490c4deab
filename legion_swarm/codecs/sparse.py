"""Sparse, low-bit pseudo-gradients (``sparse``): per-block top-k, each kept value in 2 or 4 bits.

A codec of the SparseLoCo family, meant to run under :class:`~legion_swarm.codecs.topk.ErrorFeedback` (what it
does not send is carried to the next round). The input (``n`` float32 elements) is cut into blocks of ``block``
consecutive elements (default 4096), the last one possibly shorter. In every full block it keeps the
``k = ceil(density * block)`` entries of largest ``|x|`` (at least 1, ties broken by ``torch.topk``,
deterministically); a short last block of ``t`` elements keeps ``ceil(k * t / block)``, so the message layout is
a pure function of ``(n, block, k, bits)``. The kept set is exact: exactly those entries are nonzero after
decoding, and every other entry decodes to 0.

Kept values are quantised on a symmetric grid of ``2 m = 2**bits`` levels, the odd multiples of half a step,
scaled by the block's absmax ``M_b`` (the largest kept ``|x|``, hence the block's largest)::

    scale_b = M_b / m                                   (float32; m = 2 for bits=2, 8 for bits=4)
    code    = clamp(floor(x / scale_b), -m, m - 1) + m   in [0, 2m): the high bit is the sign
    x̂       = (code - m + 1/2) * scale_b                 in ±{1/2, 3/2, ..., m - 1/2} * scale_b

Declared bound, per element of block ``b``::

    kept:     |x - x̂| <= M_b * (1 / (2 m) + 2**-20) + 2**-140     (M_b / 4 for bits=2, M_b / 16 for bits=4)
    dropped:  |x - x̂| = |x|, and x̂ = 0 exactly

``1 / (2 m)`` is half a step; ``2**-20`` relative covers the float32 roundings of the scale and of the decoded
product (codes are computed in float64 from the float32 scale, so encoder and decoder agree on the step);
``2**-140`` covers scales in float32's subnormal range. An all-zero block has scale 0 and decodes to zeros.

Wire layout, for ``K = (n // block) * k + ceil(k * (n % block) / block)`` kept entries::

    int16[K]                 one word per kept entry, block by block: offset | code << (16 - bits)
    float32[ceil(n / block)] scales

Each word packs the entry's offset inside its block (the low ``16 - bits`` bits; strictly increasing within a
block) with its code (the high ``bits`` bits), as an unsigned 16-bit pattern read as int16. That is why
``block <= 2**(16 - bits)``: 16384 for bits=2, 4096 for bits=4. Deltas would be smaller only with a
variable-length code, which is neither simple nor vectorised; a separate code buffer would cost
``bits / 8`` bytes more per entry. **Bytes per kept entry: 2 + 4 / k** (the word plus the block's share of its
scale): 2.049 at the defaults (``k = 82``), for a ratio of ``4 block / (2 k + 4) = 97.5`` (fp32 top-k at the
same density sends 8 bytes per entry, ratio 25). At a block of 4096, bits=4 costs no more bytes than bits=2:
the word has 4 bits beside a 12-bit offset either way; bits=2 allows blocks up to 16384.

Every code is a level (there is no reserved pattern), so :meth:`SparseCodec.check` validates what can be
wrong: each offset within its block and strictly increasing there, and every scale finite and ``>= 0`` with
``scale * m`` finite (so the largest level decodes finite).

Speed: blocks are selected and quantised in chunks of about a million elements (whole blocks, one
``torch.topk`` per chunk along its rows), so the ``|x|`` temporary stays in cache; decoding touches only the
``K`` kept entries and zeroes the rest. Measured on one core at the defaults: encode ~0.35 GB/s of float32
(``torch.topk`` along the rows is ~85 % of it; ``topk``'s sampled selection does not apply to 4096-element
rows), decode ~13 GB/s.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch

from legion_swarm.codecs.base import (
    Codec,
    Encoded,
    check_finite_range,
    check_input,
    check_output,
    register,
    require,
)
from legion_swarm.codecs.quant import _segments
from legion_swarm.errors import ConfigError

FP32_MAX = float(torch.finfo(torch.float32).max)
BITS = (2, 4)
MIN_BLOCK = 8
DEFAULT_BLOCK = 4096
_REL = 2.0**-20
_FLOOR = 2.0**-140


def _max_block(bits: int) -> int:
    """Largest block for ``bits``: offsets take the other ``16 - bits`` bits of a word."""
    return 1 << (16 - bits)


def _kept_in(length: int, block: int, k: int) -> int:
    """Entries kept in a block of ``length`` elements (``k`` in a full one, proportionally fewer in the short tail)."""
    return k if length == block else -(-k * length // block)


@register
class SparseCodec(Codec):
    """Per-block top-k at ``density``, kept values on a ``2**bits``-level absmax grid: int16[K] words + float32 scales.

    ``|x - x̂| <= M_block * (1 / 2**bits + 2**-20) + 2**-140`` where kept, ``= |x|`` (decoded 0) where dropped.
    """

    name = "sparse"

    def __init__(self, density: float = 0.02, bits: int = 2, block: int = DEFAULT_BLOCK) -> None:
        if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
            raise ConfigError(f"sparse density must be in (0, 1], got {density!r}")
        if isinstance(bits, bool) or not isinstance(bits, int) or bits not in BITS:
            raise ConfigError(f"sparse bits must be 2 or 4, got {bits!r}")
        if isinstance(block, bool) or not isinstance(block, int):
            raise ConfigError(f"sparse block size must be an integer, got {block!r}")
        if not MIN_BLOCK <= block <= _max_block(bits) or block % 8:
            raise ConfigError(
                f"sparse block size must be a multiple of 8 in [{MIN_BLOCK}, {_max_block(bits)}] "
                f"for bits={bits}, got {block}"
            )
        self.density = float(density)
        self.bits = bits
        self.block = block
        self.k = min(block, max(1, math.ceil(self.density * block)))
        """Entries kept per full block."""

    @property
    def levels(self) -> int:
        """``m``: levels on each side of zero."""
        return 1 << (self.bits - 1)

    @property
    def ratio(self) -> float:
        return 4 * self.block / (2 * self.k + 4)

    @property
    def bytes_per_entry(self) -> float:
        """Payload bytes per kept entry: its int16 word plus its share of the block's float32 scale."""
        return 2 + 4 / self.k

    @classmethod
    def from_params(cls, params: Mapping[str, int]) -> Codec:
        if set(params) != {"block", "k", "bits"}:
            raise ConfigError(f"sparse takes exactly the parameters 'block', 'k' and 'bits', got {sorted(params)}")
        block, k, bits = params["block"], params["k"], params["bits"]
        if bits not in BITS or not MIN_BLOCK <= block <= _max_block(bits) or block % 8 or not 1 <= k <= block:
            raise ConfigError(
                "sparse needs bits in (2, 4), block a multiple of 8 in [8, 2**(16 - bits)] and k in [1, block], "
                f"got {dict(params)}"
            )
        # density only matters to encode; a decoder reads k from the message.
        return cls(density=k / block, bits=bits, block=block)

    @classmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        block, k = params["block"], params["k"]
        full, tail = divmod(numel, block)
        entries = full * k + (_kept_in(tail, block, k) if tail else 0)
        return [("int16", entries), ("float32", -(-numel // block))]

    def _blocks(self, x: torch.Tensor) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """``(start, offsets, kept, absmax)`` per chunk of whole blocks (then the short tail) of finite ``x``:
        offsets (rows, k) int64 sorted within each row, the kept values (rows, k) and each row's absmax (rows,)."""
        for start, rows, length in _segments(x.numel(), self.block):
            x2 = x[start : start + rows * length].view(rows, length)
            k = _kept_in(length, self.block, self.k)
            if k == length:
                offsets = torch.arange(length, device=x.device).expand(rows, length)
            else:
                offsets = torch.topk(x2.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values
            kept = x2.gather(1, offsets)
            absmax = kept.abs().amax(dim=1)  # the top-k holds the block's largest |x|
            yield start, offsets, kept, absmax

    def encode(self, x: torch.Tensor) -> Encoded:
        x = check_input(x)
        check_finite_range(x, FP32_MAX, self.name)
        m, shift = self.levels, 16 - self.bits
        words, scales = [], []
        for _, offsets, kept, absmax in self._blocks(x):
            scale = absmax / m  # exact for normal absmax (m is a power of two)
            step = scale.double()
            inverse = torch.where(step > 0, 1 / step, 0.0).unsqueeze(1)  # an all-zero block: every code decodes to 0
            codes = (kept.double() * inverse).floor_().clamp_(-m, m - 1).add_(m).long()
            words.append((offsets | (codes << shift)).view(-1))
            scales.append(scale)
        word = torch.cat(words) if words else torch.empty(0, dtype=torch.long, device=x.device)
        # The unsigned 16-bit pattern as int16 (two's complement), without relying on a wrapping cast.
        word = torch.where(word >= 1 << 15, word - (1 << 16), word).to(torch.int16)
        scale = torch.cat(scales) if scales else torch.empty(0, dtype=torch.float32, device=x.device)
        params = {"block": self.block, "k": self.k, "bits": self.bits}
        return Encoded(codec=self.name, numel=x.numel(), params=params, buffers=(word, scale))

    @staticmethod
    def _entries(enc: Encoded) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each kept entry's block (int64), offset in it (int64) and code (int64), from the words."""
        words = enc.buffers[0]
        shift = 16 - enc.params["bits"]
        unsigned = words.to(torch.int64).bitwise_and_(0xFFFF)
        blocks = torch.arange(words.numel(), device=words.device).div_(enc.params["k"], rounding_mode="floor")
        return blocks, unsigned & ((1 << shift) - 1), unsigned >> shift

    def _sparse(self, enc: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
        """Global indices (int64, strictly increasing) and decoded float32 values of the kept entries."""
        scales = enc.buffers[1]
        blocks, offsets, codes = self._entries(enc)
        m = 1 << (enc.params["bits"] - 1)
        values = codes.to(torch.float32).sub_(m - 0.5).mul_(scales.index_select(0, blocks))
        return blocks.mul_(enc.params["block"]).add_(offsets), values

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        out = check_output(out, enc.numel, enc.buffers[1].device).zero_()
        index, values = self._sparse(enc)
        out.index_copy_(0, index, values)
        return out

    def subtract_decoded_(self, y: torch.Tensor, enc: Encoded, scratch: torch.Tensor | None = None) -> None:
        # Only the K kept entries change: no dense decode.
        index, values = self._sparse(enc)
        y.index_add_(0, index, values, alpha=-1)

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x)
        bound = x.abs()
        for start, offsets, _, absmax in self._blocks(x):
            rows, length = offsets.shape[0], min(self.block, x.numel() - start)
            limit = (absmax * (0.5 / self.levels + _REL) + _FLOOR).unsqueeze(1).expand_as(offsets)
            bound[start : start + rows * length].view(rows, length).scatter_(1, offsets, limit)
        return bound

    @classmethod
    def check(cls, enc: Encoded) -> None:
        words, scales = enc.buffers
        m = 1 << (enc.params["bits"] - 1)
        if scales.numel():
            require(bool(torch.isfinite(scales * m).all()), "sparse scales must be finite")
            require(float(scales.min()) >= 0, "sparse scales must be >= 0")
        if words.numel():
            blocks, offsets, _ = cls._entries(enc)
            block = enc.params["block"]
            index = blocks * block + offsets
            # Each offset inside its own block (the last one may be short): then increasing indices are
            # exactly offsets strictly increasing within every block.
            end = (blocks + 1).mul_(block).clamp_max_(enc.numel)
            require(bool((index < end).all()), "sparse offsets must lie within their block")
            require(bool((index[1:] > index[:-1]).all()), "sparse offsets must be strictly increasing within a block")


__all__ = ["SparseCodec"]
