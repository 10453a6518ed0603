"""The training loop shared by SimCLR and MoCo: data, model, optimiser and schedule,
checkpoint / resume, signals, DDP, progress bars, per-epoch kNN, final linear probes."""
from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import sys
import threading
import time

import numpy as np
import torch
from torch import nn

from . import checkpoint as C
from . import distributed as D
from . import runlog
from .config import TrainConfig
from .data import PretrainLoader, build_data
from .evaluate import evaluate_backbone
from .models import build_backbone
from .optim import WarmupCosine, build_optimizer


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM arrived; a checkpoint was saved at ``path``."""

    def __init__(self, signum: int, path: str):
        self.signum, self.path = signum, path
        super().__init__(f"{signal.Signals(signum).name}: checkpoint saved to {path}")


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


def _build_method(cfg, in_channels):
    backbone = build_backbone(cfg, in_channels)
    if cfg.method == "simclr":
        from .simclr import SimCLR

        return SimCLR(cfg, backbone)
    from .moco import MoCo

    return MoCo(cfg, backbone)


def _run_dir(cfg, resume_path) -> str:
    if cfg.run_dir:
        d = cfg.run_dir
    elif resume_path:
        d = os.path.dirname(os.path.abspath(resume_path))
    else:
        d = os.path.join(cfg.out_dir, f"{cfg.method}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
    if D.is_dist():
        obj = [d]
        torch.distributed.broadcast_object_list(obj, src=0)
        d = obj[0]
    return d


def _float_stats(stats: dict) -> dict:
    return {k: float(v) for k, v in stats.items() if torch.is_tensor(v) and v.numel() == 1
            or isinstance(v, (int, float))}


def run(cfg: TrainConfig, log=print) -> dict:
    """Pretrain, evaluate, write the run directory; returns the summary dict."""
    cfg = cfg.resolved()
    t_start = time.time()
    device = D.setup(cfg.device)
    rank, world = D.rank(), D.world_size()
    main = rank == 0
    say = log if main else (lambda *a, **k: None)

    _seed_all(cfg.seed)  # identical model initialisation on every rank
    bundle = build_data(cfg)
    method = _build_method(cfg, bundle.in_channels)
    random_init = copy.deepcopy(method.backbone.state_dict())  # the baseline encoder
    if world > 1 and cfg.sync_bn and device.type == "cuda":  # (SyncBatchNorm is CUDA-only)
        method = nn.SyncBatchNorm.convert_sync_batchnorm(method)
    method.to(device)
    _seed_all(cfg.seed + 1 + rank)  # augmentation streams differ between ranks

    global_batch = cfg.batch_size * world
    lr = cfg.lr * global_batch / 256
    optimizer = build_optimizer(cfg, [method], lr)
    loader = PretrainLoader(bundle, cfg, device, rank, world)
    spe = loader.steps_per_epoch
    total_steps = spe * cfg.epochs
    scheduler = WarmupCosine(optimizer, round(cfg.warmup_epochs * spe), total_steps, cfg.min_lr)

    start_epoch, start_step, global_step, history = 0, 0, 0, []
    accum = {"loss": 0.0, "top1": 0.0, "n": 0, "seconds": 0.0}
    state = None
    if cfg.resume:
        state = C.load_checkpoint(cfg.resume, map_location=device)
        C.check_compatible(state, cfg.structural())
        if state.get("world_size", 1) != world:
            raise C.CheckpointError(f"checkpoint was written by {state.get('world_size')} processes, "
                                    f"this run has {world}: the data order would differ")
        C.load_into("model", method, state["model"], state["path"])
        C.load_into("optimizer", optimizer, state["optimizer"], state["path"])
        C.load_into("scheduler", scheduler, state["scheduler"], state["path"])
        start_epoch, start_step = state["epoch"], state["step_in_epoch"]
        global_step, history, accum = state["global_step"], list(state["history"]), dict(state["accum"])
        if scheduler.total_steps != total_steps:  # --epochs changed: stretch the cosine
            scheduler.total_steps = total_steps
    run_dir = _run_dir(cfg, state["path"] if state else None)
    ckpt_path = os.path.join(run_dir, C.LAST)
    if main:
        os.makedirs(run_dir, exist_ok=True)
        for name in C.remove_stale_temporaries(run_dir):
            say(f"removed {name}, left by an interrupted checkpoint write")
        conf = dict(cfg.to_dict(), world_size=world, global_batch=global_batch, scaled_lr=lr,
                    steps_per_epoch=spe, device=str(device), run_dir=run_dir,
                    data=dict(bundle.info, num_classes=bundle.num_classes))
        runlog.write_json(os.path.join(run_dir, "config.json"), conf)
        say("config: " + " ".join(f"{k}={v}" for k, v in conf.items() if k != "extra"))
        if state:
            say(f"resuming from {state['path']} at epoch {start_epoch + 1}, step {start_step}")

    model = method
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            method, device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False)
    use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_bf16 else None
    amp = autocast or contextlib.nullcontext

    def save(epoch, step_in_epoch):
        if main:
            C.save_checkpoint(ckpt_path, {
                "structural": cfg.structural(), "config": cfg.to_dict(), "world_size": world,
                "epoch": epoch, "step_in_epoch": step_in_epoch, "global_step": global_step,
                "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": C.rng_state(), "history": history,
                "accum": accum})
        D.barrier()

    if state is not None:  # last: everything before this point may have drawn random numbers
        C.set_rng_state(state["rng"])

    from tqdm.auto import tqdm

    stop_epoch = cfg.epochs if cfg.stop_after_epochs is None else min(cfg.epochs, cfg.stop_after_epochs)
    with _StopOnSignal() as stop:
        for epoch in range(start_epoch, stop_epoch):
            method.train()
            step0 = start_step if epoch == start_epoch else 0
            if step0 == 0:
                accum = {"loss": 0.0, "top1": 0.0, "n": 0, "seconds": 0.0}
            t_epoch = time.time()
            bar = tqdm(loader.epoch(epoch, step0), total=spe - step0, leave=False, dynamic_ncols=True,
                       desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (main and cfg.progress))
            for i, (x1, x2) in enumerate(bar, start=step0):
                with amp():
                    loss, stats = model(x1, x2)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                method.after_step(global_step, total_steps)
                global_step += 1
                lv = float(loss.detach())
                if not np.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at epoch {epoch + 1}, step {i}; "
                                             f"lower --lr or raise --temperature")
                st = _float_stats(stats)
                accum["loss"] += lv
                accum["top1"] += st.get("top1_accuracy", float("nan"))
                accum["n"] += 1
                bar.set_postfix(loss=f"{lv:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.3g}")
                if D.any_flag(stop.signum is not None, device):
                    accum["seconds"] += time.time() - t_epoch
                    save(epoch, i + 1)
                    bar.close()
                    raise TrainingInterrupted(stop.signum or signal.SIGTERM, ckpt_path)
            bar.close()
            accum["seconds"] += time.time() - t_epoch
            row = {"epoch": epoch + 1, "step": global_step, "loss": accum["loss"] / max(accum["n"], 1),
                   "contrastive_top1": accum["top1"] / max(accum["n"], 1),
                   "lr": optimizer.param_groups[0]["lr"], "knn_accuracy": None,
                   "epoch_seconds": round(accum["seconds"], 3)}
            last = epoch + 1 == cfg.epochs
            if main and (last or (cfg.knn_every > 0 and (epoch + 1) % cfg.knn_every == 0)):
                row["knn_accuracy"] = evaluate_backbone(method.backbone, bundle, device, cfg,
                                                        probe=False, autocast=autocast)["knn_accuracy"]
            history.append(row)
            if main:
                knn = f" knn {row['knn_accuracy']:.4f}" if row["knn_accuracy"] is not None else ""
                msg = (f"epoch {epoch + 1}/{cfg.epochs} loss {row['loss']:.4f} "
                       f"top1 {row['contrastive_top1']:.3f}{knn} lr {row['lr']:.4g} "
                       f"({row['epoch_seconds']:.1f}s)")
                tqdm.write(msg) if cfg.progress else say(msg)
                runlog.write_csv(os.path.join(run_dir, "log.csv"), history)
            accum = {"loss": 0.0, "top1": 0.0, "n": 0, "seconds": 0.0}
            if last or (epoch + 1) == stop_epoch or (cfg.ckpt_every > 0 and (epoch + 1) % cfg.ckpt_every == 0):
                save(epoch + 1, 0)
            if D.any_flag(stop.signum is not None, device):
                save(epoch + 1, 0)
                raise TrainingInterrupted(stop.signum or signal.SIGTERM, ckpt_path)

    finished = stop_epoch == cfg.epochs
    summary = {"run_dir": run_dir, "method": cfg.method, "dataset": cfg.dataset, "arch": cfg.arch,
               "epochs": cfg.epochs, "epochs_done": stop_epoch, "finished": finished,
               "final_loss": history[-1]["loss"] if history else None,
               "knn_accuracy": history[-1]["knn_accuracy"] if history else None,
               "checkpoint": ckpt_path, "rank": rank, "world_size": world}
    if main and finished:
        torch.save(method.backbone.state_dict(), os.path.join(run_dir, "backbone.pt"))
        if cfg.probe:
            say("linear probe on frozen features (pretrained encoder)...")
            ev = evaluate_backbone(method.backbone, bundle, device, cfg, probe=True, autocast=autocast)
            summary.update(probe_accuracy=ev["probe_accuracy"],
                           probe_train_accuracy=ev["probe_train_accuracy"])
            if cfg.baseline:
                say("linear probe on frozen features (random-init encoder, the baseline)...")
                base = build_backbone(cfg, bundle.in_channels)
                base.load_state_dict(random_init)
                base.to(device)
                eb = evaluate_backbone(base, bundle, device, cfg, probe=True, autocast=autocast)
                summary.update(baseline_probe_accuracy=eb["probe_accuracy"],
                               baseline_knn_accuracy=eb["knn_accuracy"])
    summary["wall_seconds"] = round(time.time() - t_start, 2)
    if main:
        runlog.write_json(os.path.join(run_dir, "summary.json"), summary)
        if cfg.plot and history:
            try:
                runlog.plot(os.path.join(run_dir, "curves.png"), history,
                            f"{cfg.method} / {cfg.dataset} / {cfg.arch}")
            except Exception as e:  # a plot must never lose a finished run
                say(f"warning: could not write the plot: {e}")
    D.barrier()
    return summary
