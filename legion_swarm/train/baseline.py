"""The single-process baseline a swarm is compared with: the same model, data and AdamW on one machine.

``train_baseline(spec, steps, batch_multiplier=N)`` trains the swarm config's model with ``torch.optim.AdamW`` on
batches of ``N x batch_size`` sequences read from the same shards, so after ``steps`` steps it has seen as many
tokens as N peers that each trained ``steps`` local steps. Used by the notebook and ``bench_training.py``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from legion_swarm.train.data import ShardReader, evaluate, load_tokens, val_batches
from legion_swarm.train.model import build_model
from legion_swarm.train.modes import forward_backward, trainable
from legion_swarm.train.swarm_config import SwarmSpec

logger = logging.getLogger(__name__)


@dataclass
class BaselineResult:
    history: list[tuple[int, float]] = field(default_factory=list)
    """``(step, training loss)`` for every step."""
    val_loss: float = float("nan")
    tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def train_baseline(
    spec: SwarmSpec, steps: int, *, batch_multiplier: int = 1, shards: Sequence[int] | None = None,
    eval_batches: int = 8, lr_at: Callable[[int], float] | None = None,
) -> BaselineResult:  # fmt: skip
    """AdamW on one process; every step takes one batch from each of ``batch_multiplier`` shards: ``shards``
    (e.g. the ones the swarm's peers leased, for a like-for-like comparison), or ``0 .. batch_multiplier-1``.
    ``lr_at``: the learning rate of each 0-based step (default: the spec's lr throughout)."""
    data = load_tokens(spec.data)
    model = build_model(spec.model)
    seq_len, batch = spec.model.seq_len, spec.data.batch_size
    assert seq_len is not None
    chosen = list(shards) if shards is not None else [i % data.num_shards for i in range(batch_multiplier)]
    if len(chosen) != batch_multiplier:
        raise ValueError(f"{len(chosen)} shards for a batch of {batch_multiplier} peers' batches")
    # Each shard read as the peer holding it reads it: the same seed, from position 0.
    readers = [ShardReader(data.shard(i), seq_len, batch, seed=spec.data.seed + i) for i in chosen]
    optimizer = torch.optim.AdamW(trainable(model), **spec.train.adamw())
    result = BaselineResult()
    started = time.perf_counter()
    for step in range(1, steps + 1):
        pieces = [next(r) for r in readers]
        inputs, targets = torch.cat([x for x, _ in pieces]), torch.cat([y for _, y in pieces])
        if lr_at is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step - 1)
        optimizer.zero_grad(set_to_none=False)
        loss = forward_backward(model, (inputs, targets))
        if spec.train.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(trainable(model), spec.train.grad_clip)
        optimizer.step()
        result.history.append((step, loss))
        result.tokens += inputs.numel()
    result.seconds = time.perf_counter() - started
    result.val_loss = evaluate(model, val_batches(data.val, seq_len, batch, eval_batches))
    logger.info("baseline: %d steps, val loss %.4f, %.0f tokens/s", steps, result.val_loss, result.tokens_per_s)
    return result
