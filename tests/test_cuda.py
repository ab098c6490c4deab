"""The device checks of ``tests/test_device.py`` on a CUDA GPU: a GPU peer (fp32, bf16, fp16) and a CPU peer in
one group hold the same bits after every round, in both modes; and a real swarm trains on the GPU.

Skipped, with the reason, on machines without CUDA (the default install is torch's CPU wheel; see the README for
a CUDA build). MPS (macOS) runs the same code path but is not tested here: no macOS machine runs this suite.
"""

from __future__ import annotations

import pytest
import torch

from legion_swarm.collectives import Collectives
from legion_swarm.config import CollectiveConfig, TrainConfig
from legion_swarm.train.device import Placement
from legion_swarm.train.modes import DiLoCoMode, SyncMode
from tests.helpers.collectives import FAST, planes
from tests.helpers.training import TinyLM, flat, rounds_hold_the_same_bits

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.mark.parametrize("cls", [DiLoCoMode, SyncMode])
async def test_gpu_and_cpu_peers_hold_the_same_bits_after_each_round(cls: type) -> None:
    config = TrainConfig(mode="diloco" if cls is DiLoCoMode else "sync", lr=3e-3, inner_steps=3)
    bf16 = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    placements = [
        Placement(torch.device("cpu"), "fp32"),
        Placement(torch.device("cuda"), "fp32"),
        Placement(torch.device("cuda"), bf16),
        Placement(torch.device("cuda"), "fp16"),
    ]
    async with planes(len(placements)) as ps:
        models = [TinyLM().to(pl.device) for pl in placements]
        modes = [
            cls(m, Collectives(p, CollectiveConfig(codec="none", **FAST)), config, placement=pl)
            for m, p, pl in zip(models, ps, placements, strict=True)
        ]
        assert all(next(m.parameters()).device.type == pl.device.type for m, pl in zip(models, placements, strict=True))
        state = await rounds_hold_the_same_bits(modes, ps, models)
    assert not torch.equal(state, flat(TinyLM()))


@pytest.mark.integration
async def test_a_swarm_trains_on_the_gpu_beside_a_cpu_peer(real_processes) -> None:
    """Real processes: one peer on CUDA in bf16, one on the CPU; both commit every round with one state id."""
    from legion_swarm.sim import LocalSwarm
    from tests.helpers.swarm import FAST, trained

    rounds = 4
    bootstrap_args = ("--mode", "diloco", "--inner-steps", "5", *FAST)
    async with await LocalSwarm.create(
        2, bootstrap_args=bootstrap_args, peer_args=("--rounds", str(rounds), "--threads", "1"),
        per_peer_args=[("--device", "cuda", "--precision", "bf16"), ("--device", "cpu")],
    ) as swarm:  # fmt: skip
        summaries = await trained(swarm.peers, timeout=300)
    assert [s["device"] for s in summaries] == ["cuda:0/bf16", "cpu/fp32"]
    assert all(s["rounds_committed"] == rounds and s["resyncs"] == 0 for s in summaries)
    assert summaries[0]["val_loss"] == summaries[1]["val_loss"]
