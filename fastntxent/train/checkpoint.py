"""Checkpoints: atomic writes (temporary file + os.replace), safe loading
(torch.load(weights_only=True)), and clear errors for corrupt or mismatched files. A bad
checkpoint never turns into a silent fresh start."""
from __future__ import annotations

import os
import random
import zipfile

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


def _crc_error(path: str):
    """The first member of a zip checkpoint whose CRC-32 does not match its bytes (torch.load
    does not check them: a flipped bit in a tensor would load silently), or None."""
    try:
        if not zipfile.is_zipfile(path):
            return None  # torch.load reports what it is
        with zipfile.ZipFile(path) as z:
            return z.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None  # unreadable as a zip: torch.load's error says so


def load_checkpoint(path: str, map_location="cpu") -> dict:
    path = resolve_path(path)
    damaged = _crc_error(path)
    if damaged is not None:
        raise CheckpointError(
            f"checkpoint {path!r} is corrupt or unreadable (the bytes of {damaged!r} fail their CRC-32 "
            f"check). Refusing to start from scratch: resume from an intact checkpoint, or drop "
            f"--resume to start a new run.")
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


# What the trainer does with each entry needs this type (ints >= 0).
_ENTRY_TYPES = {"structural": dict, "config": dict, "world_size": int, "epoch": int, "step_in_epoch": int,
                "global_step": int, "model": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
                "history": list, "accum": dict}


def check_entries(state: dict) -> None:
    """The entries a resume uses have the types save() wrote (an edited or foreign file is a
    CheckpointError naming the entry, not a traceback or a silently odd run)."""
    bad = []
    for k, t in _ENTRY_TYPES.items():
        v = state.get(k)
        if isinstance(v, bool) or not isinstance(v, t) or (t is int and v < 0):
            bad.append(f"{k}={v!r:.40}" if not isinstance(v, (dict, list)) else f"{k} ({type(v).__name__})")
    if not bad:
        bad += [f"rng lacks {k!r}" for k in ("torch", "numpy", "python") if k not in state["rng"]]
        bad += [f"accum lacks {k!r}" for k in ("loss", "top1", "n", "seconds") if k not in state["accum"]]
        if not all(isinstance(r, dict) for r in state["history"]):
            bad.append("history holds a non-dict row")
    if bad:
        raise CheckpointError(f"checkpoint {state.get('path')!r} has unusable entries: {', '.join(bad)} "
                              f"(edited, or written by another program); resume from an intact checkpoint "
                              f"or drop --resume.")


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
