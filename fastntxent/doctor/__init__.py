"""`python -m fastntxent.doctor` / `fastntxent-doctor`: check fastntxent on this machine.

Prints the versions and devices, which backend runs where (and why not), checks every
available backend against the float64 reference for every loss on a grid of odd shapes
(loss, input gradients, temperature / logit_scale gradient), times the fused loss against
the naive one and the device's matmul rate, and exits non-zero on any failure.

Modules: environment (versions, devices), availability (which backend runs, from the public
API's own errors), cases (the losses and their inputs), compare (one case against the
reference), grid (the shape grid), sampled (large M against a chunked float64 reference),
timing, report (table and JSON), cli (the command line).
"""


def main(argv=None) -> int:
    """Entry point of `fastntxent-doctor`; returns the exit code (non-zero on any FAIL)."""
    from .cli import main as run

    return run(argv)


__all__ = ["main"]
