"""Drop-in classes of the losses people already use, computed by fastntxent's fused kernels.

One module per peer; each class has the peer's name, constructor arguments and defaults,
forward signature, return type and maths, so that migrating is one changed import line:

    from lightly.loss import NTXentLoss                       ->  from fastntxent.compat.lightly import NTXentLoss
    from pytorch_metric_learning.losses import NTXentLoss     ->  from fastntxent.compat.pytorch_metric_learning import NTXentLoss
    from losses import SupConLoss  (HobbitLong/SupContrast)   ->  from fastntxent.compat.supcontrast import SupConLoss
    from open_clip.loss import ClipLoss                       ->  from fastntxent.compat.open_clip import ClipLoss

Where an option of a peer cannot be computed exactly by the fused kernels the class raises
NotImplementedError naming it, rather than computing something else. What each class does
not reproduce (bit-level rounding aside) is in its module docstring.
"""
from . import lightly, open_clip, pytorch_metric_learning, supcontrast

__all__ = ["lightly", "pytorch_metric_learning", "supcontrast", "open_clip"]
