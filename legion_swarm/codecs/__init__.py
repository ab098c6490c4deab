"""Tensor codecs: pure, synchronous maps between 1-D float32 shard chunks and compact wire messages.

::

    codec = get_codec("int8", block=256)          # none | fp16 | bf16 | int8 | int4 | topk | sparse
    enc = codec.encode(chunk)                     # Encoded(codec, numel, params, buffers)
    header, buffers = to_wire(enc)                # msgpack bytes + memoryviews (no copy)
    received = from_wire(header, buffers)         # fully validated, or CodecError
    values = decode(received)                     # float32, len == numel

    ef = ErrorFeedback(get_codec("topk", fraction=0.01))
    enc = ef.encode(chunk, key=(shard, peer))     # adds / updates the residual for that key
    ef = ErrorFeedback(get_codec("sparse", density=0.02, bits=2))   # per-block top-k, 2-bit values

Modules: :mod:`.base` (interface, Encoded, wire format, registry), :mod:`.float` (none, fp16, bf16),
:mod:`.quant` (int8, int4 blockwise), :mod:`.topk` (top-k and error feedback), :mod:`.sparse` (per-block
top-k with 2- or 4-bit values, SparseLoCo-style). Each codec's
docstring states its error bound; :meth:`Codec.error_bound` computes it per element.
"""

from __future__ import annotations

from legion_swarm.codecs.base import (
    WIRE_VERSION,
    Codec,
    CodecError,
    Encoded,
    available_codecs,
    decode,
    from_wire,
    get_codec,
    to_wire,
)
from legion_swarm.codecs.float import BF16Codec, FP16Codec, NoneCodec
from legion_swarm.codecs.quant import Int4Codec, Int8Codec
from legion_swarm.codecs.sparse import SparseCodec
from legion_swarm.codecs.topk import ErrorFeedback, TopKCodec

__all__ = [
    "WIRE_VERSION",
    "BF16Codec",
    "Codec",
    "CodecError",
    "Encoded",
    "ErrorFeedback",
    "FP16Codec",
    "Int4Codec",
    "Int8Codec",
    "NoneCodec",
    "SparseCodec",
    "TopKCodec",
    "available_codecs",
    "decode",
    "from_wire",
    "get_codec",
    "to_wire",
]
