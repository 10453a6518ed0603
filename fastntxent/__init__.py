"""fastntxent: fused, memory-lean contrastive losses (NT-Xent, multi-view, SupCon, InfoNCE, CLIP, SigLIP) for PyTorch.

    import fastntxent as fx
    loss = fx.nt_xent(z1, z2, temperature=0.5)
"""
from . import _extension, reference
from .self_family import multiview_nt_xent, nt_xent, supcon
from .cross_family import clip_loss, info_nce
from .siglip_family import siglip_loss
from .losses import ClipLoss, InfoNCELoss, MemoryQueue, NTXentLoss, SigLipLoss, SupConLoss
from .health import CollapseError, CollapseWarning, HealthMonitor, effective_rank, uniformity
from .chunked import chunked_backward, chunked_forward

__version__ = "0.1.0"

__all__ = [
    "nt_xent",
    "multiview_nt_xent",
    "supcon",
    "NTXentLoss",
    "SupConLoss",
    "info_nce",
    "clip_loss",
    "InfoNCELoss",
    "ClipLoss",
    "siglip_loss",
    "SigLipLoss",
    "MemoryQueue",
    "HealthMonitor",
    "CollapseWarning",
    "CollapseError",
    "effective_rank",
    "uniformity",
    "chunked_backward",
    "chunked_forward",
    "reference",
    "__version__",
]
