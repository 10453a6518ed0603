"""Category: bad and odd inputs to the five public functions — shapes, ranks, dtypes (int,
bool, complex, float8), devices (meta, mixed), empty and one-row inputs, non-tensors, labels
and queues of every wrong kind, bad options; odd but valid inputs (one row, D = 1, strided,
negative-bit and stride-0 views, a queue of another dtype, labels of other integer dtypes)
give the float64 reference's answer. The C++ operators on meta tensors and huge shapes run
in a subprocess (a segfault or hang fails one probe).

Not repeated here: the nt_xent cases of tests/test_api.py (rank 1, empty rows, int dtype, a
list, mixed dtypes, mismatched shapes, bad reduction/backend names).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fastntxent as fx
from adv_common import (FUSED, LABELS, assert_matches_reference, assert_rel_close, call, inputs, loss_and_grads,
                        needs_ext)

R = lambda *s, **kw: torch.randn(*s, **kw)  # noqa: E731
F8 = [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d is not None]

PAIRS = {  # function, argument names, a call with the two tensors
    "nt_xent": (("z1", "z2"), lambda a, b, **kw: fx.nt_xent(a, b, 0.5, **kw)),
    "info_nce": (("q", "k"), lambda a, b, **kw: fx.info_nce(a, b, None, 0.2, **kw)),
    "info_nce_queue": (("q", "k"), lambda a, b, **kw: fx.info_nce(
        a, b, R(5, 6, device=a.device if isinstance(a, torch.Tensor) else "cpu"), 0.2, **kw)),
    "clip": (("a", "b"), lambda a, b, **kw: fx.clip_loss(a, b, 10.0, **kw)),
}
# Already in tests/test_api.py for nt_xent: skip those exact probes there.
_IN_TEST_API = {("nt_xent", "rank1_first"), ("nt_xent", "empty_rows"), ("nt_xent", "int64_first"),
                ("nt_xent", "list_first"), ("nt_xent", "mixed_dtype"), ("nt_xent", "rows_mismatch")}


def _pair_cases():
    """(id, thunk, error, regex) for every pair function: each argument position, each kind."""
    cases = []
    for fname, (names, f) in PAIRS.items():
        a, b = names
        table = [
            ("rank1_first", lambda f=f: f(R(6), R(6)), ValueError, rf"{a} must be 2-D"),
            ("rank0_first", lambda f=f: f(R(()), R(4, 6)), ValueError, rf"{a} must be 2-D"),
            ("rank3_second", lambda f=f: f(R(4, 6), R(1, 4, 6)), ValueError, rf"{b} must be 2-D"),
            ("int64_first", lambda f=f: f(torch.ones(4, 6, dtype=torch.long), R(4, 6)), TypeError, rf"{a} has dtype"),
            ("bool_second", lambda f=f: f(R(4, 6), R(4, 6) > 0), TypeError, rf"{b} has dtype torch.bool"),
            ("uint8_both", lambda f=f: f(torch.ones(4, 6, dtype=torch.uint8), torch.ones(4, 6, dtype=torch.uint8)),
             TypeError, rf"{a} has dtype torch.uint8"),
            ("complex_first", lambda f=f: f(R(4, 6, dtype=torch.complex64), R(4, 6)), TypeError, rf"{a} has dtype"),
            ("complex128_second", lambda f=f: f(R(4, 6), R(4, 6, dtype=torch.complex128)), TypeError,
             rf"{b} has dtype torch.complex128"),
            ("mixed_dtype", lambda f=f: f(R(4, 6), R(4, 6).half()), TypeError, rf"{a} and {b} must have the same dtype"),
            ("mixed_bf16_fp64", lambda f=f: f(R(4, 6).bfloat16(), R(4, 6).double()), TypeError, "same dtype"),
            ("rows_mismatch", lambda f=f: f(R(4, 6), R(5, 6)), ValueError, rf"{a} and {b} must have the same shape"),
            ("dim_mismatch", lambda f=f: f(R(4, 6), R(4, 7)), ValueError, rf"{a} and {b} must have the same shape"),
            ("empty_rows", lambda f=f: f(R(0, 6), R(0, 6)), ValueError, rf"{a} must not be empty"),
            ("empty_dim", lambda f=f: f(R(4, 0), R(4, 0)), ValueError, rf"{a} must not be empty"),
            ("list_first", lambda f=f: f([[0.0] * 6] * 4, R(4, 6)), TypeError, rf"{a} must be a torch.Tensor"),
            ("numpy_second", lambda f=f: f(R(4, 6), np.ones((4, 6), np.float32)), TypeError,
             rf"{b} must be a torch.Tensor, got ndarray"),
            ("none_first", lambda f=f: f(None, R(4, 6)), TypeError, rf"{a} must be a torch.Tensor, got NoneType"),
            ("meta_second", lambda f=f: f(R(4, 6), R(4, 6, device="meta")), ValueError, rf"{b} is on meta but {a} is on cpu"),
            ("meta_first", lambda f=f: f(R(4, 6, device="meta"), R(4, 6)), ValueError, rf"{b} is on cpu but {a} is on meta"),
            ("bad_reduction", lambda f=f, fname=fname: f(R(4, 6), R(4, 6), **({} if fname == "clip" else {"reduction": "MEAN"})),
             (ValueError, TypeError) if fname != "clip" else None, "reduction"),
            ("backend_cpu_on_meta", lambda f=f: f(R(4, 6, device="meta"), R(4, 6, device="meta"), backend="cpu"),
             ValueError, 'backend="cpu" needs CPU tensors, got tensors on meta'),
            ("backend_triton_on_meta", lambda f=f: f(R(4, 6, device="meta"), R(4, 6, device="meta"), backend="triton"),
             ValueError, 'backend="triton" needs'),
            ("backend_none", lambda f=f: f(R(4, 6), R(4, 6), backend=None), ValueError, "backend must be one of"),
            ("backend_upper", lambda f=f: f(R(4, 6), R(4, 6), backend="CPU"), ValueError, "backend must be one of"),
        ]
        for F8dt in F8:
            table.append((f"{F8dt}_first".replace("torch.", ""), lambda f=f, d=F8dt: f(R(4, 6).to(d), R(4, 6).to(d)),
                          TypeError, rf"{a} has dtype torch.float8"))
        for pid, thunk, err, rx in table:
            if (fname, pid) in _IN_TEST_API or err is None:
                continue
            cases.append(pytest.param(thunk, err, rx, id=f"{fname}-{pid}"))
    return cases


def _other_cases():
    z = R(8, 6)
    lab = LABELS[:8]
    q = R(4, 6)
    views = [R(4, 6), R(4, 6)]
    return [
        # supcon: z and labels of every wrong kind
        pytest.param(lambda: fx.supcon(R(8), lab), ValueError, "z must be 2-D", id="supcon-z-rank1"),
        pytest.param(lambda: fx.supcon(z.long(), lab), TypeError, "z has dtype torch.int64", id="supcon-z-int"),
        pytest.param(lambda: fx.supcon(z.to(torch.complex64), lab), TypeError, "z has dtype", id="supcon-z-complex"),
        pytest.param(lambda: fx.supcon(R(0, 6), lab[:0]), ValueError, "z must not be empty", id="supcon-z-empty"),
        pytest.param(lambda: fx.supcon(z, lab.double()), TypeError, "labels must be an integer tensor", id="supcon-labels-float64"),
        pytest.param(lambda: fx.supcon(z, lab > 0), TypeError, "labels must be an integer tensor, got dtype torch.bool",
                     id="supcon-labels-bool"),
        pytest.param(lambda: fx.supcon(z, lab.to(torch.complex64)), TypeError, "labels must be an integer tensor",
                     id="supcon-labels-complex"),
        pytest.param(lambda: fx.supcon(z, lab.view(2, 4)), ValueError, r"labels must have shape \(8,\)", id="supcon-labels-2d-same-numel"),
        pytest.param(lambda: fx.supcon(z, lab[:1].reshape(())), ValueError, r"labels must have shape \(8,\)", id="supcon-labels-0d"),
        pytest.param(lambda: fx.supcon(z, torch.arange(9)), ValueError, r"labels must have shape \(8,\)", id="supcon-labels-too-long"),
        pytest.param(lambda: fx.supcon(z, np.arange(8)), TypeError, "labels must be a torch.Tensor, got ndarray", id="supcon-labels-numpy"),
        pytest.param(lambda: fx.supcon(z, None), TypeError, "labels must be a torch.Tensor, got NoneType", id="supcon-labels-none"),
        pytest.param(lambda: fx.supcon(z, lab.to("meta")), ValueError, "labels is on meta but z is on cpu", id="supcon-labels-meta"),
        pytest.param(lambda: fx.supcon(z.to("meta"), lab), ValueError, "labels is on cpu but z is on meta", id="supcon-z-meta-labels-cpu"),
        # multiview: views of every wrong kind
        pytest.param(lambda: fx.multiview_nt_xent(R(2, 3, 4, 6)), ValueError, "views must be 3-D", id="multiview-rank4"),
        pytest.param(lambda: fx.multiview_nt_xent(R(0, 4, 6)), ValueError, "views must not be empty", id="multiview-zero-views"),
        pytest.param(lambda: fx.multiview_nt_xent(R(2, 0, 6)), ValueError, "views must not be empty", id="multiview-zero-rows"),
        pytest.param(lambda: fx.multiview_nt_xent(R(2, 4, 6).long()), TypeError, "views has dtype", id="multiview-int"),
        pytest.param(lambda: fx.multiview_nt_xent((views[0], views[1].double())), TypeError,
                     r"views\[1\] has dtype torch.float64", id="multiview-tuple-mixed-dtype"),
        pytest.param(lambda: fx.multiview_nt_xent([views[0], views[1].bool()]), TypeError, r"views\[1\] has dtype torch.bool",
                     id="multiview-list-bool"),
        pytest.param(lambda: fx.multiview_nt_xent([views[0], R(4, 7)]), ValueError, r"views\[1\] has shape", id="multiview-list-dim"),
        pytest.param(lambda: fx.multiview_nt_xent([views[0], views[1].to("meta")]), ValueError,
                     r"views\[1\] is on meta but views\[0\] is on cpu", id="multiview-list-meta"),
        pytest.param(lambda: fx.multiview_nt_xent([views[0], None]), TypeError, r"views\[1\] must be a torch.Tensor",
                     id="multiview-list-none"),
        pytest.param(lambda: fx.multiview_nt_xent([R(6), R(6)]), ValueError, r"views\[0\] must be 2-D", id="multiview-list-rank1"),
        pytest.param(lambda: fx.multiview_nt_xent(iter(views)), TypeError, "views must be a torch.Tensor", id="multiview-generator"),
        pytest.param(lambda: fx.multiview_nt_xent(views, reduction="avg"), ValueError, "reduction", id="multiview-reduction"),
        # info_nce: the queue of every wrong kind
        pytest.param(lambda: fx.info_nce(q, q, R(5, 7)), ValueError, r"queue must have shape \(K, D\) with D = 6", id="queue-wrong-D"),
        pytest.param(lambda: fx.info_nce(q, q, R(6)), ValueError, "queue must have shape", id="queue-rank1"),
        pytest.param(lambda: fx.info_nce(q, q, R(2, 5, 6)), ValueError, "queue must have shape", id="queue-rank3"),
        pytest.param(lambda: fx.info_nce(q, q, R(0, 6)), ValueError, "queue must not be empty", id="queue-empty"),
        pytest.param(lambda: fx.info_nce(q, q, torch.ones(5, 6, dtype=torch.long)), TypeError, "queue has dtype torch.int64",
                     id="queue-int"),
        pytest.param(lambda: fx.info_nce(q, q, R(5, 6) > 0), TypeError, "queue has dtype torch.bool", id="queue-bool"),
        pytest.param(lambda: fx.info_nce(q, q, R(5, 6, dtype=torch.complex64)), TypeError, "queue has dtype", id="queue-complex"),
        pytest.param(lambda: fx.info_nce(q, q, R(5, 6, device="meta")), ValueError, "queue is on meta but q is on cpu",
                     id="queue-meta"),
        pytest.param(lambda: fx.info_nce(q, q, np.ones((5, 6), np.float32)), TypeError, "queue must be a torch.Tensor or None",
                     id="queue-numpy"),
        pytest.param(lambda: fx.info_nce(q, q, 0.2), TypeError, "queue must be a torch.Tensor or None, got float",
                     id="queue-temperature-in-its-place"),
        pytest.param(lambda: fx.info_nce(q.to("meta"), q.to("meta"), R(5, 6)), ValueError, "queue is on cpu but q is on meta",
                     id="queue-cpu-q-meta"),
        # options
        pytest.param(lambda: fx.clip_loss(q, q, 10.0, reduction="none"), TypeError, "reduction", id="clip-has-no-reduction"),
        pytest.param(lambda: fx.supcon(z, lab, reduction=None), ValueError, "reduction must be one of", id="supcon-reduction-none"),
        pytest.param(lambda: fx.info_nce(q, q, gather=True), ValueError, "gather=True needs", id="info_nce-gather-no-group"),
        pytest.param(lambda: fx.clip_loss(q, q, 10.0, gather=True), ValueError, "gather=True needs", id="clip-gather-no-group"),
        pytest.param(lambda: fx.nt_xent(q, q, gather="no"), (TypeError, ValueError), "gather", id="nt_xent-gather-string"),
        pytest.param(lambda: fx.nt_xent(q, q, 0.5, backend="cuda"), ValueError, 'backend="cuda" needs CUDA tensors', id="cuda-on-cpu"),
        pytest.param(lambda: fx.info_nce(q, q, backend="cuda"), ValueError, 'backend="cuda"', id="cuda-cross-family"),
        pytest.param(lambda: fx.clip_loss(q.double(), q.double(), 10.0, backend="triton"), ValueError, "does not take float64",
                     id="triton-float64"),
    ]


@pytest.mark.parametrize("thunk,error,match", _pair_cases() + _other_cases())
def test_bad_input_is_a_clear_error(thunk, error, match):
    with pytest.raises(error, match=match):
        thunk()


# ---------------------------------------------------------------------------------------
# Boolean options: a truthy string must not silently mean True
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce", "clip"])
@pytest.mark.parametrize("flag", ["normalize", "return_stats"])
def test_boolean_option_given_a_string_is_refused(loss, flag):
    xs = inputs(loss, torch.float32)
    with pytest.raises(TypeError, match=flag):
        call(loss, xs, 0.5, **{flag: "no"})


# ---------------------------------------------------------------------------------------
# Odd but valid inputs: the float64 reference's answer
# ---------------------------------------------------------------------------------------
def _odd(loss, kind):
    """Inputs of an odd shape for `loss` (float64, cast later)."""
    if kind == "one_row":
        return inputs(loss, rows=1, dim=6) if loss != "supcon" else [torch.randn(1, 6, dtype=torch.float64)]
    if kind in ("dim_one", "dim_one_normalized"):
        return inputs(loss, rows=3, dim=1)
    if kind == "odd_shape":
        return inputs(loss, rows=7, dim=13, queue_rows=11)
    if kind == "one_view_or_pair":  # two rows: the smallest batch with a negative
        return inputs(loss, rows=2, dim=5) if loss != "multiview" else [torch.randn(1, 2, 5, dtype=torch.float64)]
    raise KeyError(kind)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("kind", ["one_row", "dim_one", "dim_one_normalized", "odd_shape", "one_view_or_pair"])
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce", "info_nce_queue", "clip"])
def test_odd_shapes_match_reference(loss, kind, backend):
    if backend == "triton" and kind == "odd_shape" and loss in ("multiview", "supcon"):
        pytest.skip("interpreter time: covered by the cpu backend")
    if kind == "dim_one_normalized":
        # D = 1: every unit row is ±1, so the gradient through the normalisation is exactly 0
        # (rounding noise of size eps/|z| is all a backend can give: compared absolutely).
        xs = [x.float() for x in _odd(loss, kind)]
        got, grads = loss_and_grads(loss, xs, 0.3, backend)
        ref = call(loss, [x.double() for x in xs], 0.3, backend="reference")
        assert_rel_close(got, ref, 1e-5, f"{loss} D=1 loss")
        for g, x in zip(grads, xs):
            assert torch.isfinite(g).all() and float((g * x).abs().max()) < 1e-4, f"{loss} D=1 gradient {g}"
        return
    assert_matches_reference(loss, _odd(loss, kind), 0.3, backend, what=f"{loss} {kind}",
                             normalize=kind != "dim_one")


def _views(kind, x):
    """A non-trivially laid out tensor with the values of x (M, D)."""
    if kind == "neg_view":  # a lazily negated view: the data in memory is -x
        return torch._neg_view(-x)
    if kind == "stride0_rows":  # one row repeated by stride 0
        return x[:1].expand_as(x)
    if kind == "transposed":  # column-major storage
        return x.t().contiguous().t()
    if kind == "column_slice":  # every other column of a wider tensor
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    if kind == "overlapping_rows":  # rows that share memory
        flat = torch.randn(x.shape[0] + x.shape[1], dtype=x.dtype)
        return flat.as_strided(x.shape, (1, 1))
    raise KeyError(kind)


@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize("kind", ["neg_view", "stride0_rows", "transposed", "column_slice", "overlapping_rows"])
@pytest.mark.parametrize("loss", ["nt_xent", "supcon", "info_nce_queue", "clip"])
def test_strided_and_lazy_views_match_reference(loss, kind, normalize):
    """The kernels must read a tensor through its strides and view bits, not its raw memory."""
    xs = inputs(loss, torch.float32)
    xs = [_views(kind, xs[0])] + xs[1:]
    got = call(loss, xs, 0.3, backend="auto", normalize=normalize)
    ref = call(loss, [x.to(torch.float64) for x in xs], 0.3, backend="reference", normalize=normalize)
    assert_rel_close(got, ref, 1e-5, f"{loss} {kind}")


@needs_ext
@pytest.mark.parametrize("queue_dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_queue_of_another_dtype_matches_reference(queue_dtype):
    """The docstring allows a queue dtype that differs from q's: its values are used as given."""
    q, k, queue = inputs("info_nce_queue", torch.float32)
    queue = queue.to(queue_dtype)
    qq = q.clone().requires_grad_(True)
    got = fx.info_nce(qq, k, queue, 0.2)
    got.backward()
    q64 = q.double().requires_grad_(True)
    ref = fx.info_nce(q64, k.double(), queue.double(), 0.2, backend="reference")
    ref.backward()
    assert_rel_close(got, ref, 1e-5, "loss")
    assert_rel_close(qq.grad, q64.grad, 1e-5, "dq")


@needs_ext
@pytest.mark.parametrize("labels", [
    pytest.param(lambda: LABELS[:8].to(torch.int32), id="int32"),
    pytest.param(lambda: LABELS[:8].to(torch.uint8), id="uint8"),
    pytest.param(lambda: LABELS[:8].to(torch.int8) - 100, id="negative-int8"),
    pytest.param(lambda: LABELS[:8] * (2**62) - 2**62, id="huge-int64"),
    pytest.param(lambda: torch.zeros(8, dtype=torch.long), id="all-one-class"),
    pytest.param(lambda: torch.arange(8), id="all-distinct-no-positive"),
    pytest.param(lambda: torch.arange(16)[::2] // 4, id="strided"),
])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_labels_of_other_integer_kinds_match_reference(labels, reduction):
    lab = labels()
    z = torch.randn(8, 6, dtype=torch.float64)
    zz = z.float().requires_grad_(True)
    got = fx.supcon(zz, lab, 0.2, reduction=reduction, backend="cpu")
    got.sum().backward()
    z64 = z.float().double().requires_grad_(True)
    ref = fx.supcon(z64, lab.to(torch.int64), 0.2, reduction=reduction, backend="reference")
    ref.sum().backward()
    assert_rel_close(got, ref, 1e-5, "loss")
    assert_rel_close(zz.grad, z64.grad, 1e-5, "dz")


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("loss", ["nt_xent", "multiview", "supcon", "info_nce", "info_nce_queue", "clip"])
def test_meta_tensors_give_the_right_shape(loss, reduction):
    """Meta tensors (no data) through the public functions: backend "auto" takes the
    reference, which gives a meta result of the right shape and dtype (a temperature may stay
    a CPU scalar)."""
    xs = [x.to(torch.float32).to("meta") for x in inputs(loss)]
    out = call(loss, xs, torch.tensor(0.3), reduction=reduction)
    rows = {"nt_xent": 8, "multiview": 12, "supcon": 8}.get(loss, 4)
    expected = (rows,) if reduction == "none" and loss != "clip" else ()
    assert out.device.type == "meta" and out.dtype == torch.float32 and out.shape == expected


# ---------------------------------------------------------------------------------------
# In a subprocess: the C++ operators on meta tensors, huge shapes
# ---------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("op", ["self", "cross"])
def test_cpp_operators_on_meta_tensors(op, worker):
    """The compiled operators called directly on meta tensors run their fake kernels (shapes
    only), forward and backward: no crash."""
    r = worker.run(f"""
        import torch
        ops = torch.ops.fastntxent
        M, D = 6, 5
        u = torch.empty(M, D, device="meta")
        t = torch.empty((), device="meta")
        if "{op}" == "self":
            out = ops.self_forward(u, t, None, 3)
            assert len(out) == 5 and all(o.shape == (M,) and o.is_meta for o in out), out
            g = ops.self_backward(u, t, None, 3, out[0], out[0], out[0])
            assert g.shape == (M, D) and g.is_meta
        else:
            k = torch.empty(M, D, device="meta")
            queue = torch.empty(7, D, device="meta")
            out = ops.cross_forward(u, k, queue, t, 0, False)
            assert len(out) == 4 and all(o.shape == (M,) and o.is_meta for o in out), out
            gq, gk = ops.cross_backward(u, k, queue, t, 0, False, out[0], out[0], out[0], True)
            assert gq.shape == (M, D) and gk.shape == (M, D) and gq.is_meta
    """, timeout=60)
    assert r["ok"], r.get("traceback")


@needs_ext
@pytest.mark.parametrize("loss,shape", [
    pytest.param("nt_xent", (3, 2**18 + 7), id="nt_xent-huge-D"),
    pytest.param("info_nce_queue", (3, 2**18 + 7), id="info_nce_queue-huge-D"),
    pytest.param("nt_xent", (1025, 3), id="nt_xent-many-rows"),
    pytest.param("clip", (2049, 3), id="clip-many-rows"),
])
def test_huge_shapes_match_reference_in_a_subprocess(loss, shape, worker):
    rows, dim = shape
    r = worker.run(f"""
        import torch
        from adv_common import assert_matches_reference, inputs
        xs = inputs("{loss}", rows={rows}, dim={dim}, queue_rows=9)
        # float64 for the huge D (fp32 sums of 2^18 products carry ~sqrt(D)·eps of rounding)
        dtype = torch.float64 if {dim} > 1000 else torch.float32
        assert_matches_reference("{loss}", xs, 0.3, "cpu", dtype=dtype, what="{loss} {shape}")
    """, timeout=120)
    assert r["ok"], r.get("traceback")
