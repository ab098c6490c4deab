"""Codec interface, the :class:`Encoded` container, its wire format, and the codec registry.

A codec turns a 1-D float32 tensor (a shard chunk, ``n`` elements) into an :class:`Encoded`: a few
named integer parameters plus a fixed list of 1-D typed buffers whose dtypes and lengths are a pure
function of ``(n, params)`` (:meth:`Codec.layout`). That function is what makes the wire format
checkable: a receiver recomputes the layout from the header and refuses anything else.

Wire format, version 1 — a msgpack header plus the raw buffers, in order, sent as separate frames::

    {"v": 1, "codec": "int8", "numel": n, "params": {"block": 256},
     "buffers": [["int8", n], ["float32", ceil(n / 256)]]}

Buffers are little-endian (checked at import). :func:`from_wire` validates every field and the buffer
contents (:meth:`Codec.check`), so that anything it returns decodes to exactly ``numel`` finite
float32 values; any malformed message raises :class:`CodecError`, never another exception.

Zero-copy: :func:`to_wire` returns memoryviews of the encoded tensors' storage; :func:`from_wire` wraps
received buffers without copying when they are writable (``bytearray``, writable ``memoryview``) and
aligned to the dtype's item size. Read-only (``bytes``) or misaligned buffers are copied once, because
torch cannot safely view read-only memory and unaligned element access is undefined behaviour for
its vectorised kernels. Receivers that care read into preallocated ``bytearray`` s. A zero-copy
:class:`Encoded` (and the ``none`` codec's decoded tensor) views those buffers: do not reuse them while
the result is in use.
"""

from __future__ import annotations

import logging
import math
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import msgpack
import numpy as np
import torch

from legion_swarm.errors import CodecError, ConfigError

logger = logging.getLogger(__name__)

WIRE_VERSION = 1
MAX_HEADER_BYTES = 4096
"""A longer header is refused before parsing (a real one is ~100 bytes)."""
MAX_NUMEL = 1 << 40
"""Largest element count a header may declare (4 TiB of float32): keeps all size arithmetic sane."""

if sys.byteorder != "little":  # pragma: no cover - every platform we run on is little-endian
    raise ImportError("legion_swarm.codecs assumes a little-endian host (buffers are sent as in memory)")


_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    # name on the wire -> (torch dtype, numpy dtype used to read the raw bytes)
    "float32": (torch.float32, np.dtype("<f4")),
    "float16": (torch.float16, np.dtype("<f2")),
    "bfloat16": (torch.bfloat16, np.dtype("<i2")),  # numpy has no bfloat16: read as int16, view in torch
    "int8": (torch.int8, np.dtype("i1")),
    "uint8": (torch.uint8, np.dtype("u1")),
    "int16": (torch.int16, np.dtype("<i2")),
    "int32": (torch.int32, np.dtype("<i4")),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


@dataclass(frozen=True, eq=False)
class Encoded:
    """A compressed 1-D float32 tensor of ``numel`` elements.

    ``params`` are the small integers the decoder needs (block size, k, ...); ``buffers`` are 1-D
    contiguous tensors in the order and with the dtypes/lengths given by the codec's :meth:`Codec.layout`.
    Buffers never alias the encoder's input, except for the lossless ``none`` codec.
    """

    codec: str
    numel: int
    params: Mapping[str, int]
    buffers: tuple[torch.Tensor, ...]

    @property
    def nbytes(self) -> int:
        """Payload bytes on the wire (buffers only; the header adds ~100 bytes)."""
        return sum(b.numel() * b.element_size() for b in self.buffers)


class Codec(ABC):
    """A lossy or lossless map between 1-D float32 tensors and :class:`Encoded`.

    Subclasses set ``name`` and ``ratio`` and implement :meth:`encode`, :meth:`decode`,
    :meth:`error_bound`, :meth:`layout` and (for content checks) :meth:`check`.
    ``decode`` reads every parameter it needs from the :class:`Encoded`, so any instance of a codec
    class decodes anything a peer with different options encoded.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    """True only when ``decode(encode(x))`` equals ``x`` exactly: error feedback then keeps no residual."""

    @property
    @abstractmethod
    def ratio(self) -> float:
        """Declared compression ratio: fp32 bytes / payload bytes, for large tensors."""

    @abstractmethod
    def encode(self, x: torch.Tensor) -> Encoded:
        """Compress ``x`` (1-D float32, finite). Raises :class:`CodecError` on non-finite or unrepresentable input."""

    @abstractmethod
    def decode(self, enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
        """Reconstruct ``enc.numel`` float32 values (1-D).

        Without ``out`` the result is a new tensor, or for ``none`` a view of ``enc``'s buffer. With
        ``out`` (1-D contiguous float32 of ``enc.numel`` elements, see :func:`check_output`) the values
        are written there and ``out`` is returned: a receiver reusing one buffer per round avoids
        allocating (and page-faulting) ``4 * numel`` fresh bytes per message.
        """

    @abstractmethod
    def error_bound(self, x: torch.Tensor) -> torch.Tensor:
        """Per-element bound on ``|x - decode(encode(x))|`` (float32, shape of ``x``) — the declared guarantee."""

    @classmethod
    @abstractmethod
    def from_params(cls, params: Mapping[str, int]) -> Codec:
        """The codec instance described by a header's ``params``; ConfigError if they are not sane."""

    @classmethod
    @abstractmethod
    def layout(cls, numel: int, params: Mapping[str, int]) -> list[tuple[str, int]]:
        """Expected ``(dtype name, length)`` of each buffer for ``numel`` elements and ``params``."""

    @classmethod
    @abstractmethod
    def check(cls, enc: Encoded) -> None:
        """Validate buffer *contents* of a received message (layout is already checked); CodecError if bad."""

    def subtract_decoded_(self, y: torch.Tensor, enc: Encoded, scratch: torch.Tensor | None = None) -> None:
        """``y -= decode(enc)`` in place (error feedback's residual update); codecs may do it sparsely.
        ``scratch``: a float32 buffer of ``y``'s size the decoded values may go through."""
        y.sub_(self.decode(enc, out=scratch))

    def max_abs_error(self, x: torch.Tensor) -> float:
        """The largest per-element bound for ``x`` (0.0 for an empty tensor)."""
        bound = self.error_bound(check_input(x))
        return float(bound.max()) if bound.numel() else 0.0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"


_REGISTRY: dict[str, type[Codec]] = {}


def register(cls: type[Codec]) -> type[Codec]:
    """Class decorator: make a codec available to :func:`get_codec` and :func:`from_wire` by its name."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"codec name {cls.name!r} registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def available_codecs() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_codec(name: str, **opts: Any) -> Codec:
    """The codec called ``name`` built with ``opts`` (e.g. ``get_codec("int8", block=256)``).

    Raises :class:`ConfigError` for an unknown name or bad options.
    """
    cls = _REGISTRY.get(name)
    if cls is None:
        raise ConfigError(f"unknown codec {name!r}; available: {', '.join(available_codecs())}")
    try:
        return cls(**opts)
    except TypeError as e:
        raise ConfigError(f"bad options for codec {name!r}: {e}") from None


def decode(enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode with whichever registered codec produced ``enc`` (``out`` as in :meth:`Codec.decode`)."""
    cls = _REGISTRY.get(enc.codec)
    if cls is None:
        raise CodecError(f"unknown codec {enc.codec!r}")
    return cls.from_params(enc.params).decode(enc, out)


def check_output(out: torch.Tensor | None, numel: int, device: torch.device) -> torch.Tensor:
    """``out`` checked to be a 1-D contiguous float32 tensor of ``numel`` elements, or a new empty one."""
    if out is None:
        return torch.empty(numel, dtype=torch.float32, device=device)
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != numel or not out.is_contiguous():
        raise CodecError(
            f"decode output must be contiguous 1-D float32 of {numel} elements, got {out.dtype} {tuple(out.shape)}"
        )
    return out


def check_input(x: torch.Tensor) -> torch.Tensor:
    """Return ``x`` as a contiguous 1-D float32 tensor, or raise :class:`CodecError`."""
    if not isinstance(x, torch.Tensor):
        raise CodecError(f"codecs take a torch.Tensor, got {type(x).__name__}")
    if x.dtype != torch.float32:
        raise CodecError(f"codecs take float32 tensors, got {x.dtype}")
    if x.dim() != 1:
        raise CodecError(f"codecs take 1-D tensors (flatten first), got shape {tuple(x.shape)}")
    if x.numel() > MAX_NUMEL:
        raise CodecError(f"tensor of {x.numel()} elements exceeds {MAX_NUMEL}")
    return x.detach().contiguous()


# dtypes numpy reduces with SIMD; float16 it reduces in software (slower than torch), bfloat16 it lacks.
_NUMPY_REDUCIBLE = (torch.float32, torch.int8, torch.uint8, torch.int16, torch.int32)


def min_max(x: torch.Tensor) -> tuple[float, float]:
    """Smallest and largest element of a non-empty tensor; NaN if it holds a NaN (both propagate it).

    On CPU through numpy: single-threaded, ~30 GB/s. ``torch.aminmax`` may wake OpenMP threads, and with
    more busy processes than cores each such call costs a scheduler time slice (measured: 4 s instead of
    0.6 s for a 4-process all-reduce)."""
    if x.device.type == "cpu" and x.dtype in _NUMPY_REDUCIBLE:
        values = x.detach().numpy()
        return float(values.min()), float(values.max())
    lo, hi = torch.aminmax(x)
    return float(lo), float(hi)


def minimum(x: torch.Tensor) -> float:
    """Smallest element of a non-empty tensor (one pass where :func:`min_max` makes two)."""
    if x.device.type == "cpu" and x.dtype in _NUMPY_REDUCIBLE:
        return float(x.detach().numpy().min())
    return float(x.min())


def sum_of_squares(x: torch.Tensor) -> float:
    """``x · x`` of a contiguous 1-D float32 tensor, accumulated in float32: one pass.

    It is finite only if every element is: a NaN or an infinity makes it NaN or infinite, and squares are never
    negative, so nothing cancels. And it bounds every element: accumulating non-negative terms never rounds below
    one of them, so ``x_i ** 2 <= sum * (1 + 2**-23)``. BLAS ``sdot`` (single-threaded in numpy's OpenBLAS)
    reads ~1.5x as fast as :func:`min_max`'s two passes (measured: 17 against 12 GB/s from memory)."""
    if x.device.type == "cpu":
        values = x.detach().numpy()
        with np.errstate(over="ignore", invalid="ignore"):  # inf / NaN is the answer, not an accident
            return float(np.dot(values, values))
    return float(torch.dot(x, x))


_SQUARE_MARGIN = 1 - 2.0**-20  # below the accumulated rounding of sum_of_squares' bound on one element
_EXPONENT_MASKS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def all_finite_16bit(x: torch.Tensor) -> bool:
    """True unless a float16 / bfloat16 tensor holds an infinity or NaN (all exponent bits set).

    Integer work on the bit patterns: numpy's float16 reductions are done in software (~0.15 GB/s)."""
    bits = x.detach().contiguous().view(torch.int16).numpy()
    mask = _EXPONENT_MASKS[x.dtype]
    return bits.size == 0 or int(np.bitwise_and(bits, mask).max()) != mask


def check_finite_range(x: torch.Tensor, limit: float, what: str) -> None:
    """Raise :class:`CodecError` unless every element of 1-D float32 ``x`` is finite with ``|x| <= limit``.

    One pass (:func:`sum_of_squares`) decides when no element comes near ``limit``; otherwise min and max do,
    and name the offending value."""
    if x.numel() == 0 or sum_of_squares(x) <= limit * limit * _SQUARE_MARGIN:
        return
    lo, hi = min_max(x)
    if math.isnan(lo) or math.isnan(hi):
        raise CodecError(f"cannot encode {what}: tensor contains NaN")
    if not (-limit <= lo and hi <= limit):
        worst = hi if abs(hi) > abs(lo) else lo
        if math.isinf(worst):
            raise CodecError(f"cannot encode {what}: tensor contains {worst}")
        raise CodecError(f"cannot encode {what}: value {worst:.6g} is outside the representable range ±{limit:.6g}")


def all_finite(x: torch.Tensor) -> bool:
    """True unless 1-D float32 ``x`` holds a NaN or an infinity; one pass unless its squares overflow."""
    if x.numel() == 0 or math.isfinite(sum_of_squares(x)):
        return True
    lo, hi = min_max(x)  # |x| > ~1.8e19 somewhere: exact
    return math.isfinite(lo) and math.isfinite(hi)


def to_wire(enc: Encoded) -> tuple[bytes, list[memoryview]]:
    """Serialise ``enc`` into a msgpack header and its raw buffers (memoryviews of the tensors, no copy)."""
    header = {
        "v": WIRE_VERSION,
        "codec": enc.codec,
        "numel": enc.numel,
        "params": dict(enc.params),
        "buffers": [[_DTYPE_NAMES[b.dtype], b.numel()] for b in enc.buffers],
    }
    views = []
    for b in enc.buffers:
        b = b.detach().cpu().contiguous()
        if b.dtype == torch.bfloat16:
            b = b.view(torch.int16)
        views.append(memoryview(b.numpy()).cast("B"))
    return msgpack.packb(header), views


def from_wire(header: bytes, buffers: Sequence[bytes | bytearray | memoryview], *, numel: int | None = None) -> Encoded:
    """Parse and fully validate a wire message; raise :class:`CodecError` if anything is off.

    ``numel``: the element count the receiver expects (it knows the shard size). Pass it: a sparse
    (``topk``) message is small whatever ``numel`` it declares, and decoding allocates ``numel`` floats.
    """
    try:
        return _from_wire(header, buffers, numel)
    except CodecError:
        raise
    except Exception as e:  # a bug in a check must still not leak an unexpected exception type
        logger.debug("wire message rejected by an unexpected %s", type(e).__name__, exc_info=True)
        raise CodecError(f"malformed codec message ({type(e).__name__}: {e})") from None


def wire_layout(header: bytes, *, numel: int) -> tuple[str, list[tuple[str, int]]]:
    """Validate a wire header alone; return the codec name and the buffers (dtype, length) that must follow.

    A receiver calls this before reading any buffer, so that it allocates exactly what a valid message
    of ``numel`` elements needs and nothing a peer merely claims."""
    try:
        cls, _, _, expected = _parse_header(header, numel)
    except CodecError:
        raise
    except Exception as e:
        raise CodecError(f"malformed codec header ({type(e).__name__}: {e})") from None
    return cls.name, expected


def _parse_header(
    header: bytes, expected_numel: int | None
) -> tuple[type[Codec], int, dict[str, int], list[tuple[str, int]]]:
    if not isinstance(header, (bytes, bytearray, memoryview)):
        raise CodecError(f"header must be bytes, got {type(header).__name__}")
    if len(header) > MAX_HEADER_BYTES:
        raise CodecError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        fields = msgpack.unpackb(header, strict_map_key=True)
    except Exception as e:
        raise CodecError(f"undecodable codec header: {e}") from None
    if not isinstance(fields, dict) or set(fields) != {"v", "codec", "numel", "params", "buffers"}:
        raise CodecError("codec header must be a map with exactly v, codec, numel, params, buffers")
    version = fields["v"]
    if type(version) is not int or version != WIRE_VERSION:
        raise CodecError(f"unsupported codec wire version {version!r} (this peer speaks {WIRE_VERSION})")
    name = fields["codec"]
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise CodecError(f"unknown codec {name!r}")
    numel = fields["numel"]
    if type(numel) is not int or not 0 <= numel <= MAX_NUMEL:
        raise CodecError(f"bad numel {numel!r}")
    if expected_numel is not None and numel != expected_numel:
        raise CodecError(f"message carries {numel} elements, expected {expected_numel}")
    params = fields["params"]
    if not isinstance(params, dict) or not all(isinstance(k, str) and type(v) is int for k, v in params.items()):
        raise CodecError(f"codec params must map names to integers, got {params!r}")
    try:
        cls.from_params(params)
    except ConfigError as e:
        raise CodecError(f"bad {name} params {params!r}: {e}") from None
    try:
        expected = cls.layout(numel, params)
    except ConfigError as e:
        raise CodecError(f"bad {name} params {params!r} for {numel} elements: {e}") from None
    # Defense in depth: no codec needs more than 8 bytes per element (top-k: int32 index + float32 value),
    # and a receiver allocates what the layout says before it reads a byte.
    wire_bytes = sum(length * _DTYPES[dtype][1].itemsize for dtype, length in expected)
    if wire_bytes > 8 * numel + 4096:
        raise CodecError(f"{name} message of {numel} elements would carry {wire_bytes} bytes")
    declared = fields["buffers"]
    if not isinstance(declared, list) or [_as_pair(d) for d in declared] != [list(e) for e in expected]:
        raise CodecError(f"{name} message of {numel} elements must carry buffers {expected}, header says {declared!r}")
    return cls, numel, dict(params), expected


def _from_wire(header: bytes, buffers: Sequence[bytes | bytearray | memoryview], expected_numel: int | None) -> Encoded:
    cls, numel, params, expected = _parse_header(header, expected_numel)
    if not isinstance(buffers, (list, tuple)):
        raise CodecError(f"buffers must be a list of bytes-like objects, got {type(buffers).__name__}")
    if len(buffers) != len(expected):
        raise CodecError(f"{cls.name} message needs {len(expected)} buffers, got {len(buffers)}")
    tensors = tuple(_wrap(buf, dtype, length) for buf, (dtype, length) in zip(buffers, expected, strict=True))
    enc = Encoded(codec=cls.name, numel=numel, params=params, buffers=tensors)
    cls.check(enc)
    return enc


def wire_buffer(dtype: str, length: int) -> np.ndarray:
    """An uninitialised array to receive a wire buffer of ``length`` elements of ``dtype`` (from a layout)."""
    return np.empty(length, dtype=_DTYPES[dtype][1])


def _as_pair(item: object) -> object:
    # msgpack gives lists; anything else (tuple-like garbage, maps) must simply fail the comparison.
    return item if isinstance(item, list) else None


def _wrap(buf: object, dtype: str, length: int) -> torch.Tensor:
    """View ``buf`` as ``length`` elements of ``dtype`` (zero-copy when writable and aligned)."""
    try:
        view = memoryview(buf)  # type: ignore[arg-type]
    except TypeError:
        raise CodecError(f"buffer must be bytes-like, got {type(buf).__name__}") from None
    torch_dtype, np_dtype = _DTYPES[dtype]
    if view.nbytes != length * np_dtype.itemsize:
        raise CodecError(f"buffer of {view.nbytes} bytes, expected {length} x {dtype} = {length * np_dtype.itemsize}")
    if length == 0:
        return torch.empty(0, dtype=torch_dtype)
    if not view.c_contiguous:
        raise CodecError("buffer must be contiguous")
    array = np.frombuffer(view.cast("B") if view.format != "B" or view.ndim != 1 else view, dtype=np_dtype)
    if not (array.flags.writeable and array.flags.aligned):
        array = array.copy()
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if torch_dtype == torch.bfloat16 else tensor


def require(condition: bool, message: str) -> None:
    """Raise :class:`CodecError` with ``message`` unless ``condition`` — for :meth:`Codec.check`."""
    if not condition:
        raise CodecError(message)
