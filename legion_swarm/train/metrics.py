"""Swarm-wide metrics that peers publish and readers compute: how far apart the swarm's copies of the model are.

Every training peer publishes, with its progress, its parameters at ``SAMPLE_SIZE`` fixed positions drawn from
a seeded generator (the same positions on every peer of a model). A reader compares the samples of the peers
that report the same round: the relative spread ``max_i |s_i - mean| / |mean|`` estimates the true relative
spread of the full parameter vectors when the differences are spread over the model (as averaging leaves
them), and is exactly 0 when the copies are bit-identical. A difference confined to a few elements can escape
a 64-position sample; peers' state ids (equal iff bit-identical) cover that case.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

SAMPLE_SIZE = 64
SAMPLE_SEED = 20261124


def sample_positions(numels: Sequence[int], size: int = SAMPLE_SIZE) -> list[tuple[int, int]]:
    """``(tensor index, flat offset)`` of ``size`` seeded positions in tensors of ``numels`` elements, in
    increasing flat order (repeats possible for tiny models)."""
    total = sum(numels)
    if total == 0:
        return []
    gen = torch.Generator().manual_seed(SAMPLE_SEED)
    flat = sorted(torch.randint(0, total, (size,), generator=gen).tolist())
    starts = np.cumsum([0, *numels])
    out = []
    for i in flat:
        t = int(np.searchsorted(starts, i, side="right")) - 1
        out.append((t, i - int(starts[t])))
    return out


def take_sample(tensors: Sequence[torch.Tensor], positions: Iterable[tuple[int, int]]) -> bytes:
    """The float32 values of ``tensors`` at ``positions``, as bytes for a progress record."""
    values = [float(tensors[t].detach().reshape(-1)[o]) for t, o in positions]
    return np.asarray(values, dtype=np.float32).tobytes()


def relative_spread(samples: Sequence[bytes]) -> float | None:
    """``max_i ||s_i - mean|| / ||mean||`` over samples of equal length (None for fewer than two, or if they
    do not match: peers of another model)."""
    arrays = [np.frombuffer(s, dtype=np.float32).astype(np.float64) for s in samples]
    if len(arrays) < 2 or len({a.size for a in arrays}) != 1 or arrays[0].size == 0:
        return None
    stacked = np.stack(arrays)
    mean = stacked.mean(axis=0)
    norm = float(np.linalg.norm(mean))
    if not np.isfinite(stacked).all() or norm == 0.0:
        return None
    return float(np.linalg.norm(stacked - mean, axis=1).max() / norm)


def swarm_spread(records: Iterable[object]) -> tuple[int, float, int] | None:
    """``(round, spread, peers)`` for the latest round that at least two peers report a sample for, from
    peer records (anything with ``round`` and ``sample``); None if there is none."""
    by_round: dict[int, list[bytes]] = {}
    for r in records:
        round_, sample = getattr(r, "round", None), getattr(r, "sample", None)
        if round_ is not None and sample:
            by_round.setdefault(round_, []).append(sample)
    for round_ in sorted(by_round, reverse=True):
        spread = relative_spread(by_round[round_])
        if spread is not None:
            return round_, spread, len(by_round[round_])
    return None
