"""Buffers a member keeps from one round to the next."""

from __future__ import annotations

import numpy as np
import torch

from legion_swarm.codecs.base import _DTYPES


class BufferPool:
    """Receive and reduce buffers kept from one round to the next (same group, same shapes: same buffers).

    Fresh memory costs a page fault per 4 KiB on first touch: for 100 MB of model that was a third of a
    round. The pool holds about one model's worth of float32 between rounds; one round at a time uses it."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() != numel or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype)
        return buffer

    def peek(self, key: str) -> torch.Tensor | None:
        return self._buffers.get(key)

    def wire(self, key: str, dtype: str, length: int) -> np.ndarray:
        """A numpy array of ``length`` elements of wire dtype ``dtype`` (see ``codecs.base``)."""
        np_dtype = _DTYPES[dtype][1]
        return self.get(key, length * np_dtype.itemsize, torch.uint8).numpy().view(np_dtype)

    def clear(self) -> None:
        self._buffers.clear()
