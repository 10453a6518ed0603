"""SigLIP's sigmoid loss (fastntxent/siglip_family.py, csrc/cpu/siglip.cpp, fastntxent/_triton/siglip*.py).

Every backend against the literal float64 reference (loss, ∂img, ∂txt, ∂t, ∂b; odd sizes,
every reduction, large |ℓ|, bf16/fp16, non-contiguous inputs; Triton under TRITON_INTERPRET=1),
the NaN rule, bad arguments, opcheck of both operator pairs, torch.compile(fullgraph=True), the
module, open_clip's SigLipLoss (when installed), and gather=True on 2 and 4 gloo processes
against one process on the concatenated batch.
"""
from __future__ import annotations

import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastntxent as fx
from fastntxent import _extension, reference
from fastntxent.backends import _triton_import_error
from fastntxent.compat import open_clip as c_open_clip
from helpers import TOLERANCE, assert_rel_close

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_OK = _triton_import_error() is None
needs_cpu = pytest.mark.skipif(not _extension.has_siglip_kernels(), reason="fastntxent._C without the SigLIP kernels")
needs_interpreter = pytest.mark.skipif(not (INTERPRET and TRITON_OK), reason="needs TRITON_INTERPRET=1 and triton")

CASES = [
    pytest.param("cpu", "cpu", id="cpu", marks=needs_cpu),
    pytest.param("triton", "cpu", id="triton-interpret", marks=needs_interpreter),
    pytest.param("triton", "cuda", id="triton-cuda",
                 marks=pytest.mark.skipif(not (torch.cuda.is_available() and TRITON_OK), reason="needs a CUDA GPU")),
    pytest.param("reference", "cpu", id="reference"),
]


def _leaf(x, dtype=None, device="cpu"):
    return x.detach().to(device=device, dtype=dtype or x.dtype).requires_grad_()


def _check_against_reference(backend, device, img, txt, t, b, dtype, reduction="mean", normalize=True, tol=None,
                             what=""):
    """Loss and gradients of the backend on inputs rounded to `dtype` vs the float64 reference
    of the same rounded inputs; a random upstream weight per row for "none"."""
    x, y = _leaf(img, dtype, device), _leaf(txt, dtype, device)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    ts, bs = _leaf(torch.tensor(t), acc, device), _leaf(torch.tensor(b), acc, device)
    x64, y64 = _leaf(x.detach().cpu(), torch.float64), _leaf(y.detach().cpu(), torch.float64)
    t64, b64 = _leaf(ts.detach().cpu(), torch.float64), _leaf(bs.detach().cpu(), torch.float64)
    got = fx.siglip_loss(x, y, ts, bs, normalize=normalize, reduction=reduction, backend=backend)
    ref = reference.siglip_loss(x64, y64, t64, b64, normalize=normalize, reduction=reduction)
    w = torch.rand(ref.shape, dtype=torch.float64) + 0.5
    tol = tol or TOLERANCE[dtype]
    assert_rel_close(got.cpu(), ref, tol, f"{what} loss")
    grads = torch.autograd.grad((got * w.to(device, got.dtype)).sum(), (x, y, ts, bs))
    refs = torch.autograd.grad((ref * w).sum(), (x64, y64, t64, b64))
    for name, g, r in zip(("img", "txt", "t", "b"), grads, refs):
        assert g.dtype == (dtype if name in ("img", "txt") else acc), (name, g.dtype)
        assert_rel_close(g.cpu(), r, tol, f"{what} grad {name}")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("B,D", [(1, 1), (7, 5), (67, 33)], ids=lambda v: str(v))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_float_inputs_match_the_reference(backend, device, B, D, reduction):
    img, txt = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    _check_against_reference(backend, device, img, txt, 10.0, -10.0, torch.float32, reduction)
    if backend in ("cpu", "reference"):
        _check_against_reference(backend, device, img, txt, 3.0, 0.7, torch.float64, reduction)


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs_match_the_reference(backend, device, dtype):
    img, txt = torch.randn(45, 20, dtype=torch.float64), torch.randn(45, 20, dtype=torch.float64)
    _check_against_reference(backend, device, img, txt, 10.0, -10.0, dtype)


@pytest.mark.parametrize("backend,device", CASES)
def test_odd_shapes_and_unnormalised_rows(backend, device):
    """Sizes across the blocks (Triton: 32-row / 64-wide interpreter blocks, two D chunks; CPU:
    64 × 256 tiles) and normalize=False with rows of norm ≠ 1."""
    img, txt = torch.randn(70, 100, dtype=torch.float64), torch.randn(70, 100, dtype=torch.float64)
    _check_against_reference(backend, device, img * 0.2, txt * 0.3, 4.0, 1.5, torch.float32, normalize=False)
    if backend == "cpu":
        img, txt = torch.randn(300, 9, dtype=torch.float64), torch.randn(300, 9, dtype=torch.float64)
        _check_against_reference(backend, device, img, txt, 10.0, -10.0, torch.float32, "none")


@pytest.mark.parametrize("backend,device", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_of_magnitude_1e4_are_exact(backend, device, dtype):
    """One-hot rows (cosines 0 or 1, exact in every dtype), t = 1e4, b = −5e3: logits ±5e3 with
    the positives wrong-sided — the loss is 5e3 per wrongly placed pair, no overflow, and the
    gradients match the float64 reference."""
    B = 6
    img = torch.eye(B, dtype=torch.float64)
    txt = torch.eye(B, dtype=torch.float64)[torch.tensor([1, 0, 2, 4, 3, 5])]  # rows 0, 1, 3, 4 misplaced
    for t, b in ((1e4, -5e3), (1e4, 5e3)):
        got = fx.siglip_loss(img.to(device, dtype), txt.to(device, dtype), t, b, backend=backend, reduction="sum")
        ref = reference.siglip_loss(img, txt, t, b, reduction="sum")
        assert torch.isfinite(got) and math.isclose(float(got), float(ref), rel_tol=1e-6), (t, b, got, ref)
        # gradients are returned in the input dtype: bf16/fp16 rounding bounds them, not the maths
        _check_against_reference(backend, device, img, txt, t, b, dtype, "sum")


@pytest.mark.parametrize("backend,device", CASES)
def test_non_contiguous_inputs(backend, device):
    base = torch.randn(40, 2 * 13).to(device)
    img, txt = base[::2, ::2], base[1::2, 1::2]
    assert not img.is_contiguous() and not txt.is_contiguous()
    for normalize in (True, False):
        got = fx.siglip_loss(img, txt, 5.0, -2.0, normalize=normalize, backend=backend)
        ref = reference.siglip_loss(img.double().cpu(), txt.double().cpu(), 5.0, -2.0, normalize=normalize)
        assert_rel_close(got.cpu(), ref, 1e-5, f"normalize={normalize}")


@pytest.mark.parametrize("backend,device", CASES)
def test_nonfinite_inputs_give_nan(backend, device):
    img, txt = torch.randn(9, 4), torch.randn(9, 4)
    for which, value in (("img", float("nan")), ("txt", float("inf"))):
        x, y = img.clone(), txt.clone()
        (x if which == "img" else y)[3, 1] = value
        x, y = _leaf(x, device=device), _leaf(y, device=device)
        t, b = _leaf(torch.tensor(10.0), device=device), _leaf(torch.tensor(-10.0), device=device)
        for reduction in ("mean", "none"):
            loss = fx.siglip_loss(x, y, t, b, backend=backend, reduction=reduction)
            assert torch.isnan(loss).all(), (which, reduction)
            grads = torch.autograd.grad(loss.sum(), (x, y, t, b))
            assert all(torch.isnan(g).all() for g in grads), which
    x, y = _leaf(img, device=device), _leaf(txt, device=device)
    bias = torch.tensor(float("nan"), requires_grad=True)
    loss = fx.siglip_loss(x, y, 10.0, bias, backend="reference" if backend == "reference" else "auto")
    assert torch.isnan(loss)


def test_bad_arguments():
    img, txt = torch.randn(5, 3), torch.randn(5, 3)
    with pytest.raises(ValueError, match="txt"):
        fx.siglip_loss(img, torch.randn(4, 3), 10.0, -10.0)
    with pytest.raises(ValueError, match="logit_scale"):
        fx.siglip_loss(img, txt, -1.0, -10.0)
    with pytest.raises(ValueError, match="logit_bias"):
        fx.siglip_loss(img, txt, 10.0, float("inf"))
    with pytest.raises(TypeError, match="logit_bias"):
        fx.siglip_loss(img, txt, 10.0, "bias")
    with pytest.raises(ValueError, match="logit_bias"):
        fx.siglip_loss(img, txt, 10.0, torch.zeros(2))
    with pytest.raises(TypeError, match="logit_bias"):
        fx.siglip_loss(img, txt, 10.0, torch.tensor(1))
    with pytest.raises(ValueError, match="reduction"):
        fx.siglip_loss(img, txt, 10.0, -10.0, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        fx.siglip_loss(img, txt, 10.0, -10.0, backend="gpu")
    with pytest.raises(TypeError, match="normalize"):
        fx.siglip_loss(img, txt, 10.0, -10.0, normalize=1)
    with pytest.raises(ValueError, match="gather=True"):
        fx.siglip_loss(img, txt, 10.0, -10.0, gather=True)
    with pytest.raises(TypeError):
        fx.siglip_loss(img, txt, 10.0, -10.0, True)  # options are keyword-only
    with pytest.raises(ValueError, match="cuda"):
        fx.siglip_loss(img, txt, 10.0, -10.0, backend="cuda")
    if _extension.has_siglip_kernels():
        with pytest.raises(ValueError, match="float64"):
            fx.siglip_loss(img.double(), txt.double(), 10.0, -10.0, backend="triton")
    with pytest.raises(ValueError, match="logit_bias"):
        fx.SigLipLoss(logit_bias=float("nan"))
    with pytest.raises(ValueError, match="logit_scale"):
        fx.SigLipLoss(logit_scale=0.0)


@needs_cpu
def test_opcheck_cpu_ops():
    x = torch.nn.functional.normalize(torch.randn(13, 5, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(20, 5, dtype=torch.float64), dim=1)
    for dtype in (torch.float32, torch.float64):
        s, b = torch.tensor(4.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
        for off in (0, 7):
            args = (x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_(), s.clone().requires_grad_(),
                    b.clone().requires_grad_(), off)
            torch.library.opcheck(torch.ops.fastntxent.siglip_forward.default, args)
            for need_y in (True, False):
                torch.library.opcheck(torch.ops.fastntxent.siglip_backward.default,
                                      (x.to(dtype), y.to(dtype), s, b, off, torch.rand(13, dtype=dtype), need_y))


@needs_interpreter
def test_opcheck_triton_ops():
    from fastntxent._triton import siglip as ts

    x = torch.nn.functional.normalize(torch.randn(9, 5), dim=1)
    y = torch.nn.functional.normalize(torch.randn(12, 5), dim=1)
    s, b = torch.tensor(4.0), torch.tensor(-2.0)
    args = (x.clone().requires_grad_(), y.clone().requires_grad_(), s.clone().requires_grad_(),
            b.clone().requires_grad_(), 3)
    torch.library.opcheck(ts.siglip_forward.default, args)
    torch.library.opcheck(ts.siglip_backward.default, (x, y, s, b, 3, torch.rand(9), True))


@needs_interpreter
@pytest.mark.parametrize("splits", [None, 3], ids=["one-split", "three-splits"])
def test_triton_operator_with_offset_matches_reference_rows(monkeypatch, splits):
    """The operators on their own: local rows (M) against gathered columns (N) with the positive
    at an offset (gather=True's layout), and the gradient of both towers; the forward's column
    splits (partial sums added on the host) forced to 3."""
    from fastntxent._triton import siglip as ts

    monkeypatch.setattr(ts, "SPLITS", splits)

    x, y = torch.randn(11, 6), torch.randn(40, 6)
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    for op in ([ts.siglip_forward] + ([torch.ops.fastntxent.siglip_forward] if _extension.has_siglip_kernels() else [])):
        xx, yy = _leaf(x), _leaf(y)
        got = op(xx, yy, s, b, 25)
        x64, y64 = _leaf(x, torch.float64), _leaf(y, torch.float64)
        ref = reference.siglip_rows(x64, y64, s.double(), b.double(), 25)
        for name, g, r in zip(("loss", "dlogit_sum", "dlogit_cos"), got, ref):
            assert_rel_close(g, r, 1e-5, name)
        w = torch.rand(11, dtype=torch.float64)
        g = torch.autograd.grad((got[0] * w.float()).sum(), (xx, yy))
        r = torch.autograd.grad((ref[0] * w).sum(), (x64, y64))
        assert_rel_close(g[0], r[0], 1e-5, "grad x")
        assert_rel_close(g[1], r[1], 1e-5, "grad y")


@needs_cpu
def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(6, 4)
            self.loss = fx.SigLipLoss(backend="cpu")

        def forward(self, x, y):
            return self.loss(self.head(x), self.head(y))

    torch._dynamo.reset()
    model = Model()
    x, y = torch.randn(10, 6), torch.randn(10, 6)
    loss = torch.compile(model, fullgraph=True)(x, y)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(x, y)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_module_initial_values_and_gradients():
    module = fx.SigLipLoss()
    assert math.isclose(float(module.log_logit_scale), math.log(10.0), rel_tol=1e-7)
    assert float(module.logit_bias) == -10.0
    module = module.double()
    with torch.no_grad():
        module.log_logit_scale.fill_(math.log(10.0))
    img, txt = torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 5, dtype=torch.float64)
    loss = module(img, txt)
    loss.backward()
    t, b = _leaf(torch.tensor(math.log(10.0), dtype=torch.float64)), _leaf(torch.tensor(-10.0, dtype=torch.float64))
    ref = reference.siglip_loss(img, txt, t.exp(), b)
    ref.backward()
    assert_rel_close(loss.detach(), ref.detach(), 1e-10, "loss")
    assert_rel_close(module.log_logit_scale.grad, t.grad, 1e-10, "grad log t")
    assert_rel_close(module.logit_bias.grad, b.grad, 1e-10, "grad b")
    fixed = fx.SigLipLoss(learnable=False, reduction="none")
    assert list(fixed.parameters()) == [] and fixed(img, txt).shape == (8,)
    assert "logit_bias=-10" in repr(module)


# ---------------------------------------------------------------------------------------
# open_clip's SigLipLoss (loss.py loaded from its file: the package's __init__ needs timm & co.)
# ---------------------------------------------------------------------------------------
def _open_clip_loss_module():
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_siglip_tests", path)
    mod = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(mod)
    except Exception:
        return None
    return mod if hasattr(mod, "SigLipLoss") else None


REAL_OPEN_CLIP = _open_clip_loss_module()
needs_open_clip = pytest.mark.skipif(
    REAL_OPEN_CLIP is None,
    reason="open_clip_torch (with SigLipLoss) not installed: pip install --no-deps open_clip_torch==3.3.0")


@needs_open_clip
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_matches_open_clip_siglip(dtype):
    img = torch.nn.functional.normalize(torch.randn(23, 16, dtype=dtype), dim=1)
    txt = torch.nn.functional.normalize(torch.randn(23, 16, dtype=dtype), dim=1)
    results = []
    for cls in (REAL_OPEN_CLIP.SigLipLoss, c_open_clip.SigLipLoss, None):
        x, y = _leaf(img), _leaf(txt)
        log_t, b = _leaf(torch.tensor(math.log(10.0), dtype=dtype)), _leaf(torch.tensor(-10.0, dtype=dtype))
        if cls is None:  # the module with its own parameters, features used as given
            module = fx.SigLipLoss(normalize=False).to(dtype)
            with torch.no_grad():
                module.log_logit_scale.copy_(log_t)
            loss = module(x, y)
            loss.backward()
            results.append((loss, x.grad, y.grad, module.log_logit_scale.grad, module.logit_bias.grad))
            continue
        out = cls()(x, y, log_t.exp(), b, output_dict=True)
        loss = out["contrastive_loss"]
        loss.backward()
        results.append((loss, x.grad, y.grad, log_t.grad, b.grad))
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for got in results[1:]:
        for name, g, r in zip(("loss", "img", "txt", "log t", "b"), got, results[0]):
            assert_rel_close(g, r, tol, name)
    assert list(c_open_clip.SigLipLoss.__init__.__code__.co_varnames[1:5]) == [
        "cache_labels", "rank", "world_size", "dist_impl"]


# ---------------------------------------------------------------------------------------
# gather=True on gloo processes against one process on the concatenated batch
# ---------------------------------------------------------------------------------------
B_LOCAL, D_DIST = 3, 5


def _global_inputs(world: int):
    g = torch.Generator().manual_seed(7)
    return [torch.randn(B_LOCAL * world, D_DIST, generator=g, dtype=torch.float64) for _ in range(2)]


def _uneven_starts(world: int) -> list:
    return [sum(range(1, r + 1)) for r in range(world + 1)]


def _run(img, txt, gather, reduction, backend):
    x, y = _leaf(img), _leaf(txt)
    t, b = _leaf(torch.tensor(4.0, dtype=torch.float64)), _leaf(torch.tensor(-3.0, dtype=torch.float64))
    loss = fx.siglip_loss(x, y, t.exp(), b, reduction=reduction, backend=backend, gather=gather)
    loss.sum().backward()
    return {"loss": loss.detach(), "img": x.grad, "txt": y.grad, "t": t.grad, "b": b.grad}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        img, txt = _global_inputs(world)
        rows = slice(rank * B_LOCAL, (rank + 1) * B_LOCAL)
        results = {}
        for backend in ("cpu", "reference"):
            for reduction in ("mean", "sum", "none"):
                results[backend, reduction] = _run(img[rows], txt[rows], True, reduction, backend)
        starts = _uneven_starts(world)  # rank r holds r + 1 rows
        uneven = slice(starts[rank], starts[rank + 1])
        results["uneven"] = _run(img[uneven], txt[uneven], True, "mean", "cpu")
        if REAL_OPEN_CLIP is not None:  # open_clip's neighbour exchange vs the compat class
            for cls in (REAL_OPEN_CLIP.SigLipLoss, c_open_clip.SigLipLoss):
                x, y = _leaf(img[rows]), _leaf(txt[rows])
                t, b = _leaf(torch.tensor(4.0, dtype=torch.float64)), _leaf(torch.tensor(-3.0, dtype=torch.float64))
                loss = cls(rank=rank, world_size=world)(x, y, t.exp(), b)
                loss.backward()
                results[cls.__module__] = {"loss": loss.detach(), "img": x.grad, "txt": y.grad, "t": t.grad,
                                           "b": b.grad}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def dist_results(request, tmp_path_factory):
    if not _extension.has_siglip_kernels():
        pytest.skip("fastntxent._C without the SigLIP kernels")
    world = request.param
    d = tmp_path_factory.mktemp(f"siglip{world}")
    mp.spawn(_worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
    return world, [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(world)]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gather_equals_single_process(dist_results, backend, reduction):
    """The project's convention (fastntxent.distributed): the value is the global loss ("none":
    the local rows), each rank's input gradient is W × the global one for its rows, and the
    scalars' gradients average over the ranks to the global ones."""
    world, results = dist_results
    img, txt = _global_inputs(world)
    single = _run(img, txt, False, reduction, backend)
    ranks = [r[backend, reduction] for r in results]
    if reduction == "none":
        assert_rel_close(torch.cat([r["loss"] for r in ranks]), single["loss"], 1e-12, "rows")
        factor = 1.0
    else:
        for r in ranks:
            assert_rel_close(r["loss"], single["loss"], 1e-12, "loss")
        factor = world
    for name in ("img", "txt"):
        got = torch.cat([r[name] for r in ranks]) / factor
        assert_rel_close(got, single[name], 1e-12, f"grad {name}")
    for name in ("t", "b"):  # "none": the ranks' parts sum to it; else their W-scaled parts average to it
        total = sum(r[name] for r in ranks)
        assert_rel_close(total if reduction == "none" else total / world, single[name], 1e-12, f"grad {name}")


def test_gather_with_uneven_rows_equals_single_process(dist_results):
    world, results = dist_results
    img, txt = _global_inputs(world)
    n = _uneven_starts(world)[-1]
    single = _run(img[:n], txt[:n], False, "mean", "cpu")
    ranks = [r["uneven"] for r in results]
    for r in ranks:
        assert_rel_close(r["loss"], single["loss"], 1e-12, "loss")
    for name in ("img", "txt"):
        assert_rel_close(torch.cat([r[name] for r in ranks]) / world, single[name], 1e-12, f"grad {name}")
    for name in ("t", "b"):
        assert_rel_close(sum(r[name] for r in ranks) / world, single[name], 1e-12, f"grad {name}")


def test_gather_compat_equals_open_clip(dist_results):
    world, results = dist_results
    real = [r.get("_open_clip_loss_for_siglip_tests") for r in results]
    if real[0] is None:
        pytest.skip("open_clip_torch (with SigLipLoss) not installed: pip install --no-deps open_clip_torch==3.3.0")
    ours = [r["fastntxent.compat.open_clip"] for r in results]
    for o, r in zip(ours, real):
        for name in ("loss", "img", "txt", "t", "b"):
            assert_rel_close(o[name], r[name], 1e-12, name)


# ---------------------------------------------------------------------------------------
# The CPU kernel's gradient from the forward sweep ("mean" / "sum": siglip_loss_and_grad)
# ---------------------------------------------------------------------------------------
needs_loss_and_grad = pytest.mark.skipif(not _extension.has_siglip_loss_and_grad(),
                                         reason="fastntxent._C without siglip_loss_and_grad")
FORWARD, BACKWARD, FUSED = "fastntxent.siglip_forward", "fastntxent.siglip_backward", "fastntxent.siglip_loss_and_grad"


class _FastntxentOps(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the fastntxent operators dispatched while active (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "fastntxent":
            self.names.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def _ops_run_by(fn) -> list:
    with _FastntxentOps() as log:
        fn()
    return log.names


@needs_loss_and_grad
def test_mean_and_sum_take_their_gradient_from_the_forward_sweep():
    x, y = _leaf(torch.randn(20, 8)), _leaf(torch.randn(20, 8))
    t = _leaf(torch.tensor(10.0))
    for reduction in ("mean", "sum"):
        run = lambda: fx.siglip_loss(x, y, t, -10.0, reduction=reduction, backend="cpu").backward()  # noqa: E731
        assert _ops_run_by(run) == [FUSED], reduction
    none = lambda: fx.siglip_loss(x, y, t, -10.0, reduction="none", backend="cpu").sum().backward()  # noqa: E731
    assert _ops_run_by(none) == [FORWARD, BACKWARD]
    with torch.no_grad():  # inference: the forward alone
        assert _ops_run_by(lambda: fx.siglip_loss(x, y, t, -10.0, backend="cpu")) == [FORWARD]
    assert _ops_run_by(lambda: fx.siglip_loss(x.detach(), y.detach(), 10.0, -10.0, backend="cpu")) == [FORWARD]


@needs_loss_and_grad
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("B,D", [(1, 3), (129, 7), (300, 33)], ids=str)
def test_cpu_gradients_scale_with_the_incoming_gradient(dtype, reduction, B, D):
    """Loss and ∂img, ∂txt, ∂log t, ∂b (learnable t = exp(log t) and b) of the cpu backend vs the
    float64 reference on the same rounded inputs, for an incoming gradient of 3 and of −0.25 (per
    row, times a random weight, for "none"): gradients not multiplied by it are 3× too large /
    of the wrong sign. Sizes across the 128 × 256 tiles."""
    img, txt = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    tol = TOLERANCE[dtype]
    for grad_out in (3.0, -0.25):
        x, y = _leaf(img, dtype), _leaf(txt, dtype)
        log_t, b = _leaf(torch.tensor(math.log(8.0), dtype=acc)), _leaf(torch.tensor(-6.0, dtype=acc))
        x64, y64 = _leaf(x.detach(), torch.float64), _leaf(y.detach(), torch.float64)
        log_t64, b64 = _leaf(log_t.detach(), torch.float64), _leaf(b.detach(), torch.float64)
        got = fx.siglip_loss(x, y, log_t.exp(), b, reduction=reduction, backend="cpu")
        ref = reference.siglip_loss(x64, y64, log_t64.exp(), b64, reduction=reduction)
        assert got.dtype == acc and got.shape == ref.shape
        assert_rel_close(got.detach(), ref.detach(), tol, f"{grad_out} loss")
        upstream = grad_out * (torch.rand(ref.shape, dtype=torch.float64) + 0.5 if reduction == "none" else 1.0)
        got.backward(torch.as_tensor(upstream, dtype=acc).expand(got.shape))
        ref.backward(torch.as_tensor(upstream, dtype=torch.float64).expand(ref.shape))
        for name, g, r in (("img", x, x64), ("txt", y, y64), ("log t", log_t, log_t64), ("b", b, b64)):
            assert g.grad.dtype == g.dtype, name
            assert_rel_close(g.grad, r.grad, tol, f"{grad_out} {reduction} grad {name}")


@needs_loss_and_grad
@pytest.mark.parametrize("need_x,need_y", [(True, True), (True, False), (False, True), (False, False)])
def test_loss_and_grad_operator_with_offset_matches_reference(need_x, need_y):
    """The operator on its own with gather=True's layout (local rows M against N gathered columns,
    the positive at an offset): L = Σ_i loss_i and its four gradients (zeros for a tower not asked
    for) vs autograd of the float64 reference rows."""
    x, y = torch.randn(11, 6), torch.randn(300, 6)
    s, b = torch.tensor(3.0), torch.tensor(-1.0)
    loss, gx, gy, gs, gb = torch.ops.fastntxent.siglip_loss_and_grad(x, y, s, b, 260, need_x, need_y)
    x64, y64, s64, b64 = (_leaf(v, torch.float64) for v in (x, y, s, b))
    ref = reference.siglip_rows(x64, y64, s64, b64, 260)[0].sum()
    refs = torch.autograd.grad(ref, (x64, y64, s64, b64))
    assert_rel_close(loss, ref.detach(), 1e-5, "loss")
    for name, g, r, needed in zip(("x", "y", "scale", "bias"), (gx, gy, gs, gb), refs, (need_x, need_y, True, True)):
        assert g.dtype == torch.float32 and g.shape == r.shape, name
        if needed:
            assert_rel_close(g, r, 1e-5, name)
        else:
            assert torch.equal(g, torch.zeros_like(g)), name


@needs_loss_and_grad
def test_saved_gradient_survives_retain_graph_and_double_backward_is_refused():
    x, y = _leaf(torch.randn(30, 5)), _leaf(torch.randn(30, 5))
    t = _leaf(torch.tensor(5.0))
    loss = fx.siglip_loss(x, y, t, -2.0, backend="cpu")
    loss.backward(retain_graph=True)
    first = [v.grad.clone() for v in (x, y, t)]
    (loss * 2).backward()  # 1× + 2× the same saved gradient
    for v, g in zip((x, y, t), first):
        assert torch.allclose(v.grad, 3 * g, rtol=1e-6, atol=0)
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(fx.siglip_loss(x, y, t, -2.0, backend="cpu"), t, create_graph=True)
    with pytest.raises(RuntimeError, match="need_grad_x"):
        torch.ops.fastntxent.siglip_loss_and_grad(x, y.detach(), t, torch.tensor(0.0), 0, False, False)[0].backward()


@needs_loss_and_grad
def test_nonfinite_scale_or_bias_tensor_gives_nan_gradients():
    for scale, bias in ((float("inf"), -1.0), (2.0, float("nan")), (float("nan"), 0.0)):
        x, y = _leaf(torch.randn(9, 4)), _leaf(torch.randn(9, 4))
        t, b = _leaf(torch.tensor(scale)), _leaf(torch.tensor(bias))
        loss = fx.siglip_loss(x, y, t, b, backend="cpu")
        assert torch.isnan(loss), (scale, bias)
        assert all(torch.isnan(g).all() for g in torch.autograd.grad(loss, (x, y, t, b))), (scale, bias)


@needs_loss_and_grad
def test_opcheck_loss_and_grad():
    x = torch.nn.functional.normalize(torch.randn(13, 5, dtype=torch.float64), dim=1)
    y = torch.nn.functional.normalize(torch.randn(20, 5, dtype=torch.float64), dim=1)
    for dtype in (torch.float32, torch.float64):
        s, b = torch.tensor(4.0, dtype=dtype), torch.tensor(-2.0, dtype=dtype)
        for off, need_x, need_y in ((0, True, True), (7, True, False), (3, False, True)):
            args = (x.to(dtype).requires_grad_(need_x), y.to(dtype).requires_grad_(need_y),
                    s.clone().requires_grad_(), b.clone().requires_grad_(), off, need_x, need_y)
            torch.library.opcheck(torch.ops.fastntxent.siglip_loss_and_grad.default, args)


@needs_loss_and_grad
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_compile_fullgraph_scaled_loss(reduction):
    """torch.compile(fullgraph=True) of 3 × the loss (the saved gradient scaled in the compiled
    backward) with a learnable scale and bias, against eager."""
    def step(x, y, log_t, b):
        loss = fx.siglip_loss(x, y, log_t.exp(), b, reduction=reduction, backend="cpu")
        return 3 * loss.sum()

    torch._dynamo.reset()
    inputs = [_leaf(torch.randn(10, 6)), _leaf(torch.randn(10, 6)), _leaf(torch.tensor(2.0)), _leaf(torch.tensor(-3.0))]
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    got = torch.autograd.grad(compiled, inputs)
    eager = step(*inputs)
    expected = torch.autograd.grad(eager, inputs)
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-6)


@needs_cpu
def test_cpu_pair_terms_across_the_logit_range():
    """The fp32 kernel's own softplus / sigmoid (one exp, log1p by a series) row by row against
    float64: logits ℓ_ij = x_i from −60 to 60 in every column (D = 1, y = 1), and 0, ±1e-30, ±1e-7,
    ±40 (ATen's softplus threshold), ±88 and ±104 (exp underflow). Error bound per row: N·2⁻²⁴ of
    the sum of the terms' magnitudes (Σ g may cancel; the fp32 row sums run in column order — the
    previous kernel, with ATen's softplus, had the same loss errors). Then rows of small terms
    only (negatives at ℓ from −30 to −3, the positive at +15), where a plain log(1 + e) would be
    off by up to 1 % (e ≈ 1e-5)."""
    special = torch.tensor([0.0, 1e-30, -1e-30, 1e-7, -1e-7, 40.0, -40.0, 88.0, -88.0, 104.0, -104.0])
    x = torch.cat([torch.linspace(-60, 60, 241), special]).unsqueeze(1)
    one, zero = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for off in (0, 7):
        y = torch.ones(x.shape[0] + off, 1)
        got = torch.ops.fastntxent.siglip_forward(x, y, one.float(), zero.float(), off)
        ref = reference.siglip_rows(x.double(), y.double(), one, zero, off)
        ell, n = x.double().squeeze(1), y.shape[0]
        magnitude = (n - 1) * torch.sigmoid(ell) + torch.sigmoid(-ell)  # Σ_j |g_ij|
        for name, g, r, m in zip(("loss", "dlogit_sum", "dlogit_cos"), got, ref,
                                 (ref[0], magnitude, magnitude * ell.abs())):
            err = ((g.double() - r).abs() / m.clamp_min(1e-300)).max()
            assert err < n * 2.0**-24, (off, name, float(err))
    M = 64
    a = torch.linspace(-30, -3, M)
    x = torch.cat([a.unsqueeze(1), torch.diag(15 - a)], dim=1)  # ℓ_ij = a_i + (15 − a_i)·[i = j]
    y = torch.cat([torch.ones(M, 1), torch.eye(M)], dim=1)
    got = torch.ops.fastntxent.siglip_forward(x, y, one.float(), zero.float(), 0)[0]
    ref = reference.siglip_rows(x.double(), y.double(), one, zero, 0)[0]
    err = ((got.double() - ref) / ref).abs().max()  # per row: every row is small
    assert err < M * 2.0**-24, float(err)
