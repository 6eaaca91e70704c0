"""More than one process (issue 13), on torch's engine: torchrun + gloo on this CPU.

N processes must compute what one process computes with the same global batch (losses are
token-weighted over the global batch), for DDP (adapters) and FSDP2 (full fine-tuning), and a
checkpoint written by 2 processes resumes in 1. Each process gets OMP_NUM_THREADS=1.
"""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from peftkit.cli import main
from tests.helpers import free_port

ROWS = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3} and more words {i}"}
        for i in range(12)]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def data(write):
    return write("lm.jsonl", ROWS)


def _train(data, out, *flags, env=ENV):
    cmd = [sys.executable, "-m", "peftkit", "train", "--model", "tiny-llama", "--data", str(data),
           "--val-split", "0", "--dropout", "0", "--device", "cpu", "--schedule", "constant",
           "--warmup", "0", "--output", str(out), *flags]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _weights(out, part):
    return load_file(glob.glob(str(out / part / "*.safetensors"))[0])


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _losses(out):
    return json.loads((out / "report.json").read_text())["train_losses"]


@pytest.mark.parametrize("method,part,lr,strategy", [
    ("lora", "adapter", "1e-2", "ddp"), ("full", "model", "1e-3", "fsdp"),
    ("probe", ".", "1e-2", "ddp"),  # features sharded and gathered, the head on DDP
    ("lora", "adapter", "1e-2", "fsdp")])  # frozen base and adapters sharded together
def test_two_processes_equal_one_with_the_same_global_batch(data, tmp_path, method, part, lr,
                                                            strategy):
    one, two = tmp_path / "one", tmp_path / "two"
    _train(data, one, "--method", method, "--steps", "8", "--batch-size", "6", "--lr", lr)
    run = _train(data, two, "--method", method, "--steps", "8", "--batch-size", "3", "--lr", lr,
                 "--nproc", "2", "--strategy", strategy)
    assert "running torchrun --standalone --nproc_per_node=2 -m peftkit train" in run.stderr
    assert f"2 processes, strategy {strategy}" in run.stderr
    assert _max_diff(_weights(one, part), _weights(two, part)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(_losses(one), _losses(two))) <= 1e-5
    assert not (two / "report.json").read_text().count("rank")  # one report, rank 0's


def test_a_checkpoint_of_two_processes_resumes_in_one(data, tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ["--method", "lora", "--lr", "1e-2", "--batch-size", "3"]
    _train(data, whole, *common, "--steps", "8", "--grad-accum", "2")
    _train(data, cut, *common, "--steps", "4", "--nproc", "2")
    resumed = _train(data, cut, *common, "--steps", "8", "--resume")
    assert "keeping the checkpoint's global batch of 6: 2 micro-steps of 3" in resumed.stderr
    assert _max_diff(_weights(whole, "adapter"), _weights(cut, "adapter")) <= 1e-5
    assert max(abs(a - b) for a, b in zip(_losses(whole), _losses(cut))) <= 1e-5


def test_bad_distributed_input_is_one_line_and_never_hangs(data, tmp_path, write, capsys):
    out = tmp_path / "x"
    base = ["train", "--model", "tiny-llama", "--data", str(data), "--output", str(out),
            "--device", "cpu", "--steps", "1"]
    assert main([*base, "--nproc", "2", "--strategy", "fsdp", "--method", "ia3"]) == 2
    assert "--strategy fsdp: shards full and lora runs; for --method ia3 use --strategy ddp" in \
        capsys.readouterr().err
    tiny = write("one.jsonl", ROWS[:2])
    assert main([*base[:4], str(tiny), *base[5:], "--nproc", "3", "--val-split", "0"]) == 2
    assert "2 training examples cannot be split over --nproc 3" in capsys.readouterr().err
    assert not out.exists()
    cmd = [sys.executable, "-m", "peftkit", *base, "--dist-timeout", "3"]
    no_rendezvous = {**ENV, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"}
    no_rendezvous.pop("MASTER_ADDR", None)
    alone = {**no_rendezvous, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    for env in (no_rendezvous, alone):  # no address; an address where the peer never comes
        start = time.time()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        err = done.stderr.strip().splitlines()[-1]
        assert done.returncode == 2 and err.startswith("peftkit: error: cannot join the "
                                                       "process group of 2"), done.stderr[-2000:]
        assert "Traceback" not in done.stderr and time.time() - start < 60


def test_sigterm_to_one_rank_stops_every_rank_after_a_checkpoint(data, tmp_path):
    import psutil
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftkit", "train", "--model", "tiny-llama", "--data", str(data),
           "--method", "lora", "--steps", "100000", "--batch-size", "3", "--val-split", "0",
           "--device", "cpu", "--output", str(out), "--nproc", "2"]
    launcher = subprocess.Popen(cmd, env=ENV, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        ranks = []
        while len(ranks) < 2 and time.time() < deadline:
            kids = psutil.Process(launcher.pid).children(recursive=True)
            ranks = [k for k in kids if "peftkit" in " ".join(k.cmdline()) and
                     "LOCAL_RANK" in k.environ()]
            time.sleep(0.2)
        while not (out / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(1.0)
        one = max(ranks, key=lambda k: k.environ()["LOCAL_RANK"])  # rank 1: not the writer
        one.send_signal(signal.SIGTERM)
        _, err = launcher.communicate(timeout=120)
    finally:
        launcher.kill()
    assert "stopped by SIGTERM" in err or "stopped by a signal to another rank" in err
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 1 and state["global_batch"] == 6
    assert all(not k.is_running() or k.status() == psutil.STATUS_ZOMBIE for k in ranks)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_early_stopping_and_the_best_adapter_under_torchrun(data, write, tmp_path, strategy):
    """Every rank evaluates the same validation data and so stops at the same step; the best
    tensors (FSDP shards gathered) are the saved adapter, as in one process."""
    other = write("other.jsonl", [{"prompt": f"Q: item {i}?", "completion": f"zz{i % 2}"}
                                  for i in range(6)])
    one, two = tmp_path / "one", tmp_path / "two"
    common = ["--method", "lora", "--lr", "1e-2", "--steps", "12", "--val-data", str(other),
              "--eval-every", "2", "--patience", "2", "--keep", "best", "--exact-match-max", "0"]
    _train(data, one, *common, "--batch-size", "6")
    _train(data, two, *common, "--batch-size", "3", "--nproc", "2", "--strategy", strategy)
    a, b = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert a["stopped"].startswith("early stop at step 8") and a["kept_step"] == 4  # measured
    assert a["kept_step"] == b["kept_step"] and a["stopped"] == b["stopped"]
    assert len(a["train_losses"]) == len(b["train_losses"]) == 8
    assert _max_diff(_weights(one, "adapter"), _weights(two, "adapter")) <= 1e-5
