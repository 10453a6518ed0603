"""No host synchronisation in the call path (loss + backward): no Tensor.item / float / int /
bool / tolist / numpy and no tensor built from Python data (an H2D copy on a GPU), on the CPU
path and on the Triton path (interpreter, standing in for the GPU path's Python code). A
synchronisation stops the CPU from queueing ahead and breaks CUDA-graph capture."""
from __future__ import annotations

import pytest
import torch

import fastntxent as fx
from helpers import BACKEND_CASES

FORBIDDEN = ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy")


class HostSync(AssertionError):
    pass


@pytest.fixture
def no_sync(monkeypatch):
    def forbid(name):
        def raiser(self, *args, **kwargs):
            raise HostSync(f"Tensor.{name} called during a loss call (a host synchronisation)")
        return raiser

    def patch():
        for name in FORBIDDEN:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))
        real_tensor = torch.tensor

        def tensor(data, *args, **kwargs):
            if not isinstance(data, torch.Tensor):
                raise HostSync("torch.tensor(python data) during a loss call (a host-to-device copy)")
            return real_tensor(data, *args, **kwargs)
        monkeypatch.setattr(torch, "tensor", tensor)
    return patch


def _calls(device):
    labels = (torch.arange(8) % 3).to(device)
    queue = torch.randn(6, 5, device=device)
    return {
        "nt_xent": lambda z, t: fx.nt_xent(z[:4], z[4:], t, backend=BACKEND, return_stats=True),
        "supcon": lambda z, t: fx.supcon(z, labels, t, backend=BACKEND, return_stats=True),
        "multiview": lambda z, t: fx.multiview_nt_xent(z.view(2, 4, 5), t, backend=BACKEND),
        "info_nce": lambda z, t: fx.info_nce(z[:4], z[4:], queue, t, backend=BACKEND, return_stats=True),
        "clip": lambda z, t: fx.clip_loss(z[:4], z[4:], 1 / t, backend=BACKEND, return_stats=True),
    }


BACKEND = None


@pytest.mark.parametrize("backend,device", [c for c in BACKEND_CASES if c.values[0] in ("cpu", "triton")])
@pytest.mark.parametrize("temperature", ["float", "tensor"])
def test_loss_call_does_not_synchronise(backend, device, temperature, no_sync, monkeypatch):
    global BACKEND
    monkeypatch.setattr(__import__(__name__), "BACKEND", backend)
    z = torch.randn(8, 5, device=device, requires_grad=True)
    log_t = torch.tensor(-1.0, device=device, requires_grad=True)
    calls = _calls(device)
    no_sync()
    for name, call in calls.items():
        t = 0.3 if temperature == "float" else log_t.exp()
        out = call(z, t)
        loss = out[0] if isinstance(out, tuple) else out
        loss.backward()
    with pytest.raises(HostSync):  # the fixture is live: a sync would be caught
        torch.ones(()).item()
