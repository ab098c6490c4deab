"""One exception tree for everything legion-swarm raises on purpose.

::

    LegionError
    ├── ConfigError                 bad user input: flags, files, names (CLI exit code 2)
    │   ├── IdentityError           identity key file unreadable, malformed or of the wrong type
    │   ├── AddressInUseError       the listen port is taken
    │   ├── SwarmMismatchError      the entry peer serves another swarm
    │   ├── SwarmConfigError        a local setting conflicts with the swarm's signed config
    │   ├── ModelError              a model cannot be built (unknown preset, missing optional package)
    │   └── DataError               a dataset cannot be loaded (missing file, hub unreachable, bad field)
    ├── NetworkError                the network did not cooperate (CLI exit code 1)
    │   ├── PeerUnreachableError    none of the initial peers answered in time
    │   ├── ProtocolError           a peer sent a malformed, oversized or unexpected message
    │   │   ├── AuthenticationError a peer is not who it should be (signature, peer id, AEAD tag)
    │   │   └── UnsupportedProtocolError  a reachable peer does not serve the protocol asked for
    │   ├── ChannelClosedError      a secure channel was closed and cannot be used
    │   └── RoundTimeoutError       a collective round overran its deadline (a bug, or this peer stalled)
    ├── RecordError                 a DHT record failed its schema or signature check
    ├── CodecError                  a tensor cannot be encoded, or a wire message is malformed
    └── TrainingError               training cannot go on (too many failed rounds in a row, no donor)

Failures that are part of normal operation (a peer that vanished mid-round, a record that expired)
come back as values, not exceptions.
"""

from __future__ import annotations


class LegionError(Exception):
    """Base of every error raised on purpose by legion-swarm."""


class ConfigError(LegionError, ValueError):
    """A configuration value, flag, or file given by the user is invalid."""


class IdentityError(ConfigError):
    """The identity (libp2p private key) file cannot be read, parsed, or written."""


class AddressInUseError(ConfigError):
    """The requested listen address is already taken by another process."""


class SwarmMismatchError(ConfigError):
    """An entry peer belongs to a different swarm than the one requested."""


class SwarmConfigError(ConfigError):
    """A local setting conflicts with the swarm's signed config, or that config is missing or invalid."""


class ModelError(ConfigError):
    """A model cannot be built: unknown preset or architecture, or an optional package is missing."""


class DataError(ConfigError):
    """A dataset or tokenizer cannot be loaded: missing file, unreachable hub, wrong text field."""


class NetworkError(LegionError):
    """The network did not let an operation complete."""


class PeerUnreachableError(NetworkError):
    """None of the given initial peers could be reached."""


class ProtocolError(NetworkError):
    """A peer sent a malformed, oversized, truncated or unexpected message."""


class AuthenticationError(ProtocolError):
    """The peer is not who it should be: bad signature, wrong peer id, unauthorized, or a failed AEAD tag."""


class UnsupportedProtocolError(ProtocolError):
    """The peer was reached but does not serve the protocol a stream asked for (e.g. the legion hello on a plain
    hivemind DHT node): asking again will not help."""


class ChannelClosedError(NetworkError):
    """The channel was closed (by either side, or after an earlier error) and cannot be used."""


class RoundTimeoutError(NetworkError):
    """A collective round did not finish by its deadline. Never happens to a member that keeps running: every
    phase has its own deadline and the round ends when the last one passes."""


class RecordError(LegionError, ValueError):
    """A DHT record is malformed, fails its schema, or carries a bad signature."""


class CodecError(LegionError, ValueError):
    """A tensor cannot be encoded (non-finite, out of range) or an encoded wire message is malformed."""


class TrainingError(LegionError):
    """Training cannot go on: too many failed rounds in a row, no donor for the state, a diverged model."""
