"""The quickstart notebook runs end to end at a small size: a real local swarm trains, the baseline trains, the
plots render, and the summary it prints shows every peer learning with far fewer bytes than a plain all-reduce.

The notebook is executed from a copy with nbclient (never written back into ``examples/``), in a kernel started
with this very interpreter, so it imports the ``legion_swarm`` under test."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import pytest
from ipykernel import kernelspec

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "01_quickstart.ipynb"
KERNEL = "legion-swarm-test"
pytestmark = [pytest.mark.usefixtures("real_processes"), pytest.mark.timeout(360)]

# Appended to the parameters cell, so a parameter added to the notebook later keeps its default. LR keeps the
# notebook's 1e-3: higher rates spike the loss of this tiny model in its first steps, and the test compares losses.
SMALL = {
    "PEERS": 2,
    "ROUNDS": 3,
    "MODE": "diloco",
    "INNER_STEPS": 5,
    "COMPRESS": "int8",
    "MODEL": "tiny",
    "DATA": "dummy",
    "BATCH_SIZE": 4,
    "TIMEOUT_S": 180.0,
}


def tagged(nb: Any, tag: str) -> Any:
    (cell,) = [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    return cell


def stdout_of(cell: Any) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


def test_the_committed_notebook_has_no_outputs_and_a_parameters_cell() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code), "clear the notebook's outputs"
    source = tagged(nb, "parameters").source
    assert all(f"{name} = " in source for name in SMALL), "every overridden parameter is defined in the notebook"


def test_quickstart_notebook_trains_a_local_swarm_and_its_baseline(tmp_path: Path, monkeypatch) -> None:
    # A kernelspec of our own, first on JUPYTER_PATH: the kernel runs this interpreter whatever python3 kernels
    # the user or the system have installed elsewhere.
    kernelspec.write_kernel_spec(tmp_path / "jupyter" / "kernels" / KERNEL, overrides={"display_name": KERNEL})
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    # What ipykernel picks when MPLBACKEND is unset; set here so a backend in the environment cannot hide the plots.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    # The kernel and the peer processes it starts share a few cores: one OpenMP thread each, since torch's default
    # (one per core) spin-waits whenever another process holds a core, which made this test up to 10x slower.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    params = tagged(nb, "parameters")
    overrides = "".join(f"{name} = {value!r}\n" for name, value in SMALL.items())
    params.source += f"\n\n# overridden by tests/test_notebook.py\n{overrides}"
    nb.cells.append(nbformat.v4.new_code_cell("import sys\nprint(sys.prefix)"))
    # Per cell; the notebook's own TIMEOUT_S is shorter, so it gives up (and closes the swarm) first.
    client = nbclient.NotebookClient(
        nb, timeout=240, kernel_name=KERNEL, resources={"metadata": {"path": str(tmp_path)}}
    )
    try:
        client.execute()
    finally:  # the executed copy, outputs included, for a failure's post-mortem; examples/ is never written
        nbformat.write(nb, tmp_path / "executed.ipynb")

    assert stdout_of(nb.cells[-1]).strip() == sys.prefix, "the kernel runs another Python environment"
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    summary = json.loads(stdout_of(tagged(nb, "summary")))
    assert summary["mode"] == "diloco" and summary["codec"] == "int8"

    peers = summary["peers"]
    assert len(peers) == SMALL["PEERS"]
    for peer in peers:
        # A round whose local work is dropped for a re-sync is done again: more steps, never fewer.
        assert peer["rounds_committed"] == SMALL["ROUNDS"], peer
        assert peer["steps"] >= SMALL["ROUNDS"] * SMALL["INNER_STEPS"], peer
        assert peer["loss"] < peer["first_loss"], peer
        assert math.isfinite(peer["val_loss"]), peer
        assert peer["bytes_sent"] > 0
        # int8 pseudo-gradients every INNER_STEPS steps: several times less than fp32 gradients every step.
        assert peer["bytes_per_step"] < summary["allreduce_bytes_per_step"] / 4, peer

    baseline = summary["baseline"]
    steps = max(peer["steps"] for peer in peers)
    assert baseline["steps"] == steps
    assert baseline["tokens"] == steps * SMALL["PEERS"] * SMALL["BATCH_SIZE"] * 128  # tiny: seq_len 128
    assert baseline["loss"] < baseline["first_loss"]
    assert baseline["val_loss"] is not None
