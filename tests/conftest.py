import os

import torch

# Without a GPU the Triton kernels run on CPU tensors in the interpreter; it must be set
# before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_report_header(config):
    import fastntxent._extension as ext

    return (f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}, "
            f"fastntxent._C: {'loaded' if ext.has_cpu_kernels() else ext.LOAD_ERROR}, "
            f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}")
