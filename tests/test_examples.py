"""Examples and benchmarks are user-facing: they must keep running against the public API."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]


def run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_local_swarm_example() -> None:
    result = run("examples/local_swarm.py", "--peers", "2", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 peers alive" in result.stdout


def test_dht_benchmark_at_small_size_prints_json() -> None:
    result = run("benchmarks/bench_dht.py", "--sizes", "4", "--ops", "3", timeout=200)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    size = report["sizes"]["4"]
    assert size["status_complete"] is True
    assert size["ours"]["join_median_s"] > 0 and size["ratio_join"] > 0
