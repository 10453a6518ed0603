"""The resolved run configuration: one dataclass, defaults chosen per method and dataset."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

METHODS = ("simclr", "moco")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "stl10", "imagefolder")
ON_COLLAPSE = ("warn", "stop")
ARCHS = ("auto", "digits_cnn", "resnet18", "resnet50")
OPTIMIZERS = ("auto", "lars", "sgd", "adamw")

# Fields that must agree between a checkpoint and the run resuming it (anything else, such
# as the number of epochs, the output directory or progress bars, may change on resume).
STRUCTURAL_FIELDS = (
    "method", "dataset", "arch", "cifar_stem", "width", "proj_hidden_dim", "proj_output_dim",
    "queue_size", "symmetric", "optimizer", "batch_size", "seed", "learnable_temperature",
)


class ConfigError(ValueError):
    """A setting is out of range; the message names the command-line flag."""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# (field, lowest allowed, whether the lowest is allowed, highest allowed or None)
_RANGES = (
    ("width", 1, True, None), ("proj_hidden_dim", 1, True, None), ("proj_output_dim", 1, True, None),
    ("queue_size", 1, True, None), ("epochs", 1, True, None), ("stop_after_epochs", 1, True, None),
    ("batch_size", 2, True, None), ("lr", 0.0, False, None), ("weight_decay", 0.0, True, None),
    ("momentum", 0.0, True, 1.0), ("momentum_base", 0.0, True, 1.0), ("momentum_final", 0.0, True, 1.0),
    ("lars_eta", 0.0, False, None), ("warmup_epochs", 0.0, True, None), ("min_lr", 0.0, True, None),
    ("jitter_strength", 0.0, True, None), ("min_scale", 0.0, False, 1.0), ("blur_prob", 0.0, True, 1.0),
    ("crop_size", 1, True, None), ("knn_k", 1, True, None), ("knn_temperature", 0.0, False, None),
    ("knn_every", 0, True, None), ("probe_weight_decay", 0.0, True, None), ("num_workers", 0, True, None),
    ("ckpt_every", 0, True, None), ("temperature", 0.0, False, None),
    # seeds feed torch.Generator.manual_seed(seed * 1_000_003 + epoch) and numpy: keep them in 32 bits
    ("seed", 0, True, 2**32 - 1),
    ("chunk_size", 0, True, None),
)


def _check_values(c: "TrainConfig") -> None:
    """Every numeric setting is a finite number in its range: a one-line ConfigError naming
    the flag otherwise (`--stop-after-epochs 0` is refused, not read as "not set")."""
    for name, low, low_ok, high in _RANGES:
        v = getattr(c, name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{_flag(name)} must be a finite number, got {v!r}")
        if v < low or (v == low and not low_ok) or (high is not None and v > high):
            bound = (f">= {low}" if low_ok else f"> {low}") + (f" and <= {high}" if high is not None else "")
            raise ConfigError(f"{_flag(name)} must be {bound}, got {v!r}")
    # the loss computes in fp32: a temperature outside its normal range would round to 0 or inf
    if c.temperature is not None and not (1.1754943508222875e-38 <= c.temperature <= 3.4028234663852886e38):
        raise ConfigError(f"--temperature must be within float32's normal range (1.2e-38 to 3.4e38), "
                          f"got {c.temperature!r}")


@dataclass
class TrainConfig:
    # what to train
    method: str = "simclr"
    dataset: str = "digits"
    data_dir: Optional[str] = None
    arch: str = "auto"                      # digits -> digits_cnn, otherwise resnet18
    cifar_stem: Optional[bool] = None       # None: True for 32x32 datasets
    width: int = 16                         # digits CNN base width (features: 4 * width)
    proj_hidden_dim: Optional[int] = None   # None: 256 on digits, 2048 otherwise
    proj_output_dim: Optional[int] = None   # None: 64 on digits, 256 otherwise
    temperature: Optional[float] = None     # None: 0.2 (solo-learn's SimCLR and MoCo v2+ value)
    learnable_temperature: bool = False
    decoupled: bool = False                 # DCL: the positives out of the loss's denominators
    # MoCo v2
    queue_size: Optional[int] = None        # None: 512 on digits, 32768 otherwise
    momentum_base: float = 0.99
    momentum_final: float = 0.999
    symmetric: bool = False
    # optimisation
    epochs: Optional[int] = None            # None: 60 on digits, 1000 otherwise
    stop_after_epochs: Optional[int] = None  # checkpoint and exit after this many (time-sliced jobs)
    batch_size: Optional[int] = None        # per process; None: 256
    chunk_size: int = 0                     # 0: off; else the encoder runs on this many images at a time
    optimizer: str = "auto"                 # simclr -> lars, moco -> sgd
    lr: Optional[float] = None              # per 256 samples of global batch (scaled linearly)
    weight_decay: Optional[float] = None
    momentum: float = 0.9
    lars_eta: float = 0.02
    lars_clip: bool = True
    warmup_epochs: Optional[float] = None   # None: 10 (digits: 5)
    min_lr: float = 0.0
    # augmentations (large images; digits have their own, see augment.DigitsAugment)
    jitter_strength: Optional[float] = None  # colour jitter s; None: 1.0 simclr, 0.5 moco
    min_scale: float = 0.08
    blur_prob: Optional[float] = None       # None: 0.5 for images >= 64 px, 0 for 32 px
    crop_size: Optional[int] = None         # None: 32 CIFAR, 96 STL-10, 224 ImageFolder
    # evaluation
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_every: int = 1
    probe: bool = True
    baseline: bool = True
    probe_weight_decay: float = 1e-4
    # system
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"                 # auto: bf16 autocast on CUDA, fp32 on CPU
    num_workers: int = 4
    loss_backend: str = "auto"
    sync_bn: bool = True
    out_dir: str = "runs"
    run_dir: Optional[str] = None
    resume: Optional[str] = None
    ckpt_every: int = 1
    progress: bool = True
    on_collapse: str = "warn"               # the HealthMonitor found a silent failure: warn, or stop
    plot: bool = True
    extra: dict = field(default_factory=dict)

    def resolved(self) -> "TrainConfig":
        """A copy with every None/auto default filled in for this method and dataset."""
        c = dataclasses.replace(self, extra=dict(self.extra))
        if c.method not in METHODS:
            raise ConfigError(f"--method must be one of {METHODS}, got {c.method!r}")
        if c.dataset not in DATASETS:
            raise ConfigError(f"--dataset must be one of {DATASETS}, got {c.dataset!r}")
        if c.arch not in ARCHS:
            raise ConfigError(f"--arch must be one of {ARCHS}, got {c.arch!r}")
        if c.optimizer not in OPTIMIZERS:
            raise ConfigError(f"--optimizer must be one of {OPTIMIZERS}, got {c.optimizer!r}")
        if c.on_collapse not in ON_COLLAPSE:
            raise ConfigError(f"--on-collapse must be one of {ON_COLLAPSE}, got {c.on_collapse!r}")
        digits = c.dataset == "digits"
        moco = c.method == "moco"
        if c.arch == "auto":
            c.arch = "digits_cnn" if digits else "resnet18"
        if c.cifar_stem is None:
            c.cifar_stem = c.dataset in ("cifar10", "cifar100", "synthetic")
        if c.proj_hidden_dim is None:
            c.proj_hidden_dim = 256 if digits else 2048
        if c.proj_output_dim is None:
            c.proj_output_dim = 64 if digits else 256
        if c.temperature is None:
            c.temperature = 0.2
        if c.queue_size is None:
            c.queue_size = 512 if digits else 32768
        if c.epochs is None:
            c.epochs = 60 if digits else 1 if c.dataset == "synthetic" else 1000
        if c.batch_size is None:
            c.batch_size = 256
        if c.optimizer == "auto":
            c.optimizer = "sgd" if moco else "lars"
        if c.lr is None:
            c.lr = {"lars": 0.4 if not digits else 1.0, "sgd": 0.3 if not digits else 0.3,
                    "adamw": 2e-3}[c.optimizer]
        if c.weight_decay is None:
            c.weight_decay = 1e-4 if not digits else 1e-5
            if c.optimizer == "adamw":
                c.weight_decay = 1e-4
        if c.warmup_epochs is None:
            c.warmup_epochs = 5 if digits else 10
        if c.jitter_strength is None:
            c.jitter_strength = 0.5 if moco else 1.0
        if c.crop_size is None:
            c.crop_size = {"digits": 8, "synthetic": 32, "cifar10": 32, "cifar100": 32, "stl10": 96,
                           "imagefolder": 224}[c.dataset]
        if c.blur_prob is None:
            c.blur_prob = 0.5 if c.crop_size >= 64 else 0.0
        _check_values(c)
        return c

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def structural(self) -> dict:
        d = self.to_dict()
        return {k: d[k] for k in STRUCTURAL_FIELDS}
