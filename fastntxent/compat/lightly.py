"""lightly's `NTXentLoss` (lightly/loss/ntx_ent_loss.py) and its memory bank, computed by
`fastntxent.nt_xent` (in-batch negatives) and `fastntxent.info_nce` (memory-bank negatives), and
its `DCLLoss` / `DCLWLoss` (lightly/loss/dcl_loss.py), computed by `nt_xent(..., decoupled=True)`.

    from lightly.loss import NTXentLoss           ->  from fastntxent.compat.lightly import NTXentLoss
    from lightly.loss import DCLLoss, DCLWLoss    ->  from fastntxent.compat.lightly import DCLLoss, DCLWLoss

Maths, as lightly: rows normalised by `torch.nn.functional.normalize` (eps 1e-12, as lightly),
then fused with `normalize=False`.
- memory_bank_size=0 (SimCLR): cross-entropy of each of the 2N rows of cat(out0, out1) against
  the other 2N−1, mean over the 2N rows.
- a memory bank (MoCo): logits_i = [out0_i·out1_i, out0_i·bank] / τ, target 0, mean over the
  N rows of out0; the bank holds normalised out1 rows, gets no gradient, and is read before
  the batch is written into it. It is written only when out0 requires grad, with lightly's
  ring-buffer policy: a batch that reaches the end of the bank fills it up to the end, the
  rest of the batch is dropped and the pointer returns to 0. Its initial content is
  lightly's too (torch.randn, row-normalised, float32).
- memory_bank_size: (size, dim) as lightly; an int > 0 is also accepted (lightly < 1.6 took
  one; lightly 1.6 rejects it): the bank is then created at the first batch with that
  batch's dim.
- gather_distributed=True in an initialised process group with more than one rank: each
  rank's loss is its local rows against all ranks' rows (its value is the local mean, as
  lightly's; the gradient sums over ranks, as lightly's GatherLayer does); with a bank, the
  bank is written with every rank's out1. Outside a process group (or with one rank) it is
  the single-process loss, as in lightly.
DCLLoss(temperature=0.1, weight_fn=None, gather_distributed=False): lightly's symmetric
decoupled loss, ½ (loss(out0 → out1) + loss(out1 → out0)), each the mean over its N rows of
−w_i·s_i/τ + log Σ_{negatives} e^{s/τ} (negatives: every other row of both views but the
positive) — the fused decoupled NT-Xent over the 2N rows, plus the weights' share
Σ_i (2 − w0_i − w1_i)·s_i/τ / 2N computed from the N positive cosines (O(N·D)), w0 =
weight_fn(out0, out1), w1 = weight_fn(out1, out0). DCLWLoss(temperature=0.1, sigma=0.5,
gather_distributed=False): weight_fn = lightly's negative von Mises-Fisher weights
2 − N·softmax(out0·out1/σ) (no gradient, as lightly's). With gather_distributed in a process
group of more than one rank, the local rows against all ranks' rows, the weights local, as
lightly's.
Differences left: the temperature must be > 0 (lightly also takes τ <= −1e-8, a negative
temperature: NotImplementedError here); a bank whose dtype differs from the features' is
accepted (lightly's einsum would raise).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from .. import distributed as _dist
from ..cross_family import info_nce
from ..self_family import nt_xent

__all__ = ["NTXentLoss", "MemoryBankModule", "DCLLoss", "DCLWLoss", "negative_mises_fisher_weights"]


class MemoryBankModule(nn.Module):
    """lightly.models.modules.memory_bank.MemoryBankModule: `bank` (size, dim) float32 buffer and
    `bank_ptr`; forward(output, labels=None, update=False) -> (output, bank or None), the bank
    as it was before this batch, (dim, size) when feature_dim_first."""

    def __init__(self, size: Union[int, Sequence[int]], gather_distributed: bool = False,
                 feature_dim_first: bool = True):
        super().__init__()
        size_tuple = (size,) if isinstance(size, int) else tuple(size)
        if any(x < 0 for x in size_tuple):
            raise ValueError(f"Illegal memory bank size {size}, all entries must be non-negative.")
        if size_tuple != (0,) and len(size_tuple) not in (1, 2):
            raise ValueError(f"Illegal memory bank size {size}, expected a (num_features, dim) "
                             "tuple, or 'size=0' to disable the memory bank.")
        self.size = size_tuple
        self.gather_distributed = gather_distributed
        self.feature_dim_first = feature_dim_first
        self.register_buffer("bank", torch.empty(size=size_tuple, dtype=torch.float), persistent=False)
        self.register_buffer("bank_ptr", torch.empty(1, dtype=torch.long), persistent=False)
        if len(size_tuple) > 1:
            self._init_memory_bank(size_tuple)

    @torch.no_grad()
    def _init_memory_bank(self, size: Tuple[int, ...]) -> None:
        self.bank = F.normalize(torch.randn(size).type_as(self.bank), dim=-1)
        self.bank_ptr = torch.zeros(1).type_as(self.bank_ptr)

    def negatives(self, output: Tensor) -> Optional[Tensor]:
        """The bank (size, dim) as it is now (None when disabled); creates an int-sized bank."""
        if self.size[0] == 0:
            return None
        if self.bank.dim() == 1:  # an int size: dim from the first batch
            self.size = (self.size[0], output.shape[1])
            self._init_memory_bank(self.size)
        return self.bank.detach()

    def forward(self, output: Tensor, labels: Optional[Tensor] = None, update: bool = False):
        bank = self.negatives(output)
        if bank is None:
            return output, None
        bank = bank.clone()
        if self.feature_dim_first:
            bank = bank.transpose(0, -1)
        if update:
            self._dequeue_and_enqueue(output)
        return output, bank

    @torch.no_grad()
    def _dequeue_and_enqueue(self, batch: Tensor) -> None:
        if self.gather_distributed and _dist.world_size() > 1:
            batch = _dist.gather_no_grad(batch, "out1")
        batch_size = batch.shape[0]
        ptr = int(self.bank_ptr)
        if ptr + batch_size >= self.size[0]:
            self.bank[ptr:] = batch[: self.size[0] - ptr].detach()
            self.bank_ptr.zero_()
        else:
            self.bank[ptr: ptr + batch_size] = batch.detach()
            self.bank_ptr[0] = ptr + batch_size


def _check_distributed_available(gather_distributed: bool) -> None:
    """lightly's constructor check, with its message."""
    if gather_distributed and not torch.distributed.is_available():
        raise ValueError("gather_distributed is True but torch.distributed is not available. "
                         "Please set gather_distributed=False or install a torch version with "
                         "distributed support.")


class NTXentLoss(nn.Module):
    """lightly.loss.NTXentLoss with the fused kernels (see the module docstring)."""

    def __init__(self, temperature: float = 0.5, memory_bank_size: Union[int, Sequence[int]] = 0,
                 gather_distributed: bool = False):
        super().__init__()
        self.memory_bank = MemoryBankModule(size=memory_bank_size, gather_distributed=gather_distributed)
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.eps = 1e-8
        if abs(self.temperature) < self.eps:
            raise ValueError("Illegal temperature: abs({}) < 1e-8".format(self.temperature))
        if temperature < 0:
            raise NotImplementedError(f"temperature={temperature}: lightly takes a negative temperature, "
                                      "the fused kernels need temperature > 0")
        _check_distributed_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        negatives = self.memory_bank.negatives(out1)
        if negatives is not None:
            # info_nce copies the queue (normalize=False) before the bank is written below
            loss = info_nce(out0, out1, negatives.to(out0.device), self.temperature, normalize=False)
            if out0.requires_grad:
                self.memory_bank._dequeue_and_enqueue(out1)
            return loss
        if self.gather_distributed and _dist.world_size() > 1:
            # the local 2N rows against every rank's rows; the gathers sum the gradient over ranks
            return nt_xent(out0, out1, self.temperature, normalize=False, reduction="none", gather=True).mean()
        return nt_xent(out0, out1, self.temperature, normalize=False)


def negative_mises_fisher_weights(out0: Tensor, out1: Tensor, sigma: float = 0.5) -> Tensor:
    """lightly's DCLW weights (N,): 2 − N·softmax_i(out0_i·out1_i / σ), detached."""
    similarity = torch.einsum("nm,nm->n", out0.detach(), out1.detach()) / sigma
    return 2 - out0.shape[0] * F.softmax(similarity, dim=0)


class DCLLoss(nn.Module):
    """lightly.loss.DCLLoss with the fused decoupled kernels (see the module docstring)."""

    def __init__(self, temperature: float = 0.1, weight_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None,
                 gather_distributed: bool = False):
        super().__init__()
        self.temperature = temperature
        self.weight_fn = weight_fn
        self.gather_distributed = gather_distributed
        _check_distributed_available(gather_distributed)

    def forward(self, out0: Tensor, out1: Tensor) -> Tensor:
        out0 = F.normalize(out0, dim=1)
        out1 = F.normalize(out1, dim=1)
        gather = self.gather_distributed and _dist.world_size() > 1
        loss = nt_xent(out0, out1, self.temperature, normalize=False, decoupled=True, reduction="none",
                       gather=gather).mean()
        if self.weight_fn is None:
            return loss
        # −w·s/τ in place of the fused loss's −s/τ, for both directions' anchors
        positive = (out0 * out1).sum(1) / self.temperature
        w0, w1 = self.weight_fn(out0, out1), self.weight_fn(out1, out0)
        return loss + ((2 - w0 - w1) * positive).mean() / 2


class DCLWLoss(DCLLoss):
    """lightly.loss.DCLWLoss: DCLLoss with the negative von Mises-Fisher weights."""

    def __init__(self, temperature: float = 0.1, sigma: float = 0.5, gather_distributed: bool = False):
        super().__init__(temperature=temperature, weight_fn=partial(negative_mises_fisher_weights, sigma=sigma),
                         gather_distributed=gather_distributed)
