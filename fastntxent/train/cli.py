"""``fastntxent-pretrain``: SimCLR / MoCo v2 pretraining with the fused losses.

With no arguments: SimCLR on scikit-learn's digits on the CPU (about two minutes), then the
linear-probe accuracy of the pretrained encoder beside a random-init encoder's.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import typing

from .config import ARCHS, DATASETS, METHODS, ON_COLLAPSE, OPTIMIZERS, ConfigError, TrainConfig

_HELP = {
    "method": "simclr (NT-Xent) or moco (MoCo v2, InfoNCE with a memory queue)",
    "dataset": "digits (offline, default), synthetic (random 3x32x32 images from --seed, for throughput "
               "and memory measurement) or a torchvision dataset under --data-dir",
    "data_dir": "root of cifar10/cifar100/stl10 (torchvision layout) or of an ImageFolder "
                "with train/ and val/; nothing is downloaded",
    "arch": "encoder: digits_cnn, resnet18, resnet50 (auto: digits_cnn on digits, else resnet18)",
    "cifar_stem": "ResNet 3x3 stride-1 first conv without max-pool (default: on for CIFAR)",
    "epochs": "training epochs (default 60 on digits, 1 on synthetic, 1000 otherwise)",
    "stop_after_epochs": "checkpoint and exit after this epoch (a time slice of a longer run; >= 1)",
    "knn_every": "kNN evaluation every this many epochs (0: only after the last)",
    "ckpt_every": "checkpoint every this many epochs (0: only at the end and on a stop)",
    "batch_size": "batch size per process (default 256)",
    "chunk_size": "gradient caching (SimCLR, MoCo): run the encoder on this many images at a time "
                  "(same gradients, activation memory of one chunk, one extra forward; BatchNorm "
                  "statistics per chunk; 0: off, the whole batch in one call)",
    "on_collapse": "when the health monitor finds a silent failure (collapse, loss stuck at chance, "
                   "identical views, ...): warn (print it, keep training) or stop (checkpoint, exit 3)",
    "lr": "learning rate per 256 samples of global batch, scaled linearly",
    "temperature": "loss temperature (default 0.2)",
    "decoupled": "decoupled contrastive loss (DCL, Yeh et al. 2022): the positive left out of each "
                 "denominator (SimCLR: NT-Xent; MoCo: InfoNCE against the queue only)",
    "queue_size": "MoCo queue length (default 512 on digits, 32768 otherwise)",
    "symmetric": "MoCo: symmetric loss (both views as queries), as solo-learn's MoCo v2+",
    "jitter_strength": "colour-jitter strength s (default 1.0 SimCLR, 0.5 MoCo)",
    "blur_prob": "Gaussian blur probability (default 0.5 for images >= 64 px, else 0)",
    "resume": "checkpoint file or run directory to continue exactly",
    "run_dir": "run directory (default: <out-dir>/<method>-<dataset>-<time>)",
    "precision": "auto (bf16 autocast on CUDA, fp32 on CPU), bf16 or fp32",
    "loss_backend": "fastntxent backend for the loss: auto, cpu, triton, cuda, reference",
}
_CHOICES = {"method": METHODS, "dataset": DATASETS, "on_collapse": ON_COLLAPSE, "arch": ARCHS, "optimizer": OPTIMIZERS,
            "precision": ("auto", "bf16", "fp32"), "loss_backend": ("auto", "cpu", "triton", "cuda", "reference")}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line naming the flag (the full usage is what --help prints)
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _check_environment(cfg) -> None:
    """What the config alone cannot check: the device exists, the loss backend runs on it, the
    run directory can be a directory. A ConfigError naming the flag, before anything starts."""
    import os

    import torch

    from .. import backends

    dev = cfg.device
    if dev == "auto":
        dev = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(dev)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA device is available here; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {cfg.device}: only {torch.cuda.device_count()} CUDA device(s)")
    try:
        backends.resolve("self" if cfg.method == "simclr" else "cross", cfg.loss_backend, device, torch.float32)
    except ValueError as e:
        raise ConfigError(f"--loss-backend {cfg.loss_backend}: {e}") from None
    for flag, d in (("--run-dir", cfg.run_dir), ("--out-dir", cfg.out_dir)):
        if d and os.path.exists(d) and not os.path.isdir(d):
            raise ConfigError(f"{flag} {d!r} exists and is not a directory")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="fastntxent-pretrain", description=__doc__,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(TrainConfig)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        if f.name == "extra":
            continue
        t = hints[f.name]
        base = [a for a in typing.get_args(t) if a is not type(None)]
        t = base[0] if base else t
        flag = "--" + f.name.replace("_", "-")
        kw = dict(default=getattr(defaults, f.name), help=_HELP.get(f.name, " "))
        if t is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(flag, type=t, choices=_CHOICES.get(f.name), **kw)
    p.add_argument("--grad-cache-chunk", dest="chunk_size", type=int, default=argparse.SUPPRESS,
                   action=_DeprecatedAlias, help=argparse.SUPPRESS)
    return p


class _DeprecatedAlias(argparse.Action):
    """--grad-cache-chunk N: the former name of --chunk-size N (a note on stderr)."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: note: {option_string} is deprecated, use --chunk-size", file=sys.stderr)
        setattr(namespace, self.dest, values)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**vars(args))
    try:
        _check_environment(cfg.resolved())  # every value checked before anything starts
    except ConfigError as e:
        print(f"fastntxent-pretrain: error: {e}", file=sys.stderr)
        return 2
    from .checkpoint import CheckpointError
    from .data import DataNotFoundError
    from .health import summary_line
    from .trainer import TrainingCollapsed, TrainingInterrupted, run

    try:
        s = run(cfg)
    except TrainingInterrupted as e:
        print(f"\ninterrupted: checkpoint saved to {e.path}\n"
              f"continue with: fastntxent-pretrain --resume {e.path} [same options]", file=sys.stderr)
        return 128 + int(e.signum)
    except TrainingCollapsed as e:
        print(f"\nfastntxent-pretrain: stopped (--on-collapse stop) at epoch {e.epoch}, step {e.step}: "
              f"{e.reason}\ncheckpoint saved to {e.path}", file=sys.stderr)
        return 3
    except (CheckpointError, DataNotFoundError, ConfigError, FloatingPointError) as e:
        # (ConfigError here: a setting that only the data can refute, e.g. a batch larger than the
        # dataset; FloatingPointError: the loss diverged, the message says which flags to change)
        print(f"fastntxent-pretrain: error: {e}", file=sys.stderr)
        return 2
    finally:
        from . import distributed

        distributed.cleanup()
    if s.get("rank", 0) != 0:  # under torchrun only rank 0 reports
        return 0
    if "probe_accuracy" in s:
        line = f"linear probe accuracy (test): pretrained {s['probe_accuracy']:.4f}"
        if "baseline_probe_accuracy" in s:
            line += (f"  vs  random-init baseline {s['baseline_probe_accuracy']:.4f}  "
                     f"(+{100 * (s['probe_accuracy'] - s['baseline_probe_accuracy']):.1f} points)")
        print(line)
    if s.get("knn_accuracy") is not None:
        print(f"kNN accuracy (test): {s['knn_accuracy']:.4f}")
    if s.get("health") is not None:
        print(summary_line(s["health"]))
    print(f"run directory: {s['run_dir']}  ({s['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
