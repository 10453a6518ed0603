"""Triton kernels of fastntxent (GPU path; CPU tensors run under TRITON_INTERPRET=1).

Importing this package imports triton; `fastntxent._dispatch` treats an ImportError here as
"the triton backend is not available"."""
import triton  # noqa: F401  (fail early with ImportError when triton is missing)
