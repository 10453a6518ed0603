"""The benchmark compares like with like: every provider computes the same NT-Xent value."""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from providers import available  # noqa: E402


def test_providers_agree_on_cpu():
    z1, z2 = torch.randn(50, 24), torch.randn(50, 24)
    expected = available("cpu")["reference"]()(z1.double(), z2.double())
    for name, factory in available("cpu").items():
        if name == "naive-compile":
            continue  # compiling costs ~20 s; same function as "naive"
        got = factory()(z1, z2)
        assert abs(got.item() - expected.item()) < 1e-5 * abs(expected.item()), name
