"""Checkpoints: the swarm's current model assembled from its members, saved as safetensors, and resumed from.

``export_checkpoint`` downloads the flat state from the members that hold the latest round (verified by its
SHA-256, like a joining peer does), and the sharded optimizer state from the owners of each range, and writes
one ``.safetensors`` file: the model's tensors by name, the optimizer buffers as flat ``optimizer/<name>``
tensors, and metadata (swarm, round, state id, SHA-256, the signed config's canonical bytes). The file is
written next to its destination and renamed into place, so an interrupted export never leaves a torn file.

A peer started with ``--resume`` loads it: the same parameters under the same state id and round, so a swarm
that restarts from it continues the lineage, and the others (at round 0) re-sync from that peer.
"""

from __future__ import annotations

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
        optimizer = _assemble(found, numel, names)
        if optimizer is not None:
            break
        logger.info("optimizer state of round %d not complete (%d ranges), try %d/%d", got.meta.round, len(found),
                    attempt, attempts)  # fmt: skip
    else:
        logger.info("exporting parameters only")
    return Checkpoint(spec, got.meta.round, got.meta.state_id, got.flat, optimizer)


def _assemble(found: dict[tuple[int, int], StateSlice], numel: int, names: tuple[str, ...]) -> StateSlice | None:
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
