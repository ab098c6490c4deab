"""Checkpoints: a file round trip with its checks, and export from a running swarm, then a new swarm resumed
from the file (real processes)."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch

from legion_swarm.config import DataConfig, ModelConfig, TrainConfig
from legion_swarm.errors import SwarmConfigError
from legion_swarm.peer import SwarmPeer
from legion_swarm.sim import LocalSwarm, PeerProcess
from legion_swarm.train.checkpoint import (
    Checkpoint,
    CheckpointSchedule,
    PeriodicCheckpoints,
    checkpoints_in,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from legion_swarm.train.optim import StateSlice
from legion_swarm.train.state_sync import fetch_meta
from legion_swarm.train.swarm_config import SwarmSpec
from tests.helpers.polling import eventually
from tests.helpers.processes import run_cli
from tests.helpers.swarm import observer

SPEC = SwarmSpec(
    model=ModelConfig(preset="custom", n_layer=1, n_head=2, d_model=16, seq_len=8),
    data=DataConfig(source="dummy", batch_size=2),
    train=TrainConfig(mode="sync"),
)


def make(numel: int) -> Checkpoint:
    flat = torch.randn(numel, generator=torch.Generator().manual_seed(3))
    optimizer = StateSlice(0, numel, {"exp_avg": flat * 2, "exp_avg_sq": flat.abs()}, [(0, 10, 4), (10, numel, 7)])
    return Checkpoint(SPEC, 12, b"\x01" * 16, flat, optimizer)


def numel_of(spec: SwarmSpec) -> int:
    from legion_swarm.train.model import build_model

    return sum(p.numel() for p in build_model(spec.model).parameters())


async def in_step_past(obs: SwarmPeer, resumed: PeerProcess, fresh: PeerProcess, round_: int) -> None:
    """Until the resumed peer and the fresh one hold the same parameters (SHA-256) at one round past ``round_``."""

    async def same_state_past() -> bool:
        a, b = await asyncio.gather(
            fetch_meta(obs.host, resumed.peer_id), fetch_meta(obs.host, fresh.peer_id), return_exceptions=True
        )
        if isinstance(a, BaseException) or isinstance(b, BaseException):
            return False
        return a.round == b.round and a.round > round_ and a.sha256 == b.sha256

    await eventually(same_state_past, timeout=120, interval=0.3)


def test_checkpoint_round_trip_and_corruption(tmp_path) -> None:
    ckpt = make(numel_of(SPEC))
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, ckpt, "s")
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind
    back = load_checkpoint(path)
    assert back.spec.digest() == SPEC.digest() and back.round == 12 and back.state_id == ckpt.state_id
    assert torch.equal(back.flat, ckpt.flat)
    assert back.optimizer is not None and back.optimizer.segments == [(0, 10, 4), (10, ckpt.flat.numel(), 7)]
    assert torch.equal(back.optimizer.buffers["exp_avg"], ckpt.flat * 2)

    raw = bytearray(path.read_bytes())
    raw[-8:] = b"\xff" * 8  # flip the last parameter bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(SwarmConfigError, match="corrupt"):
        load_checkpoint(path)
    (tmp_path / "other.txt").write_text("not a checkpoint")
    with pytest.raises(SwarmConfigError, match="cannot read"):
        load_checkpoint(tmp_path / "other.txt")


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(300)
async def test_export_from_a_running_swarm_and_resume_a_new_swarm_from_it(tmp_path) -> None:
    # diloco: a round lasts a few local steps, so the owners still hold the exported state when asked for it
    spec_flags = ("--mode", "diloco", "--inner-steps", "10", "--model", "tiny", "--data", "dummy", "--batch-size", "2")
    out = tmp_path / "swarm.safetensors"
    async with await LocalSwarm.create(
        2, swarm="ckpt", heartbeat_s=1.0, bootstrap_args=spec_flags, peer_args=("--rounds", "400")
    ) as swarm:
        assert swarm.bootstrap is not None
        async with observer(swarm.bootstrap.maddr, swarm="ckpt") as obs:

            async def trained_a_while() -> bool:
                metas = await asyncio.gather(
                    *(fetch_meta(obs.host, p.peer_id) for p in swarm.peers), return_exceptions=True
                )
                return all(not isinstance(m, BaseException) and m.round >= 5 for m in metas)

            await eventually(trained_a_while, timeout=120, interval=1.0)
        result = await run_cli("checkpoint", "export", str(out), "--peer", swarm.bootstrap.maddr, timeout=120)
        assert result.code == 0, result.stderr[-2000:]
    ckpt = load_checkpoint(out)
    assert ckpt.round >= 5 and ckpt.optimizer is not None  # both owners handed their ranges over

    # A new swarm from the file: one peer resumes it, a fresh one must end up with the same parameters.
    async with await LocalSwarm.create(
        0, swarm="ckpt2", heartbeat_s=1.0, bootstrap_args=("--config", str(out))
    ) as swarm:
        resumed = await swarm.add_peer(args=("--rounds", "400", "--resume", str(out)))
        fresh = await swarm.add_peer(args=("--rounds", "400"))
        assert swarm.bootstrap is not None
        async with observer(swarm.bootstrap.maddr, swarm="ckpt2") as obs:
            await in_step_past(obs, resumed, fresh, ckpt.round)
        assert "resumed from a checkpoint of round" in resumed.tail(400)


async def test_periodic_checkpoints_are_due_every_n_rounds_and_keep_the_newest(tmp_path) -> None:
    numel = numel_of(SPEC)
    periodic = PeriodicCheckpoints(CheckpointSchedule(str(tmp_path / "ckpts"), every=2, keep=2), "s")
    assert [r for r in range(7) if periodic.due(r)] == [2, 4, 6]
    (tmp_path / "ckpts" / "notes.txt").write_text("not ours: left alone")
    for round_ in (2, 4, 6):
        ckpt = make(numel)
        await periodic.write(Checkpoint(ckpt.spec, round_, ckpt.state_id, ckpt.flat, ckpt.optimizer))
    await periodic.wait()
    names = sorted(os.listdir(tmp_path / "ckpts"))
    assert names == ["notes.txt", "s-r00000004.safetensors", "s-r00000006.safetensors"]  # no temp file either
    assert resolve_checkpoint(tmp_path / "ckpts").name == "s-r00000006.safetensors"
    assert load_checkpoint(resolve_checkpoint(tmp_path / "ckpts")).round == 6
    with pytest.raises(SwarmConfigError, match="no checkpoint in"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(SwarmConfigError, match=">= 1"):
        CheckpointSchedule(str(tmp_path), every=0)


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(300)
async def test_a_swarm_whose_every_peer_died_restarts_from_its_periodic_checkpoint(tmp_path) -> None:
    """Members write a checkpoint every 2 rounds; then every process is gone. A new swarm from the checkpoint
    directory (``bootstrap --config DIR``, ``join --resume DIR``) continues from that round, and a fresh member
    catches up to the same state."""
    spec_flags = ("--mode", "diloco", "--inner-steps", "5", "--model", "tiny", "--data", "dummy", "--batch-size", "2")
    ckpts = tmp_path / "ckpts"
    schedule = ("--checkpoint-dir", str(ckpts), "--checkpoint-every", "2", "--checkpoint-keep", "2")
    async with await LocalSwarm.create(
        2, swarm="periodic", heartbeat_s=1.0, bootstrap_args=spec_flags, peer_args=("--rounds", "5"),
        per_peer_args=[schedule],
    ) as swarm:  # fmt: skip
        assert [await p.wait(180) for p in swarm.peers] == [0, 0], [p.tail(30) for p in swarm.peers]
    files = checkpoints_in(ckpts)
    rounds = [int(p.name.removesuffix(".safetensors").rsplit("-r", 1)[1]) for p in files]
    assert len(files) == 2 and rounds[0] + 2 == rounds[1] and rounds[1] % 2 == 0, rounds  # every 2, newest 2 kept
    last = load_checkpoint(resolve_checkpoint(ckpts))
    assert last.round == rounds[1] and last.optimizer is not None  # the owners handed their ranges over

    async with await LocalSwarm.create(
        0, swarm="periodic2", heartbeat_s=1.0, bootstrap_args=("--config", str(ckpts))
    ) as swarm:
        resumed = await swarm.add_peer(args=("--rounds", "400", "--resume", str(ckpts)))
        fresh = await swarm.add_peer(args=("--rounds", "400"))
        assert swarm.bootstrap is not None
        async with observer(swarm.bootstrap.maddr, swarm="periodic2") as obs:
            await in_step_past(obs, resumed, fresh, last.round)
        assert f"resumed from a checkpoint of round {last.round}" in resumed.tail(400)
