"""Category: the command line of fastntxent-pretrain (python -m fastntxent.train), its
checkpoints, and signals during training.

Every bad flag is exit code 2 with one line on stderr naming the flag, before anything starts
(argparse's own errors included; tests/test_argument_checks.py has the first range checks,
not repeated). Errors only the environment or the data can reveal (device, loss backend,
run directory, a batch larger than the dataset, a diverging loss) are also one line and exit
code 2. Checkpoints that are corrupt, truncated, bit-flipped, edited or malicious (a pickle
that would run code) are a CheckpointError — the code never runs (a marker file is not
created) — and through --resume exit code 2 without a traceback. SIGTERM during
`--epochs 50` leaves a checkpoint and exits 128 + 15 with the resume hint; kill -9 leaves the
previous checkpoint loadable, and --resume continues both. The crash-prone probes run in a
subprocess with a timeout (the checkpoint ones in adv_common's worker interpreter).
"""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from adv_common import subprocess_env

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

from fastntxent.train import checkpoint as C  # noqa: E402
from fastntxent.train.cli import main  # noqa: E402

QUICK = ["--batch-size", "256", "--no-probe", "--no-baseline", "--no-progress", "--no-plot", "--knn-every", "0",
         "--num-workers", "0"]
PREFIX = "fastntxent-pretrain: error:"


def _cli(argv, tmp_path):
    """main(argv) in this process: (exit code, stderr lines)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = main(argv + ["--out-dir", str(tmp_path / "runs")])
        except SystemExit as e:
            rc = e.code
    return rc, err.getvalue().strip().splitlines()


def _one_line_error(rc, lines, flag):
    assert rc == 2, (rc, lines)
    assert len(lines) == 1 and lines[0].startswith(PREFIX) and flag in lines[0], lines


# ---------------------------------------------------------------------------------------
# Flags: exit code 2, one line naming the flag, nothing started
# ---------------------------------------------------------------------------------------
BAD_FLAGS = [  # argparse's own errors: wrong type, choice, unknown flag
    (["--epochs", "abc"], "--epochs"), (["--epochs", "2.5"], "--epochs"), (["--lr", "fast"], "--lr"),
    (["--batch-size", ""], "--batch-size"), (["--method", "byol"], "--method"), (["--dataset", "mnist"], "--dataset"),
    (["--arch", "vit"], "--arch"), (["--optimizer", "adam"], "--optimizer"), (["--precision", "fp16"], "--precision"),
    (["--loss-backend", "gpu"], "--loss-backend"), (["--unknown-flag"], "--unknown-flag"),
    (["--cifar-stem=yes"], "--cifar-stem"), (["--no-plot=1"], "--plot"), (["--symmetric=true"], "--symmetric"),
    (["--learnable-temperature=0"], "--learnable-temperature"), (["--seed", "0x10"], "--seed"),
    (["--temperature"], "--temperature"),
    # ranges (ConfigError) not in tests/test_argument_checks.py
    (["--num-workers", "-1"], "--num-workers"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "-0.1"], "--temperature"), (["--temperature", "1e-300"], "--temperature"),
    (["--temperature", "1e300"], "--temperature"), (["--knn-temperature", "0"], "--knn-temperature"),
    (["--blur-prob", "1.5"], "--blur-prob"), (["--crop-size", "0"], "--crop-size"), (["--lr", "1e400"], "--lr"),
    (["--ckpt-every", "-1"], "--ckpt-every"), (["--warmup-epochs", "nan"], "--warmup-epochs"),
    (["--warmup-epochs", "-1"], "--warmup-epochs"), (["--weight-decay", "-1e-4"], "--weight-decay"),
    (["--momentum", "1.5"], "--momentum"), (["--momentum-final", "-0.1"], "--momentum-final"),
    (["--lars-eta", "0"], "--lars-eta"), (["--min-lr", "-1"], "--min-lr"), (["--jitter-strength", "-1"], "--jitter-strength"),
    (["--min-scale", "1.5"], "--min-scale"), (["--knn-every", "-1"], "--knn-every"),
    (["--probe-weight-decay", "-1"], "--probe-weight-decay"), (["--stop-after-epochs", "-2"], "--stop-after-epochs"),
    (["--seed", "-1"], "--seed"), (["--seed", str(2**64)], "--seed"), (["--queue-size", "-5"], "--queue-size"),
    (["--knn-k", "-3"], "--knn-k"),
    # what only the environment can refute: still before anything starts
    (["--device", "nonsense"], "--device"), (["--device", "meta"], "--device"), (["--device", "cuda:7"], "--device"),
    (["--loss-backend", "cuda"], "--loss-backend"), (["--loss-backend", "cuda", "--method", "moco"], "--loss-backend"),
]


@pytest.mark.parametrize("flags,flag", [pytest.param(f, n, id=" ".join(f)[:40]) for f, n in BAD_FLAGS])
def test_bad_flag_is_one_line_and_exit_code_2(flags, flag, tmp_path):
    if flags[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has that GPU")
    rc, lines = _cli(flags, tmp_path)
    _one_line_error(rc, lines, flag)
    assert not (tmp_path / "runs").exists(), "nothing may start before the flags are checked"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device exists")
def test_device_cuda_without_a_gpu(tmp_path):
    _one_line_error(*_cli(["--device", "cuda"], tmp_path), "--device")


@pytest.mark.parametrize("flag", ["--run-dir", "--out-dir"])
def test_run_directory_that_is_a_file(flag, tmp_path):
    f = tmp_path / "a_file"
    f.write_text("not a directory")
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main([flag, str(f)])
    _one_line_error(rc, err.getvalue().strip().splitlines(), flag)


def test_batch_larger_than_the_dataset(tmp_path):
    rc, lines = _cli(["--epochs", "1", "--batch-size", "5000", "--no-progress"], tmp_path)
    _one_line_error(rc, lines, "--batch-size")


def test_diverging_loss_is_one_line_naming_the_flags(tmp_path):
    """--temperature 1e-30: logits ~1e30, the first steps blow the weights up; the trainer's
    FloatingPointError names --lr and --temperature."""
    rc, lines = _cli(["--epochs", "1", "--temperature", "1e-30"] + QUICK, tmp_path)
    _one_line_error(rc, lines, "--temperature")


def test_missing_dataset_exit_code_2_without_traceback(tmp_path):
    rc, lines = _cli(["--dataset", "cifar10", "--data-dir", str(tmp_path / "none")], tmp_path)
    assert rc == 2 and lines[0].startswith(PREFIX) and "cifar10" in lines[0] and "--data-dir" in lines[-1], lines
    assert not any("Traceback" in ln for ln in lines)


@pytest.mark.parametrize("argv,flag", [
    pytest.param(["--epochs", "abc"], "--epochs", id="argparse"),
    pytest.param(["--loss-backend", "cuda"], "--loss-backend", id="environment"),
])
def test_python_dash_m_one_line_error(argv, flag):
    p = subprocess.run([sys.executable, "-m", "fastntxent.train"] + argv, capture_output=True, text=True,
                       timeout=120, env=subprocess_env())
    _one_line_error(p.returncode, p.stderr.strip().splitlines(), flag)


# ---------------------------------------------------------------------------------------
# Checkpoints: corrupt, truncated, edited, malicious
# ---------------------------------------------------------------------------------------
def _train(run_dir, *extra, timeout=180):
    p = subprocess.run([sys.executable, "-m", "fastntxent.train", "--epochs", "1", *QUICK, "--run-dir", str(run_dir),
                        *extra], capture_output=True, text=True, timeout=timeout, env=subprocess_env())
    assert p.returncode == 0, p.stderr[-3000:]
    return run_dir / "last.pt"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("good") / "run")


def _load_probe(worker, path, tmp_path):
    """C.load_checkpoint(path) in the worker: the error's type and message; and whether the
    marker file that a malicious pickle would create exists afterwards."""
    marker = tmp_path / "PWNED"
    r = worker.run(f"""
        from fastntxent.train import checkpoint as C
        try:
            C.load_checkpoint({str(path)!r})
            print("LOADED")
        except C.CheckpointError as e:
            print("CheckpointError:", e)
    """, timeout=60)
    assert r["ok"], r.get("traceback")
    return r["stdout"], marker.exists()


class _Evil:
    def __init__(self, call, arg):
        self.call, self.arg = call, arg

    def __reduce__(self):
        return (self.call, (self.arg,))


def _evil_payloads(marker):
    import builtins
    import pickle
    import zipfile

    touch = f"open({str(marker)!r}, 'w').close()"

    def plain(good):
        return pickle.dumps({"format": C.FORMAT, "x": _Evil(os.system, f"touch {marker}")})

    def inside_zip(good):
        buf = io.BytesIO()
        with zipfile.ZipFile(good) as zin, zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zout:
            for n in zin.namelist():
                d = zin.read(n)
                if n.endswith("data.pkl"):
                    d = pickle.dumps({"format": C.FORMAT, "x": _Evil(builtins.exec, touch)}, protocol=2)
                zout.writestr(n, d)
        return buf.getvalue()

    def torch_saved(good):
        buf = io.BytesIO()
        torch.save({"format": C.FORMAT, "model": _Evil(builtins.eval, touch)}, buf)
        return buf.getvalue()

    return {"plain-pickle-os.system": plain, "pickle-inside-torch-zip-exec": inside_zip, "torch.save-eval": torch_saved}


@pytest.mark.parametrize("kind", ["plain-pickle-os.system", "pickle-inside-torch-zip-exec", "torch.save-eval"])
def test_malicious_checkpoint_is_refused_not_executed(kind, good_checkpoint, worker, tmp_path):
    marker = tmp_path / "PWNED"
    bad = tmp_path / "last.pt"
    bad.write_bytes(_evil_payloads(marker)[kind](good_checkpoint))
    out, executed = _load_probe(worker, bad, tmp_path)
    assert not executed, "the pickle's code ran"
    assert out.startswith("CheckpointError:") and "corrupt or unreadable" in out, out


def _damaged(data: bytes, kind: str) -> bytes:
    import zipfile

    z = zipfile.ZipFile(io.BytesIO(data))

    def payload_offset(member):
        info = z.getinfo(member)
        return info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)

    if kind == "first-byte-only":
        return data[:1]
    if kind == "half":
        return data[: len(data) // 2]
    if kind == "no-central-directory":
        return data[:-22]
    b = bytearray(data)
    if kind == "bit-flip-in-a-tensor":
        big = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
        b[payload_offset(big.filename) + big.file_size // 2] ^= 0x10
    elif kind == "bit-flip-in-the-pickle":
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        b[payload_offset(pkl) + 40] ^= 0x01
    elif kind == "zeroed-block":
        mid = len(b) // 3
        b[mid:mid + 4096] = bytes(4096)
    return bytes(b)


@pytest.mark.parametrize("kind", ["first-byte-only", "half", "no-central-directory", "bit-flip-in-a-tensor",
                                  "bit-flip-in-the-pickle", "zeroed-block"])
def test_damaged_checkpoint_is_a_checkpoint_error(kind, good_checkpoint, worker, tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(_damaged(good_checkpoint.read_bytes(), kind))
    out, _ = _load_probe(worker, bad, tmp_path)
    assert out.startswith("CheckpointError:") and "corrupt or unreadable" in out, out


@pytest.mark.parametrize("obj,match", [
    pytest.param(lambda: [1, 2, 3], "not a fastntxent training checkpoint", id="a-list"),
    pytest.param(lambda: {"format": "fastntxent.train/999"}, "not a fastntxent training checkpoint", id="future-format"),
    pytest.param(lambda: torch.zeros(3), "not a fastntxent training checkpoint", id="a-tensor"),
])
def test_foreign_checkpoint_is_a_checkpoint_error(obj, match, worker, tmp_path):
    bad = tmp_path / "last.pt"
    torch.save(obj(), bad)
    out, _ = _load_probe(worker, bad, tmp_path)
    assert out.startswith("CheckpointError:") and match in out, out


def _resume_probe(worker, path, tmp_path, *extra):
    """--resume through the CLI's main in the worker: (exit code, stderr lines)."""
    r = worker.run(f"""
        import contextlib, io, json
        from fastntxent.train.cli import main
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            rc = main(["--epochs", "2", *{QUICK!r}, "--resume", {str(path)!r}, "--run-dir", {str(tmp_path / "r")!r},
                       *{list(extra)!r}])
        print(json.dumps([rc, err.getvalue()]))
    """, timeout=120)
    assert r["ok"], r.get("traceback")
    import json

    rc, err = json.loads(r["stdout"])
    return rc, err.strip().splitlines()


EDITS = [  # (id, entry, bad value, text the error names)
    ("epoch-a-string", "epoch", "x", "epoch"),
    ("epoch-negative", "epoch", -1, "epoch"),
    ("history-none", "history", None, "history"),
    ("history-of-numbers", "history", [1, 2], "history"),
    ("rng-empty", "rng", {}, "rng"),
    ("rng-torch-state-garbage", "rng.torch", torch.zeros(3), "random-number state"),
    ("accum-a-list", "accum", [], "accum"),
    ("step-beyond-the-epoch", "step_in_epoch", 10**6, "step_in_epoch"),
    ("model-wrong-shapes", "model.first", torch.zeros(1), "model"),
    ("structural-other-method", "structural.method", "moco", "method"),
]


@pytest.mark.parametrize("entry,value,match", [pytest.param(e, v, m, id=i) for i, e, v, m in EDITS])
def test_edited_checkpoint_resume_is_exit_code_2_naming_the_entry(entry, value, match, good_checkpoint, worker, tmp_path):
    state = torch.load(good_checkpoint, weights_only=True)
    key, _, sub = entry.partition(".")
    if sub == "first":
        state[key][next(iter(state[key]))] = value
    elif sub:
        state[key][sub] = value
    else:
        state[key] = value
    bad = tmp_path / "edited.pt"
    torch.save(state, bad)
    rc, lines = _resume_probe(worker, bad, tmp_path)
    assert rc == 2 and lines and lines[0].startswith(PREFIX) and match in "\n".join(lines), lines
    assert not any("Traceback" in ln for ln in lines), lines


@pytest.mark.parametrize("where", ["empty-directory", "dangling-symlink"])
def test_resume_from_nothing_is_one_line(where, tmp_path):
    target = tmp_path / "d"
    if where == "empty-directory":
        target.mkdir()
    else:
        target.symlink_to(tmp_path / "nowhere.pt")
    _one_line_error(*_cli(["--resume", str(target)], tmp_path), "--resume")


# ---------------------------------------------------------------------------------------
# Signals during training (a real process, a real signal)
# ---------------------------------------------------------------------------------------
def _start_long_run(run_dir):
    out = open(run_dir.parent / f"{run_dir.name}.out", "w")
    err = open(run_dir.parent / f"{run_dir.name}.err", "w")
    p = subprocess.Popen([sys.executable, "-m", "fastntxent.train", "--epochs", "50", *QUICK, "--run-dir", str(run_dir)],
                         stdout=out, stderr=err, env=subprocess_env())
    return p, run_dir.parent / f"{run_dir.name}.err"


def _wait_for(path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited early with {proc.returncode}")
        if time.time() - t0 > timeout:
            proc.kill()
            pytest.fail(f"no {path.name} within {timeout} s")
        time.sleep(0.1)


def _finish(proc, timeout=120):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"hang: the run did not exit within {timeout} s of the signal")


@pytest.fixture(scope="module")
def sigterm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sigterm") / "run"
    proc, err = _start_long_run(run_dir)
    _wait_for(run_dir / "last.pt", proc)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGTERM)
    rc = _finish(proc)
    return run_dir, rc, err.read_text()


def test_sigterm_checkpoints_and_exits_143_with_the_resume_hint(sigterm_run):
    run_dir, rc, err = sigterm_run
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    assert "checkpoint saved to" in err and f"--resume {run_dir / 'last.pt'}" in err, err[-2000:]
    st = C.load_checkpoint(str(run_dir))
    assert st["epoch"] >= 1 and st["epoch"] < 50


def test_resume_after_sigterm_continues(sigterm_run):
    run_dir, _, _ = sigterm_run
    st = C.load_checkpoint(str(run_dir))
    epochs = st["epoch"] + 1  # finish the interrupted epoch, then stop
    p = subprocess.run([sys.executable, "-m", "fastntxent.train", "--epochs", str(epochs), *QUICK, "--resume",
                        str(run_dir)], capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert p.returncode == 0, p.stderr[-3000:]
    after = C.load_checkpoint(str(run_dir))
    assert (after["epoch"], after["step_in_epoch"]) == (epochs, 0)
    assert [r["epoch"] for r in after["history"]] == list(range(1, epochs + 1))


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("kill9") / "run"
    proc, err = _start_long_run(run_dir)
    _wait_for(run_dir / "last.pt", proc)
    time.sleep(0.5)
    proc.kill()  # SIGKILL: no handler, no final checkpoint
    rc = _finish(proc)
    # what a kill in the middle of a checkpoint write leaves behind
    (run_dir / f"last.pt.tmp.{proc.pid}").write_bytes(b"partial write")
    return run_dir, rc


def test_kill9_leaves_the_previous_checkpoint_loadable(killed_run):
    run_dir, rc = killed_run
    assert rc == -signal.SIGKILL
    st = C.load_checkpoint(str(run_dir))
    assert st["epoch"] >= 1 and st["step_in_epoch"] == 0


def test_resume_after_kill9_continues_and_removes_the_partial_write(killed_run):
    run_dir, _ = killed_run
    st = C.load_checkpoint(str(run_dir))
    epochs = st["epoch"] + 1
    p = subprocess.run([sys.executable, "-m", "fastntxent.train", "--epochs", str(epochs), *QUICK, "--resume",
                        str(run_dir / "last.pt")], capture_output=True, text=True, timeout=180, env=subprocess_env())
    assert p.returncode == 0, p.stderr[-3000:]
    after = C.load_checkpoint(str(run_dir))
    assert after["epoch"] == epochs and not list(run_dir.glob("last.pt.tmp.*"))
