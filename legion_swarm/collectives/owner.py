"""The owner's side of a round: one member's own shard, the contributions the other members send to it, their
weighted average, the update, and the encoded result every member gathers.

A :class:`ShardOwner` knows nothing of channels, deadlines or the protocol: the round (or a test) tells it what
arrived and asks it for the average and the result::

    owner = ShardOwner(rank=r, group_size=G, own=my_shard, weight=w, chunk_elems=c, gather_codec=codec)
    buffer = owner.start(k, w_k)          # member k's contribution begins: decode it into ``buffer``
    owner.add_chunk(k, offset, length)    # ... chunk by chunk (every member's piece of a chunk in: averaged now)
    owner.complete(k)                     # ... k's contribution arrived whole and valid: it counts
    owner.leave_out(k)                    # (k was excluded: it counts only if it completed before)
    average, weight, contributors = owner.reduce()
    result = owner.finish(average, update)    # -> owner.result, owner.encoded (chunk header, buffers) per chunk

The average is :func:`~legion_swarm.collectives.reference.weighted_average` over the contributors in rank order,
so with the lossless codec it equals the naive oracle bit for bit. When every member's piece of a chunk is in and
nobody has been left out, that chunk is averaged at once, overlapped with receiving the next ones; the same
operations on the same elements give the same bits, and if a member is left out after all, :meth:`reduce`
recomputes the average from the contributors.

Shapes: every tensor here is 1-D float32 of the shard's size (or a chunk of it); weights are sample counts or any
positive float.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch

from legion_swarm.codecs import Codec, decode, to_wire
from legion_swarm.collectives import wire
from legion_swarm.collectives.buffers import BufferPool
from legion_swarm.collectives.reference import weighted_average
from legion_swarm.groups.partition import chunk_bounds

logger = logging.getLogger(__name__)

EncodedChunk = tuple[bytes, list[memoryview]]
"""One chunk of a result as sent: its ``wire.chunk_header`` and the codec's buffers."""


class ShardOwner:
    """Member ``rank``'s own shard through one round (see the module docstring)."""

    def __init__(
        self, *, rank: int, group_size: int, own: torch.Tensor, weight: float, chunk_elems: int,
        gather_codec: Codec | None = None, buffers: BufferPool | None = None,
    ) -> None:  # fmt: skip
        """``own``: this member's shard of its own tensors (1-D float32, a view or a copy); ``weight``: its own
        contribution's weight; ``gather_codec``: how :meth:`finish` encodes the result for the all-gather (None: no
        all-gather, nothing encoded); ``buffers``: where contributions and the average live across rounds."""
        if not 0 <= rank < group_size:
            raise ValueError(f"rank {rank} outside a group of {group_size}")
        if own.dim() != 1 or own.dtype != torch.float32:
            raise ValueError(f"own shard must be 1-D float32, got {own.dtype} of shape {tuple(own.shape)}")
        self.rank, self.group_size, self.own, self.weight = rank, group_size, own, weight
        self.chunk_elems, self.gather_codec = chunk_elems, gather_codec
        self.buffers = buffers if buffers is not None else BufferPool()
        self.chunks = chunk_bounds(own.numel(), chunk_elems)
        self._incoming: dict[int, tuple[torch.Tensor, float]] = {}  # rank -> (buffer decoded into, weight)
        self._complete: set[int] = set()
        self._arrived: dict[int, int] = {}  # chunk offset -> members whose piece of it is in
        self._left_out = False  # a member was excluded: an early average would not be everyone's
        self.averaged_early: set[int] = set()
        """Offsets of the chunks averaged over every member as they came in."""
        self.contributors: tuple[int, ...] = (rank,)
        """Ranks in the average, in rank order (set by :meth:`reduce`; the owner alone before)."""
        self.total_weight = weight
        """The weight behind the average: the sum of its contributors' weights."""
        self.result: torch.Tensor | None = None
        """The shard's new values as every member decodes them (set by :meth:`finish`)."""
        self.encoded: list[EncodedChunk] = []
        """The result encoded once for every receiver, chunk by chunk (empty without a gather codec)."""

    # ------------------------------------------------------------------------------------ contributions

    def start(self, rank: int, weight: float) -> torch.Tensor:
        """Member ``rank``'s contribution of ``weight`` begins to arrive: the buffer to decode it into."""
        if rank == self.rank or not 0 <= rank < self.group_size:
            raise ValueError(f"rank {rank} cannot contribute to shard {self.rank} of a group of {self.group_size}")
        buffer = self.buffers.get(f"contribution/{rank}", self.own.numel())
        self._incoming[rank] = (buffer, weight)
        return buffer

    def add_chunk(self, rank: int, offset: int, length: int) -> None:
        """Elements ``[offset, offset + length)`` of ``rank``'s contribution are decoded into its buffer. Once every
        other member's piece of that chunk is in, and nobody was left out, the chunk is averaged now."""
        if rank not in self._incoming:
            raise ValueError(f"rank {rank}'s contribution has not started")
        self._arrived[offset] = self._arrived.get(offset, 0) + 1
        if self._arrived[offset] < self.group_size - 1 or self._left_out:
            return
        size = self.own.numel()
        weighted_average(
            self._contributions(range(self.group_size), offset, offset + length),
            out=self.buffers.get("average", size)[offset : offset + length],
            scratch=self.buffers.get("scratch", size)[offset : offset + length],
        )
        self.averaged_early.add(offset)

    def complete(self, rank: int) -> None:
        """``rank``'s contribution arrived whole and valid: it is in the average."""
        if rank not in self._incoming:
            raise ValueError(f"rank {rank}'s contribution has not started")
        self._complete.add(rank)

    def leave_out(self, rank: int) -> None:
        """``rank`` is out of the round (excluded): no early average any more, as its pieces may be missing. A
        contribution it completed before still counts."""
        logger.debug("shard %d: rank %d left out", self.rank, rank)
        self._left_out = True

    def _contributions(self, ranks: Sequence[int], lo: int, hi: int) -> list[tuple[torch.Tensor, float]]:
        """Elements ``[lo, hi)`` of the contributions of ``ranks``, with their weights, in rank order."""
        pieces = []
        for rank in sorted(ranks):
            if rank == self.rank:
                pieces.append((self.own[lo:hi], self.weight))
            else:
                buffer, weight = self._incoming[rank]
                pieces.append((buffer[lo:hi], weight))
        return pieces

    # ------------------------------------------------------------------------------------------- result

    def reduce(self) -> tuple[torch.Tensor, float, tuple[int, ...]]:
        """The weighted average of the owner's and every complete contribution, the total weight behind it and the
        contributors (in rank order). The average may be the pool's buffer: valid until the next round."""
        ranks = [self.rank, *sorted(self._complete)]
        size = self.own.numel()
        contributions = self._contributions(ranks, 0, size)
        average = self.buffers.get("average", size)
        if len(ranks) == self.group_size and len(self.averaged_early) == len(self.chunks):
            averaged = average  # done chunk by chunk while the contributions came in
        else:
            averaged = weighted_average(contributions, out=average, scratch=self.buffers.get("scratch", size))
        self.contributors = tuple(sorted(ranks))
        self.total_weight = float(sum(w for _, w in contributions))
        return averaged, self.total_weight, self.contributors

    def finish(
        self, averaged: torch.Tensor | None, update: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The shard's new values: ``update(averaged)`` (``averaged`` itself without an update; the own shard
        unchanged for an all-gather alone, ``averaged=None``), encoded once for the all-gather if there is one.
        The owner keeps the *decoded* value, so it holds the same bits as every member that gathers it."""
        if averaged is not None:
            result = averaged if update is None else update(averaged)
            if not (isinstance(result, torch.Tensor) and result.shape == averaged.shape):
                raise TypeError(f"update_fn must return a tensor of shape {tuple(averaged.shape)}")
            result = result.detach().to(torch.float32)
        else:
            result = self.own.clone()
        if self.gather_codec is not None:
            lossless = self.gather_codec.lossless
            decoded = result if lossless else torch.empty_like(result)
            for offset, length in chunk_bounds(result.numel(), self.chunk_elems):
                enc = self.gather_codec.encode(result[offset : offset + length])
                header, buffers = to_wire(enc)
                self.encoded.append((wire.chunk_header("ag", self.rank, offset, header, None), buffers))
                if not lossless:
                    decode(enc, out=decoded[offset : offset + length])
            result = decoded
        self.result = result
        return result

    def detached_result(self) -> torch.Tensor | None:
        """The result as a tensor that outlives the pool's buffers (a copy only where it is the pool's average)."""
        result = self.result
        if result is None:
            return None
        average = self.buffers.peek("average")
        if average is not None and result.untyped_storage().data_ptr() == average.untyped_storage().data_ptr():
            return result.clone()
        return result
