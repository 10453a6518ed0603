"""The training loop shared by SimCLR and MoCo: data, model, optimiser and schedule,
checkpoint / resume, signals, DDP, progress bars, per-epoch kNN, final linear probes.

``run(cfg)`` = ``Trainer(cfg).run()``: construction sets everything up (and resumes from a
checkpoint), ``run()`` trains epoch by epoch (train, evaluate, checkpoint) and finishes with
the probes, the summary and the plot.
"""
from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import sys
import threading
import time
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from . import checkpoint as C
from . import distributed as D
from . import health as H
from . import runlog
from ..distributed import is_initialized, rank, world_size
from .config import TrainConfig
from .data import PretrainLoader, build_data
from .evaluate import evaluate_backbone
from .method import PretrainMethod, Stats
from .models import build_backbone
from .optim import WarmupCosine, build_optimizer


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was saved at ``path``."""

    def __init__(self, signum: int, path: str):
        self.signum, self.path = signum, path
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved to {path}")


class TrainingCollapsed(Exception):
    """--on-collapse stop: the health monitor found a silent failure; a checkpoint was saved
    at ``path``. ``reason`` is the monitor's message."""

    def __init__(self, reason: str, path: str, epoch: int, step: int):
        self.reason, self.path, self.epoch, self.step = reason, path, epoch, step
        super().__init__(f"stopped at epoch {epoch}, step {step}: {reason} (checkpoint saved to {path})")


class _StopOnSignal:
    """First SIGINT/SIGTERM: finish the current step, checkpoint, exit. Second: abort now."""

    def __init__(self):
        self.signum, self._old = None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def _handler(self, signum, frame):
        if self.signum is not None:
            self.__exit__()
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name} received: saving a checkpoint after this step "
              f"(send it again to abort without saving)", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}
        return False


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _build_method(cfg: TrainConfig, in_channels: int) -> PretrainMethod:
    backbone = build_backbone(cfg, in_channels)
    if cfg.method == "simclr":
        from .simclr import SimCLR

        return SimCLR(cfg, backbone)
    from .moco import MoCo

    return MoCo(cfg, backbone)


def _run_dir(cfg: TrainConfig, resume_path: Optional[str]) -> str:
    """--run-dir, else the resumed checkpoint's directory, else a new timestamped one (rank 0's)."""
    if cfg.run_dir:
        d = cfg.run_dir
    elif resume_path:
        d = os.path.dirname(os.path.abspath(resume_path))
    else:
        d = os.path.join(cfg.out_dir, f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if is_initialized():
        obj = [d]
        torch.distributed.broadcast_object_list(obj, src=0)
        d = obj[0]
    return d


def _new_accum() -> dict:
    """The running sums of an epoch (checkpointed, so a mid-epoch resume continues them)."""
    return {"loss": 0.0, "top1": 0.0, "n": 0, "seconds": 0.0, **H.new_sums()}


class Trainer:
    """One run of ``cfg``. Its loop state (``start_epoch``, ``step_in_epoch``: the first step
    of the next epoch to train, ``global_step``, ``history``: the log.csv rows, ``accum``) is
    what a checkpoint saves besides the model, optimiser, scheduler and RNG states."""

    method: PretrainMethod
    model: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Stats]]  # method or its DDP

    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg.resolved()
        self.t_start = time.time()
        self.device = D.setup(self.cfg.device)
        self.rank, self.world = rank(), world_size()
        self.main = self.rank == 0
        self.say = log if self.main else (lambda *a, **k: None)
        self._setup()
        state = self._resume() if self.cfg.resume else None
        self._open_run_dir(state["path"] if state else None)
        self.model = self._wrap_ddp()
        if state is not None:  # last: everything before this point may have drawn random numbers
            try:
                C.set_rng_state(state["rng"])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
                raise C.CheckpointError(f"checkpoint {state['path']!r}: the saved random-number state is "
                                        f"unusable ({type(e).__name__}: {e}); resume from an intact "
                                        f"checkpoint or drop --resume.") from e

    # -- setup ----------------------------------------------------------------------------
    def _setup(self) -> None:
        """Data, method, optimiser, schedule, autocast and a fresh loop state."""
        cfg, device = self.cfg, self.device
        _seed_all(cfg.seed)  # identical model initialisation on every rank
        self.bundle = build_data(cfg)
        method = _build_method(cfg, self.bundle.in_channels)
        self.random_init = copy.deepcopy(method.backbone.state_dict())  # the baseline encoder
        if self.world > 1 and cfg.sync_bn and device.type == "cuda":  # (SyncBatchNorm is CUDA-only)
            method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
        method.to(device)
        self.method = method
        _seed_all(cfg.seed + 1 + self.rank)  # augmentation streams differ between ranks

        self.global_batch = cfg.batch_size * self.world
        self.lr = cfg.lr * self.global_batch / 256
        self.optimizer = build_optimizer(cfg, method, self.lr)
        self.loader = PretrainLoader(self.bundle, cfg, device, self.rank, self.world,
                                     lazy_views=bool(cfg.chunk_size))  # chunked: views per chunk
        self.steps_per_epoch = spe = self.loader.steps_per_epoch
        self.total_steps = spe * cfg.epochs
        self.scheduler = WarmupCosine(self.optimizer, round(cfg.warmup_epochs * spe), self.total_steps,
                                      cfg.min_lr)
        self.stop_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs,
                                                                               cfg.stop_after_epochs)
        use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        self.autocast = ((lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16
                         else contextlib.nullcontext)
        self.start_epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.history: list[dict] = []
        self.accum = _new_accum()
        self.health = H.TrainingHealth()  # fastntxent.HealthMonitor with its documented defaults
        self.embedding_dim: Optional[int] = None

    def _resume(self) -> dict:
        """Load --resume into the method, optimiser, scheduler and loop state; returns the
        checkpoint (its RNG state is restored last, in __init__)."""
        cfg = self.cfg
        state = C.load_checkpoint(cfg.resume, map_location=self.device)
        C.check_entries(state)
        C.check_compatible(state, cfg.structural())
        if state["world_size"] != self.world:
            raise C.CheckpointError(f"checkpoint was written by {state['world_size']} processes, "
                                    f"this run has {self.world}: the data order would differ")
        C.load_into("model", self.method, state["model"], state["path"])
        C.load_into("optimizer", self.optimizer, state["optimizer"], state["path"])
        C.load_into("scheduler", self.scheduler, state["scheduler"], state["path"])
        self.start_epoch, self.step_in_epoch = state["epoch"], state["step_in_epoch"]
        if self.step_in_epoch > self.steps_per_epoch:
            raise C.CheckpointError(f"checkpoint {state['path']!r}: step_in_epoch={self.step_in_epoch} is "
                                    f"beyond the {self.steps_per_epoch} steps of an epoch of this run")
        self.global_step, self.history = state["global_step"], list(state["history"])
        self.accum = dict(state["accum"])
        if self.scheduler.total_steps != self.total_steps:  # --epochs changed: stretch the cosine
            self.scheduler.total_steps = self.total_steps
        return state

    def _open_run_dir(self, resume_path: Optional[str]) -> None:
        """Choose the run directory; rank 0 creates it and writes config.json."""
        cfg = self.cfg
        self.run_dir = _run_dir(cfg, resume_path)
        self.ckpt_path = os.path.join(self.run_dir, C.LAST)
        if not self.main:
            return
        os.makedirs(self.run_dir, exist_ok=True)
        for name in C.remove_stale_temporaries(self.run_dir):
            self.say(f"removed {name}, left by an interrupted checkpoint write")
        conf = dict(cfg.to_dict(), world_size=self.world, global_batch=self.global_batch,
                    scaled_lr=self.lr, steps_per_epoch=self.steps_per_epoch, device=str(self.device),
                    run_dir=self.run_dir,
                    data=dict(self.bundle.info, num_classes=self.bundle.num_classes))
        runlog.write_json(os.path.join(self.run_dir, "config.json"), conf)
        self.say("config: " + " ".join(f"{k}={v}" for k, v in conf.items() if k != "extra"))
        if resume_path:
            self.say(f"resuming from {resume_path} at epoch {self.start_epoch + 1}, step {self.step_in_epoch}")

    def _wrap_ddp(self):
        if self.world == 1 or self.cfg.chunk_size:  # (the chunked step averages its gradients itself)
            return self.method
        return nn.parallel.DistributedDataParallel(
            self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            broadcast_buffers=False)

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> dict:
        """Train from the current epoch to the stop epoch; returns the summary dict."""
        with _StopOnSignal() as stop:
            for epoch in range(self.start_epoch, self.stop_epoch):
                self._train_epoch(epoch, stop)
                self._evaluate_epoch(epoch)
                self._checkpoint(epoch + 1, stop)
        return self._finish()

    def _train_epoch(self, epoch: int, stop: _StopOnSignal) -> None:
        from tqdm.auto import tqdm

        cfg = self.cfg
        self.method.train()
        step0 = self.step_in_epoch
        if step0 == 0:
            self.accum = _new_accum()
        t0 = time.time()
        with tqdm(self.loader.epoch(epoch, step0), total=self.steps_per_epoch - step0, leave=False,
                  dynamic_ncols=True, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                  disable=not (self.main and cfg.progress)) as bar:
            for i, (x1, x2) in enumerate(bar, start=step0):
                loss, stats, embeddings = self._step(x1, x2)
                if not np.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1}, step {i}; "
                                             f"lower --lr or raise --temperature")
                top1 = float(stats.get("top1_accuracy", float("nan")))
                self.accum["loss"] += loss
                self.accum["top1"] += top1
                self.accum["n"] += 1
                found = self._check_health(stats, embeddings, epoch, i)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{self.optimizer.param_groups[0]['lr']:.3g}")
                if D.any_flag(stop.signum is not None, self.device):
                    self.accum["seconds"] += time.time() - t0
                    self._interrupt(stop, epoch, i + 1)
                if self.cfg.on_collapse == "stop" and D.any_flag(bool(found), self.device):
                    self.accum["seconds"] += time.time() - t0
                    self._stop_collapsed(found, epoch, i + 1)
        self.accum["seconds"] += time.time() - t0
        self.step_in_epoch = 0

    def _check_health(self, stats: Stats, embeddings, epoch: int, i: int) -> list:
        """The health monitor on this step's stats; a warning first raised now is printed in
        the progress bar's log (rank 0). Returns the new (kind, message) pairs."""
        if embeddings is not None:
            self.embedding_dim = int(embeddings.shape[1])
        found = self.health.update(stats, embeddings, self.accum)
        if self.main:
            from tqdm.auto import tqdm

            for kind, message in found:
                line = f"CollapseWarning (epoch {epoch + 1}, step {i + 1}, {kind}): {message}"
                tqdm.write(line, file=sys.stderr) if self.cfg.progress else self.say(line)
        return found

    def _stop_collapsed(self, found: list, epoch: int, step_in_epoch: int) -> None:
        """--on-collapse stop: checkpoint (resumable at the next step), then TrainingCollapsed."""
        self._save(epoch, step_in_epoch)
        if self.main:  # log.csv gets the epoch so far (the checkpoint's history does not)
            runlog.write_csv(os.path.join(self.run_dir, "log.csv"), self.history + [self._epoch_row(epoch)])
        reason = found[0][1] if found else "another process's health monitor found a failure (see its log)"
        raise TrainingCollapsed(reason, self.ckpt_path, epoch + 1, step_in_epoch)

    def _step(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[float, Stats, Optional[torch.Tensor]]:
        """One optimiser step; returns the loss, the method's stats and the embeddings the
        loss saw (detached, for the health monitor; None if the method does not give them)."""
        if not self.cfg.chunk_size:
            with self.autocast():
                loss, stats = self.model(x1, x2)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
        else:
            loss, stats = self._grad_cache_backward(x1, x2)
        self.optimizer.step()
        self.scheduler.step()
        self.method.after_step(self.global_step, self.total_steps)
        self.global_step += 1
        stats = dict(stats)
        embeddings = stats.pop("embeddings", None)
        return float(loss.detach()), stats, embeddings

    def _grad_cache_backward(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, Stats]:
        """--chunk-size: the method's forward and backward with the encoder run on that
        many images at a time (fastntxent.chunked); with a tensor dataset x1 and x2 are the
        raw batch and each chunk's views are made on the fly (the loader's view_transform).
        Under torchrun the local gradients are then averaged over the ranks in one
        all-reduce, as DDP would (no DDP wrapper here)."""
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss, stats = self.method.grad_cache_backward(x1, x2, self.cfg.chunk_size,
                                                          transform=self.loader.view_transform)
        if self.world > 1:
            D.average_gradients(self.method.parameters())
        return loss, stats

    def _evaluate_epoch(self, epoch: int) -> None:
        """The epoch's log.csv row (kNN on rank 0 when due), then fresh running sums."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        row = self._epoch_row(epoch)
        last = epoch + 1 == cfg.epochs
        if self.main and (last or (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0)):
            row["knn_accuracy"] = evaluate_backbone(self.method.backbone, self.bundle, self.device, cfg,
                                                    probe=False, autocast=self.autocast)["knn_accuracy"]
        self.history.append(row)
        if self.main:
            knn = f" knn {row['knn_accuracy']:.4f}" if row["knn_accuracy"] is not None else ""
            health = ""
            if row.get("loss_to_chance") is not None:
                health = (f" loss/chance {row['loss_to_chance']:.3f} "
                          f"std*sqrt(D) {row['embedding_std_sqrt_d']:.3f}")
            msg = (f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} "
                   f"top1 {row['contrastive_top1']:.3f}{knn}{health} lr {row['lr']:.4g} "
                   f"({row['epoch_seconds']:.1f}s)")
            tqdm.write(msg) if cfg.progress else self.say(msg)
            runlog.write_csv(os.path.join(self.run_dir, "log.csv"), self.history)
        self.accum = _new_accum()

    def _epoch_row(self, epoch: int) -> dict:
        """The log.csv row of the running sums (kNN not yet filled in)."""
        a = self.accum
        return {"epoch": epoch + 1, "step": self.global_step, "loss": a["loss"] / max(a["n"], 1),
                "contrastive_top1": a["top1"] / max(a["n"], 1),
                "lr": self.optimizer.param_groups[0]["lr"], "knn_accuracy": None,
                "epoch_seconds": round(a["seconds"], 3), **H.epoch_columns(a)}

    def _checkpoint(self, epochs_done: int, stop: _StopOnSignal) -> None:
        """After an epoch: save when due (every --ckpt-every epochs and at the stop epoch);
        on a signal save and raise TrainingInterrupted."""
        every = self.cfg.ckpt_every
        if epochs_done == self.stop_epoch or (every > 0 and epochs_done % every == 0):
            self._save(epochs_done, 0)
        if D.any_flag(stop.signum is not None, self.device):
            self._interrupt(stop, epochs_done, 0)

    def _interrupt(self, stop: _StopOnSignal, epoch: int, step_in_epoch: int) -> None:
        self._save(epoch, step_in_epoch)
        # signum is None on a rank that was not signalled itself (another rank was)
        raise TrainingInterrupted(stop.signum or signal.SIGTERM, self.ckpt_path)

    def _save(self, epoch: int, step_in_epoch: int) -> None:
        """Rank 0 writes last.pt (resuming at `epoch`, `step_in_epoch`); every rank waits."""
        if self.main:
            C.save_checkpoint(self.ckpt_path, {
                "structural": self.cfg.structural(), "config": self.cfg.to_dict(),
                "world_size": self.world, "epoch": epoch, "step_in_epoch": step_in_epoch,
                "global_step": self.global_step, "model": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": C.rng_state(), "history": self.history, "accum": self.accum})
        D.barrier()

    # -- the end --------------------------------------------------------------------------
    def _finish(self) -> dict:
        """Summary; on rank 0 of a finished run backbone.pt and the linear probes (pretrained
        and random-init encoder); summary.json and curves.png."""
        cfg, history = self.cfg, self.history
        finished = self.stop_epoch == cfg.epochs
        summary = {"run_dir": self.run_dir, "method": cfg.method, "dataset": cfg.dataset,
                   "arch": cfg.arch, "epochs": cfg.epochs, "epochs_done": self.stop_epoch,
                   "finished": finished, "final_loss": history[-1]["loss"] if history else None,
                   "knn_accuracy": history[-1]["knn_accuracy"] if history else None,
                   "checkpoint": self.ckpt_path, "rank": self.rank, "world_size": self.world,
                   "health": H.summary(history, self.embedding_dim)}
        if self.main and finished:
            torch.save(self.method.backbone.state_dict(), os.path.join(self.run_dir, "backbone.pt"))
            if cfg.probe:
                summary.update(self._probes())
        summary["wall_seconds"] = round(time.time() - self.t_start, 2)
        if self.main:
            runlog.write_json(os.path.join(self.run_dir, "summary.json"), summary)
            if cfg.plot and history:
                try:
                    runlog.plot(os.path.join(self.run_dir, "curves.png"), history,
                                f"{cfg.method} / {cfg.dataset} / {cfg.arch}")
                except Exception as e:  # a plot must never lose a finished run
                    self.say(f"warning: could not write the plot: {e}")
        D.barrier()
        return summary

    def _probes(self) -> dict:
        cfg, bundle, device = self.cfg, self.bundle, self.device
        self.say("linear probe on frozen features (pretrained encoder)...")
        ev = evaluate_backbone(self.method.backbone, bundle, device, cfg, probe=True,
                               autocast=self.autocast)
        out = {"probe_accuracy": ev["probe_accuracy"], "probe_train_accuracy": ev["probe_train_accuracy"]}
        if cfg.baseline:
            self.say("linear probe on frozen features (random-init encoder, the baseline)...")
            base = build_backbone(cfg, bundle.in_channels)
            base.load_state_dict(self.random_init)
            base.to(device)
            eb = evaluate_backbone(base, bundle, device, cfg, probe=True, autocast=self.autocast)
            out.update(baseline_probe_accuracy=eb["probe_accuracy"],
                       baseline_knn_accuracy=eb["knn_accuracy"])
        return out


def run(cfg: TrainConfig, log=print) -> dict:
    """Pretrain, evaluate, write the run directory; returns the summary dict."""
    return Trainer(cfg, log).run()
