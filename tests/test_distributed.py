"""gather=True over torch.distributed (docs/distributed.md), gloo backend, 2 and 4 local processes.

Each rank holds its slice of a global batch — equal slices, and uneven ones with a rank of 0
rows. Checked against one process on the concatenated batch (float64, 1e-10):
- every rank's loss equals the global loss, for every loss and reduction; the statistics of
  return_stats equal the single-process ones;
- "mean" / "sum": each rank's input gradient is W × the global gradient of its rows and the
  average over ranks of the temperature / logit_scale gradient is the global one (the
  convention that DDP's averaging turns into the exact gradient); "none" (weighted by a fixed
  upstream vector): the local ℓ are the global ℓ of the local rows, each rank's input gradient
  is the global one and the ranks' scalar gradients add up to the global one;
- a 3-step DDP training in float64 (nt_xent + supcon + clip_loss + info_nce, learnable τ and logit scale,
  uneven batches with an empty rank) ends with the parameters of single-process training;
- MemoryQueue.enqueue gathers every rank's keys (uneven, one rank empty);
- a D or dtype that differs across ranks raises ValueError on every rank (no hang);
- no deprecated collective is used (FutureWarning is an error in the workers);
- torch.compile of a gather=True loss gives the eager loss and gradients.
Every spawn has a deadline (and every process group a timeout): a hang fails, it never blocks.
Single-process tests of the local-rows operators (CPU, reference, Triton under the
interpreter) against the reference's literal matrix are at the end.
"""
from __future__ import annotations

import datetime
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastntxent as fx
from fastntxent import _extension, backends, reference
from helpers import assert_rel_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

D, K = 5, 11
DEADLINE_S = 150  # per spawn; a hang fails the test instead of blocking CI
BACKEND = "cpu" if _extension.has_local_rows_kernels() else "reference"
# Rows (samples) per rank: equal, and uneven with an empty rank.
# (W = 4 runs the uneven layout only: 4 processes on 2 cores are slow to run everything twice.)
LAYOUTS = {2: {"equal": (3, 3), "uneven": (0, 4)}, 4: {"uneven": (3, 0, 1, 2)}}


def _weights(n: int) -> torch.Tensor:
    """Fixed upstream weights for reduction="none" (not all 1: the gradient path is exercised)."""
    return torch.linspace(0.5, 1.5, n, dtype=torch.float64) if n else torch.zeros(0, dtype=torch.float64)


# name -> (inputs with gradients, scalar value, loss(x, scalar, gather, backend), reduction)
def _nt(red, decoupled=False):
    return lambda x, t, g, b: fx.nt_xent(x["z1"], x["z2"], t, reduction=red, backend=b, gather=g, decoupled=decoupled)


def _mv(red):
    return lambda x, t, g, b: fx.multiview_nt_xent(x["views"], t, reduction=red, backend=b, gather=g)


def _sc(red):
    return lambda x, t, g, b: fx.supcon(x["z"], x["labels"], t, reduction=red, backend=b, gather=g)


def _nce(red, queue=False):
    return lambda x, t, g, b: fx.info_nce(x["q"], x["k"], x["queue"] if queue else None, t, reduction=red,
                                          backend="cpu" if b == "cpu" else "reference", gather=g)


CASES = {
    "nt_xent": (("z1", "z2"), 0.5, _nt("mean"), "mean"),
    "nt_xent_sum": (("z1", "z2"), 0.3, _nt("sum"), "sum"),
    "nt_xent_none": (("z1", "z2"), 0.4, _nt("none"), "none"),
    "nt_xent_decoupled": (("z1", "z2"), 0.3, _nt("mean", decoupled=True), "mean"),
    "multiview": (("views",), 0.5, _mv("mean"), "mean"),
    "multiview_none": (("views",), 0.2, _mv("none"), "none"),
    "supcon": (("z",), 0.1, _sc("mean"), "mean"),
    "supcon_sum": (("z",), 0.2, _sc("sum"), "sum"),
    "supcon_none": (("z",), 0.3, _sc("none"), "none"),
    "info_nce": (("q", "k"), 0.2, _nce("mean"), "mean"),
    "info_nce_sum": (("q", "k"), 0.2, _nce("sum"), "sum"),
    "info_nce_none": (("q", "k"), 0.3, _nce("none"), "none"),
    "info_nce_queue": (("q", "k"), 0.07, _nce("mean", queue=True), "mean"),
    "clip": (("a", "b"), 10.0, lambda x, t, g, b: fx.clip_loss(x["a"], x["b"], t, backend="cpu" if b == "cpu"
                                                                else "reference", gather=g), "mean"),
}
STATS_CASES = {  # return_stats=True: the statistics are global too
    "nt_xent": lambda x, t, g, b: fx.nt_xent(x["z1"], x["z2"], t, backend=b, gather=g, return_stats=True),
    "supcon": lambda x, t, g, b: fx.supcon(x["z"], x["labels"], t, backend=b, gather=g, return_stats=True),
    "multiview": lambda x, t, g, b: fx.multiview_nt_xent(x["views"], t, backend=b, gather=g, return_stats=True),
    "info_nce": lambda x, t, g, b: fx.info_nce(x["q"], x["k"], None, t, backend="reference", gather=g,
                                               return_stats=True),
    "clip": lambda x, t, g, b: fx.clip_loss(x["a"], x["b"], t, backend="reference", gather=g, return_stats=True),
}


def _global_inputs(sizes) -> dict:
    g = torch.Generator().manual_seed(1234 + 7 * len(sizes) + sum(sizes))
    n = sum(sizes)
    x = {name: torch.randn(n, D, generator=g, dtype=torch.float64) for name in ("z1", "z2", "z", "q", "k", "a", "b")}
    x["views"] = torch.randn(3, n, D, generator=g, dtype=torch.float64)
    x["labels"] = torch.randint(0, 3, (n,), generator=g)
    x["queue"] = torch.randn(K, D, generator=g, dtype=torch.float64)
    return x


def _local(x: dict, sizes, r: int | None, grad_names) -> dict:
    """Rank r's slice of every row tensor (all rows for None), grad-requiring copies."""
    out = {}
    for name, v in x.items():
        if r is not None and name != "queue":
            start = sum(sizes[:r])
            rows = slice(start, start + sizes[r])
            v = v[:, rows] if name == "views" else v[rows]
        out[name] = v.clone().requires_grad_(name in grad_names)
    return out


def _local_layout_rows(case: str, sizes, r: int) -> torch.Tensor:
    """Indices into the single-process ℓ (reduction="none") of rank r's local ℓ."""
    n, start = sum(sizes), sum(sizes[:r])
    mine = torch.arange(start, start + sizes[r])
    if case.startswith("nt_xent"):
        return torch.cat([mine, n + mine])
    if case.startswith("multiview"):
        return torch.cat([v * n + mine for v in range(3)])
    return mine


def _run_case(fn, x, t, reduction):
    loss = fn(x, t)
    objective = (loss * _weights(loss.shape[0])).sum() if reduction == "none" else loss
    objective.backward()
    return loss.detach()


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)).double()
        self.log_t = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
        self.log_s = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, x1, x2, x3, y, gather: bool):
        a, b, c = self.net(x1), self.net(x2), self.net(x3)
        return (fx.nt_xent(a, b, self.log_t.exp(), backend=BACKEND, gather=gather)
                + fx.supcon(c, y, 0.3, backend=BACKEND, gather=gather)
                + fx.clip_loss(a, c, self.log_s.exp(), backend="reference", gather=gather)
                + fx.info_nce(b, c.detach(), None, 0.2, backend="reference", gather=gather))


def _train_batches(sizes):
    g = torch.Generator().manual_seed(99)
    n = sum(sizes)
    return [tuple(torch.randn(n, 6, generator=g, dtype=torch.float64) for _ in range(3)) + (torch.randint(0, 2, (n,), generator=g),)
            for _ in range(3)]


def _train(model, batches, sizes, r: int | None, gather: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for xs in batches:
        opt.zero_grad()
        if r is not None:
            start = sum(sizes[:r])
            xs = [x[start:start + sizes[r]] for x in xs]
        model(*xs, gather=gather).backward()
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _expect_value_error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _compiled_case(r: int, sizes):
    """torch.compile of nt_xent(gather=True): loss and gradient (graph breaks allowed)."""
    torch._dynamo.reset()
    x = _local(_global_inputs(sizes), sizes, r, ("z1", "z2"))
    fn = torch.compile(lambda a, b: fx.nt_xent(a, b, 0.5, backend=BACKEND, gather=True), backend="aot_eager")
    loss = fn(x["z1"], x["z2"])
    loss.backward()
    return {"loss": loss.detach(), "z1": x["z1"].grad, "z2": x["z2"].grad}


def _full_batch_fallback(x, sizes, r):
    """The path of backends without local-rows operators (the CUDA C++ kernels): the full
    global batch on every rank, the local rows' statistics kept (forced here on the CPU)."""
    grad_names, value, fn, reduction = CASES["nt_xent"]
    real = backends.refusal
    backends.refusal = lambda name, family, *a: "forced" if family == "self_rows" else real(name, family, *a)
    try:
        local = _local(x, sizes, r, grad_names)
        t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        loss = _run_case(lambda xx, tt: fn(xx, tt, True, BACKEND), local, t, reduction)
    finally:
        backends.refusal = real
    return {"loss": loss, "t": t.grad, **{n: local[n].grad for n in grad_names}}


def _worker(r: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("error", FutureWarning)  # no deprecated collective anywhere on the path
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for lname, sizes in LAYOUTS[world].items():
            x = _global_inputs(sizes)
            for name, (grad_names, value, fn, reduction) in CASES.items():
                local = _local(x, sizes, r, grad_names)
                t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
                loss = _run_case(lambda xx, tt: fn(xx, tt, True, BACKEND), local, t, reduction)
                results[lname, name] = {"loss": loss, "t": t.grad, **{n: local[n].grad for n in grad_names}}
            for name, fn in STATS_CASES.items():
                local = _local(x, sizes, r, ())
                _, stats = fn(local, torch.tensor(0.5, dtype=torch.float64), True, BACKEND)
                results[lname, "stats", name] = stats
            local = _local(x, sizes, r, ("z",))
            t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
            results[lname, "supcon_reference"] = {"loss": _run_case(lambda xx, tt: _sc("mean")(xx, tt, True, "reference"),
                                                                    local, t, "mean"),
                                                  "t": t.grad, "z": local["z"].grad}
            results[lname, "nt_xent_full_batch"] = _full_batch_fallback(x, sizes, r)
            torch.manual_seed(5)  # the same initial queue on every rank
            mq = fx.MemoryQueue(dim=D, size=4 * sum(sizes))
            mq.enqueue(_local(x, sizes, r, ())["k"])
            results[lname, "queue"] = mq.keys.clone()
            ddp = torch.nn.parallel.DistributedDataParallel(_Tiny())
            results[lname, "ddp"] = _train(ddp, _train_batches(sizes), sizes, r, gather=True)
        # Mismatches across ranks: every rank raises (none waits in a collective).
        n = 2 + r
        results["bad_dim"] = _expect_value_error(
            lambda: fx.nt_xent(torch.randn(n, D + (r == 1)), torch.randn(n, D + (r == 1)), gather=True))
        results["bad_dtype"] = _expect_value_error(
            lambda: fx.supcon(torch.randn(n, D, dtype=torch.float64 if r == 1 else torch.float32),
                              torch.zeros(n, dtype=torch.long), gather=True))
        results["bad_dim_cross"] = _expect_value_error(
            lambda: fx.info_nce(torch.randn(n, D + (r == 1)), torch.randn(n, D + (r == 1)), gather=True))
        results["bad_queue_keys"] = _expect_value_error(
            lambda: fx.distributed.gather_no_grad(torch.randn(n, D, dtype=torch.float16 if r else torch.float32)))
        results["after_errors"] = fx.nt_xent(torch.ones(1, D), torch.ones(1, D) * (r + 1), gather=True).detach()
        if world == 2:
            warnings.simplefilter("default", FutureWarning)  # torch.compile's own deprecations are not ours
            results["compiled"] = _compiled_case(r, LAYOUTS[2]["uneven"])
        torch.save(results, os.path.join(out_dir, f"rank{r}.pt"))
    finally:
        dist.destroy_process_group()


def spawn_with_deadline(fn, args, world: int, deadline_s: float) -> None:
    """mp.spawn that fails (and kills its processes) after `deadline_s` instead of hanging."""
    ctx = mp.spawn(fn, args=args, nprocs=world, join=False)
    stop = time.monotonic() + deadline_s
    while not ctx.join(timeout=max(0.1, min(1.0, stop - time.monotonic()))):
        if time.monotonic() > stop:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed workers did not finish within {deadline_s} s (a hang)")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def dist_results(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}")
    spawn_with_deadline(_worker, (world, str(d / "init"), str(d)), world, DEADLINE_S)
    return world, [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(world)]


def _single_process(case: str, sizes, backend: str = BACKEND):
    base = {"supcon_reference": "supcon", "nt_xent_full_batch": "nt_xent"}.get(case, case)
    grad_names, value, fn, reduction = CASES[base]
    x = _local(_global_inputs(sizes), sizes, None, grad_names)
    t = torch.tensor(0.2 if case == "supcon_reference" else value, dtype=torch.float64, requires_grad=True)
    loss = fn(x, t, False, backend)
    return x, t, loss, grad_names, reduction


@pytest.mark.parametrize("case", list(CASES) + ["supcon_reference", "nt_xent_full_batch"])
def test_loss_and_gradients_equal_single_process(dist_results, case):
    world, results = dist_results
    for layout, sizes in LAYOUTS[world].items():
        _check_case(world, [res[layout, case] for res in results], case, sizes)


def _check_case(world, results, case, sizes):
    x, t, loss, grad_names, reduction = _single_process(case, sizes)
    objective = loss
    if reduction == "none":  # the global weights, laid out as each rank's local ℓ
        w = torch.zeros_like(loss)
        for r in range(world):
            idx = _local_layout_rows(case, sizes, r)
            w[idx] = _weights(idx.shape[0])
        objective = (loss * w).sum()
    objective.backward()
    scale = 1.0 if reduction == "none" else float(world)
    t_total = 0.0
    for r, res in enumerate(results):
        start = sum(sizes[:r])
        rows = slice(start, start + sizes[r])
        if reduction == "none":
            assert_rel_close(res["loss"], loss.detach()[_local_layout_rows(case, sizes, r)], 1e-10,
                             f"rank {r} local losses")
        else:
            assert_rel_close(res["loss"], loss.detach(), 1e-12, f"rank {r} loss")
        for n in grad_names:
            want = x[n].grad[:, rows] if n == "views" else x[n].grad[rows]
            assert torch.isfinite(res[n]).all()
            if want.numel():
                assert_rel_close(res[n] / scale, want, 1e-10, f"rank {r} grad {n}")
        t_total = t_total + res["t"]
    t_rank = t_total if reduction == "none" else t_total / world  # DDP averages a shared scalar
    assert_rel_close(t_rank, t.grad, 1e-10, "scalar gradient over the ranks")


@pytest.mark.parametrize("case", list(STATS_CASES))
def test_stats_equal_single_process(dist_results, case):
    world, results = dist_results
    for layout, sizes in LAYOUTS[world].items():
        _check_stats(results, layout, case, sizes)


def _check_stats(results, layout, case, sizes):
    x = _local(_global_inputs(sizes), sizes, None, ())
    _, want = STATS_CASES[case](x, torch.tensor(0.5, dtype=torch.float64), False, BACKEND)
    for r, res in enumerate(results):
        got = res[layout, "stats", case]
        assert set(got) == set(want)
        for key, v in want.items():
            if case == "info_nce" and key == "embedding_std":
                continue  # info_nce's is the local queries' (they are not gathered)
            assert_rel_close(got[key].to(torch.float64), v.to(torch.float64), 1e-10, f"rank {r} {case} {key}")


def test_ddp_training_equals_single_process(dist_results):
    world, results = dist_results
    for layout, sizes in LAYOUTS[world].items():
        expected = _train(_Tiny(), _train_batches(sizes), sizes, None, gather=False)
        for r, res in enumerate(results):
            for n, p in expected.items():
                assert_rel_close(res[layout, "ddp"][n], p, 1e-10, f"{layout}: rank {r} parameter {n}")
        moved = dict(_Tiny().named_parameters())
        assert any(not torch.allclose(p, moved[n]) for n, p in expected.items())


def test_memory_queue_gathers_all_ranks(dist_results):
    world, results = dist_results
    for layout, sizes in LAYOUTS[world].items():
        keys = _global_inputs(sizes)["k"].float()
        for res in results:
            assert torch.equal(res[layout, "queue"][: sum(sizes)], keys)
            assert torch.equal(res[layout, "queue"], results[0][layout, "queue"])


@pytest.mark.parametrize("what", ["bad_dim", "bad_dtype", "bad_dim_cross", "bad_queue_keys"])
def test_mismatch_raises_on_every_rank(dist_results, what):
    _, results = dist_results
    for r, res in enumerate(results):
        assert "differs across ranks" in res[what], f"rank {r}: {res[what]}"
    # ... and the process group still works afterwards (nobody was left inside a collective)
    M = 2 * len(results)
    want = fx.nt_xent(torch.ones(len(results), D), torch.stack([torch.ones(D) * (r + 1) for r in range(len(results))]))
    for res in results:
        assert_rel_close(res["after_errors"], want, 1e-6, "loss after the errors")
    assert M > 0


def test_torch_compile_matches_eager(dist_results):
    """torch.compile (aot_eager) of nt_xent(gather=True) at W = 2, uneven (one rank empty):
    eager's loss and gradients (the size exchange graph-breaks; the gather and the operators
    are traced)."""
    world, results = dist_results
    if world != 2:
        pytest.skip("compiled at W = 2 only")
    sizes = LAYOUTS[2]["uneven"]
    x, t, loss, _, _ = _single_process("nt_xent", sizes)
    loss.backward()
    for r, res in enumerate(results):
        got = res["compiled"]
        assert_rel_close(got["loss"], loss.detach(), 1e-12, f"rank {r} compiled loss")
        start = sum(sizes[:r])
        for n in ("z1", "z2"):
            want = x[n].grad[start:start + sizes[r]]
            if want.numel():
                assert_rel_close(got[n] / 2, want, 1e-10, f"rank {r} compiled grad {n}")


def test_gather_needs_a_process_group():
    with pytest.raises(ValueError, match="process group"):
        fx.nt_xent(torch.randn(3, 4), torch.randn(3, 4), gather=True)
    with pytest.raises(ValueError, match="process group"):
        fx.multiview_nt_xent(torch.randn(2, 3, 4), gather=True)


# ---------------------------------------------------------------------------------------
# The local-rows operators, one process: against the reference's literal matrix
# ---------------------------------------------------------------------------------------
def _rows_backends():
    out = ["reference"]
    if _extension.has_local_rows_kernels():
        out.append("cpu")
    if backends._triton_import_error() is None and backends.interpreting():
        out.append("triton")
    return out


@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
@pytest.mark.parametrize("backend", _rows_backends())
@pytest.mark.parametrize("labelled", [True, False], ids=["labels", "implicit"])
@pytest.mark.parametrize("M,D_,r0,r1", [(70, 9, 10, 47), (37, 130, 0, 37), (40, 3, 39, 40), (33, 17, 5, 5),
                                         (2, 4, 1, 2), (300, 8, 33, 290)])
def test_local_rows_operator(backend, labelled, M, D_, r0, r1, decoupled):
    """Statistics of rows [r0, r1) and the gradient they produce for every row (row and column
    side), against the literal M×M loss restricted to those rows; an upstream gradient ≠ 1.
    Decoupled (DCL): the positives out of each row's logsumexp."""
    if backend == "triton" and (M > 100 or (M, labelled) in ((70, False), (37, True), (2, False))):
        pytest.skip("interpreter: a few small cases only (slow)")
    if decoupled and (M == 2 or (backend == "triton" and M != 70)):
        pytest.skip("M = 2: no negative (lse = −inf, tested elsewhere); interpreter: one decoupled case")
    dtype = torch.float32 if backend == "triton" else torch.float64
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    g = torch.Generator().manual_seed(M + r0)
    u = torch.nn.functional.normalize(torch.randn(M, D_, generator=g, dtype=torch.float64), dim=1)
    labels = torch.randint(0, 4, (M,), generator=g) if labelled else None
    period = 1 if labelled else max(1, M // 3)
    tau64 = torch.tensor(0.3, dtype=torch.float64)
    w_lse, w_pos = torch.randn(r1 - r0, generator=g, dtype=torch.float64), torch.randn(r1 - r0, generator=g,
                                                                                       dtype=torch.float64)
    # Literal: the full reference statistics, rows selected, differentiated by autograd.
    u_ref = u.clone().requires_grad_(True)
    t_ref = tau64.clone().requires_grad_(True)
    full = reference.self_similarity_rows(u_ref, t_ref, labels if labelled else reference.implicit_labels(M, period),
                                          decoupled=decoupled)
    want = [s[r0:r1] for s in full]
    (want[0] * w_lse + want[1] * w_pos).sum().backward()

    u_got = u.to(dtype).requires_grad_(True)
    t_got = tau64.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_(True)
    ops = backends.BACKENDS[backend].operators("self_rows")
    got = ops.forward(u_got, t_got, labels, period, r0, r1, decoupled)
    for a, b, name in zip(got, want, ("lse", "pos_sum", "pos_count", "expected_logit", "top1")):
        assert a.shape == (r1 - r0,)
        if b.numel():
            assert_rel_close(a, b, tol, f"{backend} {name}")
    (got[0] * w_lse.to(got[0].dtype) + got[1] * w_pos.to(got[0].dtype)).sum().backward()
    assert torch.isfinite(u_got.grad).all()
    assert_rel_close(u_got.grad, u_ref.grad, tol, f"{backend} grad u")
    assert_rel_close(t_got.grad, t_ref.grad, tol, f"{backend} grad tau")


@pytest.mark.skipif("triton" not in _rows_backends(), reason="needs triton under TRITON_INTERPRET=1")
def test_local_rows_triton_column_splits(monkeypatch):
    """The occupancy path of the Triton local-rows operators (split states merged, fp32 partials)."""
    from fastntxent._triton import self_local_similarity

    monkeypatch.setattr(self_local_similarity, "SPLITS", 3)
    test_local_rows_operator("triton", True, 70, 9, 10, 47, False)


@pytest.mark.skipif(not _extension.has_local_rows_kernels(), reason="needs the compiled local-rows operators")
def test_local_rows_operator_opcheck():
    u = torch.nn.functional.normalize(torch.randn(20, 6), dim=1).requires_grad_(True)
    t = torch.tensor(0.5)
    labels = torch.randint(0, 3, (20,))
    torch.library.opcheck(torch.ops.fastntxent.self_forward_rows.default, (u, t, labels, 1, 4, 13))
    torch.library.opcheck(torch.ops.fastntxent.self_forward_rows.default, (u, t, None, 7, 0, 20))


@pytest.mark.skipif("triton" not in _rows_backends(), reason="needs triton under TRITON_INTERPRET=1")
@pytest.mark.parametrize("outputs", [0, 1, 2, 3])
def test_local_rows_triton_selective_outputs(outputs):
    """The Triton local-rows forward computes top1 only when asked (return_stats) and the
    expected logit only when the temperature needs a gradient; the others stay NaN."""
    from fastntxent._triton import self_local_similarity

    g = torch.Generator().manual_seed(9)
    u = torch.nn.functional.normalize(torch.randn(50, 7, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    t = torch.tensor(0.3)
    want = reference.self_similarity_local_rows(u.double(), t.double(), labels, 1, 10, 37)
    got = self_local_similarity.self_forward_rows(u, t, labels, 1, 10, 37, False, outputs)
    for i, name in enumerate(("lse", "pos_sum", "pos_count")):
        assert_rel_close(got[i], want[i], 1e-5, name)
    for i, bit, name in ((3, 2, "expected_logit"), (4, 1, "top1")):
        if outputs & bit:
            assert_rel_close(got[i], want[i], 1e-5, name)
        else:
            assert torch.isnan(got[i]).all(), f"{name} computed though not asked for"
