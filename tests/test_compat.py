"""fastntxent.compat: the peers' classes computed by the fused kernels, and the positional-argument
trap of issue 19.

Every compat class is checked, loss and input gradients (and logit_scale's), in float64
(relative error <= 1e-10) and float32 (<= 1e-5):
- against a plain-PyTorch re-implementation of the peer's maths written here from the peer's
  documentation / paper (always runs);
- against the real peer class when the peer is installed (lightly, pytorch-metric-learning,
  open_clip_torch: `pip install --no-deps lightly pytorch-metric-learning open_clip_torch`;
  open_clip's loss.py is loaded from its file, so ftfy & co. are not needed); skipped with a
  reason otherwise. SupContrast is not a package: only its paper's maths (Khosla et al. 2020,
  L_out, with SupContrast's temperature/base_temperature scaling).
Constructor and forward signatures (names, defaults, order) are the peer's. Distributed
semantics (open_clip's world_size > 1, lightly's gather_distributed) run on 2 gloo processes.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import fastntxent as fx
from fastntxent.compat import lightly as c_lightly
from fastntxent.compat import open_clip as c_open_clip
from fastntxent.compat import pytorch_metric_learning as c_pml
from fastntxent.compat import supcontrast as c_supcontrast
from helpers import assert_rel_close

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
DTYPES = [torch.float64, torch.float32]


# ---------------------------------------------------------------------------------------
# The real peers, when installed
# ---------------------------------------------------------------------------------------
def _import(name):
    try:
        return importlib.import_module(name)
    except Exception:  # not installed, or a dependency missing
        return None


def _open_clip_loss_module():
    """open_clip/loss.py alone (the package's __init__ needs ftfy, timm, ... which the loss does not)."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except Exception:
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss_for_tests", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


REAL_LIGHTLY = _import("lightly.loss")
REAL_PML = _import("pytorch_metric_learning.losses")
REAL_OPEN_CLIP = _open_clip_loss_module()

needs_lightly = pytest.mark.skipif(REAL_LIGHTLY is None, reason="lightly not installed (pip install --no-deps lightly)")
needs_pml = pytest.mark.skipif(REAL_PML is None, reason="pytorch-metric-learning not installed")
needs_open_clip = pytest.mark.skipif(REAL_OPEN_CLIP is None, reason="open_clip_torch not installed")


# ---------------------------------------------------------------------------------------
# Plain-PyTorch re-implementations of the peers' maths (written from their documentation)
# ---------------------------------------------------------------------------------------
def ref_lightly_ntxent(out0, out1, tau, bank=None):
    """lightly NTXentLoss: SimCLR's CE over the 2N−1 other rows (mean over 2N), or with a
    memory bank MoCo's CE of [positive, bank] (mean over N); rows F.normalize'd."""
    out0, out1 = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    N = out0.shape[0]
    if bank is not None:
        logits = torch.cat([(out0 * out1).sum(1, keepdim=True), out0 @ bank.to(out0.dtype).T], dim=1) / tau
        return F.cross_entropy(logits, torch.zeros(N, dtype=torch.long))
    z = torch.cat([out0, out1])
    sim = (z @ z.T / tau).masked_fill(torch.eye(2 * N, dtype=torch.bool), float("-inf"))
    return F.cross_entropy(sim, (torch.arange(2 * N) + N) % (2 * N))


def ref_pml_ntxent(emb, labels, tau, ref_emb=None, ref_labels=None):
    """PML NTXentLoss: −log(e^{s_ap/τ} / (e^{s_ap/τ} + Σ_neg e^{s_an/τ})) per positive pair, mean
    over the pairs (0 without positive or negative pairs); cosine similarity."""
    u = F.normalize(emb, dim=1)
    r = u if ref_emb is None else F.normalize(ref_emb, dim=1)
    rl = labels if ref_emb is None else ref_labels
    s = u @ r.T / tau
    same = labels[:, None] == rl[None, :]
    pos = same & ~torch.eye(*same.shape, dtype=torch.bool) if ref_emb is None else same
    neg = ~same
    if not pos.any() or not neg.any():
        return (emb * 0).sum()
    losses = [torch.logsumexp(torch.cat([s[a, p:p + 1], s[a][neg[a]]]), 0) - s[a, p] for a, p in pos.nonzero()]
    return torch.stack(losses).mean()


def ref_pml_supcon(emb, labels, tau):
    """PML SupConLoss: per anchor −mean_p log softmax_{j≠a}(s_aj/τ)[p]; mean over anchors with a loss > 0."""
    u = F.normalize(emb, dim=1)
    M = u.shape[0]
    eye = torch.eye(M, dtype=torch.bool)
    s = u @ u.T / tau
    same = labels[:, None] == labels[None, :]
    pos = same & ~eye
    if not pos.any() or not (~same).any():
        return (emb * 0).sum()
    log_prob = s - torch.logsumexp(s.masked_fill(eye, float("-inf")), dim=1, keepdim=True)
    rows = -(log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)
    rows = rows[rows > 0]
    return rows.mean() if rows.numel() else (emb * 0).sum()


def ref_supcon_paper(features, labels=None, mask=None, tau=0.07, base=0.07, mode="all"):
    """Khosla et al. 2020, L_out: anchors = all views ('all') or the first view ('one'); P(i) = the
    other rows of i's class; ℓ_i = −(τ/τ_base)/|P(i)| Σ_p log(e^{z_i·z_p/τ} / Σ_{a≠i} e^{z_i·z_a/τ}),
    0 without a positive; mean over the anchors. Features used as given (normalised by the model)."""
    bsz, V = features.shape[:2]
    f = features.reshape(bsz, V, -1)
    z = torch.cat([f[:, v] for v in range(V)])  # view-major
    if mask is None:
        lab = torch.arange(bsz) if labels is None else labels.reshape(-1)
        same_samples = lab[:, None] == lab[None, :]
    else:
        same_samples = mask.bool()
    M = V * bsz
    same = same_samples.repeat(V, V) & ~torch.eye(M, dtype=torch.bool)
    logits = z @ z.T / tau
    lse = torch.logsumexp(logits.masked_fill(torch.eye(M, dtype=torch.bool), float("-inf")), dim=1)
    n_pos = same.sum(1)
    mean_log_prob_pos = ((logits - lse[:, None]) * same).sum(1) / n_pos.clamp_min(1)
    per_anchor = -(tau / base) * mean_log_prob_pos
    n_anchors = M if mode == "all" else bsz
    return per_anchor[:n_anchors].mean()


def ref_open_clip(img, txt, scale):
    """open_clip ClipLoss (one process): ½ (CE(s·I Tᵀ) + CE(s·T Iᵀ)), features used as given."""
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


# ---------------------------------------------------------------------------------------
# Comparison helper
# ---------------------------------------------------------------------------------------
def _leaves(tensors, dtype):
    return [t.detach().to(dtype).clone().requires_grad_(t.is_floating_point()) for t in tensors]


def _loss_and_grads(fn, inputs, dtype):
    xs = _leaves(inputs, dtype)
    loss = fn(*xs)
    if isinstance(loss, dict):
        loss = loss["contrastive_loss"]
    loss.backward()
    return loss.detach(), [x.grad if x.grad is not None else torch.zeros_like(x) for x in xs if x.is_floating_point()]


def assert_same(ours, theirs, inputs, dtype, what=""):
    tol = TOL[dtype]
    lo, go = _loss_and_grads(ours, inputs, dtype)
    lt, gt = _loss_and_grads(theirs, inputs, dtype)
    assert lo.dtype == lt.dtype, (what, lo.dtype, lt.dtype)
    assert_rel_close(lo, lt, tol, f"{what} loss")
    for i, (a, b) in enumerate(zip(go, gt)):
        assert_rel_close(a, b, tol, f"{what} grad of input {i}")


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _normed(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=_g(seed), dtype=torch.float64), dim=-1)


# ---------------------------------------------------------------------------------------
# lightly
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.5, 0.07, 2.0])
def test_lightly_ntxent_in_batch(dtype, tau):
    g = _g(1)
    out0, out1 = torch.randn(9, 13, generator=g, dtype=torch.float64), torch.randn(9, 13, generator=g, dtype=torch.float64)
    ours = c_lightly.NTXentLoss(temperature=tau)
    assert_same(ours, lambda a, b: ref_lightly_ntxent(a, b, tau), [out0, out1], dtype, "reimpl")
    if REAL_LIGHTLY is not None:
        assert_same(ours, REAL_LIGHTLY.NTXentLoss(temperature=tau), [out0, out1], dtype, "lightly")
        assert_same(c_lightly.NTXentLoss(tau, 0, True), REAL_LIGHTLY.NTXentLoss(tau, 0, True), [out0, out1], dtype,
                    "lightly gather_distributed=True, no process group")


def _bank_steps(loss_fn, batches, dtype):
    """Run loss_fn over the batches: per step (loss, grads, bank after the step)."""
    out = []
    for i, (a, b) in enumerate(batches):
        a, b = a.to(dtype).clone().requires_grad_(i != 2), b.to(dtype).clone().requires_grad_(i != 2)  # step 2: eval
        loss = loss_fn(a, b)
        grads = []
        if a.requires_grad:
            loss.backward()
            grads = [a.grad, b.grad]
        out.append((loss.detach(), grads, loss_fn.memory_bank.bank.detach().clone()))
    return out


def _batches(n_steps, N, D, seed):
    g = _g(seed)
    return [(torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64))
            for _ in range(n_steps)]


class _ReimplLightlyBank(torch.nn.Module):
    """lightly's documented bank: (size, dim) of normalised out1 rows, read before the write,
    written only when out0 requires grad; a batch that reaches the end fills the bank to the end,
    the rest is dropped, the pointer returns to 0."""

    def __init__(self, tau, bank):
        super().__init__()
        self.tau = tau
        self.memory_bank = torch.nn.Module()
        self.memory_bank.bank = bank.clone()
        self.ptr = 0

    def forward(self, out0, out1):
        bank = self.memory_bank.bank.clone()
        loss = ref_lightly_ntxent(out0, out1, self.tau, bank)
        if out0.requires_grad:
            b = F.normalize(out1, dim=1).detach()
            size = bank.shape[0]
            if self.ptr + b.shape[0] >= size:
                self.memory_bank.bank[self.ptr:] = b[: size - self.ptr]
                self.ptr = 0
            else:
                self.memory_bank.bank[self.ptr:self.ptr + b.shape[0]] = b
                self.ptr += b.shape[0]
        return loss


def _assert_steps_equal(ours, theirs, dtype, what):
    for step, ((lo, go, bo), (lt, gt, bt)) in enumerate(zip(ours, theirs)):
        assert_rel_close(lo, lt, TOL[dtype], f"{what} step {step} loss")
        for a, b in zip(go, gt):
            assert_rel_close(a, b, TOL[dtype], f"{what} step {step} grad")
        assert bo.shape == bt.shape and bo.dtype == bt.dtype
        assert_rel_close(bo, bt, TOL[dtype], f"{what} step {step} bank")


def ref_lightly_dcl(out0, out1, tau, weight_fn=None):
    """lightly DCLLoss from the paper (eq. 6): per direction, the mean over rows of
    −w_i s_ii'/τ + log Σ over both views' other rows but the positive; the two directions averaged."""
    def one_way(a, b):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        n = a.shape[0]
        eye = torch.eye(n, dtype=torch.bool)
        s_aa, s_ab = a @ a.T / tau, a @ b.T / tau
        negatives = torch.cat([s_aa[~eye].view(n, -1), s_ab[~eye].view(n, -1)], dim=1)
        positive = s_ab.diagonal()
        if weight_fn is not None:
            positive = positive * weight_fn(a, b)
        return (torch.logsumexp(negatives, dim=1) - positive).mean()

    return (one_way(out0, out1) + one_way(out1, out0)) / 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["dcl", "dclw", "dcl-custom-weight"])
def test_lightly_dcl(dtype, kind):
    g = _g(3)
    out0, out1 = torch.randn(11, 7, generator=g, dtype=torch.float64), torch.randn(11, 7, generator=g, dtype=torch.float64)
    if kind == "dcl":
        ours, weight, theirs = c_lightly.DCLLoss(0.1), None, (lambda: REAL_LIGHTLY.DCLLoss(0.1))
    elif kind == "dclw":
        ours, theirs = c_lightly.DCLWLoss(0.2, sigma=0.4), (lambda: REAL_LIGHTLY.DCLWLoss(0.2, sigma=0.4))
        weight = lambda a, b: c_lightly.negative_mises_fisher_weights(a, b, 0.4)  # noqa: E731
    else:
        weight = lambda a, b: ((a - b) ** 2).sum(1)  # noqa: E731  (with a gradient)
        ours, theirs = c_lightly.DCLLoss(0.3, weight_fn=weight), (lambda: REAL_LIGHTLY.DCLLoss(0.3, weight_fn=weight))
    assert_same(ours, lambda a, b: ref_lightly_dcl(a, b, ours.temperature, weight), [out0, out1], dtype, "reimpl")
    if REAL_LIGHTLY is not None:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # lightly's torch.tensor(tensor) in its DCLW weights
            assert_same(ours, theirs(), [out0, out1], dtype, "lightly")


@pytest.mark.parametrize("dtype", DTYPES)
def test_lightly_memory_bank_ring_buffer(dtype):
    size, D, N, tau = 10, 6, 4, 0.3  # pointer 0 -> 4 -> 8 -> (eval) -> 8+4 >= 10: 2 rows written, back to 0 -> 4
    batches = _batches(5, N, D, seed=2)
    torch.manual_seed(5)
    ours = c_lightly.NTXentLoss(tau, memory_bank_size=(size, D)).to(dtype)
    torch.manual_seed(5)
    init = F.normalize(torch.randn(size, D), dim=-1)  # lightly's initial bank, from the same RNG state
    assert torch.equal(ours.memory_bank.bank, init.to(dtype))
    got = _bank_steps(ours, batches, dtype)
    assert int(ours.memory_bank.bank_ptr) == 4
    expected = _bank_steps(_ReimplLightlyBank(tau, init.to(dtype)), batches, dtype)
    _assert_steps_equal(got, expected, dtype, "reimpl")
    if REAL_LIGHTLY is not None:
        torch.manual_seed(5)
        real = REAL_LIGHTLY.NTXentLoss(tau, memory_bank_size=(size, D)).to(dtype)
        _assert_steps_equal(got, _bank_steps(real, batches, dtype), dtype, "lightly")
        assert int(real.memory_bank.bank_ptr) == 4


def test_lightly_int_bank_size_takes_dim_from_first_batch():
    size, D, N, tau = 7, 5, 3, 0.2
    batches = _batches(3, N, D, seed=3)
    ours = c_lightly.NTXentLoss(tau, memory_bank_size=size)
    assert ours.memory_bank.bank.shape == (size,)
    torch.manual_seed(11)
    got = _bank_steps(ours, batches, torch.float64)
    torch.manual_seed(11)
    init = F.normalize(torch.randn(size, D), dim=-1)  # float32, as lightly's bank
    _assert_steps_equal(got, _bank_steps(_ReimplLightlyBank(tau, init), batches, torch.float64), torch.float64, "int bank")


def test_lightly_constructor_checks():
    with pytest.raises(ValueError, match="Illegal temperature"):
        c_lightly.NTXentLoss(temperature=0.0)
    with pytest.raises(NotImplementedError, match="negative temperature"):
        c_lightly.NTXentLoss(temperature=-0.5)
    for bad in [-1, (-1, 4), (3, 4, 5)]:
        with pytest.raises(ValueError, match="Illegal memory bank size"):
            c_lightly.NTXentLoss(memory_bank_size=bad)


# ---------------------------------------------------------------------------------------
# pytorch-metric-learning
# ---------------------------------------------------------------------------------------
def _pair_labels(seed):
    """Pairs of views (SimCLR), some singletons (anchors without a positive), shuffled."""
    lab = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 4, 5, 6, 6, 7])
    return lab[torch.randperm(lab.numel(), generator=_g(seed))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_pml_ntxent(dtype, tau):
    labels = _pair_labels(4)
    emb = torch.randn(labels.numel(), 11, generator=_g(4), dtype=torch.float64)
    ours = c_pml.NTXentLoss(temperature=tau)
    assert_same(lambda e: ours(e, labels), lambda e: ref_pml_ntxent(e, labels, tau), [emb], dtype, "reimpl")
    if REAL_PML is not None:
        real = REAL_PML.NTXentLoss(temperature=tau)
        assert_same(lambda e: ours(e, labels), lambda e: real(e, labels), [emb], dtype, "pml")


@pytest.mark.parametrize("dtype", DTYPES)
def test_pml_ntxent_ref_emb_one_to_one(dtype):
    g = _g(5)
    emb, ref = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, 6, generator=g, dtype=torch.float64)
    labels = torch.randperm(8, generator=g) + 10
    ref_labels = labels[torch.randperm(8, generator=g)]  # the positive of row i is somewhere else in ref
    ours = c_pml.NTXentLoss(0.1)
    assert_same(lambda e, r: ours(e, labels, ref_emb=r, ref_labels=ref_labels),
                lambda e, r: ref_pml_ntxent(e, labels, 0.1, r, ref_labels), [emb, ref], dtype, "reimpl")
    if REAL_PML is not None:
        real = REAL_PML.NTXentLoss(0.1)
        assert_same(lambda e, r: ours(e, labels, None, r, ref_labels),
                    lambda e, r: real(e, labels, None, r, ref_labels), [emb, ref], dtype, "pml")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_pml_self_supervised_loss(dtype, symmetric):
    g = _g(6)
    emb, ref = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(7, 5, generator=g, dtype=torch.float64)
    ours = c_pml.SelfSupervisedLoss(c_pml.NTXentLoss(), symmetric=symmetric)
    reimpl = (lambda e, r: ref_pml_ntxent(torch.cat([e, r]), torch.arange(7).repeat(2), 0.07)) if symmetric else \
        (lambda e, r: ref_pml_ntxent(e, torch.arange(7), 0.07, r, torch.arange(7)))
    assert_same(ours, reimpl, [emb, ref], dtype, "reimpl")
    if REAL_PML is not None:
        real = REAL_PML.SelfSupervisedLoss(REAL_PML.NTXentLoss(), symmetric=symmetric)
        assert_same(ours, real, [emb, ref], dtype, "pml")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("labels", [[0, 0, 0, 1, 1, 2, 3, 3, 3, 3], [0, 1, 2, 3], [5, 5, 5], [0, 0, 1]],
                         ids=["classes", "no_positive", "no_negative", "small"])
def test_pml_supcon(dtype, labels):
    labels = torch.tensor(labels)
    emb = torch.randn(labels.numel(), 9, generator=_g(7), dtype=torch.float64)
    ours = c_pml.SupConLoss()
    assert_same(lambda e: ours(e, labels), lambda e: ref_pml_supcon(e, labels, 0.1), [emb], dtype, "reimpl")
    if REAL_PML is not None:
        real = REAL_PML.SupConLoss()
        assert_same(lambda e: ours(e, labels), lambda e: real(e, labels), [emb], dtype, "pml")


def test_pml_ntxent_edge_cases_match():
    for labels in ([0, 1, 2], [3, 3], [0, 0, 1, 2]):
        labels = torch.tensor(labels)
        emb = torch.randn(labels.numel(), 4, generator=_g(8), dtype=torch.float64)
        assert_same(lambda e: c_pml.NTXentLoss()(e, labels), lambda e: ref_pml_ntxent(e, labels, 0.07), [emb],
                    torch.float64, f"labels {labels.tolist()}")
        if REAL_PML is not None:
            assert_same(lambda e: c_pml.NTXentLoss()(e, labels), lambda e: REAL_PML.NTXentLoss()(e, labels), [emb],
                        torch.float64, f"pml labels {labels.tolist()}")


def test_pml_what_cannot_be_fused_raises():
    emb = torch.randn(6, 4)
    with pytest.raises(NotImplementedError, match="class of 3 rows"):
        c_pml.NTXentLoss()(emb, torch.tensor([0, 0, 0, 1, 1, 2]))
    with pytest.raises(NotImplementedError, match="miners"):
        c_pml.NTXentLoss()(emb, torch.arange(6), indices_tuple=(torch.tensor([0]),) * 3)
    with pytest.raises(NotImplementedError, match="ref_emb without ref_labels"):
        c_pml.NTXentLoss()(emb, torch.arange(6), ref_emb=torch.randn(6, 4))
    with pytest.raises(NotImplementedError, match="exactly one positive"):
        c_pml.NTXentLoss()(emb, torch.arange(6), ref_emb=torch.randn(6, 4), ref_labels=torch.tensor([0, 0, 1, 2, 3, 4]))
    with pytest.raises(NotImplementedError, match="ref_emb"):
        c_pml.SupConLoss()(emb, torch.arange(6), ref_emb=emb, ref_labels=torch.arange(6))
    for kw in ("distance", "reducer", "embedding_regularizer"):
        with pytest.raises(NotImplementedError, match=kw):
            c_pml.NTXentLoss(**{kw: object()})
    with pytest.raises(TypeError):
        c_pml.NTXentLoss(not_an_option=1)
    with pytest.raises(ValueError, match="cannot both be None"):
        c_pml.NTXentLoss()(emb)
    if REAL_PML is not None:
        with pytest.raises(ValueError, match="cannot both be None"):
            REAL_PML.NTXentLoss()(emb)


# ---------------------------------------------------------------------------------------
# SupContrast (no package: the paper's maths only)
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["all", "one"])
@pytest.mark.parametrize("case", ["labels", "unsupervised", "mask", "temperatures", "one_view", "4d"])
def test_supcontrast(dtype, mode, case):
    bsz, V, D = 7, 2, 10
    labels = torch.tensor([0, 1, 0, 2, 1, 1, 3])
    kwargs, ref_kw, ctor = {}, {}, {}
    shape = (bsz, V, D)
    if case in ("labels", "temperatures", "4d"):
        kwargs, ref_kw = {"labels": labels}, {"labels": labels}
    if case == "mask":
        mask = (labels[:, None] == labels[None, :]).float()
        kwargs, ref_kw = {"mask": mask}, {"mask": mask}
    if case == "temperatures":
        ctor, ref_kw = {"temperature": 0.3, "base_temperature": 0.1}, {**ref_kw, "tau": 0.3, "base": 0.1}
    if case == "one_view":
        shape, kwargs, ref_kw = (bsz, 1, D), {"labels": labels}, {"labels": labels}
    if case == "4d":
        shape = (bsz, V, 2, 5)
    features = _normed(*shape, seed=9)
    if case == "4d":
        features = F.normalize(features.reshape(bsz, V, -1), dim=-1).reshape(shape)
    ours = c_supcontrast.SupConLoss(contrast_mode=mode, **ctor)
    assert_same(lambda f: ours(f, **kwargs), lambda f: ref_supcon_paper(f, mode=mode, **ref_kw), [features], dtype, case)


def test_supcontrast_mask_equals_labels_and_refuses_others():
    labels = torch.tensor([2, 0, 2, 1])
    features = _normed(4, 3, 6, seed=10)
    mask = (labels[:, None] == labels[None, :]).float()
    loss_fn = c_supcontrast.SupConLoss()
    assert torch.equal(loss_fn(features, mask=mask), loss_fn(features, labels=labels))
    for bad in [mask * 0.5, mask - torch.eye(4), torch.triu(mask), torch.ones(4, 4) - torch.eye(4)]:
        with pytest.raises(NotImplementedError, match="mask"):
            loss_fn(features, mask=bad)
    with pytest.raises(ValueError, match="Cannot define both"):
        loss_fn(features, labels=labels, mask=mask)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        loss_fn(features[:, 0])
    with pytest.raises(ValueError, match="Num of labels"):
        loss_fn(features, labels=labels[:3])
    with pytest.raises(ValueError, match="Unknown mode"):
        c_supcontrast.SupConLoss(contrast_mode="both")(features)


# ---------------------------------------------------------------------------------------
# open_clip
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_kind", ["tensor", "float"])
def test_open_clip(dtype, scale_kind):
    img, txt = _normed(10, 12, seed=11), _normed(10, 12, seed=12)
    log_scale = torch.tensor(2.3, dtype=torch.float64)
    ours = c_open_clip.ClipLoss()
    if scale_kind == "tensor":  # model.logit_scale.exp(): learnable outside the loss
        inputs = [img, txt, log_scale]
        mk = lambda loss_fn: (lambda i, t, ls: loss_fn(i, t, ls.exp()))  # noqa: E731
    else:
        inputs = [img, txt]
        mk = lambda loss_fn: (lambda i, t: loss_fn(i, t, 9.5))  # noqa: E731
    assert_same(mk(ours), mk(ref_open_clip), inputs, dtype, "reimpl")
    if REAL_OPEN_CLIP is not None:
        assert_same(mk(ours), mk(REAL_OPEN_CLIP.ClipLoss()), inputs, dtype, "open_clip")
        for options in ({"cache_labels": True}, {"local_loss": True, "gather_with_grad": True}, {"use_horovod": True}):
            # every option is a no-op with world_size=1, in both
            assert_same(mk(c_open_clip.ClipLoss(**options)), mk(REAL_OPEN_CLIP.ClipLoss(**options)), inputs, dtype,
                        f"open_clip {options}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_open_clip_logit_bias_and_output_dict(dtype):
    img, txt = _normed(6, 5, seed=13), _normed(6, 5, seed=14)
    inputs = [img, txt, torch.tensor(2.0, dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64)]
    ours = c_open_clip.ClipLoss()
    out = ours(img, txt, 10.0, None, True)  # open_clip's positional order: logit_bias, then output_dict
    assert isinstance(out, dict) and set(out) == {"contrastive_loss"}
    assert_same(lambda i, t, ls, b: ours(i, t, ls.exp(), b, output_dict=True),
                lambda i, t, ls, b: ref_open_clip(i, t, ls.exp()) + 0 * b.sum(), inputs, dtype, "reimpl")
    if REAL_OPEN_CLIP is not None:
        real = REAL_OPEN_CLIP.ClipLoss()
        lo, go = _loss_and_grads(lambda i, t, ls, b: ours(i, t, ls.exp(), b, output_dict=True), inputs, dtype)
        lt, gt = _loss_and_grads(lambda i, t, ls, b: real(i, t, ls.exp(), b, output_dict=True), inputs, dtype)
        assert_rel_close(lo, lt, TOL[dtype], "loss with logit_bias")
        for a, b in zip(go[:3], gt[:3]):
            assert_rel_close(a, b, TOL[dtype], "grad with logit_bias")
        assert float(go[3].abs().max()) == 0.0 and float(gt[3].abs().max()) < 1e2 * TOL[dtype]  # softmax shift
    assert torch.isnan(ours(img, txt, 10.0, torch.tensor(float("inf"))))
    with pytest.raises(NotImplementedError, match="logit_bias"):
        ours(img, txt, 10.0, torch.zeros(6, 6))


def test_open_clip_distributed_options_without_process_group():
    img, txt = _normed(4, 3, seed=15), _normed(4, 3, seed=16)
    with pytest.raises(ValueError, match="process group"):
        c_open_clip.ClipLoss(rank=0, world_size=2, gather_with_grad=True)(img, txt, 10.0)
    with pytest.raises(NotImplementedError, match="use_horovod"):
        c_open_clip.ClipLoss(world_size=2, use_horovod=True)(img, txt, 10.0)
    with pytest.raises(NotImplementedError, match="gather_with_grad=False"):
        c_open_clip.ClipLoss(world_size=2, local_loss=True)(img, txt, 10.0)


# ---------------------------------------------------------------------------------------
# Signatures: the peers' constructor and forward arguments, names, order and defaults
# ---------------------------------------------------------------------------------------
EXPECTED_SIGNATURES = {
    # class: (__init__ parameters, forward parameters), as the peer's
    c_lightly.NTXentLoss: ("temperature=0.5, memory_bank_size=0, gather_distributed=False", "out0, out1"),
    c_pml.NTXentLoss: ("temperature=0.07, **kwargs",
                       "embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None"),
    c_pml.SupConLoss: ("temperature=0.1, **kwargs",
                       "embeddings, labels=None, indices_tuple=None, ref_emb=None, ref_labels=None"),
    c_pml.SelfSupervisedLoss: ("loss, symmetric=True, **kwargs", "embeddings, ref_emb"),
    c_supcontrast.SupConLoss: ("temperature=0.07, contrast_mode='all', base_temperature=0.07",
                               "features, labels=None, mask=None"),
    c_open_clip.ClipLoss: ("local_loss=False, gather_with_grad=False, cache_labels=False, rank=0, world_size=1, "
                           "use_horovod=False", "image_features, text_features, logit_scale, logit_bias=None, "
                                                "output_dict=False"),
}


def _params(fn) -> str:
    sig = inspect.signature(fn)
    parts = []
    for name, p in sig.parameters.items():
        if name == "self":
            continue
        s = ("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + name
        if p.default is not p.empty:
            s += "=" + repr(p.default)
        parts.append(s)
    return ", ".join(parts)


@pytest.mark.parametrize("cls", list(EXPECTED_SIGNATURES), ids=lambda c: f"{c.__module__.split('.')[-1]}.{c.__name__}")
def test_signatures_are_the_peers(cls):
    init, forward = EXPECTED_SIGNATURES[cls]
    assert _params(cls.__init__) == init
    assert _params(cls.forward) == forward
    real = {
        c_lightly.NTXentLoss: REAL_LIGHTLY and REAL_LIGHTLY.NTXentLoss,
        c_pml.NTXentLoss: REAL_PML and REAL_PML.NTXentLoss,
        c_pml.SupConLoss: REAL_PML and REAL_PML.SupConLoss,
        c_pml.SelfSupervisedLoss: REAL_PML and REAL_PML.SelfSupervisedLoss,
        c_open_clip.ClipLoss: REAL_OPEN_CLIP and REAL_OPEN_CLIP.ClipLoss,
    }.get(cls)
    if real:
        assert _params(real.__init__) == init
        assert _params(real.forward) == forward


# ---------------------------------------------------------------------------------------
# Issue 19's trap: the peers' positional calls on fastntxent's own API
# ---------------------------------------------------------------------------------------
def test_clip_loss_module_takes_open_clips_third_argument_as_the_scale():
    img, txt = torch.randn(6, 4), torch.randn(6, 4)
    log_s = torch.tensor(1.7, requires_grad=True)
    loss_fn = fx.ClipLoss()  # its own learnable scale starts at 1/0.07
    loss = loss_fn(img, txt, log_s.exp())  # open_clip's call
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert_rel_close(loss, fx.clip_loss(img, txt, log_s.exp()), 1e-6, "passed scale used")
    assert float((loss - loss_fn(img, txt)).abs().detach()) > 1e-3  # not the module's own scale
    loss.backward()
    assert log_s.grad is not None and loss_fn.log_logit_scale.grad is None
    assert_rel_close(loss_fn(img, txt, 5.0), fx.clip_loss(img, txt, 5.0), 1e-6, "float scale")
    loss_fn = fx.ClipLoss(max_logit_scale=10.0)
    assert_rel_close(loss_fn(img, txt, 50.0), fx.clip_loss(img, txt, 50.0), 1e-6, "passed scale is not clamped")
    loss, stats = loss_fn(img, txt, 5.0, return_stats=True)
    assert float(stats["logit_scale"]) == 5.0


@pytest.mark.parametrize("call", [
    lambda z, l: fx.ClipLoss()(z, z, 10.0, True),
    lambda z, l: fx.ClipLoss()(z, z, 10.0, None, True),        # open_clip: logit_bias, output_dict
    lambda z, l: fx.ClipLoss()(z, z, 10.0, output_dict=True),
    lambda z, l: fx.NTXentLoss()(z, z, True),
    lambda z, l: fx.SupConLoss()(z, l, True),
    lambda z, l: fx.InfoNCELoss()(z, z, z, True),
    lambda z, l: fx.InfoNCELoss()(z, z, None, True),
    lambda z, l: fx.nt_xent(z, z, 0.5, True),
    lambda z, l: fx.multiview_nt_xent([z, z], 0.5, True),
    lambda z, l: fx.supcon(z, l, 0.1, True),
    lambda z, l: fx.info_nce(z, z, None, 0.2, True),
    lambda z, l: fx.clip_loss(z, z, 10.0, True),
    lambda z: fx.SupConLoss()(z),                               # SupContrast's unsupervised call
], ids=lambda f: f.__code__.co_firstlineno)
def test_positional_options_raise_type_error(call):
    z, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises(TypeError):
        call(z, labels) if call.__code__.co_argcount == 2 else call(z)


def test_peer_calls_that_mean_something_else_here_raise():
    """pml's (embeddings, labels) and SupContrast's (bsz, n_views, D) on fastntxent's own
    modules: a loud error (fastntxent.compat has the peers' meaning), never a number."""
    z, labels = torch.randn(6, 4), torch.tensor([0, 0, 1, 1, 2, 2])
    with pytest.raises((TypeError, ValueError)):
        fx.NTXentLoss()(z, labels)
    with pytest.raises((TypeError, ValueError)):
        fx.SupConLoss()(torch.randn(6, 2, 4), labels)


def test_peer_calls_that_work_here_mean_the_peers():
    """lightly's loss(out0, out1) on fx.NTXentLoss and MoCo's loss(q, k, queue) on fx.InfoNCELoss."""
    g = _g(17)
    out0, out1 = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g, dtype=torch.float64)
    assert_rel_close(fx.NTXentLoss(0.5)(out0, out1), ref_lightly_ntxent(out0, out1, 0.5), 1e-10, "lightly call")
    bank = F.normalize(torch.randn(11, 5, generator=g, dtype=torch.float64), dim=1)
    assert_rel_close(fx.InfoNCELoss(0.5)(out0, out1, bank), ref_lightly_ntxent(out0, out1, 0.5, bank), 1e-10, "MoCo call")


# ---------------------------------------------------------------------------------------
# Distributed: open_clip's world_size > 1 and lightly's gather_distributed, 2 gloo processes
# ---------------------------------------------------------------------------------------
WORLD, N_LOCAL, D_DIST = 2, 3, 5
CLIP_OPTIONS = [(False, True), (False, False), (True, True)]  # (local_loss, gather_with_grad)


def _dist_inputs():
    g = _g(1234)
    M = WORLD * N_LOCAL
    return {"img": F.normalize(torch.randn(M, D_DIST, generator=g, dtype=torch.float64), dim=1),
            "txt": F.normalize(torch.randn(M, D_DIST, generator=g, dtype=torch.float64), dim=1),
            "out0": torch.randn(M, D_DIST, generator=g, dtype=torch.float64),
            "out1": torch.randn(M, D_DIST, generator=g, dtype=torch.float64)}


def _run(fn, tensors):
    xs = [t.clone().requires_grad_(True) for t in tensors]
    loss = fn(*xs)
    loss.backward()
    return [loss.detach()] + [x.grad for x in xs]


def _dist_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = _dist_inputs()
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        img, txt, out0, out1 = (x[k][rows] for k in ("img", "txt", "out0", "out1"))
        log_s = torch.tensor(2.0, dtype=torch.float64)
        res = {}
        peers = {"ours": c_open_clip}
        if REAL_OPEN_CLIP is not None:
            peers["real"] = REAL_OPEN_CLIP
        for local_loss, gwg in CLIP_OPTIONS:
            for who, mod in peers.items():
                loss_fn = mod.ClipLoss(local_loss=local_loss, gather_with_grad=gwg, rank=rank, world_size=WORLD)
                res[("clip", local_loss, gwg, who)] = _run(lambda i, t, ls: loss_fn(i, t, ls.exp()), [img, txt, log_s])
        lightly_peers = {"ours": c_lightly}
        if REAL_LIGHTLY is not None:
            lightly_peers["real"] = REAL_LIGHTLY
        for who, mod in lightly_peers.items():
            res[("lightly", who)] = _run(mod.NTXentLoss(0.3, gather_distributed=True), [out0, out1])
            torch.manual_seed(3)
            banked = mod.NTXentLoss(0.3, memory_bank_size=(4 * N_LOCAL, D_DIST), gather_distributed=True).double()
            res[("lightly_bank", who)] = _run(banked, [out0, out1]) + [banked.memory_bank.bank.clone()]
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def dist_results(tmp_path_factory):
    if not dist.is_available():
        pytest.skip("torch.distributed unavailable")
    d = tmp_path_factory.mktemp("compat_dist")
    mp.spawn(_dist_worker, args=(str(d / "init"), str(d)), nprocs=WORLD, join=True)
    return [torch.load(d / f"rank{r}.pt") for r in range(WORLD)]


def _single_process_clip(local_loss, gwg, rank):
    """open_clip's per-rank semantics derived on one process: value, local feature grads, scale grad."""
    x = _dist_inputs()
    img, txt = x["img"].clone().requires_grad_(True), x["txt"].clone().requires_grad_(True)
    log_s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    s = log_s.exp()
    logits = s * img @ txt.T
    if local_loss:  # local rows against all columns, labels offset by the rank
        lab = torch.arange(N_LOCAL) + rank * N_LOCAL
        loss = (F.cross_entropy(logits[rows], lab) + F.cross_entropy(logits.T[rows], lab)) / 2
    else:
        loss = ref_open_clip(img, txt, s)
    g_img, g_txt, g_s = torch.autograd.grad(loss, [img, txt, log_s])
    if local_loss or gwg:  # the gathers carry every rank's gradient back: W·∂L_global/∂x_r
        glob = ref_open_clip(img, txt, s)
        g_img, g_txt = (g * WORLD for g in torch.autograd.grad(glob, [img, txt]))
    return [loss.detach(), g_img[rows], g_txt[rows], g_s]


@pytest.mark.parametrize("local_loss,gather_with_grad", CLIP_OPTIONS)
def test_open_clip_distributed(dist_results, local_loss, gather_with_grad):
    for rank, res in enumerate(dist_results):
        ours = res[("clip", local_loss, gather_with_grad, "ours")]
        for got, want, what in zip(ours, _single_process_clip(local_loss, gather_with_grad, rank),
                                   ("loss", "img grad", "txt grad", "logit_scale grad")):
            assert_rel_close(got, want, 1e-10, f"rank {rank} {what} vs re-implementation")
        if REAL_OPEN_CLIP is not None:
            for got, want, what in zip(ours, res[("clip", local_loss, gather_with_grad, "real")],
                                       ("loss", "img grad", "txt grad", "logit_scale grad")):
                assert_rel_close(got, want, 1e-10, f"rank {rank} {what} vs open_clip")


def test_lightly_gather_distributed(dist_results):
    x = _dist_inputs()
    out0, out1 = x["out0"].clone().requires_grad_(True), x["out1"].clone().requires_grad_(True)
    glob = ref_lightly_ntxent(out0, out1, 0.3)  # mean over the global 2M rows
    g0, g1 = torch.autograd.grad(glob, [out0, out1])
    for rank, res in enumerate(dist_results):
        rows = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
        # value: this rank's 2N rows against all ranks' rows
        z = F.normalize(torch.cat([x["out0"], x["out1"]]), dim=1)
        M = z.shape[0]
        sim = (z @ z.T / 0.3).masked_fill(torch.eye(M, dtype=torch.bool), float("-inf"))
        target = (torch.arange(M) + M // 2) % M
        local = torch.cat([torch.arange(M)[rows], torch.arange(M)[rows] + M // 2])
        want = [F.cross_entropy(sim[local], target[local]), WORLD * g0[rows], WORLD * g1[rows]]
        ours = res[("lightly", "ours")]
        for got, w, what in zip(ours, want, ("loss", "out0 grad", "out1 grad")):
            assert_rel_close(got, w, 1e-10, f"rank {rank} {what} vs re-implementation")
        if REAL_LIGHTLY is not None:
            for got, w, what in zip(ours, res[("lightly", "real")], ("loss", "out0 grad", "out1 grad")):
                assert_rel_close(got, w, 1e-10, f"rank {rank} {what} vs lightly")
            for got, w, what in zip(res[("lightly_bank", "ours")], res[("lightly_bank", "real")],
                                    ("loss", "out0 grad", "out1 grad", "bank")):
                assert_rel_close(got, w, 1e-10, f"rank {rank} bank {what} vs lightly")
        # the bank holds every rank's normalised out1 after the step
        bank = res[("lightly_bank", "ours")][3]
        assert_rel_close(bank[:M // 2], F.normalize(x["out1"], dim=1), 1e-12, f"rank {rank} gathered bank")
