"""fastntxent.chunked (embedding-gradient caching): chunked_backward gives the loss and the
parameter gradients of plain autograd, in float64 to 1e-10 relative.

The reference ("plain") is autograd over the same computation: every chunk's encoder call
with grad, in the same order and from the same random state, the embeddings concatenated,
the loss, one backward. For an encoder without BatchNorm in training mode that is also the
unchunked encoder(x) over the whole batch (tested separately); with BatchNorm it is the
per-chunk normalisation chunked_backward documents.
"""
from __future__ import annotations

import os
import weakref

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastntxent as fx
from fastntxent import _extension
from fastntxent.chunked import chunked_backward, chunked_forward
from helpers import assert_rel_close

TOL = 1e-10
N, D_IN, D = 10, 6, 5
CROSS = "cpu" if _extension.has_cross_kernels() else "reference"


def _mlp(dropout=0.0, bn=False, seed=1):
    torch.manual_seed(seed)
    layers = [nn.Linear(D_IN, 16)]
    if bn:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(16, D)]
    return nn.Sequential(*layers).double()


def _views(n=N, views=2, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, D_IN, generator=g, dtype=torch.float64) for _ in range(views)]


def _grads(*modules):
    out = {}
    for i, m in enumerate(modules):
        for name, p in m.named_parameters():
            out[f"{i}.{name}"] = None if p.grad is None else p.grad.clone()
    return out


def _zero(*modules):
    for m in modules:
        for p in m.parameters():
            p.grad = None


def _plain(encs, inputs, loss_fn, chunk, concat_views=False):
    """Autograd over each chunk's encoder call (all graphs alive at once), then one backward."""
    n = inputs[0].shape[0]
    sl = [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]
    if concat_views:
        parts = [[] for _ in inputs]
        for s in sl:
            out = encs[0](torch.cat([x[s] for x in inputs]))
            for v, piece in enumerate(out.split([s.stop - s.start] * len(inputs))):
                parts[v].append(piece)
        z = [torch.cat(p) for p in parts]
    else:
        z = [torch.cat([encs[v](x[s]) for s in sl]) for v, x in enumerate(inputs)]
    out = loss_fn(*z)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach()


def _compare(encs, inputs, loss_fn, chunk, params=(), concat_views=False, seed=5):
    """chunked_backward vs _plain from the same random state: loss and all gradients."""
    mods = [e for e in dict.fromkeys(encs)] + list(params)
    _zero(*mods)
    torch.manual_seed(seed)
    expected_loss = _plain(encs, inputs, loss_fn, chunk, concat_views)
    rng_after_plain = torch.get_rng_state()
    expected = _grads(*mods)
    _zero(*mods)
    torch.manual_seed(seed)
    enc_arg = encs[0] if all(e is encs[0] for e in encs) else list(encs)
    out = chunked_backward(enc_arg, inputs, loss_fn, chunk, concat_views=concat_views)
    loss = out[0] if isinstance(out, tuple) else out
    assert not loss.requires_grad
    assert_rel_close(loss, expected_loss, TOL, "loss")
    got = _grads(*mods)
    for k, g in expected.items():
        assert g is not None, k
        assert_rel_close(got[k], g, TOL, f"grad {k}")
    assert torch.equal(torch.get_rng_state(), rng_after_plain), "global RNG state differs from a plain run's"
    return out


CHUNKS = [1, 3, 4, 7, N, N + 5]  # dividing and not, one chunk, more than the batch


@pytest.mark.parametrize("chunk", CHUNKS)
def test_nt_xent_learnable_temperature(chunk):
    enc = _mlp()
    loss_mod = fx.NTXentLoss(0.5, learnable_temperature=True).double()
    out = _compare([enc, enc], _views(), lambda z1, z2: loss_mod(z1, z2, return_stats=True), chunk,
                   params=[loss_mod])
    assert isinstance(out, tuple) and "top1_accuracy" in out[1]
    assert all(not v.requires_grad for v in out[1].values())


@pytest.mark.parametrize("chunk", [3, N])
def test_equals_unchunked_without_batchnorm(chunk):
    """No BatchNorm, no dropout: the gradient of the unchunked loss(encoder(x1), encoder(x2))."""
    enc = _mlp()
    x1, x2 = _views()
    fx.nt_xent(enc(x1), enc(x2), 0.5).backward()
    expected = _grads(enc)
    _zero(enc)
    loss = chunked_backward(enc, [x1, x2], lambda a, b: fx.nt_xent(a, b, 0.5), chunk)
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    for k, g in expected.items():
        assert_rel_close(_grads(enc)[k], g, TOL, k)


@pytest.mark.parametrize("chunk", [3, 7])
def test_supcon_labels_in_batch_order(chunk):
    """The embeddings reach the loss in input order, so the labels are the batch's."""
    enc = _mlp()
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    loss_mod = fx.SupConLoss(0.1, learnable_temperature=True).double()
    _compare([enc, enc], _views(),
             lambda z1, z2: loss_mod(torch.cat([z1, z2]), torch.cat([labels, labels]), return_stats=True),
             chunk, params=[loss_mod])


@pytest.mark.parametrize("chunk", [1, 4, N])
def test_info_nce_queue_query_side_chunked(chunk):
    """MoCo: the key encoder runs without grad (chunked_forward), only the queries are chunked."""
    q_enc, k_enc = _mlp(seed=1), _mlp(seed=3)
    for p in k_enc.parameters():
        p.requires_grad_(False)
    xq, xk = _views()
    keys = chunked_forward(k_enc, xk, 3)
    assert torch.allclose(keys, k_enc(xk), rtol=0, atol=1e-14)
    queue = torch.randn(17, D, dtype=torch.float64)
    loss_mod = fx.InfoNCELoss(0.2, learnable_temperature=True, backend=CROSS).double()
    _compare([q_enc], [xq], lambda q: loss_mod(q, keys, queue, return_stats=True), chunk, params=[loss_mod])


@pytest.mark.parametrize("chunk", [2, 3, N])
def test_clip_two_towers(chunk):
    img = _mlp(seed=1)
    torch.manual_seed(4)
    txt = nn.Sequential(nn.Linear(9, 12), nn.GELU(), nn.Linear(12, D)).double()
    g = torch.Generator().manual_seed(8)
    xa, xb = torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randn(N, 9, generator=g, dtype=torch.float64)
    loss_mod = fx.ClipLoss(backend=CROSS).double()
    _compare([img, txt], [xa, xb], lambda a, b: loss_mod(a, b), chunk, params=[loss_mod])
    assert loss_mod.log_logit_scale.grad is not None and loss_mod.log_logit_scale.grad != 0


@pytest.mark.parametrize("chunk", [3, 4])
def test_dropout_exact_thanks_to_rng_restore(chunk):
    enc = _mlp(dropout=0.5)
    loss_fn = lambda z1, z2: fx.nt_xent(z1, z2, 0.5)  # noqa: E731
    _compare([enc, enc], _views(), loss_fn, chunk)
    # without the restore the re-run draws other masks: the gradient is wrong
    _zero(enc)
    torch.manual_seed(5)
    _plain([enc, enc], _views(), loss_fn, chunk)
    expected = _grads(enc)
    _zero(enc)
    torch.manual_seed(5)
    chunked_backward(enc, _views(), loss_fn, chunk, preserve_rng_state=False)
    assert any(not torch.allclose(_grads(enc)[k], g) for k, g in expected.items())


@pytest.mark.parametrize("concat_views", [False, True])
@pytest.mark.parametrize("chunk", [4, 6, N])  # (not 3: a last chunk of 1 row cannot be batch-normalised)
def test_batchnorm_per_chunk_and_running_stats_once(chunk, concat_views):
    """Per-chunk BatchNorm statistics (the gradient of that computation, exactly); the running
    statistics equal those of feeding each chunk once in training mode."""
    enc = _mlp(bn=True)
    plain_enc = _mlp(bn=True)
    loss_fn = lambda z1, z2: fx.nt_xent(z1, z2, 0.5)  # noqa: E731
    x = _views()
    _plain([plain_enc, plain_enc], x, loss_fn, chunk, concat_views)  # each chunk once, train mode
    expected = _grads(plain_enc)
    chunked_backward(enc, x, loss_fn, chunk, concat_views=concat_views)
    for k, g in expected.items():
        assert_rel_close(_grads(enc)[k], g, TOL, k)
    bn, ref = enc[1], plain_enc[1]
    calls = -(-N // chunk) * (1 if concat_views else 2)
    assert int(bn.num_batches_tracked) == calls
    assert torch.equal(bn.running_mean, ref.running_mean) and torch.equal(bn.running_var, ref.running_var)


def test_batchnorm_one_chunk_concat_views_is_the_unchunked_model_call():
    """concat_views and chunk >= batch: exactly model(torch.cat([x1, x2])) (SimCLR's call)."""
    enc, ref = _mlp(bn=True), _mlp(bn=True)
    x1, x2 = _views()
    z1, z2 = ref(torch.cat([x1, x2])).chunk(2)
    fx.nt_xent(z1, z2, 0.5).backward()
    chunked_backward(enc, [x1, x2], lambda a, b: fx.nt_xent(a, b, 0.5), 64, concat_views=True)
    for k, g in _grads(ref).items():
        assert_rel_close(_grads(enc)[k], g, TOL, k)
    assert torch.equal(enc[1].running_var, ref[1].running_var) and int(enc[1].num_batches_tracked) == 1


def test_batchnorm_inside_a_plain_function_is_found():
    """A lambda over modules: the norm layers it calls are protected too (the running stats
    are updated once per chunk, not twice)."""
    enc, ref = _mlp(bn=True), _mlp(bn=True)
    x = _views()
    chunked_backward(lambda t: enc(t) * 1.0, x, lambda a, b: fx.nt_xent(a, b, 0.5), 4)
    for v in x:
        for s in range(0, N, 4):
            ref(v[s:s + 4])
    assert int(enc[1].num_batches_tracked) == 6
    assert torch.equal(enc[1].running_mean, ref[1].running_mean)


def test_gradients_accumulate_like_backward():
    enc = _mlp()
    x = _views()
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    chunked_backward(enc, x, loss_fn, 3)
    once = _grads(enc)
    chunked_backward(enc, x, loss_fn, 4)
    for k, g in once.items():
        assert_rel_close(_grads(enc)[k], 2 * g, TOL, k)


def test_tuple_of_arguments_per_view():
    """A view may be a tuple of the encoder's arguments (tensors sliced, others passed as is)."""
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D).double()

    def enc(x, mask, scale):
        return lin(x * mask) * scale

    x = _views()
    masks = [(torch.rand(N, D_IN) > 0.3).double() for _ in range(2)]
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    fx.nt_xent(enc(x[0], masks[0], 2.0), enc(x[1], masks[1], 2.0), 0.5).backward()
    expected = _grads(lin)
    _zero(lin)
    chunked_backward(enc, [(x[0], masks[0], 2.0), (x[1], masks[1], 2.0)], loss_fn, 3)
    for k, g in expected.items():
        assert_rel_close(_grads(lin)[k], g, TOL, k)


def test_one_autograd_graph_alive_at_a_time():
    """The re-runs build one chunk's graph at a time: when a chunk's forward with grad starts,
    the previous chunk's output (and so its graph) is gone; peak saved activations are one
    chunk's (counted with saved_tensors_hooks)."""
    class Probe(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _mlp()
            self.alive, self.grad_calls, self.nograd_calls = [], 0, 0

        def forward(self, x):
            if torch.is_grad_enabled():
                self.grad_calls += 1
                assert all(r() is None for r in self.alive), "a previous chunk's graph is still alive"
            else:
                self.nograd_calls += 1
            out = self.net(x)
            if torch.is_grad_enabled():
                self.alive.append(weakref.ref(out))
            return out

    enc = Probe()
    n, chunk = 64, 8
    x = _views(n)
    chunked_backward(enc, x, lambda a, b: fx.nt_xent(a, b, 0.5), chunk)
    assert enc.grad_calls == enc.nograd_calls == 2 * n // chunk

    def peak_saved_bytes(fn, params):
        live, state = {}, {"now": 0, "peak": 0}
        param_storages = {p.untyped_storage().data_ptr() for p in params}

        class Handle:
            def __init__(self, t):
                self.t, self.key = t, t.untyped_storage().data_ptr()
                if self.key not in param_storages:  # parameters (and their views) are not activations
                    live[self.key] = live.get(self.key, 0) + 1
                    if live[self.key] == 1:
                        state["now"] += t.untyped_storage().nbytes()
                        state["peak"] = max(state["peak"], state["now"])
                    self.counted = True
                else:
                    self.counted = False

            def __del__(self):
                if self.counted:
                    live[self.key] -= 1
                    if live[self.key] == 0:
                        state["now"] -= self.t.untyped_storage().nbytes()

        with torch.autograd.graph.saved_tensors_hooks(Handle, lambda h: h.t):
            fn()
        return state["peak"]

    torch.manual_seed(0)  # wide hidden layers: activations dominate the loss's O(n·D)
    net = nn.Sequential(nn.Linear(D_IN, 512), nn.Tanh(), nn.Linear(512, 512), nn.Tanh(),
                        nn.Linear(512, D)).double()
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    plain = peak_saved_bytes(lambda: loss_fn(net(x[0]), net(x[1])).backward(), net.parameters())
    chunked = peak_saved_bytes(lambda: chunked_backward(net, x, loss_fn, chunk), net.parameters())
    # plain keeps 2n rows of activations, chunked one chunk's (8 of the 2n = 128 rows; the
    # loss's own saved tensors are O(n·D), small here): measured 1087008 B against 68608 B
    assert chunked <= 1.1 * plain * chunk / (2 * n), (chunked, plain)
    print(f"peak saved activations: plain {plain} B, chunked {chunked} B")


@pytest.mark.parametrize("chunk", [3, N])
def test_cpu_bf16_autocast(chunk):
    """Under autocast the embeddings and the loss are those of the plain bf16 run (same
    values); the gradients differ at bf16 rounding only: a plain backward sums the chunks'
    weight gradients in bf16 (in the autocast copy of the weight), chunked_backward's separate
    backwards accumulate them in the parameter's float32. Both are checked against float32."""
    torch.manual_seed(1)
    enc = nn.Sequential(nn.Linear(D_IN, 32), nn.GELU(), nn.Linear(32, 16))
    x = [v.float() for v in _views()]
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    _plain([enc, enc], x, loss_fn, chunk)
    fp32 = _grads(enc)
    _zero(enc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_ref = _plain([enc, enc], x, loss_fn, chunk)
    plain_bf16 = _grads(enc)
    _zero(enc)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_backward(enc, x, loss_fn, chunk)
    assert torch.equal(loss, loss_ref)
    for k, g in fp32.items():
        assert_rel_close(_grads(enc)[k], g, 2e-2, k)
        assert_rel_close(plain_bf16[k], g, 2e-2, k)


class _Recorder:
    """A random transform (per-row noise from the global generator, as an augmentation
    draws it) that records every chunk it makes: (grad enabled?, input rows, output)."""

    def __init__(self):
        self.calls = []

    def __call__(self, x):
        out = x + torch.randn_like(x)
        self.calls.append((torch.is_grad_enabled(), x.shape[0], out.detach().clone()))
        return out

    def made(self, grad: bool) -> list:
        return [out for g, _, out in self.calls if g == grad]


@pytest.mark.parametrize("concat_views", [False, True])
@pytest.mark.parametrize("chunk", [3, 4, N])
def test_transform_per_chunk_same_views_in_both_passes(chunk, concat_views):
    """Augmentation on the fly: the inputs are the raw batch (once per view), the transform
    makes each chunk's view in the no-grad pass and again in the re-run: bit for bit the same
    views (the chunk's random state restored), one chunk's at a time; the gradients are those
    of the unchunked loss on the views the first pass made."""
    enc = _mlp()
    raw = _views(views=1)[0]
    t = _Recorder()
    loss_fn = lambda z1, z2: fx.nt_xent(z1, z2, 0.5)  # noqa: E731
    torch.manual_seed(3)
    loss = chunked_backward(enc, [raw, raw], loss_fn, chunk, concat_views=concat_views, transform=t)
    got = _grads(enc)
    first, rerun = t.made(grad=False), t.made(grad=True)
    assert len(first) == len(rerun) == 2 * -(-N // chunk)
    assert all(torch.equal(a, b) for a, b in zip(first, rerun))
    assert max(rows for _, rows, _ in t.calls) <= chunk
    # the views of the first pass, per view (call order: per chunk both views, or per view)
    per_view = [first[0::2], first[1::2]] if concat_views else [first[:len(first) // 2], first[len(first) // 2:]]
    v1, v2 = (torch.cat(p) for p in per_view)
    assert not torch.equal(v1, v2)  # (two different views of the same rows)
    _zero(enc)
    expected_loss = loss_fn(enc(v1), enc(v2))
    expected_loss.backward()
    assert_rel_close(loss, expected_loss, TOL, "loss")
    for k, g in _grads(enc).items():
        assert_rel_close(got[k], g, TOL, f"grad {k}")


def test_transform_without_rng_restore_draws_other_views():
    """(What the restore buys: without it the re-run's views are new draws.)"""
    t = _Recorder()
    raw = _views(views=1)[0]
    chunked_backward(_mlp(), [raw, raw], lambda a, b: fx.nt_xent(a, b, 0.5), 4, transform=t,
                     preserve_rng_state=False)
    assert not any(torch.equal(a, b) for a, b in zip(t.made(grad=False), t.made(grad=True)))


def test_transform_per_view_and_chunked_forward():
    """One transform per view (None: as is); chunked_forward applies it per chunk, once."""
    enc = _mlp()
    x1, x2 = _views()
    double = lambda x: 2 * x  # noqa: E731
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    loss_fn(enc(2 * x1), enc(x2)).backward()
    expected = _grads(enc)
    _zero(enc)
    chunked_backward(enc, [x1, x2], loss_fn, 3, transform=[double, None])
    for k, g in expected.items():
        assert_rel_close(_grads(enc)[k], g, TOL, k)
    t = _Recorder()
    torch.manual_seed(4)
    got = chunked_forward(enc, x1, 4, transform=t)
    torch.manual_seed(4)
    with torch.no_grad():
        ref = torch.cat([enc(x1[s:s + 4] + torch.randn_like(x1[s:s + 4])) for s in range(0, N, 4)])
    assert torch.equal(got, ref) and len(t.calls) == 3


@pytest.mark.parametrize("chunk", [4, N])
def test_target_encoder_sees_the_encoders_views(chunk):
    """target_encoder (MoCo's key encoder) runs once per call on the encoder's transformed
    arguments; its outputs reach loss_fn after the embeddings, without gradient; its
    BatchNorm statistics are updated once per call and kept."""
    enc = _mlp(bn=True)
    target, ref = _mlp(bn=True, seed=3), _mlp(bn=True, seed=3)
    seen = {"enc": [], "target": []}
    enc.register_forward_pre_hook(lambda m, a: seen["enc"].append((torch.is_grad_enabled(), a[0].clone())))
    target.register_forward_pre_hook(lambda m, a: seen["target"].append((torch.is_grad_enabled(), a[0].clone())))
    raw = _views(views=1)[0]
    got = {}

    def loss_fn(z1, z2, t1, t2):
        got.update(t1=t1, t2=t2)
        assert z1.requires_grad and not t1.requires_grad and not t2.requires_grad
        return fx.nt_xent(z1, t2, 0.5) + fx.nt_xent(z2, t1, 0.5)

    chunked_backward(enc, [raw, raw], loss_fn, chunk, concat_views=True, transform=_Recorder(),
                     target_encoder=target)
    first = [x for g, x in seen["enc"] if not g]
    targets = [x for g, x in seen["target"]]
    assert len(first) == len(targets) == -(-N // chunk) and not any(g for g, _ in seen["target"])
    assert all(torch.equal(a, b) for a, b in zip(first, targets))
    with torch.no_grad():  # each call's rows: view 1's chunk, then view 2's
        outs = [ref(x).split(x.shape[0] // 2) for x in targets]
    assert torch.equal(got["t1"], torch.cat([o[0] for o in outs]))
    assert torch.equal(got["t2"], torch.cat([o[1] for o in outs]))
    assert int(target[1].num_batches_tracked) == len(targets)
    assert torch.equal(target[1].running_mean, ref[1].running_mean)
    assert int(enc[1].num_batches_tracked) == len(first)  # (the encoder's: once per chunk too)


def test_bad_arguments_name_the_argument():
    enc = _mlp()
    x = _views()
    loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5)  # noqa: E731
    for bad in (0, -1, 2.5, True, None, "4"):
        with pytest.raises(ValueError, match="chunk_size"):
            chunked_backward(enc, x, loss_fn, bad)
    with pytest.raises(ValueError, match=r"inputs: the views have different batch sizes \[10, 9\]"):
        chunked_backward(enc, [x[0], x[1][:9]], loss_fn, 3)
    with pytest.raises(ValueError, match=r"inputs\[0\].*different batch sizes"):
        chunked_backward(lambda a, b: enc(a), [(x[0], x[1][:9])], lambda z: z.sum(), 3)
    with pytest.raises(ValueError, match="inputs"):
        chunked_backward(enc, [], loss_fn, 3)
    with pytest.raises(ValueError, match="inputs"):
        chunked_backward(enc, x[0][:0], lambda z: z.sum(), 3)
    with pytest.raises(ValueError, match="encoder: 3 encoders given for 2 views"):
        chunked_backward([enc, enc, enc], x, loss_fn, 3)
    with pytest.raises(ValueError, match="encoder must be callable"):
        chunked_backward(42, x, loss_fn, 3)
    with pytest.raises(ValueError, match="encoder returned shape"):
        chunked_backward(lambda t: enc(t)[:1], x, loss_fn, 3)
    with pytest.raises(ValueError, match="encoder: concat_views=True"):
        chunked_backward([enc, _mlp()], x, loss_fn, 3, concat_views=True)
    with pytest.raises(ValueError, match="loss_fn must return a scalar"):
        chunked_backward(enc, x, lambda a, b: fx.nt_xent(a, b, 0.5, reduction="none"), 3)
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        chunked_backward(enc, x, None, 3)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_forward(enc, x, 0)
    with pytest.raises(ValueError, match="transform: 3 transforms given for 2 views"):
        chunked_backward(enc, x, loss_fn, 3, transform=[None, None, None])
    with pytest.raises(ValueError, match="transform must be callable"):
        chunked_backward(enc, x, loss_fn, 3, transform=[None, 7])
    with pytest.raises(ValueError, match=r"transform returned batch sizes \[2\] for a chunk of 3 rows"):
        chunked_backward(enc, x, loss_fn, 3, transform=lambda t: t[:2])
    with pytest.raises(ValueError, match="target_encoder must be callable"):
        chunked_backward(enc, x, loss_fn, 3, target_encoder="keys")


# -- DistributedDataParallel, gloo, 2 processes --------------------------------------------
WORLD = 2


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        x = [v[rank * N:(rank + 1) * N] for v in _views(WORLD * N)]
        ddp = nn.parallel.DistributedDataParallel(_mlp())
        loss_fn = lambda a, b: fx.nt_xent(a, b, 0.5, gather=True)  # noqa: E731
        counts = {"hooks": 0}
        # count the all-reduces: DDP's communication hook runs once per bucket and synchronised backward
        def hook(state, bucket):
            counts["hooks"] += 1
            from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
            return allreduce_hook(dist.group.WORLD, bucket)
        ddp.register_comm_hook(None, hook)
        loss = chunked_backward(ddp, x, loss_fn, 3)
        res = {"loss": loss, "hooks": counts["hooks"],
               "grads": {n: p.grad.clone() for n, p in ddp.module.named_parameters()}}
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_gloo(tmp_path):
    """Each rank chunks its local batch (gather=True loss); DDP all-reduces once, at the last
    chunk's backward (no_sync for the others); the averaged gradient is the single-process
    gradient of the global batch."""
    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    enc = _mlp()
    x = _views(WORLD * N)
    loss = fx.nt_xent(enc(x[0]), enc(x[1]), 0.5)
    loss.backward()
    for r in res:
        assert_rel_close(r["loss"], loss, 1e-12, "loss")
        assert r["hooks"] == 1, f"{r['hooks']} synchronised backward passes (bucket all-reduces), expected 1"
        for n, p in enc.named_parameters():
            assert_rel_close(r["grads"][n], p.grad, TOL, f"grad {n}")
