"""Augmentations.

- simclr_transform: the SimCLR paper's pipeline for real images (random resized crop,
  horizontal flip, colour jitter of strength s with p = 0.8, grayscale p = 0.2, Gaussian blur
  for large images), per sample through torchvision.
- DigitsAugment: a batched on-device pipeline for 8x8 digits. Flips and colour make no sense
  there (a flipped 2 is not a 2); instead a random affine warp (rotation, zoom, shear,
  shift: the random-resized-crop analogue), a contrast/brightness change, a random erasing
  of a small patch and Gaussian noise. All randomness comes from torch's global CPU generator,
  which the checkpoint saves, so a resumed run draws the same views.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

DATASET_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "stl10": ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def simclr_transform(size: int, s: float = 1.0, min_scale: float = 0.08, blur_prob: float = 0.0,
                     mean=DATASET_STATS["imagenet"][0], std=DATASET_STATS["imagenet"][1]):
    """SimCLR (Chen et al. 2020, appendix A) augmentation for one view."""
    from torchvision import transforms as T

    ops = [
        T.RandomResizedCrop(size, scale=(min_scale, 1.0), antialias=True),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        T.RandomGrayscale(p=0.2),
    ]
    if blur_prob > 0:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)  # odd kernel, ~10% of the image side
        ops.append(T.RandomApply([T.GaussianBlur(k, sigma=(0.1, 2.0))], p=blur_prob))
    ops += [T.ToTensor(), T.Normalize(mean, std)]
    return T.Compose(ops)


def eval_transform(size: int, mean, std, resize: bool = False):
    from torchvision import transforms as T

    ops = [T.Resize(int(size * 256 / 224)), T.CenterCrop(size)] if resize else []
    return T.Compose(ops + [T.ToTensor(), T.Normalize(mean, std)])


class DigitsAugment:
    """Batched augmentation of (B, C, H, W) images in [0, 1]; returns normalised images.

    The random parameters of the whole batch are drawn first, in one fixed order (so a view
    does not depend on `slice_rows`); the warp, gain, erasing, noise and normalisation then run
    on slices of `slice_rows` images written into one output, so the temporaries (the sampling
    grid, the warped and masked copies) are a slice's, not the batch's: the batch costs its
    input, its noise and its output."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, rotation: float = 20.0,
                 zoom=(0.8, 1.25), shear: float = 15.0, shift: float = 1.0,
                 gain=(0.6, 1.4), gain_prob: float = 0.8, erase_prob: float = 0.5,
                 erase_size: int = 3, noise: float = 0.1, slice_rows: int = 256):
        self.mean, self.std = mean, std
        self.rotation, self.zoom, self.shear, self.shift = rotation, zoom, shear, shift
        self.gain, self.gain_prob = gain, gain_prob
        self.erase_prob, self.erase_size, self.noise = erase_prob, erase_size, noise
        self.slice_rows = slice_rows

    @staticmethod
    def _u(n, lo, hi):
        return torch.rand(n) * (hi - lo) + lo  # global CPU generator: same draws on any device

    def _draw(self, shape) -> dict:
        """Every random parameter of a batch of `shape`, on the CPU, in the generator's order."""
        B, C, H, W = shape
        p = {"ang": self._u(B, -self.rotation, self.rotation) * math.pi / 180,
             "sh": self._u(B, -self.shear, self.shear) * math.pi / 180,
             "z": torch.exp(self._u(B, math.log(self.zoom[0]), math.log(self.zoom[1]))),
             "t": self._u(2 * B, -self.shift, self.shift).view(B, 2) * 2 / W}  # pixels -> [-1, 1] units
        g = self._u(B, *self.gain)
        p["g"] = torch.where(torch.rand(B) < self.gain_prob, g, torch.ones(B))
        if self.erase_prob > 0:
            e = self.erase_size
            p["ey"] = torch.randint(0, H - e + 1, (B,))
            p["ex"] = torch.randint(0, W - e + 1, (B,))
            p["on"] = torch.rand(B) < self.erase_prob
        if self.noise > 0:
            p["noise"] = torch.randn(shape)
        return p

    def _apply(self, x: torch.Tensor, p: dict) -> torch.Tensor:
        """The augmentation of images x (b, C, H, W) with their parameters p (each of b rows)."""
        b, _, H, W = x.shape
        dev = x.device
        cos, sin, tsh = torch.cos(p["ang"]), torch.sin(p["ang"]), torch.tan(p["sh"])
        # theta maps output coordinates to input coordinates: rotation . shear / zoom
        a = torch.stack([cos, cos * tsh - sin, sin, sin * tsh + cos], 1).view(b, 2, 2) / p["z"].view(b, 1, 1)
        theta = torch.cat([a, p["t"].unsqueeze(2)], 2).to(dev)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out * p["g"].view(b, 1, 1, 1).to(dev)
        if self.erase_prob > 0:
            e, ey, ex = self.erase_size, p["ey"].view(b, 1, 1), p["ex"].view(b, 1, 1)
            rows = torch.arange(H).view(1, H, 1)
            cols = torch.arange(W).view(1, 1, W)
            m = (rows >= ey) & (rows < ey + e) & (cols >= ex) & (cols < ex + e) & p["on"].view(b, 1, 1)
            out = out.masked_fill(m.unsqueeze(1).to(dev), 0.0)
        if self.noise > 0:
            out = out + self.noise * p["noise"].to(dev)
        return (out - self.mean) / self.std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self._draw(x.shape)
        B = x.shape[0]
        if B <= self.slice_rows:
            return self._apply(x, p)
        out = torch.empty(x.shape, dtype=torch.result_type(x, self.mean), device=x.device)
        for s in range(0, B, self.slice_rows):
            rows = slice(s, min(B, s + self.slice_rows))
            out[rows] = self._apply(x[rows], {k: v[rows] for k, v in p.items()})
        return out
