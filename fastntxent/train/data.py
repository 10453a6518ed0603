"""Datasets: scikit-learn's digits (offline default), synthetic random images (throughput and
memory measurement) and torchvision's CIFAR-10/100, STL-10, ImageFolder from --data-dir. Nothing is ever downloaded; a missing dataset raises
DataNotFoundError saying how to get it.

Two kinds of bundle:
- "tensor" (digits, synthetic): the whole split lives in a tensor; views are made on the device by the
  batched DigitsAugment, so an epoch is a few matrix ops and resuming is exact. With
  --chunk-size the chunked step augments each chunk on the fly (PretrainLoader's lazy_views).
- "dataset" (torchvision): a DataLoader with per-sample SimCLR transforms.
Both draw batches from EpochBatchSampler: a permutation seeded by (seed, epoch), sharded by
rank, that can start mid-epoch, so a resumed run sees the same batches.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from . import augment as A
from .config import ConfigError

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.2
SYNTHETIC_TRAIN, SYNTHETIC_TEST, SYNTHETIC_CLASSES = 8192, 1024, 10


class DataNotFoundError(FileNotFoundError):
    """The dataset is not on disk; the message says how to get it."""


class EpochBatchSampler:
    """Batches of indices: a fixed permutation per (seed, epoch), global batch split by rank.

    Drops the last incomplete global batch. ``set_epoch(epoch, start_step)`` chooses the epoch
    and the first batch, so a run resumed mid-epoch continues with the same batches.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.num_batches = n // (batch_size * world_size)
        if self.num_batches == 0:
            raise ConfigError(f"dataset of {n} samples is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower --batch-size")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start = epoch, start_step

    def __len__(self) -> int:
        return self.num_batches - self.start

    def __iter__(self) -> Iterator[list]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        perm = torch.randperm(self.n, generator=g)
        B, W = self.batch_size, self.world_size
        for b in range(self.start, self.num_batches):
            glob = perm[b * B * W:(b + 1) * B * W]
            yield glob[self.rank * B:(self.rank + 1) * B].tolist()


@dataclass
class DataBundle:
    name: str
    kind: str                     # "tensor" or "dataset"
    num_classes: int
    in_channels: int
    # kind == "tensor": images in [0, 1], (N, C, H, W), float32 or uint8 (x / 255)
    train_images: Optional[torch.Tensor] = None
    train_labels: Optional[torch.Tensor] = None
    test_images: Optional[torch.Tensor] = None
    test_labels: Optional[torch.Tensor] = None
    mean: Optional[torch.Tensor] = None
    std: Optional[torch.Tensor] = None
    # kind == "dataset"
    pretrain_set: object = None   # returns ((view1, view2), label)
    train_eval_set: object = None  # returns (image, label), eval transform
    test_eval_set: object = None
    info: dict = field(default_factory=dict)

    @property
    def num_pretrain(self) -> int:
        return len(self.train_images) if self.kind == "tensor" else len(self.pretrain_set)


def load_digits_bundle() -> DataBundle:
    """sklearn's 1797 8x8 digits, stratified 80/20 train/test split (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=DIGITS_TEST_FRACTION,
                                      random_state=DIGITS_SPLIT_SEED, stratify=d.target)
    idx_tr, idx_te = torch.tensor(sorted(idx_tr)), torch.tensor(sorted(idx_te))
    xtr = x[idx_tr]
    return DataBundle(
        name="digits", kind="tensor", num_classes=10, in_channels=1,
        train_images=xtr, train_labels=y[idx_tr], test_images=x[idx_te], test_labels=y[idx_te],
        mean=xtr.mean().reshape(1, 1, 1, 1), std=xtr.std().reshape(1, 1, 1, 1),
        info={"train": len(idx_tr), "test": len(idx_te)})


def load_synthetic_bundle(seed: int) -> DataBundle:
    """Random images of CIFAR's shape (3x32x32, uint8 pixels, uniform) and random labels out of
    10, the same for the same seed: for throughput and memory measurement (--batch-size up to
    8192 on one process), not for learning anything."""
    g = torch.Generator().manual_seed(seed)
    n = SYNTHETIC_TRAIN + SYNTHETIC_TEST
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, SYNTHETIC_CLASSES, (n,), generator=g)
    xtr = x[:SYNTHETIC_TRAIN]
    mean = xtr.float().mean(dim=(0, 2, 3)).reshape(1, 3, 1, 1) / 255
    std = xtr.float().std(dim=(0, 2, 3)).reshape(1, 3, 1, 1) / 255
    return DataBundle(
        name="synthetic", kind="tensor", num_classes=SYNTHETIC_CLASSES, in_channels=3,
        train_images=xtr, train_labels=y[:SYNTHETIC_TRAIN], test_images=x[SYNTHETIC_TRAIN:],
        test_labels=y[SYNTHETIC_TRAIN:], mean=mean, std=std,
        info={"train": SYNTHETIC_TRAIN, "test": SYNTHETIC_TEST, "seed": seed})


def as_unit_float(x: torch.Tensor) -> torch.Tensor:
    """A tensor bundle's images as float32 in [0, 1] (uint8 pixels divided by 255)."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


_HOWTO = {
    "cifar10": "python -c \"import torchvision; torchvision.datasets.CIFAR10('{d}', download=True)\"",
    "cifar100": "python -c \"import torchvision; torchvision.datasets.CIFAR100('{d}', download=True)\"",
    "stl10": "python -c \"import torchvision; torchvision.datasets.STL10('{d}', split='train+unlabeled', "
             "download=True)\"",
    "imagefolder": "arrange images as {d}/train/<class>/*.jpg and {d}/val/<class>/*.jpg "
                   "(e.g. ImageNet-100)",
}


def _missing(name: str, data_dir: Optional[str], detail: str = "") -> DataNotFoundError:
    d = data_dir or "./datasets"
    how = _HOWTO[name].format(d=d)
    where = f"under {data_dir!r}" if data_dir else "(no --data-dir given)"
    msg = (f"dataset {name!r} not found {where}{': ' + detail if detail else ''}. "
           f"This trainer never downloads. Get it once with:\n    {how}\n"
           f"then pass --data-dir {d}")
    return DataNotFoundError(msg)


class TwoViews:
    def __init__(self, transform):
        self.transform = transform

    def __call__(self, img):
        return self.transform(img), self.transform(img)


def load_torchvision_bundle(cfg) -> DataBundle:
    import torchvision.datasets as tvd

    name, root = cfg.dataset, cfg.data_dir
    if not root or not os.path.isdir(root):
        raise _missing(name, root)
    mean, std = A.DATASET_STATS.get(name, A.DATASET_STATS["imagenet"])
    pre = TwoViews(A.simclr_transform(cfg.crop_size, cfg.jitter_strength, cfg.min_scale,
                                      cfg.blur_prob, mean, std))
    ev = A.eval_transform(cfg.crop_size, mean, std, resize=name == "imagefolder")
    try:
        if name in ("cifar10", "cifar100"):
            cls = tvd.CIFAR10 if name == "cifar10" else tvd.CIFAR100
            sets = (cls(root, train=True, transform=pre), cls(root, train=True, transform=ev),
                    cls(root, train=False, transform=ev))
            ncls = 10 if name == "cifar10" else 100
        elif name == "stl10":
            sets = (tvd.STL10(root, split="train+unlabeled", transform=pre),
                    tvd.STL10(root, split="train", transform=ev),
                    tvd.STL10(root, split="test", transform=ev))
            ncls = 10
        else:
            tr, va = os.path.join(root, "train"), os.path.join(root, "val")
            if not os.path.isdir(va):
                va = os.path.join(root, "test")
            for p in (tr, va):
                if not os.path.isdir(p):
                    raise _missing(name, root, f"{p} does not exist")
            sets = (tvd.ImageFolder(tr, transform=pre), tvd.ImageFolder(tr, transform=ev),
                    tvd.ImageFolder(va, transform=ev))
            ncls = len(sets[1].classes)
    except (RuntimeError, FileNotFoundError) as e:
        if isinstance(e, DataNotFoundError):
            raise
        raise _missing(name, root, str(e)) from e
    return DataBundle(name=name, kind="dataset", num_classes=ncls, in_channels=3,
                      pretrain_set=sets[0], train_eval_set=sets[1], test_eval_set=sets[2],
                      info={"train": len(sets[1]), "test": len(sets[2]), "pretrain": len(sets[0])})


def build_data(cfg) -> DataBundle:
    if cfg.dataset == "digits":
        return load_digits_bundle()
    if cfg.dataset == "synthetic":
        return load_synthetic_bundle(cfg.seed)
    return load_torchvision_bundle(cfg)


class PretrainLoader:
    """Yields a step's (x1, x2) on the device for one epoch, resumable at a step.

    By default the two augmented views: (B, C, H, W) float32, normalised. With
    ``lazy_views`` (the trainer's --chunk-size) a tensor bundle yields its raw batch instead,
    as stored (uint8 or float images in [0, 1]), the same tensor as x1 and x2, and
    ``view_transform`` is the augmentation the chunked step applies to each chunk of each
    view in both passes (fastntxent.chunked's ``transform``): no view of the whole batch is
    made. ``view_transform`` is None when the yielded tensors are the views themselves
    (always for torchvision bundles, whose DataLoader augments per sample)."""

    def __init__(self, bundle: DataBundle, cfg, device, rank: int = 0, world_size: int = 1,
                 lazy_views: bool = False):
        self.bundle, self.device = bundle, device
        self.sampler = EpochBatchSampler(bundle.num_pretrain, cfg.batch_size, cfg.seed, rank,
                                         world_size)
        self.seed = cfg.seed
        self.view_transform = None
        if bundle.kind == "tensor":
            self.images = bundle.train_images.to(device)
            self.augment = A.DigitsAugment(bundle.mean.to(device), bundle.std.to(device))
            if lazy_views:
                self.view_transform = self.view
        else:
            self.num_workers = cfg.num_workers

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.num_batches

    def view(self, raw: torch.Tensor) -> torch.Tensor:
        """One augmented view of raw tensor-bundle images (b, C, H, W) as stored → (b, C, H,
        W) float32 normalised; draws from the global CPU generator. Autocast off: the chunked
        step calls it inside the trainer's autocast, the views are float32 as the loader's."""
        with torch.autocast(self.device.type, enabled=False):
            return self.augment(as_unit_float(raw))

    def epoch(self, epoch: int, start_step: int = 0):
        self.sampler.set_epoch(epoch, start_step)
        if self.bundle.kind == "tensor":
            for idx in self.sampler:
                raw = self.images[torch.tensor(idx, device=self.device)]
                if self.view_transform is not None:
                    yield raw, raw
                else:
                    x = as_unit_float(raw)
                    yield self.augment(x), self.augment(x)
        else:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)  # worker seeds
            loader = torch.utils.data.DataLoader(
                self.bundle.pretrain_set, batch_sampler=self.sampler, num_workers=self.num_workers,
                pin_memory=self.device.type == "cuda", generator=g,
                persistent_workers=False)
            for (v1, v2), _ in loader:
                yield (v1.to(self.device, non_blocking=True), v2.to(self.device, non_blocking=True))


def eval_batches(bundle: DataBundle, split: str, device, batch_size: int = 512, num_workers: int = 0):
    """Yields (normalised images, labels) of the train or test split, no augmentation."""
    if bundle.kind == "tensor":
        x = bundle.train_images if split == "train" else bundle.test_images
        y = bundle.train_labels if split == "train" else bundle.test_labels
        mean, std = bundle.mean.to(device), bundle.std.to(device)
        for i in range(0, len(x), batch_size):
            yield (as_unit_float(x[i:i + batch_size].to(device)) - mean) / std, y[i:i + batch_size]
    else:
        ds = bundle.train_eval_set if split == "train" else bundle.test_eval_set
        loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False,
                                             num_workers=num_workers)
        for x, y in loader:
            yield x.to(device, non_blocking=True), y
