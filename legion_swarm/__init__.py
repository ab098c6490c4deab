"""legion-swarm: train language models together across the internet, with no central server.

Public API (imported lazily, so ``import legion_swarm`` stays cheap for the CLI)::

    from legion_swarm import SwarmPeer, PeerConfig, HostConfig, MembershipConfig, DHTConfig, LocalSwarm
    from legion_swarm import DataPlane, GroupInfo, GroupMember, Collectives, CollectiveConfig, RoundResult
    from legion_swarm import SwarmSpec, SignedSpec, SwarmTrainer, LoopConfig, TrainConfig, ModelConfig, DataConfig
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("legion-swarm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

_EXPORTS = {
    "SwarmPeer": "legion_swarm.peer",
    "SwarmView": "legion_swarm.peer",
    "Member": "legion_swarm.peer",
    "PeerConfig": "legion_swarm.config",
    "HostConfig": "legion_swarm.config",
    "DHTConfig": "legion_swarm.config",
    "MembershipConfig": "legion_swarm.config",
    "Identity": "legion_swarm.transport.identity",
    "LocalSwarm": "legion_swarm.sim",
    "PeerRecord": "legion_swarm.dht.records",
    "DataPlane": "legion_swarm.transport.dataplane",
    "GroupInfo": "legion_swarm.groups.info",
    "GroupMember": "legion_swarm.groups.info",
    "CollectiveConfig": "legion_swarm.config",
    "Collectives": "legion_swarm.collectives.api",
    "RoundResult": "legion_swarm.collectives.result",
    "FaultPlan": "legion_swarm.collectives.faults",
    "TrainConfig": "legion_swarm.config",
    "ModelConfig": "legion_swarm.config",
    "DataConfig": "legion_swarm.config",
    "SwarmSpec": "legion_swarm.train.swarm_config",
    "SignedSpec": "legion_swarm.train.swarm_config",
    "SwarmTrainer": "legion_swarm.train.loop",
    "LoopConfig": "legion_swarm.train.loop",
    "build_model": "legion_swarm.train.model",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'legion_swarm' has no attribute {name!r}")
