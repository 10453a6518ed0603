"""Category: the nn.Modules (NTXentLoss, SupConLoss, InfoNCELoss, ClipLoss, MemoryQueue) —
constructor arguments beyond tests/test_argument_checks.py, forward inputs, MemoryQueue's
enqueue with keys of every wrong kind and its ring-buffer arithmetic, and state_dict round
trips of every module (learnable temperature / logit scale, queue buffers and pointer), through
torch.save/torch.load(weights_only=True), into a fresh module that gives the same loss.
"""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import fastntxent as fx
from adv_common import LABELS, NAN, INF, assert_rel_close, needs_ext

TEMPERATURE_MODULES = [fx.NTXentLoss, fx.SupConLoss, fx.InfoNCELoss]


def _ctor_cases():
    cases = []
    for cls in TEMPERATURE_MODULES:
        n = cls.__name__
        cases += [
            pytest.param(lambda c=cls: c(temperature=0.0), ValueError, "temperature", id=f"{n}-temperature-0"),
            pytest.param(lambda c=cls: c(temperature=-0.1), ValueError, "temperature", id=f"{n}-temperature-negative"),
            pytest.param(lambda c=cls: c(temperature=None), TypeError, "temperature", id=f"{n}-temperature-none"),
            pytest.param(lambda c=cls: c(temperature=torch.tensor(0.5)), TypeError, "temperature", id=f"{n}-temperature-tensor"),
            pytest.param(lambda c=cls: c(temperature=0.5 + 0j), TypeError, "temperature", id=f"{n}-temperature-complex"),
            pytest.param(lambda c=cls: c(temperature=np.float32(0.5)), TypeError, "temperature", id=f"{n}-temperature-np32"),
            pytest.param(lambda c=cls: c(temperature=-INF), ValueError, "temperature", id=f"{n}-temperature--inf"),
            pytest.param(lambda c=cls: c(reduction=None), ValueError, "reduction", id=f"{n}-reduction-none"),
            pytest.param(lambda c=cls: c(reduction="MEAN"), ValueError, "reduction", id=f"{n}-reduction-upper"),
            pytest.param(lambda c=cls: c(backend=None), ValueError, "backend", id=f"{n}-backend-none"),
            pytest.param(lambda c=cls: c(normalize=1), TypeError, "normalize", id=f"{n}-normalize-int"),
            pytest.param(lambda c=cls: c(learnable_temperature="True"), TypeError, "learnable_temperature",
                         id=f"{n}-learnable-str"),
            pytest.param(lambda c=cls: c(gather=0), TypeError, "gather", id=f"{n}-gather-int"),
            pytest.param(lambda c=cls: c(0.5, True), TypeError, "positional", id=f"{n}-keyword-only"),
        ]
    cases += [
        pytest.param(lambda: fx.ClipLoss(logit_scale=0.0), ValueError, "logit_scale", id="Clip-scale-0"),
        pytest.param(lambda: fx.ClipLoss(logit_scale=-1.0), ValueError, "logit_scale", id="Clip-scale-negative"),
        pytest.param(lambda: fx.ClipLoss(logit_scale=NAN), ValueError, "logit_scale", id="Clip-scale-nan"),
        pytest.param(lambda: fx.ClipLoss(logit_scale=INF), ValueError, "logit_scale", id="Clip-scale-inf"),
        pytest.param(lambda: fx.ClipLoss(logit_scale=None), TypeError, "logit_scale", id="Clip-scale-none"),
        pytest.param(lambda: fx.ClipLoss(max_logit_scale=0.0), ValueError, "max_logit_scale", id="Clip-max-0"),
        pytest.param(lambda: fx.ClipLoss(max_logit_scale=NAN), ValueError, "max_logit_scale", id="Clip-max-nan"),
        pytest.param(lambda: fx.ClipLoss(max_logit_scale=True), TypeError, "max_logit_scale", id="Clip-max-bool"),
        pytest.param(lambda: fx.ClipLoss(normalize=None), TypeError, "normalize", id="Clip-normalize-none"),
        pytest.param(lambda: fx.ClipLoss(backend="gpu"), ValueError, "backend", id="Clip-backend"),
        pytest.param(lambda: fx.ClipLoss(gather="yes"), TypeError, "gather", id="Clip-gather-str"),
        # MemoryQueue
        pytest.param(lambda: fx.MemoryQueue(0, 8), ValueError, "dim", id="Queue-dim-0"),
        pytest.param(lambda: fx.MemoryQueue(-4, 8), ValueError, "dim", id="Queue-dim-negative"),
        pytest.param(lambda: fx.MemoryQueue(True, 8), ValueError, "dim", id="Queue-dim-bool"),
        pytest.param(lambda: fx.MemoryQueue(4.0, 8), ValueError, "dim", id="Queue-dim-float"),
        pytest.param(lambda: fx.MemoryQueue(4, 0), ValueError, "size", id="Queue-size-0"),
        pytest.param(lambda: fx.MemoryQueue(4, "8"), ValueError, "size", id="Queue-size-str"),
        pytest.param(lambda: fx.MemoryQueue(4, 8, dtype=torch.int64), TypeError, "dtype", id="Queue-dtype-int"),
        pytest.param(lambda: fx.MemoryQueue(4, 8, dtype=torch.bool), TypeError, "dtype", id="Queue-dtype-bool"),
        pytest.param(lambda: fx.MemoryQueue(4, 8, dtype=torch.complex64), TypeError, "dtype", id="Queue-dtype-complex"),
        pytest.param(lambda: fx.MemoryQueue(4, 8, dtype="float32"), TypeError, "dtype", id="Queue-dtype-str"),
        pytest.param(lambda: fx.MemoryQueue(4, 8, gather="no"), TypeError, "gather", id="Queue-gather-str"),
    ]
    return cases


@pytest.mark.parametrize("make,error,match", _ctor_cases())
def test_module_constructor_refuses_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("call,error,match", [
    pytest.param(lambda: fx.NTXentLoss()(torch.randn(4, 6)), TypeError, "z2", id="NTXent-missing-z2"),
    pytest.param(lambda: fx.NTXentLoss()(torch.randn(4, 6), torch.randn(4, 7)), ValueError, "z1 and z2", id="NTXent-shapes"),
    pytest.param(lambda: fx.SupConLoss()(torch.randn(8, 6), LABELS[:8].float()), TypeError, "labels", id="SupCon-float-labels"),
    pytest.param(lambda: fx.SupConLoss()(torch.randn(8, 6), LABELS[:7]), ValueError, "labels", id="SupCon-short-labels"),
    pytest.param(lambda: fx.InfoNCELoss()(torch.randn(4, 6), torch.randn(4, 6), torch.randn(5, 3)), ValueError, "queue",
                 id="InfoNCE-queue-D"),
    pytest.param(lambda: fx.InfoNCELoss()(torch.randn(4, 6), torch.randn(4, 6), fx.MemoryQueue(6, 5)), TypeError, "queue",
                 id="InfoNCE-queue-module-not-keys"),
    pytest.param(lambda: fx.InfoNCELoss()(torch.randn(4, 6), torch.randn(4, 6), fx.MemoryQueue(6, 5).to("meta").keys),
                 ValueError, "queue is on meta", id="InfoNCE-queue-on-meta"),
    pytest.param(lambda: fx.ClipLoss()(torch.randn(4, 6), torch.randn(4, 6).double()), TypeError, "same dtype", id="Clip-dtypes"),
    pytest.param(lambda: fx.NTXentLoss(backend="cuda")(torch.randn(4, 6), torch.randn(4, 6)), ValueError, 'backend="cuda"',
                 id="NTXent-cuda-backend-on-cpu"),
])
def test_module_forward_refuses_bad_inputs(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize("module", [
    pytest.param(lambda: fx.NTXentLoss(learnable_temperature=True), id="NTXent-learnable"),
    pytest.param(lambda: fx.ClipLoss(), id="Clip-learnable"),
    pytest.param(lambda: fx.MemoryQueue(4, 8), id="MemoryQueue"),
    pytest.param(lambda: fx.InfoNCELoss(0.3), id="InfoNCE-fixed"),
])
def test_repr_of_a_module_on_meta(module):
    """repr() of a module moved to the meta device (e.g. while building a model without
    memory) names its settings instead of crashing on a value it cannot read."""
    r = repr(module().to("meta"))
    assert r and "(" in r


# ---------------------------------------------------------------------------------------
# MemoryQueue.enqueue
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("keys,error,match", [
    pytest.param(lambda: torch.randn(2, 4, device="meta"), ValueError, "keys", id="meta-keys"),
    pytest.param(lambda: torch.ones(2, 4, dtype=torch.long), TypeError, "keys", id="int-keys"),
    pytest.param(lambda: torch.ones(2, 4, dtype=torch.bool), TypeError, "keys", id="bool-keys"),
    pytest.param(lambda: torch.ones(2, 4, dtype=torch.complex64), TypeError, "keys", id="complex-keys"),
    pytest.param(lambda: torch.randn(4), ValueError, r"keys must have shape \(B, 4\)", id="rank1-keys"),
    pytest.param(lambda: torch.randn(1, 2, 4), ValueError, r"keys must have shape \(B, 4\)", id="rank3-keys"),
    pytest.param(lambda: torch.randn(2, 5), ValueError, r"keys must have shape \(B, 4\)", id="wrong-D-keys"),
    pytest.param(lambda: np.ones((2, 4), np.float32), TypeError, "keys must be a torch.Tensor", id="numpy-keys"),
])
def test_enqueue_refuses_bad_keys_and_leaves_the_queue_intact(keys, error, match):
    q = fx.MemoryQueue(4, 8)
    before, ptr = q.queue.clone(), int(q.ptr)
    with pytest.raises(error, match=match):
        q.enqueue(keys())
    assert torch.equal(q.queue, before) and int(q.ptr) == ptr


@pytest.mark.parametrize("batches", [
    pytest.param([3, 3, 3], id="wraps-around"),
    pytest.param([8], id="exactly-full"),
    pytest.param([11], id="more-than-size-keeps-newest"),
    pytest.param([0, 2, 0], id="empty-batches"),
    pytest.param([5, 20, 1], id="overflow-then-one"),
])
def test_enqueue_ring_buffer_contents(batches):
    """Against a plain Python ring buffer of the same size."""
    q = fx.MemoryQueue(4, 8)
    expected = [row.clone() for row in q.queue]
    ptr = 0
    for n in batches:
        keys = torch.randn(n, 4)
        q.enqueue(keys)
        for row in keys[-8:]:
            expected[ptr] = row
            ptr = (ptr + 1) % 8
    assert torch.equal(q.queue, torch.stack(expected)) and int(q.ptr) == ptr


def test_enqueue_detaches_and_casts_keys():
    q = fx.MemoryQueue(4, 8, dtype=torch.float16)
    k = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    q.enqueue(k * 2)
    assert not q.queue.requires_grad and q.queue.dtype == torch.float16
    assert torch.equal(q.queue[:3], (k.detach() * 2).half())


def test_nan_key_in_the_queue_poisons_the_next_loss():
    """A NaN enqueued is a negative of every query: the next loss is NaN, not finite."""
    q = fx.MemoryQueue(6, 8)
    bad = torch.randn(1, 6)
    bad[0, 0] = NAN
    q.enqueue(bad)
    query = torch.randn(4, 6, requires_grad=True)
    out = fx.InfoNCELoss()(query, torch.randn(4, 6), q.keys)
    out.backward()
    assert torch.isnan(out) and torch.isnan(query.grad).all()


# ---------------------------------------------------------------------------------------
# state_dict round trips into fresh modules
# ---------------------------------------------------------------------------------------
def _through_bytes(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _trained(module, inputs, steps=2):
    """A few SGD steps so that the learnable scalars move away from their initial values."""
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        module(*inputs).backward()
        opt.step()
    return module


ROUND_TRIPS = [  # (id, constructor, inputs, parameter names)
    ("NTXent-learnable", lambda: fx.NTXentLoss(0.5, learnable_temperature=True),
     lambda: (torch.randn(4, 6), torch.randn(4, 6)), ["log_temperature"]),
    ("SupCon-learnable", lambda: fx.SupConLoss(0.1, learnable_temperature=True, reduction="sum"),
     lambda: (torch.randn(8, 6), LABELS[:8]), ["log_temperature"]),
    ("InfoNCE-learnable", lambda: fx.InfoNCELoss(0.2, learnable_temperature=True),
     lambda: (torch.randn(4, 6), torch.randn(4, 6), torch.randn(9, 6)), ["log_temperature"]),
    ("Clip-learnable", lambda: fx.ClipLoss(1 / 0.07), lambda: (torch.randn(4, 6), torch.randn(4, 6)), ["log_logit_scale"]),
    ("Clip-learnable-clamped", lambda: fx.ClipLoss(150.0, max_logit_scale=100.0),
     lambda: (torch.randn(4, 6), torch.randn(4, 6)), ["log_logit_scale"]),
    ("NTXent-fixed", lambda: fx.NTXentLoss(0.37), lambda: (torch.randn(4, 6), torch.randn(4, 6)), []),
    ("Clip-fixed", lambda: fx.ClipLoss(20.0, learnable=False), lambda: (torch.randn(4, 6), torch.randn(4, 6)), []),
]


@pytest.mark.parametrize("rid,make,make_inputs,params", [pytest.param(*r, id=r[0]) for r in ROUND_TRIPS])
def test_state_dict_round_trip_gives_the_same_loss(rid, make, make_inputs, params):
    x = make_inputs()
    m = make()
    if params:
        _trained(m, x)
    sd = _through_bytes(m.state_dict())
    assert sorted(sd) == sorted(params)
    fresh = make()
    fresh.load_state_dict(sd)
    for p in params:
        assert torch.equal(getattr(fresh, p), getattr(m, p))
    assert torch.equal(fresh(*x), m(*x))


def test_learnable_state_into_a_fixed_module_is_a_clear_error():
    sd = fx.NTXentLoss(learnable_temperature=True).state_dict()
    with pytest.raises(RuntimeError, match="log_temperature"):
        fx.NTXentLoss().load_state_dict(sd)


def test_memory_queue_round_trip_gives_the_same_loss_and_continues_identically():
    q = fx.MemoryQueue(6, 10)
    q.enqueue(torch.randn(7, 6))
    q.enqueue(torch.randn(5, 6))  # wrapped: ptr = 2
    sd = _through_bytes(q.state_dict())
    assert sorted(sd) == ["ptr", "queue"]
    fresh = fx.MemoryQueue(6, 10)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.queue, q.queue) and int(fresh.ptr) == int(q.ptr) == 2
    query, key = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(fx.info_nce(query, key, fresh.keys), fx.info_nce(query, key, q.keys))
    more = torch.randn(3, 6)
    q.enqueue(more)
    fresh.enqueue(more)
    assert torch.equal(fresh.queue, q.queue) and int(fresh.ptr) == int(q.ptr)


def test_memory_queue_state_of_another_size_is_a_clear_error():
    with pytest.raises(RuntimeError, match="queue"):
        fx.MemoryQueue(6, 10).load_state_dict(fx.MemoryQueue(6, 12).state_dict())


@needs_ext
def test_moco_style_container_round_trip():
    """InfoNCELoss (learnable) and a MemoryQueue inside one model: saved and restored together."""
    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.loss = fx.InfoNCELoss(0.2, learnable_temperature=True)
            self.queue = fx.MemoryQueue(6, 16)

        def forward(self, q, k):
            out = self.loss(q, k, self.queue.keys)
            self.queue.enqueue(k)
            return out

    a = Head()
    for _ in range(3):
        a(torch.randn(4, 6), torch.randn(4, 6)).backward()
    b = Head()
    b.load_state_dict(_through_bytes(a.state_dict()))
    q, k = torch.randn(4, 6), torch.randn(4, 6)
    assert torch.equal(a(q, k), b(q, k)) and torch.equal(a.queue.queue, b.queue.queue)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_learnable_module_cast_to_another_dtype(dtype):
    """module.to(dtype) casts log τ; the loss is the reference's at that (rounded) τ."""
    m = fx.NTXentLoss(0.3, learnable_temperature=True).to(dtype)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    got = m(a, b)
    tau = float(m.log_temperature.detach().exp())
    ref = fx.nt_xent(a.double(), b.double(), tau, backend="reference")
    assert_rel_close(got, ref, 1e-5, f"{dtype}")


def test_clip_clamp_stops_the_scale_gradient():
    """A logit scale above max_logit_scale is clamped: the loss uses 100 and log_logit_scale
    gets no gradient (the clamp's), as in CLIP."""
    m = fx.ClipLoss(200.0, max_logit_scale=100.0)
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    out = m(a, b)
    out.backward()
    assert_rel_close(out, fx.clip_loss(a.double(), b.double(), 100.0, backend="reference"), 1e-5, "clamped loss")
    assert float(m.log_logit_scale.grad) == 0.0
