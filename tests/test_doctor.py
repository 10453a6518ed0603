"""fastntxent.doctor: the --quick run on the CPU (fused C++ kernels and the reference), the
Triton backend under the interpreter, and that a wrong answer makes it fail (so that its
PASS means something)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import fastntxent._extension as ext
from fastntxent.doctor import sampled
from fastntxent.doctor.availability import backend_status
from fastntxent.doctor.cases import LOSSES
from fastntxent.doctor.compare import Variant, judge, perturbed, rel_err, rounded, run_backend, run_oracle, \
    upstream_weights

needs_cpu_kernels = pytest.mark.skipif(not ext.has_cpu_kernels(), reason="fastntxent._C not built")
DTYPES = {"float32", "float64", "bfloat16", "float16"}


def run_doctor(tmp_path, *args, interpret: bool = False, timeout: int = 300):
    """Run `python -m fastntxent.doctor --json <tmp> *args`; (exit code, JSON, stdout)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "doctor.json"
    proc = subprocess.run([sys.executable, "-m", "fastntxent.doctor", "--json", str(out), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)
    report = json.loads(out.read_text()) if out.exists() else None
    return proc.returncode, report, proc.stdout + proc.stderr


def rows_of(report, backend, device="cpu"):
    return [r for r in report["accuracy"] if r["backend"] == backend and r["device"] == device]


@needs_cpu_kernels
def test_quick_run_on_cpu_passes_for_cpu_and_reference(tmp_path):
    code, report, out = run_doctor(tmp_path, "--quick", "--seed", "0")
    assert code == 0, out
    assert report["doctor"]["exit_code"] == 0 and report["summary"]["FAIL"] == 0
    for backend in ("cpu", "reference"):
        rows = rows_of(report, backend)
        assert {(r["loss"], r["dtype"]) for r in rows} == {(l, d) for l in LOSSES for d in DTYPES}
        for r in rows:
            assert r["status"] == "PASS" and r["cases"] >= 12, r
            assert 0 <= r["worst_error"] <= r["tolerance"], r
    # No GPU and no interpreter here: the GPU backends say why they cannot run.
    for backend in ("triton", "cuda"):
        (row,) = rows_of(report, backend)
        assert row["status"] == "N/A" and row["reason"], row
    assert report["backends"]["cuda"]["cuda"]["self"]["reason"]
    assert report["environment"]["torch"] == torch.__version__
    timing = [t for t in report["timing"] if t["backend"] == "cpu"]
    assert len(timing) == 2 and all(t["status"] == "PASS" and t["ms"] > 0 for t in timing), timing
    for section in ("== environment", "== backends", "== accuracy", "== timing", "== summary"):
        assert section in out


def test_quick_run_triton_under_interpreter(tmp_path):
    code, report, out = run_doctor(tmp_path, "--quick", "--seed", "0", "--backends", "triton",
                                   "--no-timing", interpret=True, timeout=240)
    assert report is not None, out
    rows = rows_of(report, "triton")
    assert {(r["loss"], r["dtype"]) for r in rows} == {(l, d) for l in LOSSES for d in DTYPES - {"float64"}}
    assert all(r["cases"] >= 12 for r in rows), rows
    failed = [r for r in rows if r["status"] != "PASS"]
    assert code == 0 and not failed, failed


@needs_cpu_kernels
def test_injected_fault_fails_the_run(tmp_path):
    code, report, out = run_doctor(tmp_path, "--quick", "--seed", "0", "--backends", "cpu", "--losses", "supcon",
                                   "--dtypes", "float32", "--no-timing", "--inject-fault", "1e-4")
    assert code == 1, out
    (row,) = rows_of(report, "cpu")
    assert row["status"] == "FAIL" and row["failures"], row
    assert "FAIL" in out


@needs_cpu_kernels
@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_quantity_is_checked(loss):
    """A 1e-3 relative error in any one quantity (loss, each input gradient, the scalar's
    gradient) fails the comparison; a NaN anywhere fails; the untouched result passes."""
    case = LOSSES[loss]
    gen = torch.Generator().manual_seed(1)
    variant = Variant(0.5, True, case.reductions[-1])
    inputs = rounded(case.make(9, 17, gen), torch.float32)
    weights = upstream_weights(inputs.rows, gen)
    ref, floors = run_oracle(case, inputs, variant, weights, "cpu")
    got = run_backend(case, inputs, variant, weights, backend="cpu", device="cpu", dtype=torch.float32, gen=gen)
    base = run_backend(case, inputs, variant, weights, backend="reference", device="cpu", dtype=torch.float32,
                       gen=gen)
    assert judge(case, got, ref, floors, base, torch.float32, "cpu").passed
    names = list(got.quantities(case))
    assert len(names) == 2 + len(inputs.grad)
    for name in names:
        for bad in (1e-3, float("nan")):
            wrong = perturbed(got, 0.0)
            if name == "loss":
                wrong.loss = wrong.loss * (1 + bad)
            elif name == f"d{case.scalar_name}":
                wrong.scalar_grad = wrong.scalar_grad * (1 + bad)
            else:
                wrong.grads[name[1:]] = wrong.grads[name[1:]] * (1 + bad)
            result = judge(case, wrong, ref, floors, base, torch.float32, "cpu")
            assert not result.passed, (name, bad, result.errors)


def test_rel_err_never_lets_nan_or_inf_pass():
    b = torch.ones(3)
    assert rel_err(torch.tensor([1.0, float("nan"), 1.0]), b, 1e-6) == float("inf")
    assert rel_err(torch.tensor([1.0, float("inf"), 1.0]), b, 1e-6) == float("inf")
    assert rel_err(torch.ones(2), b, 1e-6) == float("inf")  # shape mismatch


@needs_cpu_kernels
def test_backend_status_reports_the_library_reason():
    assert backend_status("cpu", "cpu") == (True, "")
    ok, why = backend_status("cuda", "cpu")
    assert not ok and "CUDA" in why


@needs_cpu_kernels
@pytest.mark.parametrize("check", [sampled.nt_xent_sampled, sampled.info_nce_sampled])
def test_chunked_large_m_reference_is_exact(check, monkeypatch):
    """The chunked float64 reference of the GPU large-M case, on a small size across several
    chunks: against the CPU kernel in float64 it agrees to rounding, in every quantity."""
    monkeypatch.setattr(sampled, "CHUNK_ELEMENTS", 7 * 150)
    result = check("cpu", "cpu", torch.float64, 150, 9, 0.1, samples=12, seed=3)
    assert result.passed and len(result.errors) >= 3, result.errors
    assert all(err < 1e-12 for err, _ in result.errors.values()), result.errors


@needs_cpu_kernels
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce"])
def test_large_m_row_plumbing(loss, monkeypatch):
    """The GPU-only large-M row, run on the CPU kernel at a small M (the GPU run is unchecked here)."""
    from fastntxent.doctor import cli

    monkeypatch.setattr(cli, "LARGE_M", 300)
    monkeypatch.setattr(cli, "LARGE_SAMPLES", 8)
    row = cli.large_m_row("cpu", "cpu", loss, torch.float32, seed=0)
    assert row.status == "PASS" and row.cases == 1 and row.worst_error <= row.tolerance, row
    assert cli.large_m_row("cuda", "cpu", loss, torch.float32, seed=0).status == "N/A"
