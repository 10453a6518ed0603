"""Small CPU subset for pytest-benchmark:  pytest benchmarks/ --benchmark-only

Times forward+backward of NT-Xent (M = 1024, D = 128, fp32) for each provider on this
machine. No speed is asserted here; the full sweep is benchmarks/run.py.
"""
import pytest
import torch

from providers import available

PROVIDERS = [p for p in available("cpu") if p != "naive-compile"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_nt_xent_forward_backward(benchmark, provider):
    fn = available("cpu")[provider]()
    z1 = torch.randn(512, 128, requires_grad=True)
    z2 = torch.randn(512, 128, requires_grad=True)

    def step():
        z1.grad = z2.grad = None
        loss = fn(z1, z2)
        loss.backward()
        return loss

    loss = benchmark(step)
    assert torch.isfinite(loss)
