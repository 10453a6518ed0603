"""Training health (fastntxent.health): the statistics every loss returns, and the monitor
that makes the classic silent failures loud — reproduced here one by one."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

import fastntxent as fx
from helpers import BACKEND_CASES


@pytest.mark.parametrize("backend,device", BACKEND_CASES)
@pytest.mark.parametrize("M", [4, 10, 64])
def test_constant_encoder_gives_chance_loss(backend, device, M):
    """All embeddings equal: every similarity is equal and the loss is ln(M−1) (ln 32 in the
    copied TensorFlow example's output)."""
    z = torch.ones(M, 8, device=device)
    loss, stats = fx.nt_xent(z[: M // 2], z[M // 2:], 0.5, backend=backend, return_stats=True)
    assert abs(float(loss) - math.log(M - 1)) < 1e-6
    assert abs(float(stats["chance_loss"]) - math.log(M - 1)) < 1e-6
    assert abs(float(stats["loss_to_chance"]) - 1) < 1e-6
    assert float(stats["embedding_std"]) == 0.0


def test_health_statistics_values():
    z = torch.randn(40, 16, dtype=torch.float64)
    labels = torch.arange(40) % 5
    loss, s = fx.supcon(z, labels, 0.2, return_stats=True)
    u = torch.nn.functional.normalize(z, dim=1)
    assert torch.allclose(s["embedding_std"], u.std(0, unbiased=False).mean())
    assert torch.allclose(s["top1_chance"], torch.tensor(7 / 39, dtype=torch.float64))  # 7 positives of 39
    assert torch.allclose(s["loss_to_chance"], loss / math.log(39))
    assert torch.allclose(s["alignment"], s["positive_cosine"])
    _, s = fx.info_nce(z[:8], z[8:16], z[16:], 0.2, return_stats=True)
    assert torch.allclose(s["chance_loss"], torch.tensor(math.log(1 + 24), dtype=torch.float64))
    _, s = fx.info_nce(z[:8], z[8:16], None, 0.2, return_stats=True)
    assert torch.allclose(s["top1_chance"], torch.tensor(1 / 8, dtype=torch.float64))
    _, s = fx.clip_loss(z[:8], z[8:16], 10.0, return_stats=True)
    assert torch.allclose(s["chance_loss"], torch.tensor(math.log(8), dtype=torch.float64))


def _run(monitor, make_batch, steps):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            z1, z2 = make_batch()
            _, stats = fx.nt_xent(z1, z2, 0.2, return_stats=True)
            monitor.update(stats, embeddings=torch.cat([z1, z2]))
    return [w for w in caught if issubclass(w.category, fx.CollapseWarning)]


def test_collapse_is_reported_within_patience():
    monitor = fx.HealthMonitor(patience=5)
    caught = _run(monitor, lambda: (torch.ones(16, 32), torch.ones(16, 32)), 5)
    messages = " ".join(str(w.message) for w in caught)
    assert "collapsed to one point" in messages and "representation collapse" in messages


def test_identical_views_are_reported():
    def batch():
        z = torch.randn(16, 32)
        return z, z.clone()
    caught = _run(fx.HealthMonitor(), batch, 3)
    assert any("views are identical" in str(w.message) for w in caught), [str(w.message) for w in caught]


def test_dimensional_collapse_is_reported():
    proj = torch.randn(2, 128)  # every embedding lies in a 2-dimensional subspace
    caught = _run(fx.HealthMonitor(), lambda: (torch.randn(32, 2) @ proj, torch.randn(32, 2) @ proj), 2)
    assert any("dimensional collapse" in str(w.message) for w in caught)


def test_nonfinite_embeddings_name_the_row():
    z = torch.randn(8, 4)
    z[5, 1] = float("nan")
    with pytest.warns(fx.CollapseWarning, match="row 5"):
        fx.HealthMonitor().update({}, embeddings=z)
    with pytest.raises(fx.CollapseError, match="row 5"):
        fx.HealthMonitor(strict=True).update({}, embeddings=z)


def test_same_tensor_for_both_views_warns():
    z = torch.randn(8, 4)
    with pytest.warns(fx.CollapseWarning, match="same tensor"):
        fx.nt_xent(z, z, 0.5)


def test_no_false_alarm_while_training_on_digits():
    """A short SimCLR run on digits (noisy shifted views): no warning at all."""
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    x = torch.tensor(load_digits().data, dtype=torch.float32) / 16
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    monitor = fx.HealthMonitor(patience=10)

    def view(b):
        return (b + 0.1 * torch.randn_like(b)).roll(int(torch.randint(-1, 2, ())), dims=1)

    with warnings.catch_warnings():
        warnings.simplefilter("error", fx.CollapseWarning)
        for step in range(30):
            b = x[torch.randint(0, len(x), (128,))]
            z1, z2 = net(view(b)), net(view(b))
            loss, stats = fx.nt_xent(z1, z2, 0.5, return_stats=True)
            opt.zero_grad()
            loss.backward()
            opt.step()
            assert monitor.update(stats, embeddings=torch.cat([z1, z2]).detach()) == []


def test_monitor_arguments_are_checked():
    with pytest.raises(ValueError, match="patience"):
        fx.HealthMonitor(patience=0)
    with pytest.raises(ValueError, match="std_fraction"):
        fx.HealthMonitor(std_fraction=float("nan"))


def _feed(monitor, ratios, top1s, top1_chance=1 / 511):
    """Stats of a run, step by step: returns the step (1-based) of each warning kind."""
    first = {}
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for step, (r, t) in enumerate(zip(ratios, top1s), start=1):
            stats = {"loss_to_chance": torch.tensor(r), "chance_loss": torch.tensor(math.log(511)),
                     "top1_accuracy": torch.tensor(t), "top1_chance": torch.tensor(top1_chance)}
            before = set(monitor.raised)
            monitor.update(stats)
            for k in monitor.raised.keys() - before:
                first[k] = step
    return first


def test_stuck_at_chance_is_reported_after_the_warm_up():
    """The lr = 1e4 digits run's shape: loss/chance 1 ± a few %, top-1 about a random ranking's.
    The exact-collapse check (1e-3) cannot see it; the stuck check does, once its warm-up
    (stuck_after) and window are over — and not before."""
    g = torch.Generator().manual_seed(0)
    n = 120
    ratios = (1 + 0.02 * torch.randn(n, generator=g)).tolist()
    top1s = ((1 + torch.rand(n, generator=g)) / 511).tolist()  # 1-2 x chance
    m = fx.HealthMonitor()
    first = _feed(m, ratios, top1s)
    assert "collapse" not in first
    assert m.stuck_after < first["stuck"] <= m.stuck_after + 2 * m.stuck_window, first
    assert "learning nothing" in m.raised["stuck"]
    assert _feed(fx.HealthMonitor(), ratios[:m.stuck_after], top1s[:m.stuck_after]) == {}


def test_stuck_check_leaves_a_learning_run_alone():
    """The default digits run's shape: loss/chance 0.99 falling to 0.8 over the first 50 steps,
    top-1 5-25 x chance; also a run that is still at chance but whose top-1 is far above it,
    and one at chance whose loss has started to fall."""
    n = 150
    falling = [max(0.99 - 0.004 * i, 0.8) for i in range(n)]
    rising = [min(0.01 + 0.001 * i, 0.05) for i in range(n)]
    assert _feed(fx.HealthMonitor(), falling, rising) == {}
    assert _feed(fx.HealthMonitor(), [0.995] * n, [0.05] * n) == {}  # at chance, but ranking well
    starting = [0.995] * 40 + [0.995 - 0.003 * i for i in range(n - 40)]  # falls from step 41 on
    assert _feed(fx.HealthMonitor(), starting, [1 / 511] * n) == {}


def test_stuck_check_arguments_are_checked():
    for kw in ({"stuck_window": 0}, {"stuck_after": -1}, {"stuck_tol": -0.1}, {"stuck_top1": float("inf")}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            fx.HealthMonitor(**kw)
