"""Hardening, training: SIGKILL at random moments (checkpoint writes included) never loses more
than the steps since the last complete checkpoint, and `--resume` then ends exactly where an
uninterrupted run ends. Failed writes (disk full, read-only) leave the previous checkpoint."""

import errno
import json
import os
import random
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from peftkit.errors import PeftkitError
from peftkit.train import checkpoint as ckpt

ROWS = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3}"} for i in range(8)]
STEPS = 60


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "peftkit.cli", "train", "--model", "tiny-llama", "--data",
            str(data), "--method", "lora", "--steps", str(STEPS), "--batch-size", "2",
            "--val-split", "0", "--save-every", "1", "--dropout", "0.1", "--lr", "1e-2",
            "--output", str(out), *extra]


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _adapter(out):
    return load_file(out / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def data(write):
    return write("lm.jsonl", ROWS)


def test_sigkill_at_random_moments_then_resume_is_exact(data, tmp_path):
    whole = tmp_path / "whole"
    subprocess.run(_cmd(data, whole), env=ENV, check=True, capture_output=True, timeout=300)
    out, rng, kills, mid_write = tmp_path / "cut", random.Random(16), 0, 0
    deadline = time.time() + 240
    while kills < 10 and time.time() < deadline:
        proc = subprocess.Popen(_cmd(data, out, "--resume"), env=ENV, stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True)
        line = ""
        while "step" not in line and proc.poll() is None:  # "resuming from step N" / "step 0"
            line = proc.stderr.readline()
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:  # it finished first: nothing left to interrupt
            break
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        kills += 1
        mid_write += (out / ".checkpoint-tmp").exists() or (out / ".checkpoint-old").exists()
    assert kills >= 10, f"only {kills} kills landed before training ended"
    done = subprocess.run(_cmd(data, out, "--resume"), env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Traceback" not in done.stderr
    print(f"{kills} kills, {mid_write} inside a checkpoint write")
    a, b = _adapter(whole), _adapter(out)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    p = [torch.nn.Parameter(torch.randn(4, 3, generator=g))]
    return p, torch.optim.AdamW(p)


def test_death_between_the_renames_recovers_the_newer_checkpoint(tmp_path, monkeypatch):
    p, opt = _params(0)
    ckpt.save_checkpoint(tmp_path, p, opt, {"step": 1, "losses": [1.0], "history": []})
    real = os.replace
    calls = []

    def dies_on_second(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise SystemExit("killed between the renames")
        real(src, dst)
    monkeypatch.setattr(ckpt.os, "replace", dies_on_second)
    with pytest.raises(SystemExit):
        ckpt.save_checkpoint(tmp_path, p, opt, {"step": 2, "losses": [1.0, 0.5], "history": []})
    monkeypatch.setattr(ckpt.os, "replace", real)
    assert not (tmp_path / "checkpoint").exists()  # the window: only -old and -tmp remain
    assert ckpt.recover(tmp_path) == "recovered the checkpoint from .checkpoint-tmp"
    q, opt2 = _params(1)
    assert ckpt.load_checkpoint(tmp_path, q, opt2)["step"] == 2
    assert torch.equal(q[0], p[0])


def test_read_only_directory_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    p, opt = _params(0)
    ckpt.save_checkpoint(tmp_path, p, opt, {"step": 1})

    def read_only(*_a, **_k):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(ckpt, "save_file", read_only)
    with pytest.raises(PeftkitError, match="cannot write a checkpoint .Read-only file system.; "
                                           "the previous checkpoint in .* is intact"):
        ckpt.save_checkpoint(tmp_path, p, opt, {"step": 2})
    assert json.loads((tmp_path / "checkpoint" / "trainer_state.json").read_text())["step"] == 1
    assert not (tmp_path / ".checkpoint-tmp").exists()


def test_disk_full_mid_run_is_a_clear_error_and_the_checkpoint_survives(data, tmp_path):
    out = tmp_path / "run"
    first = subprocess.run(_cmd(data, out), env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    size = (out / "checkpoint" / "state.safetensors").stat().st_size

    def small_disk():  # writes past `size // 2` bytes fail with EFBIG, as on a full disk
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (size // 2, size // 2))
    longer = [a if a != str(STEPS) else str(STEPS + 5) for a in _cmd(data, out, "--resume")]
    full = subprocess.run(longer, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=small_disk)
    err = full.stderr.strip().splitlines()[-1]
    assert full.returncode == 2 and err.startswith("peftkit: error:"), full.stderr[-2000:]
    assert "cannot write a checkpoint" in err and "is intact" in err
    assert "Traceback" not in full.stderr
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == STEPS and ckpt.complete(out / "checkpoint")


TAMPERED = {  # trainer_state.json edits -> the field the error must name
    "negative step": ({"step": -3}, "'step' must be a whole number >= 0"),
    "text step": ({"step": "abc"}, "'step' must be"),
    "null step": ({"step": None}, "'step' must be"),
    "fractional step": ({"step": 2.5}, "'step' must be"),
    "zero batch": ({"global_batch": 0}, "'global_batch' must be a whole number >= 1"),
    "no n_params": ({"n_params": "drop"}, "'n_params' must be"),
    "losses off": ({"losses": [1.0]}, "1 losses for step 2"),
    "losses text": ({"losses": "x"}, "'losses' must be a list of numbers"),
    "history": ({"history": 3}, "'history' must be a list of objects"),
    "past the end": ({"step": 100, "losses": [1.0] * 100}, "at step 100, past this run's 2 "
                                                           "steps"),
    "no rng": ("rng", "no tensor 'rng.torch'"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_a_tampered_trainer_state_is_one_line_naming_the_field(data, tmp_path, capsys, case):
    from safetensors.torch import save_file
    from peftkit.cli import main
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--method", "lora",
            "--steps", "2", "--batch-size", "2", "--val-split", "0", "--output",
            str(tmp_path / "run")]
    assert main(args) == 0
    ckpt_dir = tmp_path / "run" / "checkpoint"
    edit, reason = TAMPERED[case]
    if edit == "rng":
        tensors = load_file(ckpt_dir / "state.safetensors")
        del tensors["rng.torch"]
        save_file(tensors, ckpt_dir / "state.safetensors")
    else:
        state = json.loads((ckpt_dir / "trainer_state.json").read_text())
        state.update(edit)
        state = {k: v for k, v in state.items() if v != "drop"}
        (ckpt_dir / "trainer_state.json").write_text(json.dumps(state))
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and err.count("peftkit: error:") == 1, err
    last = err.splitlines()[-1]
    assert last.startswith("peftkit: error:") and reason in last, err
