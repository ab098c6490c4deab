"""Blockwise absmax quantisation: ``int8`` (levels -127..127) and ``int4`` (levels -7..7).

The input (``n`` float32 elements) is cut into blocks of ``block`` consecutive elements (a multiple
of 8 in [8, 2**20]), the last one possibly shorter. Per block ``b``: ``scale_b = absmax_b / Q`` (float32) and
``q_i = round_half_even(x_i * Q / absmax_b)``, so ``|q_i| <= Q``; decoding is ``x̂_i = q_i * scale_b``
in float32. Declared bound, per element of block ``b``::

    |x_i - x̂_i| <= absmax_b * (1 / (2 Q) + 2**-20) + 2**-140

``1 / (2 Q)`` is the rounding step (``absmax/254`` for int8, ``absmax/14`` for int4); ``2**-20``
relative covers the float32 roundings of the reciprocal, the product and the scale (a few ulps);
``2**-140`` covers scales that fall into float32's subnormal range. An all-zero block has scale 0 and
decodes to exact zeros.

Why float32 scales: gradients span far more than fp16's range (absmax below 6e-8 would underflow
to 0 or to a subnormal with a few bits, breaking the bound), and at the default block of 256 the
scales cost 4 / 256 = 1.6 % of the int8 payload. Blocks whose absmax is below ``2**-120`` (where
``Q / absmax`` overflows float32) take a float64 path; they are rare and handled as one batch.

Payload per element: 1 byte (int8) or 1/2 byte (int4, two codes per byte, low nibble first, code =
``q + 8`` in 1..15, a pad nibble of 8 when ``n`` is odd), plus ``4 / block`` bytes of scale.
Declared ratios at the defaults: int8 ``4 / (1 + 4/256) = 3.94``, int4 ``4 / (0.5 + 4/128) = 7.53``.
int4's smaller default block keeps its coarser step (``absmax/14``) local to fewer elements.

Speed: work proceeds in chunks of about a million elements (whole blocks, all blocks of a chunk in
one vectorised op each) through a reused float32 buffer, so temporaries stay in cache instead of
costing a full-size allocation (page faults) and extra DRAM passes.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterator, Mapping
from typing import ClassVar

import torch

from legion_swarm.codecs.base import (
    Codec,
    CodecError,
    Encoded,
    check_input,
    check_output,
    minimum,
    register,
    require,
)
from legion_swarm.errors import ConfigError

MIN_BLOCK = 8
MAX_BLOCK = 1 << 20
_TINY = 2.0**-120
"""Below this absmax, ``Q / absmax`` would overflow float32: such blocks are quantised in float64."""
_REL = 2.0**-20
_FLOOR = 2.0**-140
CHUNK_ELEMENTS = 1 << 20
"""Elements processed per vectorised step (4 MiB of float32 working buffer: fits in L2/L3)."""


def _segments(n: int, block: int) -> Iterator[tuple[int, int, int]]:
    """``(start, rows, row_length)`` pieces covering ``n`` elements: chunks of whole blocks, then the short tail.

    Chunks hold about :data:`CHUNK_ELEMENTS` elements so that the float32 working buffer stays in cache
    and is reused: one temporary of the input's size would cost a page fault per 4 KiB and a trip to
    DRAM per pass. Each chunk is still processed with vectorised ops over all its blocks at once.
    """
    full = n // block
    step = max(1, CHUNK_ELEMENTS // block)
    for first in range(0, full, step):
        rows = min(step, full - first)
        yield first * block, rows, block
    if n - full * block:
        yield full * block, 1, n - full * block


class _BlockQuant(Codec):
    """Shared body of ``int8`` and ``int4``: ``Q`` levels each side of zero, float32 scale per block."""

    qmax: ClassVar[int]
    bytes_per_element: ClassVar[float]
    default_block: ClassVar[int]

    def __init__(self, block: int | None = None) -> None:
        block = self.default_block if block is None else block
        try:
            if isinstance(block, bool):
                raise TypeError
            block = operator.index(block)
        except TypeError:
            raise ConfigError(f"{self.name} block size must be an integer, got {block!r}") from None
        if not MIN_BLOCK <= block <= MAX_BLOCK or block % 8:
            raise ConfigError(
                f"{self.name} block size must be a multiple of 8 in [{MIN_BLOCK}, {MAX_BLOCK}], got {block}"
            )
        self.block = block

    @property
    def ratio(self) -> float:
        return 4 / (self.bytes_per_element + 4 / self.block)

    @classmethod
    def from_params(cls, params: Mapping[str, int]) -> Codec:
        if set(params) != {"block"}:
            raise ConfigError(f"{cls.name} takes exactly the parameter 'block', got {sorted(params)}")
        return cls(block=params["block"])

    def _quantize(self, x: torch.Tensor, store: Callable[[torch.Tensor, int], None]) -> torch.Tensor:
        """Quantise ``x`` chunk by chunk and return the float32 scales (``ceil(n / block)``).

        Each chunk's codes (1-D float32 holding integers in [-Q, Q]; a reused buffer) go to
        ``store(codes, start)``, which writes them to the output at element offset ``start``.
        """
        n, qmax, block = x.numel(), self.qmax, self.block
        scales = torch.empty(-(-n // block), dtype=torch.float32, device=x.device)
        work = torch.empty(min(n, max(block, CHUNK_ELEMENTS // block * block)), device=x.device)
        for start, rows, length in _segments(n, block):
            x2 = x[start : start + rows * length].view(rows, length)
            codes = work[: rows * length].view(rows, length)
            # amax and amin are one streaming pass each with no temporary; abs().amax() would write a copy.
            absmax = torch.maximum(x2.amax(dim=1), x2.amin(dim=1).neg_())
            chunk_scales = scales[start // block : start // block + rows]
            torch.div(absmax, qmax, out=chunk_scales)
            # NaN/inf anywhere in a block shows up in its absmax; scale * Q must also stay finite to decode.
            if not bool(torch.isfinite(chunk_scales * qmax).all()):
                bad = "NaN or infinity" if not bool(torch.isfinite(absmax).all()) else "values too close to float32 max"
                raise CodecError(f"cannot encode {self.name}: tensor contains {bad}")
            tiny = absmax < _TINY
            inv = torch.where(tiny, 0.0, qmax / absmax)  # tiny (incl. all-zero) blocks get codes 0 here...
            torch.mul(x2, inv.unsqueeze(1), out=codes).round_()
            rare = torch.nonzero(tiny & (absmax > 0)).squeeze(1)
            if rare.numel():  # ...and the non-zero ones among them are redone in float64
                wide = x2.index_select(0, rare).double() * (qmax / absmax.index_select(0, rare).double()).unsqueeze(1)
                codes.index_copy_(0, rare, wide.round_().float())
            store(codes.view(-1), start)
        return scales

    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        x = check_input(x)
        bound = torch.empty_like(x)
        for start, rows, length in _segments(x.numel(), self.block):
            x2 = x[start : start + rows * length].view(rows, length)
            absmax = x2.abs().amax(dim=1, keepdim=True)
            limit = absmax * (0.5 / self.qmax + _REL) + _FLOOR
            bound[start : start + rows * length].view(rows, length).copy_(limit.expand(rows, length))
        return bound

    @classmethod
    def _check_scales(cls, scales: torch.Tensor) -> None:
        if scales.numel():
            require(bool(torch.isfinite(scales * cls.qmax).all()), f"{cls.name} scales must be finite")
            require(float(scales.min()) >= 0, f"{cls.name} scales must be >= 0")


def _dequantize_into(target: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, first_block: int) -> None:
    """``target[r] = codes[r] * scales[first_block + r]`` for (rows, block) views, ``target`` float32.

    An exact integer -> float32 cast, then one float32 multiply: the rounding of a mixed-dtype mul, which
    takes torch's slow casting path (4x slower on one thread)."""
    rows = target.shape[0]
    target.copy_(codes).mul_(scales[first_block : first_block + rows].unsqueeze(1))


@register
class Int8Codec(_BlockQuant):
    """Blockwise absmax int8: ``|x - x̂| <= absmax_block * (1/254 + 2**-20) + 2**-140``.

    Buffers: int8[n] codes, float32[ceil(n / block)] scales. Default block 256.
    """

    name = "int8"
    qmax = 127
    bytes_per_element = 1.0
    default_block = 256

    @classmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        return [("int8", numel), ("float32", -(-numel // params["block"]))]

    def encode(self, x: torch.Tensor) -> Encoded:
        x = check_input(x)
        q = torch.empty(x.numel(), dtype=torch.int8, device=x.device)
        scales = self._quantize(x, lambda codes, start: q[start : start + codes.numel()].copy_(codes))
        return Encoded(codec=self.name, numel=x.numel(), params={"block": self.block}, buffers=(q, scales))

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        q, scales = enc.buffers
        n, block = enc.numel, enc.params["block"]
        out = check_output(out, n, q.device)
        for start, rows, length in _segments(n, block):
            codes = q[start : start + rows * length].view(rows, length)
            _dequantize_into(out[start : start + rows * length].view(rows, length), codes, scales, start // block)
        return out

    @classmethod
    def check(cls, enc: Encoded) -> None:
        q, scales = enc.buffers
        cls._check_scales(scales)
        # -128 is outside the symmetric code range the encoder produces.
        require(q.numel() == 0 or minimum(q) >= -cls.qmax, "int8 codes must be in [-127, 127]")


@register
class Int4Codec(_BlockQuant):
    """Blockwise absmax int4: ``|x - x̂| <= absmax_block * (1/14 + 2**-20) + 2**-140``.

    Buffers: uint8[ceil(n / 2)] packed codes, float32[ceil(n / block)] scales. Default block 128.
    """

    name = "int4"
    qmax = 7
    bytes_per_element = 0.5
    default_block = 128

    @classmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        return [("uint8", -(-numel // 2)), ("float32", -(-numel // params["block"]))]

    def encode(self, x: torch.Tensor) -> Encoded:
        x = check_input(x)
        n = x.numel()
        packed = torch.empty(-(-n // 2), dtype=torch.uint8, device=x.device)

        def store(codes: torch.Tensor, start: int) -> None:
            # codes + 8 in [1, 15]; byte = low code | high code << 4, computed exactly in float32.
            m = codes.numel()
            even = codes[: m - (m & 1)].view(-1, 2)
            out = packed[start // 2 : start // 2 + even.shape[0]]
            out.copy_(torch.add(even[:, 0], even[:, 1], alpha=16).add_(8 + 16 * 8))
            if m & 1:  # only the last chunk can be odd: its final byte holds the code and the pad nibble 8
                packed[-1] = int(codes[-1]) + 8 + 16 * 8

        scales = self._quantize(x, store)
        return Encoded(codec=self.name, numel=n, params={"block": self.block}, buffers=(packed, scales))

    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        packed, scales = enc.buffers
        n, block = enc.numel, enc.params["block"]
        out = check_output(out, n, packed.device)
        # Unpack in int16 lanes, one per byte: (b & 15) | (b << 4 & 0x0F00) is, read as two little-endian
        # int8, the pair (low code, high code). Contiguous int16 ops run ~6x faster than strided int8 writes.
        size = min(packed.numel(), CHUNK_ELEMENTS // 2 + 1)
        lanes = torch.empty(size, dtype=torch.int16, device=packed.device)
        high = torch.empty(size, dtype=torch.int16, device=packed.device)
        for start, rows, length in _segments(n, block):
            m = rows * length
            chunk = packed[start // 2 : start // 2 + -(-m // 2)]
            v, h = lanes[: chunk.numel()], high[: chunk.numel()]
            v.copy_(chunk)
            torch.bitwise_left_shift(v, 4, out=h).bitwise_and_(0x0F00)
            v.bitwise_and_(15).bitwise_or_(h)
            codes = v.view(torch.int8)[:m].sub_(8).view(rows, length)
            _dequantize_into(out[start : start + m].view(rows, length), codes, scales, start // block)
        return out

    @classmethod
    def check(cls, enc: Encoded) -> None:
        packed, scales = enc.buffers
        cls._check_scales(scales)
        if packed.numel():
            # Code 0 (= -8) is never produced; an odd numel's pad nibble must be the zero code 8.
            require(minimum(packed & 15) >= 1 and minimum(packed) >= 16, "int4 codes must be in [1, 15]")
            if enc.numel & 1:
                require(int(packed[-1]) >> 4 == 8, "int4 pad nibble must be 8")


__all__ = ["Int4Codec", "Int8Codec"]
