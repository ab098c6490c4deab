"""Checkpoints: the swarm's current model assembled from its members, saved as safetensors, and resumed from.

``export_checkpoint`` downloads the flat state from the members that hold the latest round (verified by its
SHA-256, like a joining peer does), and the sharded optimizer state from the owners of each range, and writes
one ``.safetensors`` file: the model's tensors by name, the optimizer buffers as flat ``optimizer/<name>``
tensors, and metadata (swarm, round, state id, SHA-256, the signed config's canonical bytes). The file is
written next to its destination and renamed into place, so an interrupted export never leaves a torn file.

A peer started with ``--resume`` loads it: the same parameters under the same state id and round, so a swarm
that restarts from it continues the lineage, and the others (at round 0) re-sync from that peer.

:class:`PeriodicCheckpoints` is a member's own schedule (``join --checkpoint-dir DIR --checkpoint-every N``):
after every N-th committed round it writes the state it holds (bit-identical to every survivor's) and the
optimizer state of the whole space, its own range plus its owners' (parameters only if an owner does not
answer), to ``DIR/<swarm>-r<round>.safetensors``, atomically, keeping the newest K. So a swarm whose every
peer died restarts from the last one: ``bootstrap --config DIR/...`` and ``join --resume DIR`` (a directory
means its newest checkpoint).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import msgpack
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

from legion_swarm.errors import SwarmConfigError, TrainingError
from legion_swarm.train.model import build_model
from legion_swarm.train.modes import trainable
from legion_swarm.train.optim import Segment, StateSlice
from legion_swarm.train.state_sync import download_state, fetch_optimizer_state
from legion_swarm.train.swarm_config import SwarmSpec
from legion_swarm.transport.host import Host

logger = logging.getLogger(__name__)

FORMAT = "legion-swarm/checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    spec: SwarmSpec
    round: int
    state_id: bytes
    flat: torch.Tensor
    """The model's parameters, flattened in ``model.parameters()`` order (float32)."""
    optimizer: StateSlice | None
    """Optimizer state of the whole flat space, if every owner handed its range over."""


def _names(spec: SwarmSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's trainable tensors, in the order the swarm flattens them."""
    model = build_model(spec.model)
    by_id = {id(p): n for n, p in model.named_parameters()}
    return [(by_id[id(p)], tuple(p.shape)) for p in trainable(model)]


def save_checkpoint(path: str | Path, ckpt: Checkpoint, swarm: str) -> None:
    """Write ``ckpt`` to ``path`` atomically (temp file in the same directory, then rename)."""
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    flat = ckpt.flat.detach().numpy()
    for name, shape in _names(ckpt.spec):
        n = int(np.prod(shape)) if shape else 1
        tensors[name] = flat[offset : offset + n].reshape(shape).copy()
        offset += n
    if offset != flat.size:
        raise TrainingError(f"state of {flat.size} elements does not fit the model's {offset} parameters")
    meta = {
        "format": FORMAT, "swarm": swarm, "round": str(ckpt.round), "state_id": ckpt.state_id.hex(),
        "sha256": hashlib.sha256(memoryview(flat).cast("B")).hexdigest(),
        "config": base64.b64encode(ckpt.spec.canonical()).decode(),
    }  # fmt: skip
    if ckpt.optimizer is not None:
        for name, buffer in ckpt.optimizer.buffers.items():
            tensors[f"optimizer/{name}"] = buffer.numpy()
        meta["optimizer_segments"] = json.dumps(ckpt.optimizer.segments)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent or ".")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read and verify a checkpoint (format, config, SHA-256 of the parameters); SwarmConfigError if it is not one."""
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise SwarmConfigError(f"cannot read checkpoint {path}: {e}") from None
    if meta.get("format") != FORMAT:
        raise SwarmConfigError(f"{path} is not a legion-swarm checkpoint")
    spec = SwarmSpec.from_dict(msgpack.unpackb(base64.b64decode(meta["config"])))
    names = _names(spec)  # builds the model: once
    pieces = [tensors[name].reshape(-1) for name, _ in names if name in tensors]
    if len(pieces) != len(names):
        raise SwarmConfigError(f"checkpoint {path} lacks tensors of its own model")
    flat = np.concatenate(pieces).astype(np.float32)
    if hashlib.sha256(memoryview(flat).cast("B")).hexdigest() != meta["sha256"]:
        raise SwarmConfigError(f"checkpoint {path} is corrupt: its parameters do not match their SHA-256")
    optimizer = None
    prefix = "optimizer/"
    buffers = {k.removeprefix(prefix): torch.from_numpy(v.copy()) for k, v in tensors.items() if k.startswith(prefix)}
    if buffers:
        segments: list[Segment] = [tuple(s) for s in json.loads(meta["optimizer_segments"])]  # type: ignore[misc]
        optimizer = StateSlice(0, flat.size, buffers, segments)
    return Checkpoint(spec, int(meta["round"]), bytes.fromhex(meta["state_id"]), torch.from_numpy(flat), optimizer)


async def export_checkpoint(
    host: Host, trainers: list[str], spec: SwarmSpec, *, timeout: float = 60.0, attempts: int = 3
) -> Checkpoint:
    """Assemble the swarm's current state from ``trainers`` (peer ids of training members).

    Owners serve the optimizer state of the state they hold now only; a round that commits between the parameter
    download and the optimizer requests leaves ranges unanswered. So an incomplete snapshot is taken again, up to
    ``attempts`` times, before the parameters are exported alone."""
    numel = sum(int(np.prod(shape)) if shape else 1 for _, shape in _names(spec))
    names = ("exp_avg", "exp_avg_sq") if spec.train.mode == "sync" else ("momentum",)
    for attempt in range(1, attempts + 1):
        got = await download_state(host, trainers, numel=numel, timeout=timeout)
        found = await fetch_optimizer_state(host, got.meta.owners, got.meta.state_id, 0, numel, buffer_names=names)
        optimizer = assemble_optimizer_state(found, numel, names)
        if optimizer is not None:
            break
        logger.info("optimizer state of round %d not complete (%d ranges), try %d/%d", got.meta.round, len(found),
                    attempt, attempts)  # fmt: skip
    else:
        logger.info("exporting parameters only")
    return Checkpoint(spec, got.meta.round, got.meta.state_id, got.flat, optimizer)


def assemble_optimizer_state(
    found: dict[tuple[int, int], StateSlice], numel: int, names: tuple[str, ...]
) -> StateSlice | None:
    """One slice of the whole flat space from ranges that tile it, or None if any part is missing."""
    at, segments = 0, []
    buffers = {n: torch.empty(numel) for n in names}
    for (lo, hi), piece in sorted(found.items()):
        if lo != at:
            return None
        for n in names:
            buffers[n][lo:hi] = piece.buffers[n]
        segments += piece.segments
        at = hi
    return StateSlice(0, numel, buffers, segments) if at == numel else None


async def trainers_of(peer: object) -> list[str]:
    """Peer ids of the training members in ``peer``'s view, latest round first."""
    view = await peer.view()  # type: ignore[attr-defined]
    records = [m.record for m in view.members if m.record.mode is not None and m.record.round is not None]
    return [r.peer_id for r in sorted(records, key=lambda r: -(r.round or 0))]


CHECKPOINT_SUFFIX = ".safetensors"


def checkpoint_name(swarm: str, round_: int) -> str:
    """``<swarm>-r<round, 8 digits>.safetensors``: sorting the names sorts the rounds."""
    return f"{swarm}-r{round_:08d}{CHECKPOINT_SUFFIX}"


def checkpoints_in(directory: str | Path) -> list[Path]:
    """The checkpoint files :class:`PeriodicCheckpoints` wrote in ``directory``, oldest round first."""
    found = [p for p in Path(directory).glob(f"*-r{'[0-9]' * 8}{CHECKPOINT_SUFFIX}") if p.is_file()]
    return sorted(found, key=lambda p: (p.name.rsplit("-r", 1)[1], p.name))


def resolve_checkpoint(path: str | Path) -> Path:
    """``path`` itself, or for a directory its newest checkpoint; SwarmConfigError if there is none."""
    path = Path(path)
    if not path.is_dir():
        return path
    found = checkpoints_in(path)
    if not found:
        raise SwarmConfigError(f"no checkpoint in {path}")
    return found[-1]


@dataclass(frozen=True)
class CheckpointSchedule:
    """Where and how often a member writes checkpoints."""

    directory: str
    every: int = 10
    """Rounds between checkpoints (a round divisible by it is written)."""
    keep: int = 3
    """Newest checkpoints kept; older ones are deleted after a write."""

    def __post_init__(self) -> None:
        if self.every < 1 or self.keep < 1:
            raise SwarmConfigError(f"checkpoint every and keep must be >= 1, got {self.every}, {self.keep}")


class PeriodicCheckpoints:
    """Writes a member's state every ``schedule.every`` rounds, one write at a time, off the event loop."""

    def __init__(self, schedule: CheckpointSchedule, swarm: str) -> None:
        self.schedule, self.swarm = schedule, swarm
        Path(schedule.directory).mkdir(parents=True, exist_ok=True)
        self._writing: asyncio.Task[None] | None = None
        self.written: list[Path] = []

    def due(self, round_: int) -> bool:
        return round_ > 0 and round_ % self.schedule.every == 0

    async def write(self, ckpt: Checkpoint) -> None:
        """Start writing ``ckpt`` (its tensors must not change: pass copies); a write still running is awaited
        first, so writes never overlap."""
        await self.wait()
        self._writing = asyncio.create_task(asyncio.to_thread(self._write, ckpt))

    def _write(self, ckpt: Checkpoint) -> None:
        path = Path(self.schedule.directory) / checkpoint_name(self.swarm, ckpt.round)
        save_checkpoint(path, ckpt, self.swarm)
        self.written.append(path)
        for old in checkpoints_in(self.schedule.directory)[: -self.schedule.keep]:
            if old.name.startswith(f"{self.swarm}-r"):
                old.unlink(missing_ok=True)
        logger.info("checkpoint of round %d written to %s", ckpt.round, path)

    async def wait(self) -> None:
        """Until the write in progress (if any) is on disk."""
        if self._writing is not None:
            task, self._writing = self._writing, None
            try:
                await task
            except Exception as e:  # a full disk must not stop training
                logger.warning("checkpoint not written: %r", e)
