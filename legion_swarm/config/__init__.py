"""Configuration: one tree of frozen dataclasses, validated on construction, with CLI flags generated from them.

- :mod:`~legion_swarm.config.peer`: this process's own settings (libp2p host, DHT, membership, RTT probing);
- :mod:`~legion_swarm.config.model` and :mod:`~legion_swarm.config.train`: what every training member of a
  swarm shares, the four sections of the signed swarm config (:data:`SPEC_SECTIONS`);
- :mod:`~legion_swarm.config.flags`: one command-line flag per field of those sections, its help read from the
  field's docstring.

Validation is pure Python (no hivemind or torch import), so a bad flag or file fails fast with a
:class:`~legion_swarm.errors.ConfigError` before any daemon starts. ``from legion_swarm.config import X`` is the
public way in; the submodules are the design's layout.
"""

from __future__ import annotations

from legion_swarm.config.flags import (
    Flag,
    add_config_flags,
    cli,
    config_flags,
    config_overrides,
    field_docs,
    flags_argv,
    option_of,
)
from legion_swarm.config.model import HF_DEFAULT_GEOMETRY, HF_PREFIX, PRESETS, DataConfig, ModelConfig
from legion_swarm.config.peer import (
    DEFAULT_BOOTSTRAP_PORT,
    DEFAULT_SWARM,
    ROLES,
    SWARM_NAME_RE,
    DHTConfig,
    HostConfig,
    MembershipConfig,
    PeerConfig,
    ProbeConfig,
    validate_multiaddr,
    validate_swarm_name,
)
from legion_swarm.config.train import CODECS, MODES, PLANES, CollectiveConfig, TrainConfig

SPEC_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "collective": CollectiveConfig,
}
"""The swarm config's sections (TOML tables) and their dataclasses, in the order ``--help`` lists their flags."""

__all__ = [
    "CODECS",
    "DEFAULT_BOOTSTRAP_PORT",
    "DEFAULT_SWARM",
    "HF_DEFAULT_GEOMETRY",
    "HF_PREFIX",
    "MODES",
    "PLANES",
    "PRESETS",
    "ROLES",
    "SPEC_SECTIONS",
    "SWARM_NAME_RE",
    "CollectiveConfig",
    "DHTConfig",
    "DataConfig",
    "Flag",
    "HostConfig",
    "MembershipConfig",
    "ModelConfig",
    "PeerConfig",
    "ProbeConfig",
    "TrainConfig",
    "add_config_flags",
    "cli",
    "config_flags",
    "config_overrides",
    "field_docs",
    "flags_argv",
    "option_of",
    "validate_multiaddr",
    "validate_swarm_name",
]
