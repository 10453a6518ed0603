"""gather=True over torch.distributed (docs/maths.md §4), gloo backend, 2 and 4 local processes.

Each rank holds its slice of a global batch. Checked against one process on the
concatenated batch:
- the loss each rank returns equals the global loss;
- each rank's input gradient equals W × the global gradient of its rows (the convention of
  fastntxent.distributed: DDP's averaging over W ranks then gives the exact gradient), and
  the average over ranks of a shared scalar's gradient (τ, logit_scale) equals its global
  gradient;
- a 3-step DDP training of a tiny model (nt_xent + clip_loss + info_nce, learnable τ and
  logit scale) ends with the parameters of single-process training on the global batch;
- MemoryQueue.enqueue gathers every rank's keys; unequal row counts raise ValueError.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastntxent as fx
from fastntxent import _extension
from helpers import assert_rel_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")

N_LOCAL, D, K = 3, 5, 11
ROW_TENSORS = ("z1", "z2", "z", "labels", "q", "k", "a", "b")
BACKEND = "cpu" if _extension.has_cross_kernels() else "reference"

# name -> (inputs that get gradients, value of the shared scalar, loss(inputs, scalar, gather))
CASES = {
    "nt_xent": (("z1", "z2"), 0.5, lambda x, t, g: fx.nt_xent(x["z1"], x["z2"], t, gather=g)),
    "nt_xent_sum": (("z1", "z2"), 0.3,
                    lambda x, t, g: fx.nt_xent(x["z1"], x["z2"], t, reduction="sum", gather=g)),
    "supcon": (("z",), 0.1, lambda x, t, g: fx.supcon(x["z"], x["labels"], t, gather=g)),
    "info_nce": (("q", "k"), 0.2, lambda x, t, g: fx.info_nce(x["q"], x["k"], None, t, backend=BACKEND, gather=g)),
    "info_nce_sum": (("q", "k"), 0.2,
                     lambda x, t, g: fx.info_nce(x["q"], x["k"], None, t, reduction="sum", backend=BACKEND, gather=g)),
    "info_nce_queue": (("q", "k"), 0.07,
                       lambda x, t, g: fx.info_nce(x["q"], x["k"], x["queue"], t, backend=BACKEND, gather=g)),
    "clip": (("a", "b"), 10.0, lambda x, t, g: fx.clip_loss(x["a"], x["b"], t, backend=BACKEND, gather=g)),
    "clip_reference": (("a", "b"), 3.0, lambda x, t, g: fx.clip_loss(x["a"], x["b"], t, backend="reference", gather=g)),
}


def _global_inputs(world: int) -> dict:
    g = torch.Generator().manual_seed(1234 + world)
    M = N_LOCAL * world
    x = {name: torch.randn(M, D, generator=g, dtype=torch.float64) for name in ("z1", "z2", "z", "q", "k", "a", "b")}
    x["labels"] = torch.randint(0, 3, (M,), generator=g)
    x["queue"] = torch.randn(K, D, generator=g, dtype=torch.float64)
    return x


def _inputs_for(x: dict, rows: slice | None, grad_names) -> dict:
    out = {n: (v[rows] if rows is not None and n in ROW_TENSORS else v).clone() for n, v in x.items()}
    for n in grad_names:
        out[n].requires_grad_(True)
    return out


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        self.log_t = torch.nn.Parameter(torch.tensor(-1.0))
        self.log_s = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, x1, x2, x3, gather: bool):
        a, b, c = self.net(x1), self.net(x2), self.net(x3)
        return (fx.nt_xent(a, b, self.log_t.exp(), gather=gather)
                + fx.clip_loss(a, c, self.log_s.exp(), backend=BACKEND, gather=gather)
                + fx.info_nce(b, c.detach(), None, 0.2, backend=BACKEND, gather=gather))


def _train_batches(world: int):
    g = torch.Generator().manual_seed(99)
    return [tuple(torch.randn(N_LOCAL * world, 6, generator=g) for _ in range(3)) for _ in range(3)]


def _train(model, batches, rows: slice | None, gather: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    for xs in batches:
        opt.zero_grad()
        xs = [x[rows] if rows is not None else x for x in xs]
        model(*xs, gather=gather).backward()
        opt.step()
    inner = model.module if hasattr(model, "module") else model
    return {n: p.detach().clone() for n, p in inner.named_parameters()}


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        x = _global_inputs(world)
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        results = {}
        for name, (grad_names, value, fn) in CASES.items():
            local = _inputs_for(x, rows, grad_names)
            t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
            loss = fn(local, t, True)
            loss.backward()
            results[name] = {"loss": loss.detach(), "t": t.grad, **{n: local[n].grad for n in grad_names}}
        ddp = torch.nn.parallel.DistributedDataParallel(_Tiny())
        results["ddp"] = _train(ddp, _train_batches(world), rows, gather=True)
        mq = fx.MemoryQueue(dim=D, size=4 * world * N_LOCAL)
        mq.enqueue(x["k"][rows])
        results["queue"] = mq.keys.clone()
        try:  # unequal row counts: every rank must raise, none may hang
            fx.nt_xent(torch.randn(rank + 2, D), torch.randn(rank + 2, D), gather=True)
            results["unequal"] = "no error"
        except ValueError as exc:
            results["unequal"] = str(exc)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def dist_results(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
    return world, [torch.load(d / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_equal_single_process(dist_results, case):
    world, results = dist_results
    grad_names, value, fn = CASES[case]
    x = _inputs_for(_global_inputs(world), None, grad_names)
    t = torch.tensor(value, dtype=torch.float64, requires_grad=True)
    loss = fn(x, t, False)
    loss.backward()
    results = [res[case] for res in results]
    for r, res in enumerate(results):
        rows = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        assert_rel_close(res["loss"], loss, 1e-12, f"rank {r} loss")
        for n in grad_names:
            assert_rel_close(res[n] / world, x[n].grad[rows], 1e-10, f"rank {r} grad {n} / W")
    t_avg = sum(res["t"] for res in results) / world  # what DDP's averaging gives
    assert_rel_close(t_avg, t.grad, 1e-10, "mean over ranks of the scalar's grad")


def test_ddp_training_equals_single_process(dist_results):
    world, results = dist_results
    expected = _train(_Tiny(), _train_batches(world), None, gather=False)
    for r, res in enumerate(results):
        for n, p in expected.items():
            assert_rel_close(res["ddp"][n], p, 1e-5, f"rank {r} parameter {n}")
    moved = _Tiny()
    assert any(not torch.allclose(p, dict(moved.named_parameters())[n]) for n, p in expected.items())


def test_memory_queue_gathers_all_ranks(dist_results):
    world, results = dist_results
    keys = _global_inputs(world)["k"].float()
    for res in results:
        assert torch.equal(res["queue"][: world * N_LOCAL], keys)
        assert torch.equal(res["queue"], results[0]["queue"])


def test_unequal_rows_raise_on_every_rank(dist_results):
    _, results = dist_results
    for res in results:
        assert "same number of rows" in res["unequal"]
