"""The functional API of fastntxent in one namespace (each family's module owns its losses)."""
from .cross_family import clip_loss, info_nce
from .self_family import multiview_nt_xent, nt_xent, self_similarity_loss, supcon
from .siglip_family import siglip_loss

__all__ = ["nt_xent", "multiview_nt_xent", "supcon", "self_similarity_loss", "info_nce", "clip_loss", "siglip_loss"]
