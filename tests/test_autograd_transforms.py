"""Which autograd transforms the losses support (docs/maths.md §6), each outcome tested:

- first-order reverse mode (`.backward`, `torch.autograd.grad`): every backend;
- double backward (create_graph=True: ∂²L/∂τ², Hessian-vector products): the reference
  backend; the fused backends raise NotImplementedError (their backward is first-order);
- torch.func transforms (grad, vmap, jvp) and forward-mode dual tensors: the reference
  backend; the fused backends raise NotImplementedError naming the transform;
- torch.compile with a Python-float temperature that changes every call (a schedule): works,
  at most one recompile.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
import torch.autograd.forward_ad as fwAD
from torch.func import grad, jvp, vmap

import fastntxent as fx
import fastntxent._extension as ext
from helpers import assert_rel_close

needs_ext = pytest.mark.skipif(not ext.has_cpu_kernels(), reason="fastntxent._C not built")


def _losses(backend):
    labels = torch.tensor([0, 1, 0, 1, 2, 2, 0, 1])
    queue = torch.linspace(-1, 1, 18, dtype=torch.float64).view(3, 6)
    return {
        "nt_xent": lambda z, t: fx.nt_xent(z[:4], z[4:], t, backend=backend),
        "supcon": lambda z, t: fx.supcon(z, labels, t, backend=backend),
        "info_nce": lambda z, t: fx.info_nce(z[:4], z[4:], queue.to(z.dtype), t, backend=backend),
        "clip": lambda z, t: fx.clip_loss(z[:4], z[4:], 1 / t, backend=backend),
    }


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce", "clip"])
def test_double_backward_fused_refuses_reference_is_right(loss):
    z = torch.randn(8, 6, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    value = _losses("cpu")[loss](z, t)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(value, t, create_graph=True)  # refused where the graph would be built
    # The reference: ∂²L/∂τ² and a Hessian-vector product against finite differences.
    ref = _losses("reference")[loss]
    (g_ref,) = torch.autograd.grad(ref(z, t), t, create_graph=True)
    (g2,) = torch.autograd.grad(g_ref, t)
    h = 1e-5
    fd = (torch.autograd.grad(ref(z, t + h), t)[0] - torch.autograd.grad(ref(z, t - h), t)[0]) / (2 * h)
    assert_rel_close(g2, fd, 1e-5, "d2L/dtau2")
    v = torch.randn_like(z)
    (gz,) = torch.autograd.grad(ref(z, t), z, create_graph=True)
    (hvp,) = torch.autograd.grad((gz * v).sum(), z)
    fd = (torch.autograd.grad(ref(z + h * v, t), z)[0] - torch.autograd.grad(ref(z - h * v, t), z)[0]) / (2 * h)
    assert_rel_close(hvp, fd, 1e-4, "Hessian-vector product")


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce"])
def test_torch_func_and_forward_mode(loss):
    z = torch.randn(8, 6, dtype=torch.float64)
    fused, ref = _losses("cpu")[loss], _losses("reference")[loss]
    with pytest.raises(NotImplementedError, match="torch.func"):
        grad(lambda zz: fused(zz, 0.3))(z)
    with pytest.raises(NotImplementedError, match="torch.func"):
        jvp(lambda zz: fused(zz, 0.3), (z,), (torch.ones_like(z),))
    with pytest.raises(NotImplementedError, match="torch.func"):
        vmap(lambda zz: fused(zz, 0.3))(z[None])
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError, match="forward-mode"):
            fused(fwAD.make_dual(z, torch.ones_like(z)), 0.3)
    # The reference supports them: torch.func.grad equals autograd, jvp equals grad·v.
    zz = z.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(ref(zz, 0.3), zz)
    assert_rel_close(grad(lambda x: ref(x, 0.3))(z), expected, 1e-12, "torch.func.grad")
    v = torch.randn_like(z)
    _, tangent = jvp(lambda x: ref(x, 0.3), (z,), (v,))
    assert_rel_close(tangent, (expected * v).sum(), 1e-10, "jvp")


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce", "clip"])
def test_compile_with_a_temperature_schedule(loss):
    """A Python float that changes every call: right values, at most one recompile."""
    fn = _losses("auto")[loss]
    z = torch.randn(8, 6)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(fn, fullgraph=True, backend=counter)
    for tau in (0.5, 0.3, 0.2, 0.1, 0.07):
        assert_rel_close(compiled(z, tau), fn(z, tau), 1e-5, f"tau={tau}")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiles for 5 temperatures"


def test_temperature_checked_under_compile_too():
    """Eager raises a ValueError; compiled, a temperature <= 0 cannot give a finite loss."""
    z = torch.randn(8, 6)
    with pytest.raises(ValueError, match="temperature"):
        fx.nt_xent(z[:4], z[4:], -0.5, backend="reference")
    torch._dynamo.reset()
    compiled = torch.compile(lambda a, t: fx.nt_xent(a[:4], a[4:], t, backend="reference"), fullgraph=True)
    compiled(z, 0.5)
    compiled(z, 0.3)
    out = compiled(z, -0.5)
    assert torch.isnan(out)
