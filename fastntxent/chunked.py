"""Huge contrastive batches on one device: embedding-gradient caching (GradCache, Gao et al.
2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup").

A contrastive loss couples every row of the batch, so the batch cannot simply be split into
gradient-accumulation steps. It can be split in the encoder, though: the loss depends on the
parameters only through the embeddings, so with ``g = ∂L/∂z`` (the cached embedding gradient)

    ∂L/∂θ = Σ_chunks (∂z_chunk/∂θ)ᵀ g_chunk.

``chunked_backward`` does this in three phases:

1. **Embed** every chunk without autograd (``torch.no_grad``): only the (M, D) embeddings are
   kept. Before each chunk the CPU (and CUDA) random-number state is saved.
2. **Loss** on the full batch of embeddings (detached leaves) and its backward: ``g`` for
   every row, and the gradient of any parameter of the loss itself (a learnable temperature,
   CLIP's logit scale) lands in its ``.grad`` directly. With the fused losses this costs
   O(M·D) memory, not O(M²).
3. **Re-run** each chunk with autograd, the chunk's random state restored (the same dropout
   masks, stochastic depth, ... as in phase 1), and back-propagate ``g_chunk`` into it; the
   chunk's graph is freed before the next one is built.

Exact: the loss and every parameter gradient are those of plain autograd applied to the same
computation (each chunk's encoder call, the embeddings concatenated, the loss), to float
rounding: in float64, relative differences around 2e-16 (tested at 1e-10). When the encoder
treats rows independently (no BatchNorm in training mode), that is exactly the unchunked
``loss_fn(encoder(x1), encoder(x2)).backward()``.

What is not the unchunked computation:

- **BatchNorm in training mode** normalises each encoder call by its own batch statistics:
  the statistics become per chunk (what each GPU computes under DDP without SyncBatchNorm).
  The gradient is the exact gradient of that per-chunk-normalised loss. Running statistics
  (``running_mean``, ``running_var``, ``num_batches_tracked``) are updated **once per chunk**
  — equal to feeding the chunks once in training mode, in order — not twice: the buffers of
  every norm layer (``nn.modules.batchnorm._NormBase``: BatchNorm*, SyncBatchNorm,
  InstanceNorm with running stats) are saved before phase 1 and restored after it. Norm
  layers inside a plain function are found too (a forward pre-hook during phase 1 sees each
  module that runs). Other stateful modules (a custom EMA buffer, say) see two calls per chunk.
- **Dropout**: each chunk draws its own masks (a plain run on the same chunks draws the same
  ones, an unchunked run over the whole batch draws others). After the call the global random
  state is what phase 1 and the loss left (the re-runs happen under ``torch.random.fork_rng``),
  as after a plain forward and backward of the chunks.

Augmenting on the fly (``transform=``): the encoder call of a chunk can start from the raw
images, ``encoder(transform(raw[c]))``; the random state restored for the re-run makes it
draw the same views, so the augmented views of the whole batch are never held (tested).
A ``target_encoder`` (MoCo's key encoder) runs in phase 1 on the very arguments the encoder
got, so it sees the same views.

Memory: the activations of one chunk at a time, plus the embeddings and their gradients
(O(M·D) per view) and the loss's own O(M·D). Time: one extra forward of the encoder.

Autocast: the three phases run in the caller's autocast context (enter it around the call);
the re-run sees the same autocast state as the first run, so both give the same embeddings.

DistributedDataParallel: an encoder that is a ``DistributedDataParallel`` is re-run under
``no_sync()`` for every chunk but its last, so its gradients are all-reduced once, at the last
chunk's backward (DDP's gradient-accumulation pattern). Nothing else is synchronised: a loss
parameter outside the DDP module (a standalone ``NTXentLoss(learnable_temperature=True)``)
gets the local gradient, as it would in a plain DDP step. With ``gather=True`` losses the
loss's all-gather happens once, in phase 2, on the full local batch; every rank must call
``chunked_backward`` with the same number of chunks (equal local batches). An encoder that
is a plain function over DDP-less modules gets local gradients: all-reduce them yourself
(the trainer, fastntxent.train, does one all-reduce per step).
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import torch
from torch import nn

__all__ = ["chunked_backward", "chunked_forward"]

Inputs = Union[torch.Tensor, Sequence[Union[torch.Tensor, Sequence[Any]]]]


# -- arguments ------------------------------------------------------------------------------
def _check_chunk_size(chunk_size) -> int:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    return chunk_size


def _views(inputs) -> list[tuple]:
    """inputs -> one tuple of encoder arguments per view; checks the row counts."""
    if isinstance(inputs, torch.Tensor):
        inputs = [inputs]
    if not isinstance(inputs, (list, tuple)) or len(inputs) == 0:
        raise ValueError("inputs must be a tensor (one view) or a non-empty list/tuple with one "
                         f"entry per view, got {type(inputs).__name__}"
                         + (" of length 0" if isinstance(inputs, (list, tuple)) else ""))
    views, rows = [], []
    for v, view in enumerate(inputs):
        args = (view,) if isinstance(view, torch.Tensor) else view
        if not isinstance(args, (list, tuple)):
            raise ValueError(f"inputs[{v}] must be a tensor or a tuple of the encoder's arguments, "
                             f"got {type(view).__name__}")
        sizes = {a.shape[0] for a in args if isinstance(a, torch.Tensor) and a.dim() > 0}
        if not sizes:
            raise ValueError(f"inputs[{v}] holds no tensor with a batch dimension")
        if len(sizes) > 1:
            raise ValueError(f"inputs[{v}]: the encoder's tensor arguments have different batch sizes "
                             f"{sorted(sizes)}")
        views.append(tuple(args))
        rows.append(sizes.pop())
    if len(set(rows)) > 1:
        raise ValueError(f"inputs: the views have different batch sizes {rows}; every view must hold "
                         "the same samples")
    if rows[0] == 0:
        raise ValueError("inputs: the batch is empty")
    return views


def _encoders(encoder, n_views: int) -> list:
    encs = list(encoder) if isinstance(encoder, (list, tuple)) else [encoder] * n_views
    if len(encs) != n_views:
        raise ValueError(f"encoder: {len(encs)} encoders given for {n_views} views (pass one encoder "
                         "shared by all views, or one per view)")
    for e in encs:
        if not callable(e):
            raise ValueError(f"encoder must be callable (an nn.Module or a function), got {type(e).__name__}")
    return encs


def _transforms(transform, n_views: int) -> list:
    """transform -> one callable (or None: the identity) per view."""
    ts = list(transform) if isinstance(transform, (list, tuple)) else [transform] * n_views
    if len(ts) != n_views:
        raise ValueError(f"transform: {len(ts)} transforms given for {n_views} views (pass one shared by "
                         "all views, or one per view)")
    for t in ts:
        if t is not None and not callable(t):
            raise ValueError(f"transform must be callable or None, got {type(t).__name__}")
    return ts


def _slice(args: tuple, sl: slice) -> tuple:
    return tuple(a[sl] if isinstance(a, torch.Tensor) and a.dim() > 0 else a for a in args)


def _transformed(transform, args: tuple, rows: int, where: str) -> tuple:
    """A view's chunk of encoder arguments through its transform (None: as is)."""
    if transform is None:
        return args
    out = transform(*args)
    out = tuple(out) if isinstance(out, (tuple, list)) else (out,)
    sizes = {a.shape[0] for a in out if isinstance(a, torch.Tensor) and a.dim() > 0}
    if sizes != {rows}:
        raise ValueError(f"transform returned batch sizes {sorted(sizes)} for a chunk of {rows} rows ({where}); "
                         "it must return the chunk's rows, transformed")
    return out


def _concat_args(views: list[tuple]) -> tuple:
    """One call's arguments from several views' chunks, concatenated argument by argument
    (concat_views=True)."""
    n = len(views[0])
    if any(len(v) != n for v in views):
        raise ValueError("inputs: with concat_views=True every view must pass the encoder the same "
                         "number of arguments")
    out = []
    for j in range(n):
        parts = [v[j] for v in views]
        if all(isinstance(p, torch.Tensor) and p.dim() > 0 for p in parts):
            out.append(torch.cat(parts))
        elif any(isinstance(p, torch.Tensor) and p.dim() > 0 for p in parts):
            raise ValueError(f"inputs: argument {j} is a batched tensor in some views only")
        else:
            out.append(parts[0])
    return tuple(out)


def _embedding(out, rows: int, where: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"encoder must return a tensor of embeddings, got {type(out).__name__} ({where})")
    if out.dim() < 1 or out.shape[0] != rows:
        raise ValueError(f"encoder returned shape {tuple(out.shape)} for {rows} input rows ({where}); "
                         "it must return one embedding per row")
    return out


# -- state: RNG, norm-layer buffers --------------------------------------------------------
def _modules(encs) -> list[nn.Module]:
    seen, out = set(), []
    for e in encs:
        if isinstance(e, nn.Module) and id(e) not in seen:
            seen.add(id(e))
            out.append(e)
    return out


def _cuda_devices(views, modules) -> list[int]:
    if not torch.cuda.is_available():
        return []
    devs = {a.device.index if a.device.index is not None else torch.cuda.current_device()
            for v in views for a in v if isinstance(a, torch.Tensor) and a.is_cuda}
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.is_cuda:
                devs.add(t.device.index)
    return sorted(devs)


def _rng_state(devices):
    return torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in devices]


def _set_rng_state(state, devices) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in zip(devices, cuda):
        torch.cuda.set_rng_state(s, d)


_NORM_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


class _NormBufferGuard:
    """Puts back the running statistics of the norm layers in training mode that a no-grad
    pass updates: those found in the given modules (saved up front) and, inside ``watch()``,
    any other that runs (a global forward pre-hook: norm layers a plain function calls).
    ``restore()`` copies the saved values back. Norm layers that run outside ``watch()``
    (a target encoder's) keep their updates."""

    def __init__(self, modules):
        self.saved: dict[int, tuple[nn.Module, dict]] = {}
        for m in modules:
            for sub in m.modules():
                self._save(sub)

    def _save(self, m: nn.Module) -> None:
        if (id(m) in self.saved or not isinstance(m, nn.modules.batchnorm._NormBase)
                or not (m.training and m.track_running_stats)):
            return
        bufs = {n: getattr(m, n) for n in _NORM_BUFFERS}
        if any(b is None or nn.parameter.is_lazy(b) for b in bufs.values()):
            return
        self.saved[id(m)] = (m, {n: b.detach().clone() for n, b in bufs.items()})

    @contextlib.contextmanager
    def watch(self):
        hook = nn.modules.module.register_module_forward_pre_hook(lambda m, args: self._save(m))
        try:
            yield
        finally:
            hook.remove()

    def restore(self) -> None:
        with torch.no_grad():
            for m, bufs in self.saved.values():
                for n, b in bufs.items():
                    getattr(m, n).copy_(b)


def _is_ddp(e) -> bool:
    return isinstance(e, nn.parallel.DistributedDataParallel)


# -- phases ---------------------------------------------------------------------------------
class _Call(NamedTuple):
    """One encoder call: the encoder and, for each view it embeds (several with concat_views),
    (view, rows, the view's chunk of the encoder's arguments, before the transform)."""
    encoder: Callable
    chunks: list

    @property
    def parts(self) -> list[tuple[int, int]]:
        return [(v, r) for v, r, _ in self.chunks]

    @property
    def rows(self) -> int:
        return sum(r for _, r, _ in self.chunks)


def _plan(views, encs, chunk_size: int, concat_views: bool) -> list[_Call]:
    """The encoder calls in order: per chunk (all views in one call), or per view, then chunk."""
    n = next(a.shape[0] for a in views[0] if isinstance(a, torch.Tensor) and a.dim() > 0)
    slices = [slice(s, min(s + chunk_size, n)) for s in range(0, n, chunk_size)]
    if concat_views:
        if any(e is not encs[0] for e in encs):
            raise ValueError("encoder: concat_views=True runs one shared encoder on all views at once; "
                             "pass a single encoder")
        return [_Call(encs[0], [(v, sl.stop - sl.start, _slice(views[v], sl)) for v in range(len(views))])
                for sl in slices]
    return [_Call(encs[v], [(v, sl.stop - sl.start, _slice(views[v], sl))])
            for v in range(len(views)) for sl in slices]


def _arguments(call: _Call, transforms, where: str) -> tuple:
    """The call's encoder arguments: each view's chunk through that view's transform, the
    views concatenated argument by argument when the call holds several."""
    args = [_transformed(transforms[v], a, r, where) for v, r, a in call.chunks]
    return args[0] if len(args) == 1 else _concat_args(args)


def _collect(per_view: dict, call: _Call, out, where: str) -> None:
    """Appends a call's (rows, ...) output to per_view[v], split by view."""
    out = _embedding(out, call.rows, where)
    for (v, _), piece in zip(call.parts, out.split([r for _, r in call.parts])):
        per_view.setdefault(v, []).append(piece)


def _embed(plan, transforms, devices, save_rng: bool, guard=None, target=None):
    """Phase 1, without autograd: (per-view lists of embedding chunks, per-view lists of the
    target encoder's outputs, per-call RNG states). The transform and the encoder run inside
    ``guard.watch()``, the target encoder after them, outside it."""
    per_view: dict[int, list] = {}
    per_target: dict[int, list] = {}
    states = []
    watch = guard.watch if guard is not None else contextlib.nullcontext
    with torch.no_grad():
        for i, call in enumerate(plan):
            states.append(_rng_state(devices) if save_rng else None)
            with watch():
                args = _arguments(call, transforms, f"call {i}")
                _collect(per_view, call, call.encoder(*args), f"call {i}")
            if target is not None:
                _collect(per_target, call, target(*args), f"call {i}, target_encoder")
            del args
    return per_view, per_target, states


def _split_loss(out):
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0], tuple(out[1:])
    raise ValueError(f"loss_fn must return a scalar tensor or a tuple (loss, ...), got {type(out).__name__}")


def _detached(x):
    if isinstance(x, torch.Tensor):
        return x.detach()
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_detached(v) for v in x)
    return x


def chunked_backward(encoder: Union[Callable, Sequence[Callable]], inputs: Inputs,
                     loss_fn: Callable, chunk_size: int, *, concat_views: bool = False,
                     transform: Union[None, Callable, Sequence[Optional[Callable]]] = None,
                     target_encoder: Optional[Callable] = None, preserve_rng_state: bool = True):
    """``loss_fn(*embeddings).backward()`` with the encoder run ``chunk_size`` samples at a
    time: parameter gradients of the whole batch, activation memory of one chunk.

    Args:
        encoder: an ``nn.Module`` or any callable, shared by all views, or a list with one per
            view (CLIP's two towers). Called as ``encoder(*args)`` on a chunk of a view's
            arguments; returns (rows, D) embeddings. It runs twice per chunk, so it must not
            modify its inputs in place.
        inputs: the batch, per view: a tensor (one view), or a list/tuple with one entry per
            view, each a tensor or a tuple of the encoder's arguments (e.g. ``(ids, mask)``;
            tensors are sliced along dim 0, anything else is passed as is). All views hold the
            same samples (same batch size). A single view with several arguments is
            ``[(ids, mask)]``.
        loss_fn: ``loss_fn(z_view0, z_view1, ...)`` on the full batch's embeddings (in input
            order; with ``target_encoder``, its outputs follow: ``loss_fn(z_0, z_1, t_0, t_1)``)
            → a scalar loss, or a tuple ``(loss, stats, ...)`` (e.g. a fastntxent loss
            with ``return_stats=True``). Anything else it needs (labels, MoCo's keys and
            queue) it closes over; its own parameters (a learnable temperature) get their
            gradient.
        chunk_size: samples per encoder call (>= 1; the last chunk may be smaller; a
            chunk_size >= the batch is one call per view: a plain backward plus one
            no-grad forward).
        concat_views: run the shared encoder once per chunk on the chunk's rows of all views
            concatenated (``encoder(torch.cat([x1[c], x2[c]]))``, as SimCLR implementations
            call ``model(torch.cat([x1, x2]))``): BatchNorm then normalises over both views of
            the chunk's samples, and a chunk_size >= the batch is exactly the unchunked
            ``model(torch.cat([x1, x2]))``. Default: one call per view per chunk.
        transform: applied to each view's chunk right before the encoder, in both passes:
            ``transform(*chunk_args)`` → the encoder's arguments for the same rows (a tensor
            or a tuple; with concat_views each view is transformed, then concatenated). One
            callable shared by all views, or a list with one per view (None: as is). For
            data augmentation on the fly: the inputs are the raw batch, once per view
            (``[raw, raw]``), and only one chunk's augmented views ever exist; the re-run
            starts from the chunk's saved random state, so it draws the first pass's views
            bit for bit, as long as the transform draws from torch's global CPU / CUDA
            generators (``torch.rand``, not a ``torch.Generator`` of its own or NumPy).
        target_encoder: a second encoder run without gradient, once per call in the first
            pass, right after ``encoder`` on the same (transformed) arguments: MoCo's
            momentum key encoder or BYOL's target network seeing exactly the views the
            encoder sees. Its (rows, D') outputs, per view, are passed to ``loss_fn`` after
            the embeddings, without gradient. It runs once per chunk, so its norm layers
            update their running statistics once per chunk and keep them.
        preserve_rng_state: restore each chunk's random state for its re-run (needed for
            exact gradients with dropout or a random transform; on by default, as in
            torch.utils.checkpoint).

    Returns what ``loss_fn`` returns, detached: the loss, or ``(loss, stats, ...)``.

    Gradients accumulate into ``.grad`` like ``.backward()`` (zero them first). Semantics of
    BatchNorm, dropout, autocast and DDP: see the module docstring.

    Example (SimCLR, batch 8192, 256 images at a time):
        >>> loss_fn = fx.NTXentLoss(0.2, learnable_temperature=True)
        >>> opt.zero_grad()
        >>> loss, stats = chunked_backward(model, [x1, x2], lambda z1, z2: loss_fn(z1, z2, return_stats=True),
        ...                                chunk_size=256, concat_views=True)
        >>> opt.step()
    """
    chunk_size = _check_chunk_size(chunk_size)
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if target_encoder is not None and not callable(target_encoder):
        raise ValueError(f"target_encoder must be callable or None, got {type(target_encoder).__name__}")
    views = _views(inputs)
    encs = _encoders(encoder, len(views))
    transforms = _transforms(transform, len(views))
    plan = _plan(views, encs, chunk_size, concat_views)
    modules = _modules(encs)
    devices = _cuda_devices(views, modules) if preserve_rng_state else []

    # 1. embeddings without autograd; norm-layer running statistics left as they were
    guard = _NormBufferGuard(modules)
    try:
        per_view, per_target, states = _embed(plan, transforms, devices, preserve_rng_state, guard,
                                              target_encoder)
    finally:
        guard.restore()
    z = [torch.cat(per_view[v]).requires_grad_(True) for v in range(len(views))]
    targets = [torch.cat(per_target[v]) for v in range(len(views))] if target_encoder is not None else []
    del per_view, per_target

    # 2. the loss on the full batch, its gradient for every embedding (and the loss's parameters)
    out = loss_fn(*z, *targets)
    loss, rest = _split_loss(out)
    if loss.dim() != 0:
        raise ValueError(f"loss_fn must return a scalar (0-dim) loss, got shape {tuple(loss.shape)} "
                         "(use reduction='mean' or 'sum')")
    if not loss.requires_grad:
        raise ValueError("loss_fn's loss does not depend on the embeddings (it has no gradient)")
    loss.backward()
    grads = [t.grad for t in z]
    result = (loss.detach(),) + _detached(rest) if rest is not None else loss.detach()
    del out, loss, rest, z, targets

    # 3. each chunk again with autograd, its random state restored, the cached gradient pushed in
    last_call = {id(call.encoder): i for i, call in enumerate(plan)
                 if any(grads[v] is not None for v, _ in call.parts)}
    offsets = [0] * len(views)
    with torch.random.fork_rng(devices=devices, enabled=preserve_rng_state):
        for i, call in enumerate(plan):
            enc, g = call.encoder, []
            for v, r in call.parts:
                gv = grads[v]
                g.append(None if gv is None else gv[offsets[v]:offsets[v] + r])
                offsets[v] += r
            if all(x is None for x in g):
                continue  # the loss does not use these rows' embeddings
            sync = contextlib.nullcontext()
            if _is_ddp(enc) and last_call[id(enc)] != i:
                sync = enc.no_sync()
            with sync:
                if preserve_rng_state:
                    _set_rng_state(states[i], devices)
                emb = _embedding(enc(*_arguments(call, transforms, f"call {i}, re-run")), call.rows,
                                 f"call {i}, re-run")
                if not emb.requires_grad:
                    continue  # nothing trainable in this encoder
                g = torch.cat([x if x is not None else torch.zeros((r,) + emb.shape[1:], dtype=emb.dtype,
                                                                   device=emb.device)
                               for x, (_, r) in zip(g, call.parts)])
                emb.backward(g.to(emb.dtype))
            del emb, g
    return result


def chunked_forward(encoder: Union[Callable, Sequence[Callable]], inputs: Inputs, chunk_size: int, *,
                    concat_views: bool = False,
                    transform: Union[None, Callable, Sequence[Optional[Callable]]] = None):
    """The embeddings of the batch computed ``chunk_size`` samples at a time without autograd
    (MoCo's key encoder, evaluation). Same ``encoder`` / ``inputs`` / ``concat_views`` /
    ``transform`` as ``chunked_backward`` (one pass: a random transform draws each chunk's
    views once, from the global generators); returns a tensor when ``inputs`` is a tensor,
    else a list with one (M, D) tensor per view. Norm layers in training mode update their
    running statistics once per chunk (a single pass)."""
    chunk_size = _check_chunk_size(chunk_size)
    views = _views(inputs)
    plan = _plan(views, _encoders(encoder, len(views)), chunk_size, concat_views)
    per_view, _, _ = _embed(plan, _transforms(transform, len(views)), [], False)
    out = [torch.cat(per_view[v]) for v in range(len(views))]
    return out[0] if isinstance(inputs, torch.Tensor) else out
