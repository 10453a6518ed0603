"""Every examples/*.py runs with --quick, exits 0 and ends with a line of key=value pairs in
which final_loss < initial_loss. A new example is picked up by the glob."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.py"))


def parse_final_line(stdout: str) -> dict:
    last = stdout.strip().splitlines()[-1]
    return {key: float(value) for key, value in (item.split("=", 1) for item in last.split())}


@pytest.fixture(scope="module")
def runs():
    """All examples started at once (most of each run is importing torch), one thread each:
    oversubscribed OpenMP threads on a few shared cores turn seconds into tens of seconds."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {script: subprocess.Popen([sys.executable, str(script), "--quick", "--seed", "0"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      env=env, cwd=script.parent)
             for script in EXAMPLES}
    yield procs
    for proc in procs.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_examples_found():
    assert EXAMPLES, "no examples/*.py"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_and_loss_decreases(runs, script):
    stdout, stderr = runs[script].communicate(timeout=180)
    assert runs[script].returncode == 0, f"{script.name} failed:\n{stdout}\n{stderr}"
    final = parse_final_line(stdout)
    assert final["final_loss"] < final["initial_loss"], stdout


def test_siglip_example_retrieval_rises(runs):
    """examples/siglip.py: held-out retrieval top-1 well above its start (chance 1/500)."""
    script = next(p for p in EXAMPLES if p.stem == "siglip")
    stdout, stderr = runs[script].communicate(timeout=180)
    assert runs[script].returncode == 0, stderr
    final = parse_final_line(stdout)
    assert final["top1"] > final["initial_top1"] + 0.1, stdout
