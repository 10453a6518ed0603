"""nn.Module forms of the losses, with optional learnable temperature."""
from __future__ import annotations

import math

import torch
from torch import nn

from . import functional as F
from ._validation import check_backend, check_reduction


class _TemperatureModule(nn.Module):
    def __init__(self, temperature: float, learnable_temperature: bool, normalize: bool,
                 reduction: str, backend: str):
        super().__init__()
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite float > 0, got {temperature!r}")
        self.normalize = normalize
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.learnable_temperature = learnable_temperature
        if learnable_temperature:
            # Log-parameterised so that the optimiser cannot make it negative.
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self._temperature = float(temperature)

    @property
    def temperature(self):
        """A float, or a 0-dim tensor with gradient when learnable."""
        return self.log_temperature.exp() if self.learnable_temperature else self._temperature

    def _options(self, return_stats: bool) -> dict:
        return dict(normalize=self.normalize, reduction=self.reduction, backend=self.backend,
                    return_stats=return_stats)

    def extra_repr(self) -> str:
        t = float(torch.as_tensor(self.temperature).detach())
        return (f"temperature={t:.4g}, learnable_temperature={self.learnable_temperature}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}")


class NTXentLoss(_TemperatureModule):
    """SimCLR NT-Xent loss.

    Args: temperature (τ > 0), learnable_temperature, normalize, reduction, backend.
    Shape: z1, z2: (N, D) → scalar (or (2N,) with reduction="none").
    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(model(x1), model(x2))
    """

    def __init__(self, temperature: float = 0.5, *, learnable_temperature: bool = False,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__(temperature, learnable_temperature, normalize, reduction, backend)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, return_stats: bool = False):
        return F.nt_xent(z1, z2, self.temperature, **self._options(return_stats))


class SupConLoss(_TemperatureModule):
    """Supervised contrastive loss (L_out).

    Shape: z: (M, D), labels: (M,) integer → scalar (or (M,) with reduction="none").
    Example:
        >>> loss = SupConLoss(temperature=0.1)(features, labels)
    """

    def __init__(self, temperature: float = 0.1, *, learnable_temperature: bool = False,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto"):
        super().__init__(temperature, learnable_temperature, normalize, reduction, backend)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, return_stats: bool = False):
        return F.supcon(z, labels, self.temperature, **self._options(return_stats))
