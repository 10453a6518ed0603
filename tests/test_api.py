"""Input validation, backend selection, custom-op registration (opcheck) and torch.compile."""
from __future__ import annotations

import pytest
import torch

import fastntxent as fx
from fastntxent import _extension

needs_ext = pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="fastntxent._C not built")


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "z1 and z2 must have the same shape"),
        (lambda: fx.nt_xent(torch.randn(4), torch.randn(4)), ValueError, "z1 must be 2-D"),
        (lambda: fx.nt_xent(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "z1 must not be empty"),
        (lambda: fx.nt_xent(torch.randn(4, 3).int(), torch.randn(4, 3)), TypeError, "z1 has dtype"),
        (lambda: fx.nt_xent([1.0], torch.randn(4, 3)), TypeError, "z1 must be a torch.Tensor"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3).double()), TypeError, "same dtype"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "temperature must be finite and > 0"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), -1.0), ValueError, "temperature"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), float("nan")), ValueError, "temperature"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), float("inf")), ValueError, "temperature"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-0.1)), ValueError, "temperature"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), torch.ones(2)), ValueError, "temperature must be a scalar"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), "0.5"), TypeError, "temperature must be a float"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), backend="tpu"), ValueError, "backend must be one of"),
        (lambda: fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), backend="cuda"), ValueError, 'backend="cuda" needs CUDA tensors'),
        (lambda: fx.nt_xent(torch.randn(4, 3).double(), torch.randn(4, 3).double(), backend="cuda"),
         ValueError, "does not take float64"),
        (lambda: fx.supcon(torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), ValueError, r"labels must have shape \(4,\)"),
        (lambda: fx.supcon(torch.randn(4, 3), torch.zeros(4)), TypeError, "labels must be an integer tensor"),
        (lambda: fx.supcon(torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long)), ValueError, "labels must have shape"),
        (lambda: fx.supcon(torch.randn(4, 3), [0, 1, 2, 3]), TypeError, "labels must be a torch.Tensor"),
        (lambda: fx.supcon(torch.randn(4, 3, 2), torch.zeros(4, dtype=torch.long)), ValueError, "z must be 2-D"),
        (lambda: fx.multiview_nt_xent(torch.randn(4, 3)), ValueError, "views must be 3-D"),
        (lambda: fx.multiview_nt_xent([]), ValueError, "at least one view"),
        (lambda: fx.multiview_nt_xent([torch.randn(4, 3), torch.randn(5, 3)]), ValueError, r"views\[1\] has shape"),
        (lambda: fx.NTXentLoss(temperature=0), ValueError, "temperature"),
        (lambda: fx.NTXentLoss(gather=True)(torch.randn(4, 3), torch.randn(4, 3)), ValueError,
         "needs an initialised torch.distributed process group"),
        (lambda: fx.SupConLoss(gather=True)(torch.randn(4, 3), torch.zeros(4, dtype=torch.long)), ValueError,
         "process group"),
        (lambda: fx.SupConLoss(reduction="mean2"), ValueError, "reduction"),
    ],
)
def test_bad_input_errors_name_the_argument(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_device_mismatch_is_reported():
    meta = torch.randn(4, 3, device="meta")
    with pytest.raises(ValueError, match="z2 is on meta but z1 is on cpu"):
        fx.nt_xent(torch.randn(4, 3), meta)
    with pytest.raises(ValueError, match="labels is on meta"):
        fx.supcon(torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"))


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|triton"):
        fx.nt_xent(torch.randn(4, 3), torch.randn(4, 3), backend="triton")


def test_auto_backend_on_cpu():
    from fastntxent.backends import resolve

    expected = "cpu" if _extension.has_cpu_kernels() else "reference"
    assert resolve("self", "auto", torch.device("cpu"), torch.float32).name == expected


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_opcheck_cpu_ops(dtype):
    u = torch.nn.functional.normalize(torch.randn(13, 5, dtype=torch.float64), dim=1).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    t = torch.tensor(0.3, dtype=acc)
    labels = torch.randint(0, 3, (13,))
    for lab, period in ((labels, 1), (None, 6)):
        args = (u.clone().requires_grad_(dtype != torch.bfloat16), t.clone().requires_grad_(True), lab, period)
        torch.library.opcheck(torch.ops.fastntxent.self_forward.default, args)
        lse, *_ = torch.ops.fastntxent.self_forward(u, t, lab, period)
        torch.library.opcheck(torch.ops.fastntxent.self_backward.default,
                              (u, t, lab, period, lse, torch.rand(13, dtype=acc), -torch.rand(13, dtype=acc)))


@needs_ext
def test_torch_compile_fullgraph():
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.head = torch.nn.Linear(6, 4)
            self.loss = fx.NTXentLoss(temperature=0.3, learnable_temperature=True)

        def forward(self, a, b):
            return self.loss(self.head(a), self.head(b))

    torch._dynamo.reset()
    model = Model()
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    a, b = torch.randn(10, 6), torch.randn(10, 6)
    loss = compiled(a, b)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    eager = model(a, b)
    eager.backward()
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-6)
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, rtol=1e-4, atol=1e-6)


def test_cuda_kernels_are_built_where_they_can_be():
    """With nvcc and a CUDA build of torch the extension must carry the CUDA kernels (CI
    builds them on every submission, GPU or not)."""
    import os

    from torch.utils import cpp_extension

    if os.environ.get("FASTNTXENT_SKIP_CUDA") == "1" or torch.version.cuda is None:
        pytest.skip("CUDA build disabled or torch without CUDA")
    if cpp_extension.CUDA_HOME is None:
        pytest.skip("no CUDA toolkit")
    assert _extension.has_cuda_kernels(), "fastntxent._C was built without its CUDA kernels"
