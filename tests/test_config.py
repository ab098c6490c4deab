import pytest

from legion_swarm.config import (
    DHTConfig,
    HostConfig,
    MembershipConfig,
    PeerConfig,
    validate_multiaddr,
    validate_swarm_name,
)
from legion_swarm.errors import ConfigError

PEER_ID = "QmdtW6xneAJGp1wtT5edc5K73XWU2uWXhNoEV1vFStwsWt"


@pytest.mark.parametrize(
    "maddr",
    [
        f"/ip4/127.0.0.1/tcp/31337/p2p/{PEER_ID}",
        f"/ip6/::1/tcp/1/p2p/{PEER_ID}",
        f"/dns4/boot.example.org/tcp/31337/p2p/{PEER_ID}",
    ],
)
def test_dialable_multiaddrs_are_accepted(maddr: str) -> None:
    assert validate_multiaddr(maddr, require_peer_id=True, allow_port_zero=False) == maddr


@pytest.mark.parametrize(
    ("maddr", "reason"),
    [
        ("foo", "malformed"),
        ("/ip4/127.0.0.1/tcp/31337", "lacks /p2p/"),
        (f"/ip4/999.0.0.1/tcp/1/p2p/{PEER_ID}", "bad ip4 address"),
        (f"/ip4/127.0.0.1/udp/1/quic-v1/p2p/{PEER_ID}", "only /tcp"),
        (f"/ip4/127.0.0.1/tcp/70000/p2p/{PEER_ID}", "bad TCP port"),
        (f"/ip4/127.0.0.1/tcp/0/p2p/{PEER_ID}", "port 0"),
        ("/ip4/127.0.0.1/tcp/1/p2p/0OIl", "base58"),
        (f"/unix/tmp/x/tcp/1/p2p/{PEER_ID}", "unsupported protocol"),
    ],
)
def test_bad_multiaddrs_say_why(maddr: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        validate_multiaddr(maddr, require_peer_id=True, allow_port_zero=False)


@pytest.mark.parametrize("name", ["legion", "a", "my-swarm_1.test"])
def test_good_swarm_names(name: str) -> None:
    assert validate_swarm_name(name) == name


@pytest.mark.parametrize("name", ["", "Upper", "-lead", "x" * 65, "sp ace", "sl/ash"])
def test_bad_swarm_names(name: str) -> None:
    with pytest.raises(ConfigError, match="bad swarm name"):
        validate_swarm_name(name)


def test_host_config_checks_every_field() -> None:
    with pytest.raises(ConfigError, match="--host"):
        HostConfig(host="localhost")
    with pytest.raises(ConfigError, match="--port"):
        HostConfig(port=65536)
    with pytest.raises(ConfigError, match="port 0"):
        HostConfig(announce=("/ip4/1.2.3.4/tcp/0",))
    assert HostConfig(host="::", port=5).listen_maddr == "/ip6/::/tcp/5"


def test_cross_field_rules() -> None:
    with pytest.raises(ConfigError, match="join_timeout_s"):
        PeerConfig(dht=DHTConfig(wait_timeout_s=5), join_timeout_s=4)
    with pytest.raises(ConfigError, match="observer"):
        PeerConfig(host=HostConfig(client_mode=True))
    with pytest.raises(ConfigError, match="ttl_heartbeats"):
        MembershipConfig(ttl_heartbeats=1.0)
    with pytest.raises(ConfigError, match="role"):
        MembershipConfig(role="king")
    assert MembershipConfig(heartbeat_s=2, ttl_heartbeats=3).record_ttl_s == 6


def test_configs_are_frozen() -> None:
    config = HostConfig()
    with pytest.raises(AttributeError):
        config.port = 5  # type: ignore[misc]


def test_train_config_defaults_and_codec() -> None:
    from legion_swarm.config import TrainConfig

    assert TrainConfig().resolved_codec == "int8" and TrainConfig(mode="sync").resolved_codec == "none"
    assert TrainConfig(codec="fp16").resolved_codec == "fp16"


@pytest.mark.parametrize(
    "changes",
    [
        {"mode": "async"},
        {"lr": 0},
        {"lr": float("nan")},
        {"betas": (0.9, 1.0)},
        {"inner_steps": 0},
        {"outer_momentum": 1.0},
        {"codec": "zip"},
        {"grad_clip": -1.0},
        {"max_failed_rounds": 0},
        {"weight_decay": -0.1},
    ],
)
def test_train_config_rejects_bad_values(changes: dict) -> None:
    from legion_swarm.config import TrainConfig

    with pytest.raises(ConfigError):
        TrainConfig(**changes)


def test_every_generated_flag_has_its_fields_doc_and_default_as_help() -> None:
    from legion_swarm.config import SPEC_SECTIONS, config_flags, field_docs

    for section, cls in SPEC_SECTIONS.items():
        docs = field_docs(cls)
        for flag in config_flags(cls, section):
            assert docs.get(flag.name), f"{section}.{flag.name} has no docstring"
            assert flag.help.startswith(" ".join(docs[flag.name].replace("``", "").split()))
            assert "(default: " in flag.help


def test_flags_follow_one_rule_and_keep_the_known_names() -> None:
    from legion_swarm.config import SPEC_SECTIONS, config_flags

    options = {(f.section, f.name): f.option for s, cls in SPEC_SECTIONS.items() for f in config_flags(cls, s)}
    known = {
        ("train", "mode"): "--mode", ("train", "codec"): "--compress", ("train", "lr"): "--lr",
        ("train", "inner_steps"): "--inner-steps", ("model", "preset"): "--model", ("data", "source"): "--data",
        ("data", "batch_size"): "--batch-size", ("train", "max_group"): "--max-group",
        ("train", "min_group"): "--min-group",
    }  # fmt: skip
    for key, option in known.items():
        assert options.pop(key) == option
    for (section, name), option in options.items():  # every other field: --<section>-<name>
        assert option == f"--{section}-{name.replace('_', '-')}"
    assert ("collective", "reduce_timeout_s") in options and ("collective", "plane") in options
    assert ("collective", "codec") not in options and ("train", "betas") not in options  # never flags
    assert len(set(options.values())) == len(options)


def test_generated_flags_parse_into_per_section_overrides() -> None:
    import argparse

    from legion_swarm.config import SPEC_SECTIONS, TrainConfig, add_config_flags, config_overrides

    parser = argparse.ArgumentParser()
    for section, cls in SPEC_SECTIONS.items():
        add_config_flags(parser, cls, section)
    args = parser.parse_args(["--compress", "int8", "--collective-gather-timeout-s", "30", "--model-n-layer", "3"])
    assert config_overrides(args, SPEC_SECTIONS) == {
        "model": {"n_layer": 3}, "train": {"codec": "int8"}, "collective": {"gather_timeout_s": 30.0},
    }  # fmt: skip
    assert config_overrides(parser.parse_args([]), SPEC_SECTIONS) == {}
    assert TrainConfig.codec is None and TrainConfig.mode == "diloco"  # metadata keeps the class defaults
    with pytest.raises(SystemExit):
        parser.parse_args(["--collective-plane", "udp"])
