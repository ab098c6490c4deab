"""The swarm's signed config: canonical bytes, the creator's signature, TOML files, local overrides, and a
joiner refusing a conflicting flag (a real bootstrap process)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from legion_swarm.config import DataConfig, ModelConfig, TrainConfig
from legion_swarm.errors import SwarmConfigError
from legion_swarm.sim import start_process, stop_process
from legion_swarm.train.swarm_config import SignedSpec, SwarmSpec, check_overrides
from legion_swarm.transport.identity import Identity
from tests.helpers.processes import run_cli


def test_canonical_bytes_and_digest_do_not_depend_on_how_the_config_was_written() -> None:
    a = SwarmSpec(train=TrainConfig(mode="sync", lr=0.002))
    b = SwarmSpec.from_dict({"train": {"lr": 0.002, "mode": "sync"}, "model": {"preset": "tiny"}})
    assert a.canonical() == b.canonical() and a.digest() == b.digest()
    assert SwarmSpec.from_dict(a.to_dict()) == a
    assert SwarmSpec(train=TrainConfig(mode="diloco")).digest() != a.digest()


def test_a_signed_config_verifies_and_any_change_is_refused() -> None:
    creator = Identity.generate()
    signed = SignedSpec.sign(SwarmSpec(data=DataConfig(source="dummy")), creator)
    record = signed.record("s", writer="QmCopyHolder")
    back = SignedSpec.from_record(record)
    assert back.spec == signed.spec and back.creator == creator.peer_id
    other = SwarmSpec(data=DataConfig(source="dummy", batch_size=9)).canonical()
    with pytest.raises(SwarmConfigError, match="bad creator signature"):
        SignedSpec.from_record(dataclasses.replace(record, config=other))
    with pytest.raises(SwarmConfigError, match="creator key does not match"):
        SignedSpec.from_record(dataclasses.replace(record, creator=Identity.generate().peer_id))
    impostor = Identity.generate()
    forged = dataclasses.replace(record, creator_key=impostor.public_key, creator=impostor.peer_id)
    with pytest.raises(SwarmConfigError, match="bad creator signature"):
        SignedSpec.from_record(forged)


def test_toml_files_and_their_errors(tmp_path) -> None:
    good = tmp_path / "swarm.toml"
    good.write_text(
        '[model]\npreset = "small"\n[data]\nsource = "dummy"\n[train]\nmode = "sync"\nbetas = [0.9, 0.99]\n'
    )
    spec = SwarmSpec.load(good)
    assert spec.model == ModelConfig(preset="small") and spec.train.betas == (0.9, 0.99)
    for text, match in [
        ("[train]\nmode = 'async'\n", "bad mode"),
        ("[train]\nspeed = 3\n", "unknown \\[train\\] keys: speed"),
        ("[optimizer]\nlr = 1\n", "unknown swarm config sections"),
        ("[model\n", "cannot read"),
    ]:
        bad = tmp_path / "bad.toml"
        bad.write_text(text)
        with pytest.raises(SwarmConfigError, match=match):
            SwarmSpec.load(bad)


def test_local_overrides_must_equal_the_swarms_values() -> None:
    spec = SwarmSpec(train=TrainConfig(mode="diloco"), data=DataConfig(batch_size=8))
    check_overrides(spec, {"train": {"mode": "diloco"}, "data": {"batch_size": 8}})
    with pytest.raises(SwarmConfigError, match="--mode sync conflicts with the swarm's config"):
        check_overrides(spec, {"train": {"mode": "sync"}})


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(90)
async def test_join_with_a_conflicting_flag_exits_with_a_clear_error() -> None:
    boot = await start_process(
        "bootstrap", ["bootstrap", "--host", "127.0.0.1", "--port", "0", "--swarm", "conf", "--mode", "diloco"]
    )
    try:
        result = await run_cli("join", "--peer", boot.maddr, "--host", "127.0.0.1", "--mode", "sync", timeout=60)
    finally:
        await stop_process(boot)
    assert result.code == 2, result.stderr
    assert "--mode sync conflicts with the swarm's config (train.mode = diloco)" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.usefixtures("real_processes")
@pytest.mark.timeout(90)
async def test_a_joiner_takes_the_config_its_entry_peer_names_not_the_most_common_copy() -> None:
    from legion_swarm.peer import SwarmPeer
    from legion_swarm.train.swarm_config import SwarmConfigKeeper, publish_spec
    from tests.helpers.swarm import config

    real = SignedSpec.sign(SwarmSpec(train=TrainConfig(mode="sync")), Identity.generate())
    peers: list[SwarmPeer] = []
    try:
        boot = await SwarmPeer.create(config(role="bootstrap"))
        peers.append(boot)
        boot.set_hello_field("config", real.digest)
        await publish_spec(boot.dht, boot.swarm, real, ttl_s=60)
        for _ in range(2):  # two members push another config, each under its own (valid) signature
            sybil = await SwarmPeer.create(config(boot.maddrs[0]))
            peers.append(sybil)
            forged = SignedSpec.sign(SwarmSpec(train=TrainConfig(mode="diloco", lr=0.5)), sybil.host.identity)
            await publish_spec(sybil.dht, sybil.swarm, forged, ttl_s=60)
        joiner = await SwarmPeer.create(config(boot.maddrs[0]))
        peers.append(joiner)
        assert [h.config for h in joiner.entry_hellos] == [real.digest]
        got = await SwarmConfigKeeper(joiner).fetch(timeout=10)
        assert got.digest == real.digest and got.spec.train.mode == "sync"
    finally:
        await asyncio.gather(*(p.aclose() for p in peers), return_exceptions=True)


def test_the_collective_section_round_trips_and_only_a_non_default_one_changes_the_digest() -> None:
    from legion_swarm.config import CollectiveConfig

    plain = SwarmSpec()
    assert "collective" not in plain.to_dict()  # old records, checkpoints and digests stay valid
    assert SwarmSpec.from_dict({**plain.to_dict(), "collective": {}}).digest() == plain.digest()
    short = SwarmSpec(collective=CollectiveConfig(reduce_timeout_s=20.0, plane="libp2p"))
    assert short.digest() != plain.digest() and SwarmSpec.from_dict(short.to_dict()) == short
    assert "codec" not in short.to_dict()["collective"]
    used = short.collective_config()
    assert used.codec == "int8" and used.reduce_timeout_s == 20.0 and used.plane == "libp2p"
    local = short.collective_config(CollectiveConfig(reduce_timeout_s=7.0))
    assert local.codec == "int8" and local.reduce_timeout_s == 7.0
    with pytest.raises(SwarmConfigError, match=r"unknown \[collective\] keys: codec"):
        SwarmSpec.from_dict({"collective": {"codec": "fp16"}})
    with pytest.raises(SwarmConfigError, match="stall_timeout_s"):
        SwarmSpec.from_dict({"collective": {"reduce_timeout_s": 1.0}})
    check_overrides(short, {"collective": {"reduce_timeout_s": 20.0}})
    with pytest.raises(SwarmConfigError, match=r"--collective-reduce-timeout-s 60\.0 conflicts"):
        check_overrides(short, {"collective": {"reduce_timeout_s": 60.0}})
    with pytest.raises(SwarmConfigError, match="--compress fp16 conflicts"):
        check_overrides(short, {"train": {"codec": "fp16"}})


def test_creator_flags_override_the_config_file_and_steps_is_an_alias_of_rounds(tmp_path, caplog) -> None:
    from legion_swarm.cli import build_parser
    from legion_swarm.cli.train import spec_argv, spec_from_args

    path = tmp_path / "swarm.toml"
    path.write_text('[model]\npreset = "small"\n[collective]\ngather_timeout_s = 30.0\n')
    argv = ["--config", str(path), "--model", "tiny", "--collective-reduce-timeout-s", "20", "--max-group", "4"]
    args = build_parser().parse_args(["simulate", *argv, "--steps", "3"])
    spec = spec_from_args(args)
    assert spec.model.preset == "tiny" and spec.model.n_layer == 5  # a new preset brings its own sizes
    assert (spec.collective.reduce_timeout_s, spec.collective.gather_timeout_s) == (20.0, 30.0)
    assert spec.train.max_group == 4 and args.rounds == 3
    assert "--steps is deprecated: use --rounds" in caplog.text
    assert build_parser().parse_args(["bootstrap", *spec_argv(args)]) is not None
    assert spec_argv(args) == ["--model", "tiny", "--max-group", "4", "--collective-reduce-timeout-s", "20.0"]
