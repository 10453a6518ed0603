"""Checkpoints: atomic writes (temporary file + os.replace), safe loading
(torch.load(weights_only=True)), and clear errors for corrupt or mismatched files. A bad
checkpoint never turns into a silent fresh start."""
from __future__ import annotations

import os
import random

import numpy as np
import torch

FORMAT = "fastntxent.train/1"
LAST = "last.pt"
# Entries a resumable checkpoint must hold (Trainer._save in trainer.py writes them all).
REQUIRED = ("structural", "config", "world_size", "epoch", "step_in_epoch", "global_step", "model",
            "optimizer", "scheduler", "rng", "history", "accum")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used to resume this run; the message says why."""


def rng_state() -> dict:
    mt = np.random.get_state()
    py = random.getstate()
    s = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(mt[1].astype(np.int64)), "pos": int(mt[2]),
                  "has_gauss": int(mt[3]), "cached_gaussian": float(mt[4])},
        "python": {"version": py[0], "state": list(py[1]), "gauss_next": py[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"].cpu())
    n = s["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = s["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if "cuda" in s and torch.cuda.is_available():
        cuda = [t.cpu() for t in s["cuda"]]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(path: str, state: dict) -> None:
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    state = dict(state, format=FORMAT)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def resolve_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, LAST)
    if not os.path.isfile(path):
        raise CheckpointError(f"--resume {path!r}: no such checkpoint file. Give a checkpoint "
                              f"(e.g. runs/<run>/{LAST}) or its run directory, or drop --resume "
                              f"to start a new run.")
    return path


def load_checkpoint(path: str, map_location="cpu") -> dict:
    path = resolve_path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle needing arbitrary code...
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")[:160]
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or unreadable ({type(e).__name__}: {why}). "
            f"Refusing to start from scratch: resume from an intact checkpoint, or drop "
            f"--resume to start a new run.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        got = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path!r} is not a fastntxent training checkpoint "
                              f"(format {got!r}, expected {FORMAT!r}).")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} lacks the entries {missing} (written by another "
                              f"version, or edited); resume from an intact checkpoint or drop --resume.")
    state["path"] = path
    return state


def remove_stale_temporaries(directory: str) -> list:
    """Delete `*.tmp.<pid>` files a killed checkpoint write left behind in `directory` (the
    checkpoint itself is safe: the rename never happened). Files of a live process are kept."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in os.listdir(directory):
        stem, sep, pid = name.rpartition(".tmp.")
        if not sep or not pid.isdigit() or not stem:
            continue
        if int(pid) != os.getpid() and _alive(int(pid)):
            continue
        try:
            os.remove(os.path.join(directory, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_compatible(state: dict, structural: dict) -> None:
    """The run resuming must have the same method, model, data and batch as the checkpoint."""
    saved = state.get("structural", {})
    diff = [f"{k}: checkpoint={saved.get(k)!r}, this run={v!r}" for k, v in structural.items()
            if saved.get(k) != v]
    if diff:
        raise CheckpointError(f"checkpoint {state.get('path')!r} does not match this run's "
                              f"configuration:\n  " + "\n  ".join(diff) +
                              "\nResume with the same settings (see the run's config.json).")


def load_into(name: str, target, sd, path) -> None:
    try:
        target.load_state_dict(sd)
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path!r}: the saved {name} does not fit this run's "
                              f"{name}: {e}") from e
