"""Category: every form of the temperature (for CLIP, the logit scale) in every call form.

Python numbers are checked on the host: 0, negative, NaN, ±inf, bool, str, None, complex,
numpy float32, values outside the computing dtype's normal range (1e-300 / 1e300 in fp32)
raise a ValueError/TypeError naming the argument. Tensors are checked for shape, dtype and
device (ValueError/TypeError); their value is never read on the host (no synchronisation,
commit 2f7b37e): a tensor <= 0 or non-finite is a ValueError from the CPU kernels (e15b2ba)
and a NaN loss and NaN gradients from the reference and triton backends. Valid forms
(int, numpy float64, 0-dim and (1,) tensors of every float dtype, a tensor that requires grad,
a non-leaf tensor, tiny 1e-8 with fp16/bf16/fp32 embeddings, huge 1e6) give the float64
reference's loss and gradients, including ∂L/∂τ.
"""
from __future__ import annotations

from decimal import Decimal
from fractions import Fraction

import numpy as np
import pytest
import torch

from adv_common import (FUSED, LOSSES, NAN, INF, assert_matches_reference, assert_rel_close, call, inputs,
                        loss_and_grads, needs_ext, trainable)


def _name(loss):
    return "logit_scale" if loss == "clip" else "temperature"


BAD_FORMS = [  # (id, value factory, error, regex after the argument's name)
    ("zero", lambda: 0.0, ValueError, "must be finite and > 0"),
    ("int-zero", lambda: 0, ValueError, "must be finite and > 0"),
    ("negative", lambda: -0.5, ValueError, "must be finite and > 0"),
    ("negative-zero", lambda: -0.0, ValueError, "must be finite and > 0"),
    ("nan", lambda: NAN, ValueError, "must be finite and > 0"),
    ("inf", lambda: INF, ValueError, "must be finite and > 0"),
    ("-inf", lambda: -INF, ValueError, "must be finite and > 0"),
    ("true", lambda: True, TypeError, "must be a float or a 0-dim tensor, got bool"),
    ("false", lambda: False, TypeError, "got bool"),
    ("str", lambda: "0.5", TypeError, "got str"),
    ("none", lambda: None, TypeError, "got NoneType"),
    ("list", lambda: [0.5], TypeError, "got list"),
    ("complex", lambda: 0.5 + 0j, TypeError, "got complex"),
    ("numpy-float32", lambda: np.float32(0.5), TypeError, "got float32"),
    ("decimal", lambda: Decimal("0.5"), TypeError, "got Decimal"),
    ("fraction", lambda: Fraction(1, 2), TypeError, "got Fraction"),
    ("underflows-fp32", lambda: 1e-300, ValueError, "outside the normal range of torch.float32"),
    ("overflows-fp32", lambda: 1e300, ValueError, "outside the normal range of torch.float32"),
    ("subnormal-fp32", lambda: 1e-40, ValueError, "outside the normal range"),
    ("int-beyond-float", lambda: 10**400, ValueError, "must be finite and > 0"),
    ("tensor-shape-2", lambda: torch.tensor([0.5, 0.5]), ValueError, r"must be a scalar \(0-dim\) tensor, got shape \(2,\)"),
    ("tensor-shape-1x1", lambda: torch.tensor([[0.5]]), ValueError, r"got shape \(1, 1\)"),
    ("tensor-empty", lambda: torch.tensor([]), ValueError, r"got shape \(0,\)"),
    ("tensor-int", lambda: torch.tensor(1), TypeError, "must be a floating tensor, got dtype torch.int64"),
    ("tensor-bool", lambda: torch.tensor(True), TypeError, "got dtype torch.bool"),
    ("tensor-complex", lambda: torch.tensor(0.5 + 0j), TypeError, "got dtype torch.complex64"),
    ("tensor-meta", lambda: torch.tensor(0.5, device="meta"), ValueError, "is on meta but the embeddings are on cpu"),
    ("numpy-array", lambda: np.array(0.5), TypeError, "got ndarray"),
]


@pytest.mark.parametrize("form,make,error,match", [pytest.param(*f, id=f[0]) for f in BAD_FORMS])
@pytest.mark.parametrize("loss", LOSSES)
def test_bad_temperature_is_a_clear_error(loss, form, make, error, match):
    xs = inputs(loss, torch.float32)
    with pytest.raises(error, match=f"{_name(loss)}.*{match}" if not match.startswith(_name(loss)) else match):
        call(loss, xs, make(), backend="reference")


@needs_ext
@pytest.mark.parametrize("loss", ["nt_xent", "clip"])
def test_bad_temperature_refused_before_any_backend_runs(loss):
    """The check is the same for the fused backend as for the reference."""
    xs = inputs(loss, torch.float32)
    with pytest.raises(ValueError, match=_name(loss)):
        call(loss, xs, -1.0, backend="cpu")


GOOD_FORMS = [  # (id, value factory, embedding dtype)
    ("int-one", lambda: 1, torch.float32),
    ("numpy-float64", lambda: np.float64(0.3), torch.float32),
    ("tensor-0d", lambda: torch.tensor(0.3), torch.float32),
    ("tensor-shape-1", lambda: torch.tensor([0.3]), torch.float32),
    ("tensor-fp64-with-fp32", lambda: torch.tensor(0.3, dtype=torch.float64), torch.float32),
    ("tensor-fp16", lambda: torch.tensor(0.3, dtype=torch.float16), torch.float32),
    ("tensor-bf16", lambda: torch.tensor(0.3, dtype=torch.bfloat16), torch.float32),
    ("tensor-fp32-with-fp64", lambda: torch.tensor(0.3), torch.float64),
    ("tensor-strided-view", lambda: torch.tensor([9.0, 0.3])[1:], torch.float32),
    ("tiny-1e-8-fp32", lambda: 1e-8, torch.float32),
    ("tiny-1e-8-bf16", lambda: 1e-8, torch.bfloat16),
    ("tiny-1e-8-fp16", lambda: 1e-8, torch.float16),
    ("tiny-bf16-tensor-1e-8", lambda: torch.tensor(1e-8, dtype=torch.bfloat16), torch.float32),
    ("huge-1e6", lambda: 1e6, torch.float32),
    ("fp64-tiny-1e-300", lambda: 1e-300, torch.float64),
    ("fp64-huge-1e300", lambda: 1e300, torch.float64),
]


@needs_ext
@pytest.mark.parametrize("form,make,dtype", [pytest.param(*f, id=f[0]) for f in GOOD_FORMS])
@pytest.mark.parametrize("loss", LOSSES)
def test_valid_temperature_forms_match_reference(loss, form, make, dtype):
    t = make()
    if isinstance(t, torch.Tensor) and t.shape == (1,):
        ref_t = t.reshape(())
    else:
        ref_t = t
    # tiny temperatures: losses ~1e8 (the gap of the largest negative to the positive over τ);
    # fp32 sums of such logits carry relative rounding of a few eps.
    tol = 1e-10 if dtype == torch.float64 else (1e-5 if dtype == torch.float32 else 2e-2)
    xs = [x.to(dtype) for x in inputs(loss)]
    got, grads = loss_and_grads(loss, xs, t, "cpu")
    ref, ref_grads = loss_and_grads(loss, [x.double() for x in xs], ref_t if not isinstance(ref_t, torch.Tensor)
                                    else ref_t.double(), "reference")
    assert_rel_close(got, ref, tol, f"{form} loss")
    if dtype == torch.float16 and form.startswith("tiny"):
        return  # ∂L/∂z ~ 1/τ = 1e8 is beyond fp16's range: inf is its correct rounding
    # gradients scale as 1/τ (CLIP: as its logit scale): compared as τ·∂L/∂x, so that their
    # norms stay in range at τ = 1e±300
    scale = float(ref_t) if not isinstance(ref_t, torch.Tensor) else float(ref_t.double())
    scale = 1 / scale if loss == "clip" else scale
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g.double() * scale, r * scale, tol, f"{form} grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("loss", LOSSES)
def test_temperature_gradient_matches_reference(loss, reduction, backend):
    """A leaf temperature tensor that requires grad: ∂L/∂τ (through the kernel's row
    statistics) against autograd through the float64 reference."""
    if reduction != "mean" and loss == "clip":
        pytest.skip("clip_loss has no reduction")
    if backend == "triton" and reduction == "sum":
        pytest.skip("interpreter time: the sum is the mean times a constant")
    xs = inputs(loss, torch.float32)
    t = torch.tensor(0.3, requires_grad=True)
    out, _ = loss_and_grads(loss, xs, t, backend, reduction)
    t64 = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ref, _ = loss_and_grads(loss, [x.double() for x in xs], t64, "reference", reduction)
    assert_rel_close(t.grad, t64.grad, 1e-5, "dL/dtau")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_non_leaf_temperature_gradient_reaches_the_parameter(loss, backend):
    """τ = exp(log τ) (the modules' parameterisation): the gradient reaches log τ."""
    xs = inputs(loss, torch.float32)
    log_t = torch.tensor(-1.2, requires_grad=True)
    loss_and_grads(loss, xs, log_t.exp(), backend)
    log_t64 = torch.tensor(-1.2, dtype=torch.float64, requires_grad=True)
    loss_and_grads(loss, [x.double() for x in xs], log_t64.exp(), "reference")
    assert_rel_close(log_t.grad, log_t64.grad, 1e-5, "dL/dlog_tau")


BAD_TENSOR_VALUES = {
    "zero": lambda: torch.tensor(0.0),
    "negative": lambda: torch.tensor(-0.3),
    "nan": lambda: torch.tensor(NAN),
    "inf": lambda: torch.tensor(INF),
    "fp16-1e-8-rounds-to-0": lambda: torch.tensor(1e-8, dtype=torch.float16),
    "underflowed-exp": lambda: torch.tensor(-200.0, requires_grad=True).exp(),
}
def _bad_tensor_cases():
    cases = []
    for loss in ("nt_xent", "supcon", "info_nce_queue", "clip"):
        for form in BAD_TENSOR_VALUES:
            for backend in ("reference", "cpu", "triton"):
                marks = {"cpu": [needs_ext], "triton": [FUSED[1].marks[0]], "reference": []}[backend]
                cases.append(pytest.param(loss, form, backend, marks=marks, id=f"{loss}-{form}-{backend}"))
    return cases


@pytest.mark.parametrize("loss,form,backend", _bad_tensor_cases())
def test_bad_temperature_tensor_is_never_a_finite_loss(loss, form, backend):
    """The CPU kernels check the value they read (no host sync there): a ValueError naming the
    temperature / logit scale (e15b2ba). The reference and triton never read it: the loss and
    every gradient come out NaN (2f7b37e)."""
    t = BAD_TENSOR_VALUES[form]()
    if t.is_leaf:
        t = t.clone().requires_grad_(True)
    xs = inputs(loss, torch.float32)
    reduction = "none" if loss != "clip" else "mean"
    if backend == "cpu":
        with pytest.raises(ValueError, match="temperature|logit scale"):
            loss_and_grads(loss, xs, t, backend, reduction=reduction)
        return
    out, grads = loss_and_grads(loss, xs, t, backend, reduction=reduction)
    assert torch.isnan(out).all(), f"loss {out} from a bad temperature"
    assert all(torch.isnan(g).all() for g in grads)


def _min_top2_gap(xs):
    """The smallest gap between a row's two largest cosine similarities (self and cross)."""
    u = torch.nn.functional.normalize(torch.cat([x.double().flatten(0, -2) for x in xs]), dim=1)
    s = u @ u.T
    s.fill_diagonal_(-2)
    return float((s.topk(2, dim=1).values @ torch.tensor([1.0, -1.0], dtype=torch.float64)).min())


@needs_ext
@pytest.mark.parametrize("dim", [6, 33])
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "clip"])
def test_tiny_temperature_across_tile_blocks(loss, dim):
    """τ = 1e-8 with 264 rows: 3 row blocks (the last of 8 rows) × 2 column blocks of the CPU
    kernels' tiles. At such a temperature one ulp of a similarity moves exp(s/τ − lse) by e^6,
    so the backward must use the forward's similarities bit for bit, also those it reads
    transposed (s_jk as s_kj; key gradients from query tiles): this machine's BLAS (MKL on an
    AMD EPYC) rounds small products A·Bᵀ and B·Aᵀ differently where one side has 8 or 16 rows."""
    xs = inputs(loss, torch.float32, rows=88 if loss == "multiview" else 132, dim=dim, seed=3)
    assert _min_top2_gap(xs) > 1e-6  # one-hot at τ = 1e-8: gap/τ ≥ 100, past fp32 logit noise (~10)
    t = 1e8 if loss == "clip" else 1e-8
    got, grads = loss_and_grads(loss, xs, t, "cpu")
    ref, ref_grads = loss_and_grads(loss, [x.double() for x in xs], t, "reference")
    assert_rel_close(got, ref, 1e-5, "loss")
    for g, r in zip(grads, ref_grads):
        assert_rel_close(g.double() * 1e-8, r * 1e-8, 1e-5, "grad")
