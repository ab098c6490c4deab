"""A tiny language model and learnable batches, for the training modes against their single-process references."""

from __future__ import annotations

import asyncio
import os

import torch

from legion_swarm.collectives import Collectives
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.groups import GroupInfo, GroupMember
from legion_swarm.train.modes import trainable
from legion_swarm.transport.dataplane import DataPlane
from tests.helpers.collectives import FAST

VOCAB, SEQ, BATCH = 32, 16, 4


class TinyLM(torch.nn.Module):
    """Any module with the ``forward(idx, targets) -> (logits, loss)`` contract trains in a swarm."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.embed = torch.nn.Parameter(torch.randn(VOCAB, 24, generator=gen) * 0.1)
        self.hidden = torch.nn.Linear(24, 24)
        self.out = torch.nn.Linear(24, VOCAB)
        with torch.no_grad():
            for p in (*self.hidden.parameters(), *self.out.parameters()):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.out(torch.tanh(self.hidden(self.embed[idx])))
        loss = None if targets is None else torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss


def batches(n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` (inputs, targets) pairs of shape (BATCH, SEQ), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        # A learnable sequence: each token is the previous plus one, from a random start.
        start = torch.randint(0, VOCAB, (BATCH, 1), generator=gen)
        seq = (start + torch.arange(SEQ + 1)) % VOCAB
        out.append((seq[:, :-1], seq[:, 1:]))
    return out


def make_modes(cls: type, models: list[TinyLM], ps: list[DataPlane], codec: str, config: TrainConfig) -> list:
    """One training mode of class ``cls`` per (model, data plane), with the fast collective timeouts."""
    return [
        cls(m, Collectives(p, CollectiveConfig(codec=codec, **FAST)), config) for m, p in zip(models, ps, strict=True)
    ]


def flat(model: torch.nn.Module) -> torch.Tensor:
    """The trainable parameters as one 1-D tensor, to compare models bit for bit."""
    return torch.cat([p.detach().reshape(-1) for p in trainable(model)])


def group_of(ps: list[DataPlane]) -> GroupInfo:
    """One group of the data planes ``ps``, in their order, with a fresh round id."""
    members = tuple(GroupMember(peer_id=p.identity.peer_id, direct=p.endpoint) for p in ps)
    return GroupInfo(round_id=os.urandom(8), members=members)


async def rounds_hold_the_same_bits(modes: list, ps: list[DataPlane], models: list, rounds: int = 3) -> torch.Tensor:
    """``rounds`` rounds of every mode's local steps (different batches per member) and one group round; after
    each, every member's state is the same float32 host tensor and every model (on any device) a copy of it.
    Returns the final state, flattened."""
    for k in range(rounds):
        for r, mode in enumerate(modes):
            for batch in batches(mode.local_steps, seed=100 * k + r):
                await mode.local_step(batch)
        group = group_of(ps)
        outcomes = await asyncio.gather(*(mode.round(group) for mode in modes))
        assert all(o.result.complete and o.in_sync for o in outcomes)
        states = [torch.cat([t.reshape(-1) for t in mode.state_tensors()]) for mode in modes]
        for s in states[1:]:
            assert torch.equal(s, states[0])
        for model in models:
            assert torch.equal(flat(model).cpu(), states[0])
        host = torch.device("cpu")
        assert all(t.device == host and t.dtype == torch.float32 for mode in modes for t in mode.state_tensors())
    return states[0]
