"""Cross-similarity family (docs/maths.md §2): MoCo InfoNCE (queue / in-batch) and CLIP.

The fused C++ CPU kernel against the literal float64 reference (odd sizes, queue sizes,
temperatures, learnable temperature / logit_scale), the operator itself (pos_offset,
opcheck), input validation, modules and MemoryQueue."""
from __future__ import annotations

import math

import pytest
import torch

import fastntxent as fx
from fastntxent import _extension, reference
from helpers import TOLERANCE, assert_rel_close, rel_err

needs_cross = pytest.mark.skipif(not _extension.has_cross_kernels(), reason="fastntxent._C without cross ops")
BACKENDS = [pytest.param("cpu", marks=needs_cross), "reference"]


def _leaf(x, dtype):
    return x.to(dtype).detach().requires_grad_(True)


def _grads(loss, inputs):
    return torch.autograd.grad(loss, inputs)


# ---------------------------------------------------------------------------- info_nce


@pytest.mark.parametrize("backend", ["reference"])  # the fused backends: tests/test_cross_suite.py
@pytest.mark.parametrize("M,D,K", [(1, 3, None), (5, 2, None), (67, 9, None), (300, 17, None),
                                   (1, 4, 1), (7, 5, 3), (67, 9, 300), (130, 33, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_info_nce_matches_float64_reference(backend, M, D, K, dtype):
    q64, k64 = torch.randn(M, D, dtype=torch.float64), torch.randn(M, D, dtype=torch.float64)
    queue = None if K is None else torch.randn(K, D, dtype=torch.float64)
    tau = 0.2
    q, k = _leaf(q64, dtype), _leaf(k64, dtype)
    loss = fx.info_nce(q, k, None if queue is None else queue.to(dtype), tau, backend=backend)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    gq, gk = _grads(loss, [q, k])
    # The reference sees the same (rounded) inputs in float64.
    qr, kr = _leaf(q.detach(), torch.float64), _leaf(k.detach(), torch.float64)
    ref = reference.info_nce_loss(qr, kr, None if queue is None else queue.to(dtype).double(), tau)
    rq, rk = _grads(ref, [qr, kr])
    # The CPU kernel computes in fp32 from the bf16 values; the reference backend rounds the
    # normalised rows to bf16 as the GPU kernels do (backends.Backend.operand_dtype).
    tol = TOLERANCE[dtype] if dtype != torch.bfloat16 or backend == "reference" else 1e-5
    assert_rel_close(loss, ref, tol, "loss")
    gtol = TOLERANCE[dtype] if dtype == torch.bfloat16 else max(tol, 1e-5) if dtype != torch.float64 else tol
    assert_rel_close(gq, rq, gtol, "grad q")
    assert_rel_close(gk, rk, gtol, "grad k")
    assert gq.dtype == dtype and gk.dtype == dtype


@needs_cross
@pytest.mark.parametrize("tau", [0.01, 0.07, 1.0, 10.0])
@pytest.mark.parametrize("K", [None, 50])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_info_nce_temperatures_and_reductions(tau, K, reduction):
    M, D = 37, 8
    q, k = torch.randn(M, D, dtype=torch.float64), torch.randn(M, D, dtype=torch.float64)
    queue = None if K is None else torch.randn(K, D, dtype=torch.float64)
    out, ref = [], []
    for fn, sink in ((fx.info_nce, out), (reference.info_nce_loss, ref)):
        qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
        t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
        if fn is fx.info_nce:
            loss = fn(qq, kk, queue, t, reduction=reduction, backend="cpu")
        else:
            loss = fn(qq, kk, queue, t, reduction=reduction)
        w = torch.linspace(0.5, 1.5, M, dtype=torch.float64) if reduction == "none" else 1.0
        sink.extend([loss, *_grads((loss * w).sum(), [qq, kk, t])])
    for name, a, b in zip(("loss", "grad q", "grad k", "grad tau"), out, ref):
        assert_rel_close(a, b, 1e-10, name)


@needs_cross
@pytest.mark.parametrize("K", [None, 19])
def test_learnable_temperature_module_matches_reference(K):
    M, D = 23, 6
    q, k = torch.randn(M, D, requires_grad=True), torch.randn(M, D, requires_grad=True)
    queue = None if K is None else torch.randn(K, D)
    mod = fx.InfoNCELoss(temperature=0.15, learnable_temperature=True, backend="cpu")
    loss = mod(q, k, queue)
    loss.backward()
    qr, kr = _leaf(q.detach(), torch.float64), _leaf(k.detach(), torch.float64)
    log_t = torch.tensor(math.log(0.15), dtype=torch.float64, requires_grad=True)
    ref = reference.info_nce_loss(qr, kr, None if queue is None else queue.double(), log_t.exp())
    rq, rk, rt = _grads(ref, [qr, kr, log_t])
    assert_rel_close(loss, ref, 1e-5, "loss")
    assert_rel_close(q.grad, rq, 1e-5, "grad q")
    assert_rel_close(k.grad, rk, 1e-5, "grad k")
    assert_rel_close(mod.log_temperature.grad, rt, 1e-5, "grad log τ")
    assert mod.log_temperature.grad.abs() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_gets_no_gradient_and_detached_keys_work(backend):
    q = torch.randn(9, 5, requires_grad=True)
    k = torch.randn(9, 5)  # momentum encoder output: no grad
    queue = torch.randn(13, 5, requires_grad=True)
    loss = fx.info_nce(q, k, queue, 0.2, backend=backend)
    loss.backward()
    assert queue.grad is None and k.grad is None
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0


@needs_cross
def test_queue_in_other_dtype_and_non_contiguous_inputs():
    base = torch.randn(11, 2, 7, dtype=torch.float64)
    q, k = base[:, 0, :].float(), torch.randn(7, 11).t()  # non-contiguous
    q.requires_grad_()
    queue = torch.randn(7, 30, dtype=torch.float64).t()  # non-contiguous, float64
    loss = fx.info_nce(q, k, queue, 0.3, backend="cpu")
    ref = reference.info_nce_loss(q.double(), k.double(), queue, 0.3)
    assert_rel_close(loss, ref, 1e-5, "loss")


@needs_cross
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_low_temperature_half_precision_is_finite(dtype):
    q = torch.randn(40, 16).to(dtype).requires_grad_()
    k = torch.randn(40, 16).to(dtype).requires_grad_()
    loss = fx.info_nce(q, k, torch.randn(70, 16).to(dtype), 0.01, backend="cpu")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(q.grad.float()).all() and torch.isfinite(k.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K", [None, 12])
def test_info_nce_statistics(backend, K):
    M, D = 20, 4
    q = torch.randn(M, D, dtype=torch.float64)
    k = q + 0.8 * torch.randn(M, D, dtype=torch.float64)
    queue = None if K is None else torch.randn(K, D, dtype=torch.float64)
    _, stats = fx.info_nce(q, k, queue, 0.2, backend=backend, return_stats=True)
    u, v = reference.normalize_rows(q), reference.normalize_rows(k)
    if queue is None:
        logits, target = u @ v.T, torch.arange(M)
        neg = (logits.sum() - logits.diag().sum()) / (M * (M - 1))
    else:
        w = reference.normalize_rows(queue)
        logits = torch.cat([(u * v).sum(1, keepdim=True), u @ w.T], 1)
        target, neg = torch.zeros(M, dtype=torch.long), (u @ w.T).mean()
    assert float(stats["top1_accuracy"]) == pytest.approx(float((logits.argmax(1) == target).double().mean()))
    assert float(stats["positive_cosine"]) == pytest.approx(float((u * v).sum(1).mean()))
    assert float(stats["negative_cosine"]) == pytest.approx(float(neg))


# ---------------------------------------------------------------------------- CLIP


@pytest.mark.parametrize("backend", ["reference"])  # the fused backends: tests/test_cross_suite.py
@pytest.mark.parametrize("M,D", [(1, 3), (6, 2), (67, 9), (257, 20)])
@pytest.mark.parametrize("scale", [1.0, 1 / 0.07, 100.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_clip_matches_float64_reference(backend, M, D, scale, dtype):
    a64, b64 = torch.randn(M, D, dtype=torch.float64), torch.randn(M, D, dtype=torch.float64)
    a, b = _leaf(a64, dtype), _leaf(b64, dtype)
    s = torch.tensor(scale, dtype=dtype, requires_grad=True)
    loss = fx.clip_loss(a, b, s, backend=backend)
    ga, gb, gs = _grads(loss, [a, b, s])
    ar, br = _leaf(a64, torch.float64), _leaf(b64, torch.float64)
    sr = torch.tensor(scale, dtype=torch.float64, requires_grad=True)
    ref = reference.clip_loss(ar, br, sr)
    ra, rb, rs = _grads(ref, [ar, br, sr])
    tol = TOLERANCE[dtype] * (10 if dtype == torch.float32 and scale == 100.0 else 1)
    for name, x, y in (("loss", loss, ref), ("grad a", ga, ra), ("grad b", gb, rb), ("grad scale", gs, rs)):
        assert_rel_close(x, y, tol, name)


@needs_cross
def test_clip_module_learnable_scale_and_stats():
    a, b = torch.randn(31, 8, requires_grad=True), torch.randn(31, 8, requires_grad=True)
    mod = fx.ClipLoss(backend="cpu")
    assert "log_logit_scale" in dict(mod.named_parameters())
    loss, stats = mod(a, b, return_stats=True)
    loss.backward()
    ls = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    ref = reference.clip_loss(a.detach().double(), b.detach().double(), ls.exp())
    (rls,) = _grads(ref, [ls])
    assert_rel_close(loss, ref, 1e-5, "loss")
    assert_rel_close(mod.log_logit_scale.grad, rls, 1e-5, "grad log scale")
    u, v = reference.normalize_rows(a.detach()), reference.normalize_rows(b.detach())
    s = u @ v.T
    acc = 0.5 * ((s.argmax(1) == torch.arange(31)).float().mean() + (s.argmax(0) == torch.arange(31)).float().mean())
    assert float(stats["top1_accuracy"]) == pytest.approx(float(acc))
    # The clamp at max_logit_scale (CLIP's 100) stops the gradient.
    clamped = fx.ClipLoss(logit_scale=200.0, backend="cpu")
    assert float(clamped.logit_scale.detach()) == pytest.approx(100.0)
    clamped(a.detach(), b.detach()).backward()
    assert clamped.log_logit_scale.grad == 0
    fixed = fx.ClipLoss(logit_scale=10.0, learnable=False)
    assert not list(fixed.parameters()) and fixed.logit_scale == 10.0


@needs_cross
def test_modules_match_functional():
    q, k, queue = torch.randn(10, 4), torch.randn(10, 4), torch.randn(16, 4)
    assert torch.equal(fx.InfoNCELoss(0.3)(q, k, queue), fx.info_nce(q, k, queue, 0.3))
    assert torch.equal(fx.ClipLoss(5.0, learnable=False)(q, k), fx.clip_loss(q, k, 5.0))


# ---------------------------------------------------------------------------- the operator


@needs_cross
@pytest.mark.parametrize("in_batch", [True, False])
@pytest.mark.parametrize("K", [0, 70])
def test_operator_rows_with_offset_match_reference(in_batch, K):
    """Local rows against global keys (the distributed path): positive of row i = key i + off."""
    M, N, D, off = 37, 300, 7, 150
    q = torch.nn.functional.normalize(torch.randn(M, D, dtype=torch.float64), dim=1).requires_grad_()
    k = torch.nn.functional.normalize(torch.randn(N, D, dtype=torch.float64), dim=1).requires_grad_()
    queue = torch.randn(K, D, dtype=torch.float64) if K else None
    s = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    if not in_batch and queue is None:
        queue = torch.randn(3, D, dtype=torch.float64)
    got = torch.ops.fastntxent.cross_forward(q, k, queue, s, off, in_batch)
    ref = reference.cross_similarity_rows(q, k, queue, s, off, in_batch)
    for name, x, y in zip(("lse", "pos", "ps_sum", "top1"), got, ref):
        assert_rel_close(x, y, 1e-12, name)
    wa, wb = torch.rand(M, dtype=torch.float64), torch.randn(M, dtype=torch.float64)
    g = _grads((got[0] * wa + got[1] * wb).sum(), [q, k, s])
    r = _grads((ref[0] * wa + ref[1] * wb).sum(), [q, k, s])
    for name, x, y in zip(("grad q", "grad k", "grad scale"), g, r):
        assert_rel_close(x, y, 1e-11, name)


@needs_cross
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_cross_ops(dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.nn.functional.normalize(torch.randn(13, 5, dtype=torch.float64), dim=1).to(dtype)
    k = torch.nn.functional.normalize(torch.randn(20, 5, dtype=torch.float64), dim=1).to(dtype)
    queue = torch.randn(9, 5, dtype=torch.float64).to(dtype)
    s = torch.tensor(3.0, dtype=acc)
    grad = dtype != torch.bfloat16
    for qu, off, in_batch in ((None, 0, True), (queue, 7, True), (queue, 2, False)):
        args = (q.clone().requires_grad_(grad), k.clone().requires_grad_(grad), qu, s.clone().requires_grad_(True),
                off, in_batch)
        torch.library.opcheck(torch.ops.fastntxent.cross_forward.default, args)
        lse, *_ = torch.ops.fastntxent.cross_forward(q, k, qu, s, off, in_batch)
        for need_k in (True, False):
            torch.library.opcheck(torch.ops.fastntxent.cross_backward.default,
                                  (q, k, qu, s, off, in_batch, lse, torch.rand(13, dtype=acc),
                                   -torch.rand(13, dtype=acc), need_k))


@needs_cross
def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(6, 4)
            self.clip = fx.ClipLoss(backend="cpu")
            self.moco = fx.InfoNCELoss(0.2, learnable_temperature=True, backend="cpu")

        def forward(self, x, y, queue):
            a, b = self.head(x), self.head(y)
            return self.clip(a, b) + self.moco(a, b, queue)

    torch._dynamo.reset()
    model = Model()
    x, y, queue = torch.randn(10, 6), torch.randn(10, 6), torch.randn(12, 4)
    loss = torch.compile(model, fullgraph=True)(x, y, queue)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, y, queue)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- MemoryQueue


def test_memory_queue_ring_buffer_and_state_dict():
    mq = fx.MemoryQueue(dim=4, size=10)
    assert mq.keys.shape == (10, 4)
    assert torch.allclose(mq.keys.norm(dim=1), torch.ones(10))
    first = torch.randn(6, 4)
    mq.enqueue(first)
    assert torch.equal(mq.keys[:6], first) and int(mq.ptr) == 6
    second = torch.randn(6, 4, requires_grad=True)
    mq.enqueue(second)  # wraps around: slots 6..9 then 0..1
    assert torch.equal(mq.keys[6:], second[:4].detach()) and torch.equal(mq.keys[:2], second[4:].detach())
    assert int(mq.ptr) == 2 and not mq.keys.requires_grad
    big = torch.randn(25, 4)
    mq.enqueue(big)  # more than the size: the newest 10 survive
    assert set(map(tuple, mq.keys.tolist())) == set(map(tuple, big[-10:].tolist()))
    sd = mq.state_dict()
    assert set(sd) == {"queue", "ptr"}
    other = fx.MemoryQueue(dim=4, size=10)
    other.load_state_dict(sd)
    assert torch.equal(other.keys, mq.keys) and int(other.ptr) == int(mq.ptr)
    # Used as the queue of the loss.
    loss = fx.info_nce(torch.randn(3, 4), torch.randn(3, 4), mq.keys)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(8, 5)), ValueError,
         r"queue must have shape \(K, D\) with D = 3"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(8)), ValueError, "queue must have shape"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(0, 3)), ValueError, "queue must not be empty"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), [[1.0]]), TypeError, "queue must be a torch.Tensor"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "q and k must have the same shape"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "q and k must have the same shape"),
        (lambda: fx.info_nce(torch.randn(4), torch.randn(4)), ValueError, "q must be 2-D"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3).double()), TypeError, "q and k must have the same dtype"),
        (lambda: fx.info_nce(torch.randn(4, 3).int(), torch.randn(4, 3)), TypeError, "q has dtype"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), None, 0.0), ValueError, "temperature must be finite and > 0"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), None, -0.2), ValueError, "temperature"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), None, float("nan")), ValueError, "temperature"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), None, "0.2"), TypeError, "temperature must be a float"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), backend="tpu"), ValueError, "backend must be one of"),
        (lambda: fx.info_nce(torch.randn(4, 3).double(), torch.randn(4, 3).double(), backend="triton"), ValueError,
         "does not take float64"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, backend="cuda"), ValueError, "covers the self-similarity family only"),
        (lambda: fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), gather=True), ValueError,
         "gather=True needs an initialised torch.distributed process group"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 10.0, gather=True), ValueError, "process group"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), gather=True), ValueError, "process group"),
        (lambda: fx.supcon(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), gather=True), ValueError, "process group"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(3, 3), 10.0), ValueError, "a and b must have the same shape"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3).half(), 10.0), TypeError, "a and b must have the same dtype"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "logit_scale must be finite and > 0"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError, "logit_scale must be a scalar"),
        (lambda: fx.clip_loss(torch.randn(4, 3), torch.randn(4, 3), None), TypeError, "logit_scale must be a float"),
        (lambda: fx.InfoNCELoss(temperature=-1.0), ValueError, "temperature"),
        (lambda: fx.ClipLoss(logit_scale=0.0), ValueError, "logit_scale"),
        (lambda: fx.MemoryQueue(dim=0, size=10), ValueError, "dim must be an int >= 1"),
        (lambda: fx.MemoryQueue(dim=4, size=10).enqueue(torch.randn(3, 5)), ValueError, r"keys must have shape \(B, 4\)"),
        (lambda: fx.MemoryQueue(dim=4, size=10, gather=True).enqueue(torch.randn(3, 4)), ValueError, "process group"),
    ],
)
def test_bad_input_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_device_mismatch_is_reported():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        fx.info_nce(torch.randn(4, 3), meta)
    with pytest.raises(ValueError, match="queue is on meta but q is on cpu"):
        fx.info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 3, device="meta"))
    with pytest.raises(ValueError, match="b is on meta but a is on cpu"):
        fx.clip_loss(torch.randn(4, 3), meta, 10.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_dimensional_embeddings(backend):
    """D = 1: normalised rows are ±1, the gradients through the normalisation vanish."""
    q, k = torch.randn(6, 1, requires_grad=True), torch.randn(6, 1, requires_grad=True)
    for loss, ref in ((fx.info_nce(q, k, torch.randn(4, 1), 0.5, backend=backend),
                       None),
                      (fx.clip_loss(q, k, 3.0, backend=backend), reference.clip_loss(q.double(), k.double(), 3.0))):
        if ref is not None:
            assert_rel_close(loss, ref, 1e-5, "loss")
        gq, gk = _grads(loss, [q, k])
        assert gq.abs().max() < 1e-5 and gk.abs().max() < 1e-5


def test_rel_err_helper_sees_nan():
    assert rel_err(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
