"""Reference SimCLR / MoCo v2 pretraining on top of fastntxent's fused losses.

Command line: ``fastntxent-pretrain`` (or ``python -m fastntxent.train``); see docs/training.md.
Python::

    from fastntxent.train import TrainConfig, run
    summary = run(TrainConfig(method="simclr", dataset="digits", epochs=30))
    print(summary["probe_accuracy"], summary["baseline_probe_accuracy"])

Needs the ``train`` extra (torchvision, scikit-learn, tqdm, matplotlib).
"""
from .config import TrainConfig
from .trainer import run

__all__ = ["TrainConfig", "run"]
