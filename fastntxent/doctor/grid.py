"""The accuracy grid: every (backend, device, loss, dtype) over odd shapes, one PASS/FAIL row each.

Each (M, D, τ) point runs one of two variants, alternating so that every M sees both:
contiguous inputs with reduction="mean", or strided views (every other column of a wider
buffer) with reduction="none" (clip_loss has only the mean).
"""
from __future__ import annotations

import itertools
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch

from .availability import backend_status
from .cases import LossCase
from .compare import Variant, check_case

DTYPES = {
    "cpu": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "reference": (torch.float32, torch.float64, torch.bfloat16, torch.float16),
    "triton": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
MAX_FAILURES_KEPT = 5


@dataclass(frozen=True)
class Grid:
    rows: tuple[int, ...]
    dims: tuple[int, ...]
    taus: tuple[float, ...]

    def points(self, case: LossCase):
        """(M, D, Variant) for every shape and temperature, variants alternating."""
        variants = [(False, "mean"), (True, case.reductions[-1])]
        for i, (M, D, tau) in enumerate(itertools.product(self.rows, self.dims, self.taus)):
            strided, reduction = variants[i % 2]
            yield M, D, Variant(tau, strided, reduction)


FULL = Grid((1, 2, 63, 1000, 4099), (1, 17, 128, 257), (0.01, 0.5))
QUICK = Grid((1, 2, 63), (1, 17), (0.01, 0.5))
# The Triton interpreter's cost grows fast with the number of tiles: tiny shapes only.
INTERPRETED = QUICK


@dataclass
class Row:
    """The verdict of one backend × device × loss × dtype over the grid."""

    backend: str
    device: str
    loss: str
    dtype: str
    status: str = "PASS"  # PASS, FAIL or N/A
    cases: int = 0
    worst_error: float | None = None
    tolerance: float | None = None
    quantity: str = ""
    shape: str = ""
    reason: str = ""
    seconds: float = 0.0
    failures: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def input_seed(seed: int, loss: str, M: int, D: int) -> int:
    """The same inputs for every backend and dtype at one point (reproducible with --seed)."""
    return zlib.crc32(f"{seed}/{loss}/{M}/{D}".encode())


def check_row(backend: str, device: str, case: LossCase, dtype: torch.dtype, grid: Grid, *,
              seed: int, fault: float = 0.0) -> Row:
    """Run `case` with `backend` in `dtype` over `grid`; N/A when the library says it cannot run."""
    row = Row(backend, device, case.name, dtype_name(dtype))
    start = time.perf_counter()
    try:
        ok, why = backend_status(backend, device, dtype, case.name)
    except Exception as exc:  # noqa: BLE001 - a defect of the backend, not "unavailable"
        ok, why = True, ""
        row.status, row.reason = "FAIL", f"probe raised {type(exc).__name__}: {exc}"
    if not ok:
        row.status, row.reason = "N/A", why
        return row
    worst_ratio = -1.0
    for M, D, variant in grid.points(case):
        gen = torch.Generator().manual_seed(input_seed(seed, case.name, M, D))
        inputs = case.make(M, D, gen)
        result = check_case(case, inputs, variant, backend=backend, device=device, dtype=dtype,
                            seed=input_seed(seed + 1, case.name, M, D), fault=fault)
        row.cases += 1
        quantity, err, tol = result.worst()
        ratio = err / tol if tol > 0 else float("inf")
        where = f"{inputs.shape()} {variant.describe()}"
        if ratio > worst_ratio:
            worst_ratio = ratio
            row.worst_error, row.tolerance, row.quantity, row.shape = err, tol, quantity, where
        if not result.passed:
            row.status = "FAIL"
            if len(row.failures) < MAX_FAILURES_KEPT:
                row.failures.append({"shape": where, "message": result.message,
                                     "errors": {k: {"error": e, "tolerance": t}
                                                for k, (e, t) in result.errors.items()}})
    if row.failures and not row.reason:
        first = row.failures[0]
        row.reason = first["message"] or f"{row.quantity} at {row.shape}"
    row.seconds = time.perf_counter() - start
    return row
