"""Issue 5 benchmark on smollm2-135m: LoRA step / full-FT step on the same batch; probe epochs
2..n / one full-FT epoch; model-state bytes and peak RSS per method (each method in its own
process, via `peftkit compare`). Data: SST-2 from ../shared/data when present, else the demo's
generated reviews."""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_results
from peftkit.train.compare import compare

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2" / "train.tsv"
N_EXAMPLES, EPOCHS, MIB = 160, 2, 2 ** 20


def worker(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.worker", "step", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def dataset(tmp: Path) -> Path:
    path = tmp / "reviews.jsonl"
    if SST2.exists():
        lines = SST2.read_text().splitlines()[1:N_EXAMPLES + 1]
        rows = [{"text": l.split("\t", 1)[1], "label": l.split("\t", 1)[0]} for l in lines]
    else:
        from peftkit.demo.tasks import TASKS
        rows = [{"text": r["messages"][1]["content"], "label": r["messages"][2]["content"]}
                for r in TASKS[0].examples(N_EXAMPLES, seed=0)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    lora, full = worker("--method", "lora"), worker("--method", "full")
    with tempfile.TemporaryDirectory() as tmp:
        data = dataset(Path(tmp))
        common = ["--batch-size", "8", "--max-length", "64", "--val-split", "0.1", "--seed", "0"]
        rows = compare("smollm2-135m", str(data), ["full", "probe"], f"{tmp}/epochs",
                       common + ["--epochs", str(EPOCHS)])
        reports = {m: json.loads((Path(tmp) / "epochs" / m / "report.json").read_text())
                   for m in ("full", "probe")}
        per_method = compare("smollm2-135m", str(data), ["lora", "qlora", "dora", "ia3", "bottleneck"],
                             f"{tmp}/methods", common + ["--steps", "4"])
    full_epoch = reports["full"]["train_loop_seconds"] / EPOCHS
    # The probe's loop never touches the backbone: every epoch, the first included, trains the
    # head on cached features; the one backbone pass is `feature_seconds`.
    probe_later = reports["probe"]["train_loop_seconds"] * (EPOCHS - 1) / EPOCHS
    table = [
        ("train step 8x48: LoRA / full FT", f"{lora['step_s'] / full['step_s']:.2f} "
         f"({lora['step_s']:.2f} s vs {full['step_s']:.2f} s)", "<= 0.7"),
        (f"probe epochs 2..{EPOCHS} / one full-FT epoch (SST-2 x{N_EXAMPLES}, classify)",
         f"{probe_later / full_epoch:.4f} ({probe_later:.2f} s vs {full_epoch:.1f} s)", "<= 0.02"),
        ("probe feature pass (once, epoch 1)", f"{reports['probe']['feature_seconds']:.1f} s", "report"),
    ]
    for r in rows + per_method:
        table.append((f"{r['method']}: model state / peak RSS / {r['metric']}",
                      f"{r['model_state_mib']:.0f} MiB / {r['peak_rss_mib']:.0f} MiB / "
                      f"{r['quality']:.3f}", "report"))
    write_results("train", "Trainer: methods side by side (smollm2-135m)", table,
                  {"step": {"lora": lora, "full": full}, "epochs": rows, "methods": per_method})


if __name__ == "__main__":
    main()
