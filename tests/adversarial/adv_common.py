"""Shared pieces of the adversarial probes: one registry of the five public loss functions
(six call forms: InfoNCE with and without a queue), their float64 reference on the same
rounded inputs, and a subprocess runner with a timeout for probes that could crash or hang.

Every right-answer probe compares a backend's loss and input gradients with
`backend="reference"` on float64 copies of the same (rounded) inputs, within
`helpers.TOLERANCE` of the input dtype.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastntxent as fx
import fastntxent._extension as ext
from helpers import TOLERANCE, assert_rel_close, rel_err  # noqa: F401  (re-exported)

NAN, INF = float("nan"), float("inf")
LOSSES = ("nt_xent", "multiview", "supcon", "info_nce", "info_nce_queue", "clip")
LABELS = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1, 3, 3, 1, 0, 4, 2, 4, 3]).repeat(8)

needs_ext = pytest.mark.skipif(not ext.has_cpu_kernels(), reason="fastntxent._C not built")


def _triton_ok() -> bool:
    from fastntxent.backends import _triton_import_error

    return os.environ.get("TRITON_INTERPRET") == "1" and _triton_import_error() is None


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="needs TRITON_INTERPRET=1 and triton")

# The CPU-tensor backends that run here (the CUDA cases need a GPU).
FUSED = [pytest.param("cpu", id="cpu", marks=needs_ext), pytest.param("triton", id="triton", marks=needs_triton)]


def inputs(loss: str, dtype=torch.float64, rows: int = 4, dim: int = 6, queue_rows: int = 5, seed: int = 0):
    """The embedding tensors of one call form (a list; the queue last), from a fixed seed."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if loss == "multiview":
        return [r(3, rows, dim)]
    if loss == "supcon":
        return [r(2 * rows, dim)]
    if loss == "info_nce_queue":
        return [r(rows, dim), r(rows, dim), r(queue_rows, dim)]
    return [r(rows, dim), r(rows, dim)]


def call(loss: str, xs, t, **kw):
    """The public function of `loss` on the tensors `xs` with temperature (for CLIP: the logit
    scale) `t`; `reduction` is dropped for CLIP (it has none)."""
    if loss == "nt_xent":
        return fx.nt_xent(xs[0], xs[1], t, **kw)
    if loss == "multiview":
        return fx.multiview_nt_xent(xs[0], t, **kw)
    if loss == "supcon":
        return fx.supcon(xs[0], LABELS[: xs[0].shape[0]].to(xs[0].device), t, **kw)
    if loss == "info_nce":
        return fx.info_nce(xs[0], xs[1], None, t, **kw)
    if loss == "info_nce_queue":
        return fx.info_nce(xs[0], xs[1], xs[2], t, **kw)
    if loss == "clip":
        kw.pop("reduction", None)
        return fx.clip_loss(xs[0], xs[1], t, **kw)
    raise KeyError(loss)


def trainable(loss: str, xs):
    """The inputs that receive a gradient (the queue gets none)."""
    return xs[:2] if loss == "info_nce_queue" else xs


def loss_and_grads(loss, xs, t, backend, reduction="mean", **kw):
    """(loss, [∂ of every trainable input]) with an upstream gradient that is not 1."""
    xs = [x.detach().clone() for x in xs]
    for x in trainable(loss, xs):
        x.requires_grad_(True)
    out = call(loss, xs, t, backend=backend, reduction=reduction, **kw)
    weight = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).to(out.dtype).view(out.shape)
    (out * weight).sum().backward()
    return out.detach(), [x.grad for x in trainable(loss, xs)]


def to64(t):
    """A temperature as the float64 reference takes it (tensors detached, same value)."""
    if isinstance(t, torch.Tensor):
        return t.detach().to(torch.float64)
    return t


def assert_matches_reference(loss, xs, t, backend, dtype=torch.float32, reduction="mean", tol=None, what="", **kw):
    """Loss and input gradients of `backend` on `xs` rounded to `dtype` against the float64
    reference on the same rounded values."""
    rounded = [x.detach().to(dtype) for x in xs]
    got, got_g = loss_and_grads(loss, rounded, t, backend, reduction, **kw)
    ref, ref_g = loss_and_grads(loss, [x.to(torch.float64) for x in rounded], to64(t), "reference", reduction, **kw)
    bound = tol if tol is not None else TOLERANCE[dtype]
    assert torch.isfinite(got).all(), f"{what}: loss {got} from finite inputs"
    assert_rel_close(got, ref, bound, f"{what} loss")
    for i, (g, r) in enumerate(zip(got_g, ref_g)):
        assert g is not None and g.dtype == rounded[i].dtype and g.shape == rounded[i].shape, f"{what} grad {i}"
        assert_rel_close(g, r, bound, f"{what} d/dx{i}")


# ---------------------------------------------------------------------------------------
# Subprocesses: a segfault or a hang fails one probe, not the run
# ---------------------------------------------------------------------------------------
def subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("TRITON_INTERPRET", "1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), env.get("PYTHONPATH")) if p)
    env["OMP_NUM_THREADS"] = env.get("OMP_NUM_THREADS", "2")
    return env


def run_python(code: str, timeout: float = 60, cwd=None) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter; a timeout is a test failure that names the hang."""
    try:
        return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                              timeout=timeout, env=subprocess_env(), cwd=cwd)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"hang: no exit within {timeout} s\nstdout: {e.stdout}\nstderr: {e.stderr}")


def assert_subprocess_ok(p: subprocess.CompletedProcess, what=""):
    assert p.returncode == 0, (f"{what}: exit code {p.returncode} (a negative code is a signal, e.g. -11 "
                               f"a segfault)\nstdout: {p.stdout[-2000:]}\nstderr: {p.stderr[-3000:]}")


# A long-lived worker interpreter for the many short crash-prone probes: each probe's code runs
# in it with a timeout; a crash (segfault, abort) or a hang fails that probe only, and the next
# probe gets a fresh worker. It saves the ~2 s import of torch per probe.
_WORKER_SRC = r'''
import contextlib, io, json, sys, traceback
sys.path[:0] = json.loads(sys.argv[1])
import torch, fastntxent  # noqa: F401  (the import cost paid once)
out = sys.stdout
sys.stdout = sys.stderr
out.write("ready\n")
out.flush()
for line in sys.stdin:
    code = json.loads(line)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            exec(compile(code, "<probe>", "exec"), {"__name__": "__probe__"})
        reply = {"ok": True, "stdout": buf.getvalue()}
    except BaseException as e:  # noqa: BLE001
        reply = {"ok": False, "stdout": buf.getvalue(), "error": type(e).__name__, "message": str(e),
                 "traceback": traceback.format_exc()}
    out.write(json.dumps(reply) + "\n")
    out.flush()
'''


class Worker:
    def __init__(self):
        self.proc = None

    def _start(self):
        import json

        here = os.path.dirname(os.path.abspath(__file__))
        paths = [here, os.path.dirname(here), os.path.dirname(os.path.dirname(here))]
        self.proc = subprocess.Popen([sys.executable, "-u", "-c", _WORKER_SRC, json.dumps(paths)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, env=subprocess_env())
        if self._answer(120) != "ready\n":
            self.close()
            pytest.fail("the worker interpreter did not start")

    def _answer(self, timeout):
        import select

        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if ready else None

    def run(self, code: str, timeout: float = 60) -> dict:
        """Run `code` in the worker; returns {"ok", "stdout", ["error", "message", "traceback"]}."""
        import json

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        line = self._answer(timeout)
        if line is None:
            self.close()
            pytest.fail(f"hang: no answer within {timeout} s")
        if not line:
            rc = self.proc.wait(timeout=10)
            self.proc = None
            pytest.fail(f"the worker died (exit code {rc}; negative: a signal, e.g. -11 a segfault)")
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
