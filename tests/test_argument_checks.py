"""Modules, the CLI and checkpoints check their arguments like the functions do: a one-line
error naming the argument or flag, never a traceback, a silent default or a fresh start."""
from __future__ import annotations

import os

import pytest
import torch

import fastntxent as fx
from fastntxent.train import checkpoint as C
from fastntxent.train.cli import main


@pytest.mark.parametrize("make,error,match", [
    (lambda: fx.NTXentLoss(temperature=True), TypeError, "temperature"),
    (lambda: fx.NTXentLoss(temperature="0.5"), TypeError, "temperature"),
    (lambda: fx.SupConLoss(temperature=float("nan")), ValueError, "temperature"),
    (lambda: fx.InfoNCELoss(temperature=float("inf")), ValueError, "temperature"),
    (lambda: fx.NTXentLoss(normalize="no"), TypeError, "normalize"),
    (lambda: fx.NTXentLoss(learnable_temperature=1), TypeError, "learnable_temperature"),
    (lambda: fx.SupConLoss(gather=None), TypeError, "gather"),
    (lambda: fx.ClipLoss(max_logit_scale="100"), TypeError, "max_logit_scale"),
    (lambda: fx.ClipLoss(max_logit_scale=-1.0), ValueError, "max_logit_scale"),
    (lambda: fx.ClipLoss(logit_scale=True), TypeError, "logit_scale"),
    (lambda: fx.ClipLoss(learnable="yes"), TypeError, "learnable"),
    (lambda: fx.NTXentLoss(reduction="avg"), ValueError, "reduction"),
    (lambda: fx.NTXentLoss(backend="gpu"), ValueError, "backend"),
])
def test_module_constructors_refuse_bad_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("flags,match", [
    (["--width", "0"], "--width"),
    (["--proj-output-dim", "0"], "--proj-output-dim"),
    (["--proj-hidden-dim", "-3"], "--proj-hidden-dim"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--temperature", "0"], "--temperature"),
    (["--stop-after-epochs", "0"], "--stop-after-epochs"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--queue-size", "0", "--method", "moco"], "--queue-size"),
    (["--momentum-base", "1.5"], "--momentum-base"),
    (["--min-scale", "0"], "--min-scale"),
    (["--knn-k", "0"], "--knn-k"),
])
def test_cli_refuses_out_of_range_flags(flags, match, capsys, tmp_path):
    assert main(flags + ["--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0] and "error" in err[0], err
    assert not any(tmp_path.iterdir()), "nothing may start before the flags are checked"


def _state():
    return {k: 0 for k in C.REQUIRED}


def test_checkpoint_missing_an_entry_is_a_clear_error(tmp_path):
    path = str(tmp_path / "last.pt")
    for missing in ("model", "rng", "optimizer"):
        state = _state()
        del state[missing]
        C.save_checkpoint(path, state)
        with pytest.raises(C.CheckpointError, match=missing):
            C.load_checkpoint(path)
    C.save_checkpoint(path, _state())
    assert C.load_checkpoint(path)["path"] == path


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    """A killed write leaves last.pt.tmp.<pid>; the next start removes it (a live process's
    temporary file is kept)."""
    dead_pid = 2**22 + 12345  # above the default pid_max: no such process
    stale = tmp_path / f"last.pt.tmp.{dead_pid}"
    stale.write_bytes(b"partial")
    live = tmp_path / f"last.pt.tmp.{os.getppid()}"
    live.write_bytes(b"in progress")
    keep = tmp_path / "last.pt"
    keep.write_bytes(b"checkpoint")
    assert C.remove_stale_temporaries(str(tmp_path)) == [stale.name]
    assert not stale.exists() and live.exists() and keep.exists()


def test_moco_documented_order_with_every_option():
    """InfoNCELoss docstring order: loss with the queue's keys, enqueue, then backward."""
    for normalize in (True, False):
        loss_fn, queue = fx.InfoNCELoss(temperature=0.2, normalize=normalize), fx.MemoryQueue(dim=8, size=16)
        q = torch.randn(4, 8, requires_grad=True)
        k = torch.randn(4, 8)
        loss = loss_fn(q, k, queue.keys)
        queue.enqueue(k)
        loss.backward()
        assert torch.isfinite(q.grad).all()
