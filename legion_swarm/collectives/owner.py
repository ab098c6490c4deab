"""The owner's side of a round: its shard of the inputs, the weighted average of the contributions to it, the
update, the encoded result every member gathers, and what error feedback gets back when a contribution is lost.

:class:`OwnerShard` is a mixin of :class:`legion_swarm.collectives.rounds.Round`, which holds the state named
below and runs the protocol around these steps; nothing here touches a channel.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from legion_swarm.codecs import Codec, ErrorFeedback, decode, to_wire
from legion_swarm.collectives import wire
from legion_swarm.collectives.buffers import BufferPool
from legion_swarm.collectives.partition import PartitionPlan, chunk_bounds
from legion_swarm.collectives.reference import weighted_average
from legion_swarm.config import CollectiveConfig
from legion_swarm.groups.info import GroupInfo

if TYPE_CHECKING:
    from legion_swarm.collectives.rounds import Relay, UpdateFn, _Peer


class OwnerShard:
    """Steps of a round on this member's own shard (see the module docstring)."""

    rank: int
    group: GroupInfo
    config: CollectiveConfig
    plan: PartitionPlan
    tensors: list[torch.Tensor]
    out: list[torch.Tensor]
    weight: float
    reduce: bool
    gather: bool
    update_fn: UpdateFn | None
    relay: Relay | None
    gather_codec: Codec
    ef: ErrorFeedback | None
    buffers: BufferPool
    peers: dict[int, _Peer]
    my_result: torch.Tensor | None
    my_contributors: tuple[int, ...]
    my_result_weight: float
    encoded_result: list[tuple[bytes, list[memoryview]]]
    restored_before: frozenset[object]
    restored: set[object]
    _own: torch.Tensor | None
    _arrived: dict[int, int]
    averaged_early: set[int]

    def _shard_data(self, shard: int) -> torch.Tensor:
        """Shard ``shard`` of the input tensors as a 1-D float32 tensor: a view when it lies in one tensor."""
        pieces = self.plan.slices_for(shard)
        if len(pieces) == 1:
            piece = pieces[0]
            return self.tensors[piece.tensor].detach().reshape(-1)[piece.start : piece.end]
        return self.plan.extract(self.tensors, shard)

    def _own_data(self) -> torch.Tensor:
        """My shard of my tensors (a copy when it spans several tensors, made once per round)."""
        if self._own is None:
            self._own = self._shard_data(self.rank)
        return self._own

    def _contributions(self, ranks: Sequence[int], lo: int, hi: int) -> list[tuple[torch.Tensor, float]]:
        """Elements ``[lo, hi)`` of the contributions of ``ranks`` to my shard, with their weights, in rank order."""
        pieces = []
        for rank in sorted(ranks):
            if rank == self.rank:
                pieces.append((self._own_data()[lo:hi], self.weight))
            else:
                peer = self.peers[rank]
                assert peer.receiving is not None
                pieces.append((peer.receiving[lo:hi], peer.weight))
        return pieces

    def _average_early(self, offset: int, length: int) -> None:
        """Average a chunk of my shard once every member's piece of it is in, so that when all contributions
        arrive whole the owner's reduce is already done, overlapped with receiving. The same operations as
        :meth:`_reduce_own_shard` on the same elements give the same bits; if a member is left out after all,
        that recomputes the average from the contributors."""
        self._arrived[offset] = self._arrived.get(offset, 0) + 1
        if self._arrived[offset] < len(self.peers) or any(p.excluded for p in self.peers.values()):
            return
        size = self.plan.sizes[self.rank]
        weighted_average(
            self._contributions(range(self.group.size), offset, offset + length),
            out=self.buffers.get("average", size)[offset : offset + length],
            scratch=self.buffers.get("scratch", size)[offset : offset + length],
        )
        self.averaged_early.add(offset)

    def _reduce_own_shard(self) -> torch.Tensor | None:
        """The weighted average of the contributions to my shard (None for an all-gather alone)."""
        own = self._own_data()
        if self.reduce:
            ranks = [self.rank, *(p.rank for p in self.peers.values() if p.contribution is not None)]
            contributions = self._contributions(ranks, 0, own.numel())
            average = self.buffers.get("average", own.numel())
            everyone = len(ranks) == self.group.size
            if everyone and len(self.averaged_early) == len(chunk_bounds(own.numel(), self.config.chunk_elems)):
                averaged = average  # done chunk by chunk while the contributions came in
            else:
                scratch = self.buffers.get("scratch", own.numel())
                averaged = weighted_average(contributions, out=average, scratch=scratch)
            self.my_contributors = tuple(sorted(ranks))
            self.my_result_weight = float(sum(w for _, w in contributions))
            return averaged
        return None

    def _finish_own_shard(self, averaged: torch.Tensor | None) -> None:
        """Apply ``update_fn`` to my averaged shard and encode the result for the all-gather."""
        if averaged is not None:
            result = averaged if self.update_fn is None or self.relay else self.update_fn(self.rank, averaged)
            if not (isinstance(result, torch.Tensor) and result.shape == averaged.shape):
                raise TypeError(f"update_fn must return a tensor of shape {tuple(averaged.shape)}")
            result = result.detach().to(torch.float32)
        else:
            result = self._shard_data(self.rank).clone()
        if self.gather:
            # Encode once for every receiver, and keep the decoded value: the owner holds the same bits.
            lossless = self.gather_codec.lossless
            decoded = result if lossless else torch.empty_like(result)
            for offset, length in chunk_bounds(result.numel(), self.config.chunk_elems):
                enc = self.gather_codec.encode(result[offset : offset + length])
                header, buffers = to_wire(enc)
                self.encoded_result.append((wire.chunk_header("ag", self.rank, offset, header, None), buffers))
                if not lossless:
                    decode(enc, out=decoded[offset : offset + length])
            result = decoded
        self.my_result = result  # may be the pool's buffer: _commit hands RoundResult a tensor of its own

    def _own_shard(self, in_out: bool) -> torch.Tensor | None:
        """This member's result for :class:`RoundResult`, which outlives the pool's buffers. Once the result is in
        ``out`` and lies in one tensor, a view of it (copying 1/G of the model per round into fresh memory was
        a tenth of a member's CPU time, page faults included); otherwise a copy where it is the pool's buffer."""
        result = self.my_result
        if result is None:
            return None
        pieces = self.plan.slices_for(self.rank)
        if in_out and len(pieces) == 1:
            piece = pieces[0]
            return self.out[piece.tensor].detach().view(-1)[piece.start : piece.end]
        average = self.buffers.peek("average")
        if average is not None and result.untyped_storage().data_ptr() == average.untyped_storage().data_ptr():
            return result.clone()
        return result

    def _restore_residuals(self, contributors: dict[int, tuple[int, ...]]) -> None:
        """Error feedback: what an owner did not average in (or a dropped shard) goes back into the residual,
        once. If that destination failed the previous round too, the residual is dropped instead: a peer that
        keeps failing must not make it grow without bound (until it no longer fits the codec's range)."""
        if self.ef is None or not self.gather:
            return
        for peer in self.peers.values():
            if self.rank in contributors.get(peer.rank, ()):
                continue
            for key, enc in peer.sent_encodings:
                residual = self.ef.residual(key)
                if residual is None:
                    continue
                if key in self.restored_before:
                    self.ef.reset(key)
                else:
                    residual.add_(decode(enc))
                    self.restored.add(key)
