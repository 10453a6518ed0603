"""End-to-end tests of the reference trainers (fastntxent.train) on scikit-learn's digits, CPU.

Margins: measured on 2 CPU cores, the digits CNN (width 16) after 20 SimCLR epochs probes at
98.6-98.9% test accuracy against 92.2-93.9% for the same network at random init (seeds 0-2:
+5.0 to +6.4 points); the test asserts +3 points.
"""
import csv
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")
pytest.importorskip("torchvision")

from fastntxent.train import TrainConfig, run  # noqa: E402
from fastntxent.train.checkpoint import CheckpointError, load_checkpoint  # noqa: E402
from fastntxent.train.cli import build_parser, main  # noqa: E402
from fastntxent.train.data import DataNotFoundError  # noqa: E402

SIMCLR_MARGIN = 0.03
MOCO_MARGIN = 0.03


def _cfg(tmp_path, **kw):
    base = dict(dataset="digits", progress=False, plot=False, out_dir=str(tmp_path), knn_every=0)
    base.update(kw)
    return TrainConfig(**base)


def _quiet(*a, **k):
    pass


def test_simclr_beats_random_init(tmp_path):
    s = run(_cfg(tmp_path, method="simclr", epochs=20, plot=True, knn_every=5), log=_quiet)
    margin = s["probe_accuracy"] - s["baseline_probe_accuracy"]
    assert margin >= SIMCLR_MARGIN, s
    assert s["health"]["warnings"] == [], s["health"]  # a healthy run: no false alarm
    assert 0 < s["health"]["loss_to_chance"] < 0.9 and s["health"]["embedding_std_sqrt_d"] > 0.3, s["health"]
    for f in ("config.json", "log.csv", "summary.json", "curves.png", "last.pt", "backbone.pt"):
        assert os.path.isfile(os.path.join(s["run_dir"], f)), f


def test_decoupled_simclr_beats_random_init(tmp_path):
    """--decoupled (DCL): the positive out of NT-Xent's denominator, fused; it trains too (its
    loss may go below 0: the denominator holds only negatives)."""
    s = run(_cfg(tmp_path, method="simclr", epochs=20, decoupled=True), log=_quiet)
    assert s["probe_accuracy"] - s["baseline_probe_accuracy"] >= SIMCLR_MARGIN, s
    assert s["health"]["warnings"] == [], s["health"]


def test_moco_beats_random_init(tmp_path):
    s = run(_cfg(tmp_path, method="moco", epochs=20), log=_quiet)
    margin = s["probe_accuracy"] - s["baseline_probe_accuracy"]
    assert margin >= MOCO_MARGIN, s
    assert s["health"]["warnings"] == [], s["health"]


def _assert_same_state(a, b):
    ma, mb = a["model"], b["model"]
    assert ma.keys() == mb.keys()
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"model {k} differs"
    oa, ob = a["optimizer"], b["optimizer"]
    assert oa["param_groups"] == ob["param_groups"]
    assert oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][k])), (i, k)
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["loss"] for r in a["history"]] == [r["loss"] for r in b["history"]]
    assert [r["knn_accuracy"] for r in a["history"]] == [r["knn_accuracy"] for r in b["history"]]


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_resume_is_bit_exact(tmp_path, method):
    common = dict(method=method, epochs=2, probe=False, knn_every=1)
    run(_cfg(tmp_path, run_dir=str(tmp_path / "straight"), **common), log=_quiet)
    run(_cfg(tmp_path, run_dir=str(tmp_path / "sliced"), stop_after_epochs=1, **common), log=_quiet)
    first = load_checkpoint(str(tmp_path / "sliced"))
    assert first["epoch"] == 1
    run(_cfg(tmp_path, resume=str(tmp_path / "sliced" / "last.pt"), **common), log=_quiet)
    _assert_same_state(load_checkpoint(str(tmp_path / "straight")),
                       load_checkpoint(str(tmp_path / "sliced")))


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("one")
    run(TrainConfig(epochs=1, probe=False, progress=False, plot=False, run_dir=str(d / "run")),
        log=_quiet)
    return d / "run" / "last.pt"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, one_epoch_run, damage):
    bad = tmp_path / "last.pt"
    data = one_epoch_run.read_bytes()
    bad.write_bytes({"truncate": data[:len(data) // 2], "garbage": os.urandom(4096),
                     "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="(?s)corrupt or unreadable.*Refusing to start from scratch"):
        run(_cfg(tmp_path, epochs=2, resume=str(bad)), log=_quiet)
    assert main(["--epochs", "2", "--no-progress", "--resume", str(bad)]) == 2  # CLI: exit code 2


def test_mismatched_checkpoint_is_a_clear_error(tmp_path, one_epoch_run):
    with pytest.raises(CheckpointError, match=r"width: checkpoint=16, this run=8"):
        run(_cfg(tmp_path, epochs=2, width=8, resume=str(one_epoch_run)), log=_quiet)
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        run(_cfg(tmp_path, epochs=2, resume=str(tmp_path / "nope.pt")), log=_quiet)
    # a file that torch can read but is not ours
    other = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, other)
    with pytest.raises(CheckpointError, match="not a fastntxent training checkpoint"):
        run(_cfg(tmp_path, epochs=2, resume=str(other)), log=_quiet)
    # right format, wrong tensors (e.g. edited by hand): the load error is wrapped, not ignored
    state = torch.load(one_epoch_run, weights_only=True)
    state["model"]["backbone.features.0.weight"] = torch.zeros(1)
    wrong = tmp_path / "wrong.pt"
    torch.save(state, wrong)
    with pytest.raises(CheckpointError, match="saved model does not fit"):
        run(_cfg(tmp_path, epochs=2, resume=str(wrong)), log=_quiet)


def test_missing_dataset_says_how_to_get_it(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"(?s)never downloads.*CIFAR10\(.*download=True"):
        run(_cfg(tmp_path, dataset="cifar10", data_dir=str(tmp_path / "nothing")), log=_quiet)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match="download=True"):
        run(_cfg(tmp_path, dataset="cifar10", data_dir=str(tmp_path / "empty")), log=_quiet)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path):
    """A real SIGTERM mid-training: exit code 128+15, a checkpoint, and --resume completes."""
    run_dir = tmp_path / "sig"
    code = (
        "import os, signal, fastntxent.train.trainer as T\n"
        "orig = T.PretrainLoader.epoch\n"
        "def epoch(self, e, s=0):\n"
        "    for i, b in enumerate(orig(self, e, s)):\n"
        "        if e == 1 and i == 2: os.kill(os.getpid(), signal.SIGTERM)\n"
        "        yield b\n"
        "T.PretrainLoader.epoch = epoch\n"
        "from fastntxent.train.cli import main\n"
        f"raise SystemExit(main(['--epochs', '3', '--no-progress', '--no-probe', '--no-plot',"
        f" '--run-dir', {str(run_dir)!r}]))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 128 + 15, p.stderr
    assert "checkpoint saved" in p.stderr
    st = load_checkpoint(str(run_dir))
    assert (st["epoch"], st["step_in_epoch"]) == (1, 3)
    s = run(_cfg(tmp_path, epochs=3, probe=False, knn_every=1, resume=str(run_dir)), log=_quiet)
    assert s["finished"] and s["epochs_done"] == 3
    # the interrupted-and-resumed run matches an uninterrupted one bit for bit
    run(_cfg(tmp_path, epochs=3, probe=False, knn_every=1, run_dir=str(tmp_path / "straight")),
        log=_quiet)
    _assert_same_state(load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(run_dir)))


def test_python_dash_m_help():
    p = subprocess.run([sys.executable, "-m", "fastntxent.train", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0 and "--resume" in p.stdout and "--method" in p.stdout


@pytest.mark.parametrize("method,symmetric", [("simclr", False), ("moco", False), ("moco", True)])
def test_chunked_one_chunk_equals_plain_step(tmp_path, method, symmetric):
    """--chunk-size equal to the batch (one chunk: a no-grad forward, the loss, the
    re-run with the cached embedding gradients) trains bit for bit like the plain step; a
    chunk that does not divide the batch trains too (BatchNorm per chunk: close, not equal)."""
    common = dict(method=method, symmetric=symmetric, epochs=1, probe=False, batch_size=256)
    states = {}
    for name, chunk in (("plain", 0), ("one", 256), ("split", 100)):
        run(_cfg(tmp_path, run_dir=str(tmp_path / name), chunk_size=chunk, **common), log=_quiet)
        states[name] = load_checkpoint(str(tmp_path / name))
    _assert_same_state(states["plain"], states["one"])
    plain, split = states["plain"]["history"][0]["loss"], states["split"]["history"][0]["loss"]
    assert split != plain and abs(split - plain) < 0.05 * plain, (split, plain)


def test_chunk_size_flag(tmp_path, capsys):
    assert main(["--chunk-size", "-1", "--no-progress", "--out-dir", str(tmp_path)]) == 2
    with pytest.raises(ValueError, match="--chunk-size must be >= 0"):
        TrainConfig(chunk_size=-3).resolved()
    parser = build_parser()
    assert parser.parse_args([]).chunk_size == 0  # off
    assert parser.parse_args(["--grad-cache-chunk", "64"]).chunk_size == 64  # the former name
    assert "deprecated, use --chunk-size" in capsys.readouterr().err


def test_chunked_under_torchrun_equals_ddp(tmp_path):
    """2 processes (gloo, CPU): --chunk-size equal to the local batch (the local gradients
    averaged in one all-reduce, no DDP wrapper) trains bit for bit like the DDP step."""
    for name, extra in (("ddp", []), ("chunked", ["--chunk-size", "128"])):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fastntxent.train", "--device", "cpu", "--epochs", "1", "--batch-size", "128",
               "--no-probe", "--no-progress", "--no-plot", "--knn-every", "0",
               "--run-dir", str(tmp_path / name), *extra]
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert p.returncode == 0, p.stderr[-3000:]
    _assert_same_state(load_checkpoint(str(tmp_path / "ddp")), load_checkpoint(str(tmp_path / "chunked")))


@pytest.mark.parametrize("method", ["simclr", "moco"])
def test_synthetic_dataset_is_deterministic_and_trains(tmp_path, monkeypatch, method):
    """--dataset synthetic: random uint8 images of CIFAR's shape and random labels from --seed;
    a chunked SimCLR / MoCo run on it (its views made per chunk from the uint8 batch) goes
    through the whole trainer (fewer images here, for time)."""
    from fastntxent.train import data

    a, b, c = data.load_synthetic_bundle(0), data.load_synthetic_bundle(0), data.load_synthetic_bundle(1)
    assert a.train_images.shape == (data.SYNTHETIC_TRAIN, 3, 32, 32) and a.train_images.dtype == torch.uint8
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    cfg = TrainConfig(dataset="synthetic").resolved()
    assert (cfg.arch, cfg.cifar_stem, cfg.crop_size, cfg.epochs) == ("resnet18", True, 32, 1)
    monkeypatch.setattr(data, "SYNTHETIC_TRAIN", 128)
    monkeypatch.setattr(data, "SYNTHETIC_TEST", 64)
    s = run(_cfg(tmp_path, dataset="synthetic", method=method, arch="digits_cnn", width=4, proj_hidden_dim=32,
                 proj_output_dim=16, queue_size=128, batch_size=64, chunk_size=24, probe=False), log=_quiet)
    assert s["finished"] and s["knn_accuracy"] is not None


# -- lazy views: --chunk-size augments each chunk on the fly -------------------------------
def _uint8_bundle(n=48, size=12):
    """A tensor bundle of n random uint8 images (3, size, size), as --dataset synthetic's."""
    from fastntxent.train.data import DataBundle

    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    xf = x.float() / 255
    return DataBundle(name="synthetic", kind="tensor", num_classes=2, in_channels=3, train_images=x,
                      train_labels=torch.zeros(n, dtype=torch.long), mean=xf.mean(dim=(0, 2, 3)).reshape(1, 3, 1, 1),
                      std=xf.std(dim=(0, 2, 3)).reshape(1, 3, 1, 1))


def test_lazy_views_loader_yields_the_raw_batch():
    """lazy_views: the raw uint8 batch (x1 is x2), and view_transform draws the views the
    plain loader yields from the same random state."""
    from fastntxent.train.data import PretrainLoader

    bundle, cfg, cpu = _uint8_bundle(), TrainConfig(dataset="synthetic", batch_size=16), torch.device("cpu")
    plain, lazy = PretrainLoader(bundle, cfg, cpu), PretrainLoader(bundle, cfg, cpu, lazy_views=True)
    assert plain.view_transform is None
    torch.manual_seed(1)
    v1, v2 = next(plain.epoch(0))
    torch.manual_seed(1)
    r1, r2 = next(lazy.epoch(0))
    assert r1 is r2 and r1.dtype == torch.uint8 and r1.shape == (16, 3, 12, 12)
    assert torch.equal(lazy.view_transform(r1), v1) and torch.equal(lazy.view_transform(r2), v2)
    assert not torch.equal(v1, v2)


def _record_inputs(module, log: list, tag: str):
    """Appends (tag, grad enabled?, input) for every call of module."""
    module.register_forward_pre_hook(lambda m, a: log.append((tag, torch.is_grad_enabled(), a[0].detach().clone())))


@pytest.mark.parametrize("method,symmetric", [("simclr", False), ("moco", False), ("moco", True)])
def test_lazy_views_chunked_step_is_the_unchunked_step_on_its_views(method, symmetric):
    """grad_cache_backward on the raw batch with the loader's view_transform: the query
    encoder's re-run sees its first pass's views bit for bit, one chunk's at a time; MoCo's
    key encoder sees the queries' views (symmetric) or the other view; loss, gradients and
    the enqueued keys are those of the unchunked forward on those views (BatchNorm in eval
    mode, so that rows are independent and the unchunked step is the reference), to 1e-5
    relative."""
    import copy

    from fastntxent.train.data import PretrainLoader
    from fastntxent.train.trainer import _build_method
    from helpers import assert_rel_close

    cfg = TrainConfig(dataset="synthetic", method=method, symmetric=symmetric, arch="digits_cnn", width=4,
                      proj_hidden_dim=32, proj_output_dim=16, queue_size=128, batch_size=40).resolved()
    loader = PretrainLoader(_uint8_bundle(), cfg, torch.device("cpu"), lazy_views=True)
    raw, _ = next(loader.epoch(0))
    torch.manual_seed(0)
    m = _build_method(cfg, 3)
    for mod in m.modules():
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            mod.eval()
    ref = copy.deepcopy(m)
    seen: list = []
    _record_inputs(m.backbone, seen, "query")
    if method == "moco":
        _record_inputs(m.momentum_backbone, seen, "key")
    loss, _ = m.grad_cache_backward(raw, raw, 16, transform=loader.view_transform)  # chunks 16, 16, 8

    first = [x for t, g, x in seen if t == "query" and not g]
    rerun = [x for t, g, x in seen if t == "query" and g]
    keys = [x for t, _, x in seen if t == "key"]
    assert len(first) == len(rerun) == 3 and all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert max(x.shape[0] for _, _, x in seen) <= 2 * 16  # never a view of the whole batch
    if method == "simclr" or symmetric:  # each call: the chunk's view 1, then its view 2
        v1, v2 = (torch.cat([x.chunk(2)[i] for x in first]) for i in (0, 1))
    else:
        v1, v2 = torch.cat(first), torch.cat(keys)
    if symmetric:
        assert len(keys) == 3 and all(torch.equal(a, b) for a, b in zip(first, keys))
    assert v1.shape == (40, 3, 12, 12) and not torch.equal(v1, v2)

    ref_loss, _ = ref(v1, v2)
    ref_loss.backward()
    assert_rel_close(loss, ref_loss, 1e-5, "loss")
    trained = [(p, q) for p, q in zip(m.parameters(), ref.parameters()) if q.requires_grad]
    assert all(p.grad is not None for p, _ in trained)
    # the whole gradient (per parameter its share: the projector's last bias, a sum over the
    # rows that nearly cancels, is ~1e-5 of it and only float32-close relative to itself)
    assert_rel_close(torch.cat([p.grad.flatten() for p, _ in trained]),
                     torch.cat([q.grad.flatten() for _, q in trained]), 1e-5, "parameter gradients")
    if method == "moco":
        assert_rel_close(m.queue.keys, ref.queue.keys, 1e-5, "queue")


# -- health (issue 21): the failures reproduced end to end, --on-collapse ------------------
def _patch_method(monkeypatch, change):
    """Every method the trainer builds is passed through change(method) first."""
    import fastntxent.train.trainer as T

    build = T._build_method
    monkeypatch.setattr(T, "_build_method", lambda cfg, c: change(build(cfg, c)))


def _kinds(summary) -> dict:
    """warning kind -> the first epoch it was raised in."""
    out = {}
    for w in summary["health"]["warnings"]:
        out.setdefault(w["kind"], w["epoch"])
    return out


def _zero_last_layer(method):
    """All embeddings equal: the projection's last Linear outputs its bias only."""
    last = method.projector[-1]
    with torch.no_grad():
        last.weight.zero_()
    last.weight.requires_grad_(False)
    return method


def test_constant_encoder_loss_is_ln_m_minus_1_and_collapse_is_reported(tmp_path, monkeypatch):
    import math

    _patch_method(monkeypatch, _zero_last_layer)
    s = run(_cfg(tmp_path, epochs=5, probe=False, width=4), log=_quiet)  # 25 steps, patience 20
    kinds = _kinds(s)
    assert kinds.get("std") == 1 and kinds.get("collapse") == 4, kinds  # step 1; step 20 = epoch 4
    log = list(csv.DictReader(open(os.path.join(s["run_dir"], "log.csv"))))
    for row in log:  # M = 2 x 256 rows: ln(511), to 1e-6 relative (2 float32 ulps)
        assert abs(float(row["loss"]) / math.log(511) - 1) < 1e-6, row["loss"]
        assert abs(float(row["loss_to_chance"]) - 1) < 1e-6 and float(row["embedding_std_sqrt_d"]) == 0
    assert log[0]["health_warnings"] == "std;rank" and log[3]["health_warnings"] == "collapse"


def test_identical_views_stop_the_run_with_a_checkpoint(tmp_path, monkeypatch):
    """No augmentation (both views the same images): the trivial-task warning, and with
    --on-collapse stop a checkpoint and TrainingCollapsed naming the cause."""
    from fastntxent.train.trainer import PretrainLoader, TrainingCollapsed

    epoch = PretrainLoader.epoch

    def same_views(self, e, s=0):
        for v1, _ in epoch(self, e, s):
            yield v1, v1.clone()
    monkeypatch.setattr(PretrainLoader, "epoch", same_views)
    with pytest.raises(TrainingCollapsed, match="Check your augmentations") as e:
        run(_cfg(tmp_path, epochs=3, probe=False, width=4, on_collapse="stop",
                 run_dir=str(tmp_path / "same")), log=_quiet)
    assert (e.value.epoch, e.value.step) == (1, 1)
    st = load_checkpoint(str(tmp_path / "same"))
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (0, 1, 1)


def test_rank_two_projection_is_reported(tmp_path, monkeypatch):
    def rank_two(method):
        last = method.projector[-1]
        method.projector[-1] = torch.nn.Sequential(torch.nn.Linear(last.in_features, 2, bias=False),
                                                   torch.nn.Linear(2, last.out_features, bias=False))
        return method
    _patch_method(monkeypatch, rank_two)
    s = run(_cfg(tmp_path, epochs=1, probe=False, width=4), log=_quiet)
    assert "rank" in _kinds(s) and s["health"]["effective_rank"] <= 2, s["health"]


def test_absurd_learning_rate_is_stopped(tmp_path, capsys):
    """--lr 1e4 on digits: the loss stays near chance (it does not diverge, so nothing else
    stops it); --on-collapse stop ends the 60-epoch run within its first epochs, exit code 3."""
    run_dir = tmp_path / "lr"
    code = main(["--lr", "1e4", "--on-collapse", "stop", "--no-progress", "--no-plot",
                 "--run-dir", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 3, err
    assert "stopped (--on-collapse stop)" in err and "checkpoint saved" in err
    assert load_checkpoint(str(run_dir))["epoch"] <= 2


@pytest.mark.parametrize("shape", [(37, 1, 8, 8), (20, 3, 32, 32)])
def test_digits_augment_in_slices_draws_the_same_views(shape):
    """Slicing only bounds the temporaries: the views and the generator's state after them do
    not depend on the slice size (a resumed run and any batch size draw the same views)."""
    from fastntxent.train.augment import DigitsAugment

    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    mean, std = torch.tensor(0.3), torch.tensor(0.2)
    views = []
    for slice_rows in (10**9, 16, 5):
        torch.manual_seed(7)
        views.append((DigitsAugment(mean, std, slice_rows=slice_rows)(x), torch.rand(4)))
    for got, after in views[1:]:
        assert torch.equal(got, views[0][0]) and torch.equal(after, views[0][1])
    assert not torch.equal(views[0][0], (x - mean) / std)  # (it did augment)
