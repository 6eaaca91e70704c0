"""Issue 13 benchmark: data parallelism on this CPU, measured honestly.

SmolLM2-135M LoRA (r=16 all-linear), the same global batch and steps: one process with 2
threads vs 2 processes x 1 thread under torchrun (gloo). Reports the training-loop time of each
and their ratio. A CPU's cores are shared memory bandwidth, so this is not where DDP pays off;
on GPUs the planner's per-GPU figures (`peftkit plan --gpus N`) are the expectation.
"""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_results

MODEL, STEPS, GLOBAL_BATCH = "smollm2-135m", 6, 8
ROWS = [{"prompt": f"Write a short note about item {i}.",
         "completion": f"Item {i} is ready and will ship on day {i % 7}."} for i in range(64)]


def run(out: Path, data: Path, procs: int, threads: int) -> float:
    cmd = [sys.executable, "-m", "peftkit", "train", "--model", MODEL, "--data", str(data),
           "--method", "lora", "--rank", "16", "--steps", str(STEPS), "--val-split", "0",
           "--batch-size", str(GLOBAL_BATCH // procs), "--device", "cpu", "--dropout", "0",
           "--output", str(out)] + (["--nproc", str(procs)] if procs > 1 else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=1800)
    return json.loads((out / "report.json").read_text())["train_loop_seconds"]


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "d.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
        one = run(tmp / "one", data, 1, 2)
        two = run(tmp / "two", data, 2, 1)
    rows = [("training loop, 1 process x 2 threads", f"{one:.1f} s", ""),
            ("training loop, 2 processes x 1 thread (DDP, gloo)", f"{two:.1f} s", ""),
            ("2 processes / 1 process", f"{two / one:.2f}", "report (CPU: no gain expected)")]
    write_results("dist", f"DDP on this CPU: {MODEL} LoRA, global batch {GLOBAL_BATCH}, "
                  f"{STEPS} steps (issue 13)", rows,
                  {"one_process_s": one, "two_processes_s": two, "ratio": two / one})


if __name__ == "__main__":
    main()
