"""Category: autograd transforms, torch.compile, CPU autocast and threads (docs/maths.md §6).

Extends tests/test_autograd_transforms.py (double backward for four losses and torch.func /
forward AD for two, on backend="cpu") to every call form and the triton backend, and adds the
first-order transforms that must work on the fused backends (autograd.functional.jacobian,
batched grads, activation checkpointing, retain_graph, inference_mode, no_grad), the
reference's answers under vmap / jacrev / torch.func.grad, torch.compile(fullgraph=True) of
every call form (values and gradients equal eager; NaN poisoning and a bad float
temperature survive compilation), bf16 autocast on the CPU, and the same loss from four
Python threads at once (bit-equal to the single-thread result).
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import grad, hessian, jacrev, jvp, vmap

import fastntxent as fx
from adv_common import (FUSED, LOSSES, NAN, assert_matches_reference, assert_rel_close, call, inputs, loss_and_grads,
                        needs_ext, trainable)


def _fn(loss, backend, xs_rest=None):
    """A function of the first input only (the others fixed), as torch.func wants it."""
    xs = inputs(loss, torch.float64 if backend in ("cpu", "reference") else torch.float32)

    def f(x0):
        return call(loss, [x0] + xs[1:], 0.3, backend=backend)
    return f, xs[0]


# ---------------------------------------------------------------------------------------
# Transforms the fused backends refuse, by name
# ---------------------------------------------------------------------------------------
def _refusal_cases():
    cases = []
    for backend in FUSED:
        b = backend.values[0]
        for loss in LOSSES:
            for tr in ("double_backward", "func.grad", "vmap", "jvp", "jacrev", "hessian", "forward_ad",
                       "autograd.functional.hessian"):
                covered = b == "cpu" and (
                    (tr == "double_backward" and loss in ("nt_xent", "supcon", "info_nce_queue", "clip"))
                    or (tr in ("func.grad", "vmap", "jvp", "forward_ad") and loss in ("nt_xent", "info_nce_queue")))
                if covered:  # in tests/test_autograd_transforms.py
                    continue
                if b == "triton" and loss in ("multiview", "supcon", "info_nce") and tr not in ("double_backward", "vmap"):
                    continue  # interpreter time: the refusal is one shared check
                cases.append(pytest.param(loss, b, tr, marks=list(backend.marks),
                                          id=f"{loss}-{b}-{tr}"))
    return cases


@pytest.mark.parametrize("loss,backend,transform", _refusal_cases())
def test_unsupported_transform_is_refused_by_name(loss, backend, transform):
    f, x = _fn(loss, backend)
    match = {"double_backward": "double backward", "autograd.functional.hessian": "double backward",
             "forward_ad": "forward-mode"}.get(transform, "torch.func")
    with pytest.raises(NotImplementedError, match=match):
        if transform == "double_backward":
            x = x.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(f(x), x, create_graph=True)
            g.sum().backward()
        elif transform == "autograd.functional.hessian":
            torch.autograd.functional.hessian(f, x)
        elif transform == "func.grad":
            grad(f)(x)
        elif transform == "vmap":
            vmap(f)(x[None].expand(2, *x.shape))
        elif transform == "jvp":
            jvp(f, (x,), (torch.ones_like(x),))
        elif transform == "jacrev":
            jacrev(f)(x)
        elif transform == "hessian":
            hessian(f)(x)
        elif transform == "forward_ad":
            with fwAD.dual_level():
                f(fwAD.make_dual(x, torch.ones_like(x)))


# ---------------------------------------------------------------------------------------
# The reference under torch.func: right answers
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", LOSSES)
def test_reference_func_grad_equals_autograd(loss):
    f, x = _fn(loss, "reference")
    xx = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(f(xx), xx)
    assert_rel_close(grad(f)(x), expected, 1e-12, "torch.func.grad")


@pytest.mark.parametrize("loss", LOSSES)
def test_reference_vmap_equals_a_loop(loss):
    f, x = _fn(loss, "reference")
    batch = torch.stack([x, 2 * x + 1, -x])
    expected = torch.stack([f(b) for b in batch])
    assert_rel_close(vmap(f)(batch), expected, 1e-12, "vmap")


@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_reference_jacrev_equals_autograd_jacobian(loss):
    f, x = _fn(loss, "reference")
    expected = torch.autograd.functional.jacobian(f, x)
    assert_rel_close(jacrev(f)(x), expected, 1e-12, "jacrev")


# ---------------------------------------------------------------------------------------
# First-order transforms the fused backends must serve: right answers
# ---------------------------------------------------------------------------------------
def _per_row(loss):
    """A function with a vector output (reduction="none"; CLIP: the two towers' mean)."""
    if loss == "clip":
        return lambda xs, **kw: torch.stack([call(loss, xs, 0.3, **kw), call(loss, [xs[1], xs[0]], 0.3, **kw)])
    return lambda xs, **kw: call(loss, xs, 0.3, reduction="none", **kw)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("vectorize", [False, True], ids=["loop", "vectorized"])
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_autograd_functional_jacobian_matches_reference(loss, vectorize, backend):
    """vectorize=True runs the fused backward under vmap's batched-gradient fallback."""
    if backend == "triton" and vectorize:
        pytest.skip("interpreter time: one vectorized case on cpu per loss")
    xs = inputs(loss, torch.float32)
    f = _per_row(loss)
    got = torch.autograd.functional.jacobian(lambda x0: f([x0] + xs[1:], backend=backend), xs[0], vectorize=vectorize)
    x64 = [x.double() for x in xs]
    ref = torch.autograd.functional.jacobian(lambda x0: f([x0] + x64[1:], backend="reference"), x64[0])
    assert_rel_close(got, ref, 1e-5, "jacobian")


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce_queue", "clip"])
def test_is_grads_batched_matches_reference(loss):
    xs = inputs(loss, torch.float32)
    f = _per_row(loss)
    x0 = xs[0].clone().requires_grad_(True)
    out = f([x0] + xs[1:], backend="cpu")
    eye = torch.eye(out.numel())
    (got,) = torch.autograd.grad(out, x0, eye, is_grads_batched=True)
    x64 = xs[0].double().requires_grad_(True)
    out64 = f([x64] + [x.double() for x in xs[1:]], backend="reference")
    ref = torch.stack([torch.autograd.grad(out64, x64, e.double(), retain_graph=True)[0] for e in eye])
    assert_rel_close(got, ref, 1e-5, "batched grads")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "info_nce_queue", "clip"])
def test_activation_checkpointing_matches_reference(loss, backend):
    """torch.utils.checkpoint recomputes the forward in backward: same gradients."""
    xs = inputs(loss, torch.float32)
    lin = torch.nn.Linear(xs[0].shape[-1], xs[0].shape[-1]).double()
    x0 = xs[0].clone().requires_grad_(True)

    def f(a, backend=backend, dtype=torch.float32):
        return call(loss, [lin.to(dtype)(a)] + [x.to(dtype) for x in xs[1:]], 0.3, backend=backend)

    out = torch.utils.checkpoint.checkpoint(f, x0, use_reentrant=False)
    out.backward()
    x64 = xs[0].double().requires_grad_(True)
    f(x64, "reference", torch.float64).backward()
    assert_rel_close(x0.grad, x64.grad, 1e-5, "checkpointed gradient")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_retain_graph_backward_twice_accumulates_exactly(loss, backend):
    xs = inputs(loss, torch.float32)
    x0 = xs[0].clone().requires_grad_(True)
    t = torch.tensor(0.3, requires_grad=True)
    out = call(loss, [x0] + xs[1:], t, backend=backend)
    out.backward(retain_graph=True)
    g1, t1 = x0.grad.clone(), t.grad.clone()
    out.backward()
    assert torch.equal(x0.grad, 2 * g1) and torch.equal(t.grad, 2 * t1)


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce_queue", "clip"])
def test_inference_mode_and_no_grad_values(loss, backend, mode):
    xs = [x.float() for x in inputs(loss)]
    with getattr(torch, mode)():
        got = call(loss, xs, 0.3, backend=backend, reduction="none" if loss != "clip" else "mean")
    ref = call(loss, [x.double() for x in xs], 0.3, backend="reference", reduction="none" if loss != "clip" else "mean")
    assert not got.requires_grad
    assert_rel_close(got, ref, 1e-5, mode)


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "clip"])
def test_gradient_of_the_temperature_only(loss):
    """No embedding requires grad, only τ: the backward runs for τ alone."""
    xs = inputs(loss, torch.float32)
    t = torch.tensor(0.3, requires_grad=True)
    call(loss, xs, t, backend="cpu").backward()
    t64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    call(loss, [x.double() for x in xs], t64, backend="reference").backward()
    assert_rel_close(t.grad, t64.grad, 1e-5, "dL/dtau alone")


# ---------------------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------------------
def _compiled(fn, backend="aot_eager", **kw):
    torch._dynamo.reset()
    return torch.compile(fn, fullgraph=True, backend=backend, **kw)


@needs_ext
@pytest.mark.parametrize("loss", LOSSES)
def test_compile_matches_eager_values_and_gradients(loss):
    """aot_eager traces the operators' fake kernels and registered autograd."""
    xs = inputs(loss, torch.float32)
    t = torch.tensor(0.3, requires_grad=True)
    f = _compiled(lambda *a: call(loss, list(a[:-1]), a[-1], backend="cpu", reduction="none" if loss != "clip" else "mean"))
    leaves = [x.clone().requires_grad_(True) for x in trainable(loss, xs)] + xs[len(trainable(loss, xs)):]
    out = f(*leaves, t)
    (out * torch.linspace(0.5, 1.5, out.numel()).view(out.shape)).sum().backward()
    e_leaves = [x.clone().requires_grad_(True) for x in trainable(loss, xs)] + xs[len(trainable(loss, xs)):]
    te = torch.tensor(0.3, requires_grad=True)
    eo = call(loss, e_leaves, te, backend="cpu", reduction="none" if loss != "clip" else "mean")
    (eo * torch.linspace(0.5, 1.5, eo.numel()).view(eo.shape)).sum().backward()
    assert_rel_close(out, eo, 1e-6, "compiled loss")
    for a, b in zip(leaves, e_leaves):
        if b.grad is not None:
            assert_rel_close(a.grad, b.grad, 1e-6, "compiled gradient")
    assert_rel_close(t.grad, te.grad, 1e-6, "compiled dL/dtau")


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce_queue"])
def test_compile_keeps_nan_poisoning(loss):
    xs = inputs(loss, torch.float32)
    xs[-1][0, 0] = NAN
    f = _compiled(lambda *a: call(loss, list(a), 0.3, backend="cpu"))
    assert torch.isnan(f(*xs))


@pytest.mark.parametrize("backend", [pytest.param("cpu", marks=needs_ext), "reference"])
@pytest.mark.parametrize("loss", ["supcon", "info_nce_queue", "clip"])
def test_compile_bad_float_temperature_is_never_a_finite_loss(loss, backend):
    """Under compile the eager Python check cannot run (the float is symbolic): the CPU kernel
    refuses the value with its ValueError, the reference poisons the loss to NaN."""
    xs = inputs(loss, torch.float32)
    f = _compiled(lambda *a: call(loss, list(a[:-1]), a[-1], backend=backend))
    f(*xs, 0.5)
    f(*xs, 0.4)
    if backend == "cpu":
        with pytest.raises(ValueError, match="temperature|logit scale"):
            f(*xs, -0.5)
    else:
        assert torch.isnan(f(*xs, -0.5))


@needs_ext
def test_compile_dynamic_batch_sizes():
    f = _compiled(lambda a, b: fx.nt_xent(a, b, 0.3, backend="cpu"), dynamic=True)
    for n in (3, 5, 8):
        a, b = torch.randn(n, 6), torch.randn(n, 6)
        assert_rel_close(f(a, b), fx.nt_xent(a.double(), b.double(), 0.3, backend="reference"), 1e-5, f"n={n}")


@needs_ext
def test_compile_inductor_learnable_clip_module():
    m = fx.ClipLoss(10.0)
    a, b = torch.randn(5, 6), torch.randn(5, 6)
    f = _compiled(m, backend="inductor")
    out = f(a, b)
    out.backward()
    g = m.log_logit_scale.grad.clone()
    m.log_logit_scale.grad = None
    m(a, b).backward()
    assert_rel_close(out, m(a, b), 1e-6, "loss")
    assert_rel_close(g, m.log_logit_scale.grad, 1e-5, "dL/dlog_scale")


# ---------------------------------------------------------------------------------------
# CPU autocast (bf16)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", LOSSES)
def test_autocast_fp32_inputs_keep_fp32_accuracy(loss, backend):
    """fp32 embeddings inside a bf16 autocast region: the fused operators are not autocast
    ops, so the loss keeps fp32 accuracy."""
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert_matches_reference(loss, inputs(loss), 0.3, backend, what=f"{loss} under autocast")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce_queue", "clip"])
def test_autocast_bf16_activations_match_reference(loss, backend):
    """Embeddings made by a Linear under autocast (bf16): the loss and their gradient equal the
    float64 reference on the same bf16 values."""
    xs = inputs(loss, torch.float32)
    lin = torch.nn.Linear(xs[0].shape[-1], xs[0].shape[-1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(xs[0])
        assert h.dtype == torch.bfloat16
        h.retain_grad()
        rest = [lin(x) for x in xs[1:2]] + [x.bfloat16() for x in xs[2:]]
        out = call(loss, [h] + rest, 0.5, backend=backend)
    out.backward()
    h64 = h.detach().double().requires_grad_(True)
    ref = call(loss, [h64] + [r.detach().double() for r in rest], 0.5, backend="reference")
    ref.backward()
    assert_rel_close(out, ref, 2e-2, "loss")
    assert_rel_close(h.grad, h64.grad, 2e-2, "gradient")


# ---------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------
def _threaded(work, n=4, repeats=3):
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def run(i):
        try:
            barrier.wait(timeout=30)
            for _ in range(repeats):
                results[i] = work()
        except BaseException as e:  # noqa: BLE001  (reported below)
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a thread hung"
    assert not errors, errors
    return results


@pytest.mark.parametrize("backend", [FUSED[0], pytest.param("triton", marks=list(FUSED[1].marks),
                                                            id="triton")])
@pytest.mark.parametrize("loss", LOSSES)
def test_four_threads_give_the_single_thread_result(loss, backend):
    if backend == "triton" and loss in ("multiview", "supcon", "info_nce"):
        pytest.skip("interpreter time: three call forms on triton")
    xs = inputs(loss, torch.float32, rows=16, dim=24, queue_rows=40)
    t = torch.tensor(0.2, requires_grad=True)

    def work():
        out, grads = loss_and_grads(loss, xs, t, backend)
        return out, grads

    single = work()
    for out, grads in _threaded(work, repeats=1 if backend == "triton" else 3):
        assert torch.equal(out, single[0]) and all(torch.equal(a, b) for a, b in zip(grads, single[1]))


@needs_ext
def test_four_threads_one_module_with_learnable_temperature():
    m = fx.NTXentLoss(0.2, learnable_temperature=True)
    a, b = torch.randn(16, 24), torch.randn(16, 24)

    def work():
        return torch.autograd.grad(m(a, b), m.log_temperature)[0]

    single = work()
    assert all(torch.equal(r, single) for r in _threaded(work))
