"""nn.Module forms of the losses, with optional learnable temperature."""
from __future__ import annotations

import math

import torch
from torch import nn

from .cross_family import clip_loss, info_nce
from .self_family import nt_xent, supcon
from .siglip_family import siglip_loss
from ._validation import SUPPORTED_DTYPES, check_backend, check_flag, check_positive_number, check_reduction


def _shown(value) -> str:
    """A scalar setting for repr(): a float, or "?" for a tensor without data (meta device)."""
    if isinstance(value, torch.Tensor) and value.is_meta:
        return "?"
    return f"{float(torch.as_tensor(value).detach()):.4g}"


class _TemperatureModule(nn.Module):
    def __init__(self, temperature: float, learnable_temperature: bool, normalize: bool,
                 reduction: str, backend: str, gather: bool = False, decoupled: bool = False):
        super().__init__()
        temperature = check_positive_number("temperature", temperature)
        self.gather = check_flag("gather", gather)
        self.decoupled = check_flag("decoupled", decoupled)
        self.normalize = check_flag("normalize", normalize)
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.learnable_temperature = check_flag("learnable_temperature", learnable_temperature)
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
                    return_stats=return_stats, gather=self.gather, decoupled=self.decoupled)

    def extra_repr(self) -> str:
        return (f"temperature={_shown(self.temperature)}, learnable_temperature={self.learnable_temperature}, "
                f"normalize={self.normalize}, reduction={self.reduction!r}, backend={self.backend!r}, "
                f"gather={self.gather}, decoupled={self.decoupled}")


class NTXentLoss(_TemperatureModule):
    """SimCLR NT-Xent loss.

    Args: temperature (τ > 0), learnable_temperature, normalize, reduction, backend,
    gather (torch.distributed: the loss of all ranks' rows, see fastntxent.distributed),
    decoupled (DCL: the positive left out of each denominator).
    Shape: z1, z2: (N, D) → scalar (or (2N,) with reduction="none").
    Example:
        >>> loss_fn = NTXentLoss(temperature=0.5)
        >>> loss = loss_fn(model(x1), model(x2))
    """

    def __init__(self, temperature: float = 0.5, *, learnable_temperature: bool = False,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather: bool = False, decoupled: bool = False):
        super().__init__(temperature, learnable_temperature, normalize, reduction, backend, gather, decoupled)

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, *, return_stats: bool = False):
        return nt_xent(z1, z2, self.temperature, **self._options(return_stats))


class SupConLoss(_TemperatureModule):
    """Supervised contrastive loss (L_out).

    Args as NTXentLoss (gather: all ranks' rows and labels; decoupled: every positive left out).
    Shape: z: (M, D), labels: (M,) integer → scalar (or (M,) with reduction="none").
    Example:
        >>> loss = SupConLoss(temperature=0.1)(features, labels)
    """

    def __init__(self, temperature: float = 0.1, *, learnable_temperature: bool = False,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather: bool = False, decoupled: bool = False):
        super().__init__(temperature, learnable_temperature, normalize, reduction, backend, gather, decoupled)

    def forward(self, z: torch.Tensor, labels: torch.Tensor, *, return_stats: bool = False):
        return supcon(z, labels, self.temperature, **self._options(return_stats))


class InfoNCELoss(_TemperatureModule):
    """InfoNCE / MoCo loss of queries against keys (and an optional queue of negatives).

    Args: temperature (τ > 0), learnable_temperature (log-parameterised), normalize,
    reduction, backend, gather (torch.distributed: all ranks' keys, global loss), decoupled
    (DCL: the positive left out of each denominator).
    Shape: q, k: (M, D), queue: (K, D) or None → scalar (or (M,) with reduction="none").
    Example (MoCo v2):
        >>> loss_fn, queue = InfoNCELoss(temperature=0.2), MemoryQueue(dim=128, size=65536)
        >>> loss = loss_fn(q, k.detach(), queue.keys)
        >>> queue.enqueue(k)
    """

    def __init__(self, temperature: float = 0.2, *, learnable_temperature: bool = False,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto",
                 gather: bool = False, decoupled: bool = False):
        super().__init__(temperature, learnable_temperature, normalize, reduction, backend, gather, decoupled)

    def forward(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor | None = None, *,
                return_stats: bool = False):
        return info_nce(q, k, queue, self.temperature, **self._options(return_stats))


class ClipLoss(nn.Module):
    """Symmetric CLIP loss with a (by default learnable) logit scale.

    Args: logit_scale (initial value, > 0; CLIP uses 1/0.07), learnable (log-parameterised
    parameter `log_logit_scale`), max_logit_scale (clamp of the scale, CLIP uses 100; None:
    no clamp), normalize, backend, gather (torch.distributed: all ranks' rows, global loss),
    decoupled (DCL: the matching pair left out of both denominators).
    Shape: a, b: (M, D) → scalar. forward(a, b, logit_scale=None, *, return_stats=False): a
    logit_scale passed (open_clip's call) is used instead of the module's own.
    Example:
        >>> loss = ClipLoss()(image_features, text_features)
    """

    def __init__(self, logit_scale: float = 1 / 0.07, *, learnable: bool = True,
                 max_logit_scale: float | None = 100.0, normalize: bool = True,
                 backend: str = "auto", gather: bool = False, decoupled: bool = False):
        super().__init__()
        self.decoupled = check_flag("decoupled", decoupled)
        logit_scale = check_positive_number("logit_scale", logit_scale)
        if max_logit_scale is not None:
            max_logit_scale = check_positive_number("max_logit_scale", max_logit_scale)
        self.learnable = check_flag("learnable", learnable)
        self.max_logit_scale = max_logit_scale
        self.normalize = check_flag("normalize", normalize)
        self.backend = check_backend(backend)
        self.gather = check_flag("gather", gather)
        if learnable:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
        else:
            self._logit_scale = float(logit_scale)

    @property
    def logit_scale(self):
        """A float, or a 0-dim tensor with gradient when learnable (clamped to max_logit_scale)."""
        if not self.learnable:
            s = self._logit_scale
            return min(s, self.max_logit_scale) if self.max_logit_scale is not None else s
        s = self.log_logit_scale.exp()
        return s.clamp(max=self.max_logit_scale) if self.max_logit_scale is not None else s

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale=None, *, return_stats: bool = False):
        """logit_scale: None uses the module's own; a float or 0-dim tensor (e.g. open_clip's
        `model.logit_scale.exp()`, learnable outside the module) is used as it is, unclamped."""
        scale = self.logit_scale if logit_scale is None else logit_scale
        return clip_loss(a, b, scale, normalize=self.normalize, backend=self.backend,
                         gather=self.gather, return_stats=return_stats, decoupled=self.decoupled)

    def extra_repr(self) -> str:
        return (f"logit_scale={_shown(self.logit_scale)}, learnable={self.learnable}, "
                f"max_logit_scale={self.max_logit_scale}, normalize={self.normalize}, backend={self.backend!r}, "
                f"gather={self.gather}, decoupled={self.decoupled}")


class MemoryQueue(nn.Module):
    """Ring buffer of keys for MoCo-style negatives (the state lives in buffers, so
    `state_dict` / checkpoints keep it and `.to(device)` moves it).

    Initialised, like MoCo, with random normalised keys, so it is always full.
    `.keys`: (size, dim) detached view of the stored keys, to pass as `queue=`.
    `.enqueue(keys)`: after the loss, writes the (detached) keys over the oldest entries;
    when torch.distributed is initialised (and gather is not False) the keys of all ranks are
    gathered first (any count per rank, 0 included, in rank order; a dim or dtype that differs
    across ranks raises ValueError on every rank), so every rank's queue stays identical.
    """

    def __init__(self, dim: int, size: int, *, dtype: torch.dtype = torch.float32, gather: bool | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("size", size)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        if not isinstance(dtype, torch.dtype) or dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"dtype must be one of float32, float64, bfloat16, float16, got {dtype!r}")
        if gather is not None:
            check_flag("gather", gather)
        self.dim, self.size, self.gather = dim, size, gather
        self.register_buffer("queue", nn.functional.normalize(torch.randn(size, dim), dim=1).to(dtype))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def keys(self) -> torch.Tensor:
        return self.queue.detach()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        if not isinstance(keys, torch.Tensor):
            raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must have shape (B, {self.dim}), got {tuple(keys.shape)}")
        if not keys.dtype.is_floating_point:
            raise TypeError(f"keys must be a floating tensor, got dtype {keys.dtype}")
        if keys.is_meta and not self.queue.is_meta:
            raise ValueError(f"keys is on meta (no data) but the queue is on {self.queue.device}")
        keys = keys.detach()
        from . import distributed as dist

        if self.gather is not False and dist.is_initialized():
            keys = dist.gather_no_grad(keys, "keys")
        elif self.gather and not dist.is_initialized():
            dist.require_process_group("MemoryQueue(gather=True)")
        keys = keys[-self.size:]  # more keys than slots: keep the newest
        n = keys.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[idx] = keys.to(device=self.queue.device, dtype=self.queue.dtype)
        self.ptr.fill_((int(self.ptr) + n) % self.size)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, size={self.size}"


class SigLipLoss(nn.Module):
    """SigLIP's pairwise sigmoid loss with a learnable logit scale and bias (Zhai et al. 2023).

    Args: logit_scale (initial t > 0; open_clip: 10), logit_bias (initial b; open_clip: −10),
    learnable (parameters `log_logit_scale` = log t and `logit_bias`; else fixed floats),
    normalize, reduction ("mean" over the image rows, "sum", "none"), backend, gather
    (torch.distributed: local images against all ranks' texts, global loss).
    Shape: img, txt: (B, D) → scalar, or (B,) for "none".
    forward(img, txt, logit_scale=None, logit_bias=None): values passed (open_clip's call,
    `model.logit_scale.exp()`, `model.logit_bias`) are used instead of the module's own.
    Example:
        >>> loss = SigLipLoss()(image_features, text_features)
    """

    def __init__(self, logit_scale: float = 10.0, logit_bias: float = -10.0, *, learnable: bool = True,
                 normalize: bool = True, reduction: str = "mean", backend: str = "auto", gather: bool = False):
        super().__init__()
        logit_scale = check_positive_number("logit_scale", logit_scale)
        if isinstance(logit_bias, bool) or not isinstance(logit_bias, (int, float)) or not math.isfinite(logit_bias):
            raise ValueError(f"logit_bias must be a finite float, got {logit_bias!r}")
        self.learnable = check_flag("learnable", learnable)
        self.normalize = check_flag("normalize", normalize)
        self.reduction = check_reduction(reduction)
        self.backend = check_backend(backend)
        self.gather = check_flag("gather", gather)
        if learnable:
            self.log_logit_scale = nn.Parameter(torch.tensor(math.log(logit_scale)))
            self.logit_bias = nn.Parameter(torch.tensor(float(logit_bias)))
        else:
            self._logit_scale = float(logit_scale)
            self.logit_bias = float(logit_bias)

    @property
    def logit_scale(self):
        """t: a float, or exp(log_logit_scale) (0-dim, with gradient) when learnable."""
        return self.log_logit_scale.exp() if self.learnable else self._logit_scale

    def forward(self, img: torch.Tensor, txt: torch.Tensor, logit_scale=None, logit_bias=None):
        scale = self.logit_scale if logit_scale is None else logit_scale
        bias = self.logit_bias if logit_bias is None else logit_bias
        return siglip_loss(img, txt, scale, bias, normalize=self.normalize, reduction=self.reduction,
                           backend=self.backend, gather=self.gather)

    def extra_repr(self) -> str:
        return (f"logit_scale={_shown(self.logit_scale)}, logit_bias={_shown(self.logit_bias)}, "
                f"learnable={self.learnable}, normalize={self.normalize}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}, gather={self.gather}")
