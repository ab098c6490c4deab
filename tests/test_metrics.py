"""``--metrics-port``: a training peer's Prometheus metrics move between two scrapes; a bad port exits 2."""

from __future__ import annotations

import asyncio
import re
import socket
import urllib.request

import pytest

from legion_swarm.sim import LocalSwarm
from tests.helpers.polling import eventually
from tests.helpers.processes import run_cli
from tests.helpers.swarm import FAST

pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(240)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """``{"name{labels}": value}`` of every sample in the text exposition format."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def one(samples: dict[str, float], name: str) -> float:
    found = [v for k, v in samples.items() if re.fullmatch(rf"{name}\{{.*\}}", k)]
    assert len(found) == 1, (name, sorted(samples))
    return found[0]


async def test_a_training_peers_metrics_move_between_two_scrapes() -> None:
    port = free_port()
    spec = ("--mode", "diloco", "--inner-steps", "5", *FAST)
    async with await LocalSwarm.create(
        2, swarm="metrics", bootstrap_args=spec, peer_args=("--rounds", "400", "--threads", "1"),
        per_peer_args=[("--metrics-port", str(port))],
    ) as swarm:  # fmt: skip

        async def trained_a_round() -> dict[str, float] | None:
            try:
                samples = await asyncio.to_thread(scrape, port)
            except OSError:
                return None
            committed = [v for k, v in samples.items() if k.startswith("legion_rounds_committed_total")]
            return samples if committed and committed[0] >= 1 else None

        first = await eventually(trained_a_round, timeout=120, interval=0.5)

        async def moved() -> dict[str, float] | None:
            samples = await asyncio.to_thread(scrape, port)
            later = one(samples, "legion_rounds_committed_total") - one(first, "legion_rounds_committed_total")
            return samples if later >= 2 and one(samples, "legion_group_size") == 2 else None  # a round of two

        second = await eventually(moved, timeout=60, interval=0.5)
        assert swarm.peers
    for name in ("legion_step", "legion_bytes_sent_total", "legion_samples_total", "legion_compute_seconds_total"):
        assert one(second, name) > one(first, name), name
    assert one(second, "legion_peers_seen") >= 2  # the two peers (and the bootstrap node)
    assert one(second, "legion_loss") > 0
    phases = {k: v for k, v in second.items() if k.startswith("legion_phase_seconds_total")}
    assert any('phase="local work"' in k and v > 0 for k, v in phases.items()), phases
    assert any('phase="sharded step"' in k for k in phases), phases
    assert all('swarm="metrics"' in k and 'role="peer"' in k for k in second if k.startswith("legion_"))


async def test_a_bad_metrics_port_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await run_cli("bootstrap", "--host", "127.0.0.1", "--port", "0", "--metrics-port", str(port),
                               timeout=30)  # fmt: skip
    assert result.code == 2 and f"metrics port {port} is in use" in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for bad in ("0", "70000", "x"):
        result = await run_cli("bootstrap", "--metrics-port", bad, timeout=30)
        assert result.code == 2 and "--metrics-port" in result.stderr, result.stderr
