"""Category: NaN / inf in every input position and dtype, and extreme magnitudes.

docs/maths.md §5: a NaN or ±inf anywhere in the embeddings, keys or queue makes the loss, every
per-row loss, every statistic and every gradient NaN — never a finite value (no laundering).
Extends tests/test_nonfinite.py (fp32, first-half/second-half rows, one queue case) to every
tensor position of every call form, float64 / bfloat16 / float16, -inf in the queue, a NaN in
one view of a list, and every statistic. Magnitudes: rows of 1e30 / 1e-30 (fp32), 1e4 / 1e-3
(fp16), 1e300 / 1e-300 (fp64), mixed magnitudes in one batch, subnormal and zero rows give
the float64 reference's answer (normalisation by max(‖z‖, 1e-8), scale-safe).
"""
from __future__ import annotations

import pytest
import torch

import fastntxent as fx
from adv_common import (FUSED, INF, NAN, assert_matches_reference, assert_rel_close, call, inputs, loss_and_grads,
                        needs_ext, trainable)

POSITIONS = {  # loss -> tensor positions (index in the inputs list) to poison
    "nt_xent": (0, 1), "multiview": (0,), "supcon": (0,), "info_nce": (0, 1), "info_nce_queue": (0, 1, 2), "clip": (0, 1),
}


def _poisoned(loss, position, value, dtype):
    xs = inputs(loss, dtype)
    x = xs[position].clone()
    flat = x.view(-1)
    flat[flat.numel() - 1] = value  # the last entry: the last row (for multiview, of the last view)
    xs[position] = x
    return xs


def _nonfinite_cases():
    cases = []
    for loss, positions in POSITIONS.items():
        for pos in positions:
            for dtype in (torch.float64, torch.bfloat16, torch.float16):
                for name, value in (("nan", NAN), ("inf", INF), ("-inf", -INF)):
                    if name == "-inf" and dtype != torch.float64:
                        continue
                    cases.append(pytest.param(loss, pos, value, dtype, id=f"{loss}-x{pos}-{name}-{str(dtype)[6:]}"))
    return cases


@needs_ext
@pytest.mark.parametrize("loss,position,value,dtype", _nonfinite_cases())
def test_nonfinite_anywhere_gives_nan_loss_and_gradients(loss, position, value, dtype):
    xs = _poisoned(loss, position, value, dtype)
    out, grads = loss_and_grads(loss, xs, 0.3, "cpu", reduction="none" if loss != "clip" else "mean")
    assert torch.isnan(out).all(), f"finite loss {out} from a non-finite input (laundered)"
    for i, g in enumerate(grads):
        assert torch.isnan(g).all(), f"gradient {i} not all NaN: {g}"


@needs_ext
@pytest.mark.parametrize("backend", ["cpu", "reference"] + [FUSED[1]])
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce", "info_nce_queue", "clip"])
def test_nonfinite_input_makes_every_statistic_nan(loss, backend):
    xs = _poisoned(loss, len(POSITIONS[loss]) - 1, NAN, torch.float32)
    _, stats = call(loss, xs, 0.3, backend=backend, return_stats=True)
    floating = {k: v for k, v in stats.items() if v.is_floating_point() and k != "logit_scale"}
    assert floating and all(torch.isnan(v) for v in floating.values()), stats


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("value", [NAN, -INF], ids=["nan", "-inf"])
def test_nonfinite_queue_row_with_raw_rows(backend, value):
    """normalize=False: the raw queue is copied for backward; its NaN / -inf still poisons."""
    q, k, queue = inputs("info_nce_queue", torch.float32)
    queue[3, 2] = value
    out, (gq, gk) = loss_and_grads("info_nce_queue", [q, k, queue], 0.3, backend, reduction="none", normalize=False)
    assert torch.isnan(out).all() and torch.isnan(gq).all() and torch.isnan(gk).all()


@pytest.mark.parametrize("backend", FUSED)
def test_nan_in_one_view_of_a_list(backend):
    views = [torch.randn(4, 6) for _ in range(3)]
    views[2][1, 1] = NAN
    views = [v.requires_grad_(True) for v in views]
    out = fx.multiview_nt_xent(views, 0.3, backend=backend, reduction="sum")
    out.backward()
    assert torch.isnan(out) and all(torch.isnan(v.grad).all() for v in views)


@pytest.mark.parametrize("backend", FUSED)
def test_inf_in_fp16_from_overflowing_cast(backend):
    """A value beyond fp16's range becomes inf when the caller casts: still NaN out."""
    z = torch.randn(8, 6)
    z[0, 0] = 1e5
    z = z.half().requires_grad_(True)
    assert torch.isinf(z[0, 0])
    out = fx.supcon(z, torch.arange(8) % 3, 0.3, backend=backend)
    out.backward()
    assert torch.isnan(out) and torch.isnan(z.grad).all()


# ---------------------------------------------------------------------------------------
# Magnitudes: the answer of the unit rows
# ---------------------------------------------------------------------------------------
SCALES = [
    pytest.param(torch.float32, 1e30, id="fp32-1e30"),
    pytest.param(torch.float32, 1e-30, id="fp32-1e-30"),
    pytest.param(torch.float16, 1e4, id="fp16-1e4"),  # |z| up to ~3e4 of fp16's 65504
    pytest.param(torch.float16, 1e-3, id="fp16-1e-3"),  # subnormal entries, gradients ~1e3
    pytest.param(torch.bfloat16, 1e37, id="bf16-1e37"),
    pytest.param(torch.float64, 1e300, id="fp64-1e300"),
    pytest.param(torch.float64, 1e-300, id="fp64-1e-300"),
]


@needs_ext
@pytest.mark.parametrize("dtype,scale", SCALES)
@pytest.mark.parametrize("loss", ["nt_xent", "info_nce_queue", "clip"])
def test_huge_and_tiny_rows_match_reference(loss, dtype, scale):
    """Rows of magnitude `scale`: the loss of the unit rows (rows below eps = 1e-8 in norm are
    divided by eps, literally as the reference does). The reference sees the same rounded
    values, brought back to magnitude ~1 when huge (so that its literal norm cannot overflow)."""
    xs = [(x * scale).to(dtype) for x in inputs(loss)]
    assert all(torch.isfinite(x).all() for x in xs)
    back = (lambda x: x.double() / scale) if scale > 1 else (lambda x: x.double())
    got, grads = loss_and_grads(loss, xs, 0.3, "cpu")
    ref, ref_grads = loss_and_grads(loss, [back(x) for x in xs], 0.3, "reference")
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 2e-2)
    assert_rel_close(got, ref, tol, "loss")
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all(), f"gradient {g} not finite"
        if dtype in (torch.float64, torch.float32):  # ∂L/∂z = (∂L/∂z at magnitude 1) / scale
            assert_rel_close(g.double() * scale if scale > 1 else g, r, tol, "gradient")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_mixed_magnitudes_in_one_batch(loss, backend):
    """Rows of 1e30, 1 and 1e-6 side by side (fp32): each normalised on its own."""
    xs = inputs(loss)
    scales = torch.tensor([1e30, 1.0, 1e-6, 1e15], dtype=torch.float64)
    xs = [x * scales.repeat(x.shape[0] // 4 + 1)[: x.shape[0], None] for x in xs[:2]] + xs[2:]
    assert_matches_reference(loss, xs, 0.3, backend, what=f"{loss} mixed magnitudes")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("scale", [pytest.param(1e-37, id="1e-37"),
                                   pytest.param(1e-40, id="subnormal-1e-40")])
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_tiny_and_subnormal_rows(loss, backend, scale):
    """Rows of 1e-37 and of fp32 subnormals (1e-40): below eps, so divided by eps: nearly zero
    rows, finite loss and gradients."""
    xs = inputs(loss)
    xs[0] = xs[0] * scale
    assert_matches_reference(loss, xs, 0.3, backend, tol=1e-5, what=f"{loss} subnormal rows")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce", "info_nce_queue", "clip"])
def test_all_zero_input_is_finite_and_right(loss, backend):
    """Every row zero (every logit 0): the loss is log of the column count, finite; gradients
    of zero rows through max(‖z‖, eps) are finite."""
    xs = [torch.zeros_like(x) for x in inputs(loss, torch.float32)]
    out, grads = loss_and_grads(loss, xs, 0.3, backend)
    ref, _ = loss_and_grads(loss, [x.double() for x in xs], 0.3, "reference")
    assert_rel_close(out, ref, 1e-6, "loss of zero rows")
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("which", ["query", "key", "queue"])
def test_zero_rows_in_the_cross_family(backend, which):
    xs = inputs("info_nce_queue")
    xs[{"query": 0, "key": 1, "queue": 2}[which]][1] = 0
    assert_matches_reference("info_nce_queue", xs, 0.3, backend, what=f"zero {which} row")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_large_raw_rows_without_normalisation(loss, backend):
    """normalize=False with rows of norm ~1e3 (logits ~1e7): fp32 holds them; the answer is
    the reference's."""
    xs = [x * 1e3 for x in inputs(loss)]
    rounded = [x.float() for x in xs]
    got = call(loss, rounded, 0.3, backend=backend, normalize=False)
    ref = call(loss, [x.double() for x in rounded], 0.3, backend="reference", normalize=False)
    assert_rel_close(got, ref, 1e-5, "raw rows")


def test_trainable_helper_excludes_queue():
    assert len(trainable("info_nce_queue", [1, 2, 3])) == 2
