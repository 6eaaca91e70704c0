"""Issue 6 validation on smollm2-135m: the planner's predicted model-state bytes (goal ±5%) and
peak RSS (goal ±15%) against what each `peftkit train` process measured, every method, on a
classification set (SST-2 when ../shared/data has it, else generated reviews) and a chat set;
plus the peak RSS of one LoRA run with and without the trainer's per-layer malloc_trim,
side by side."""

import json
import os
import tempfile
from pathlib import Path

from bench.common import write_results
from bench.train import dataset as classification_set
from peftkit.train.compare import compare

MIB = 2 ** 20
CLASSIFY = ["full", "probe", "lora", "qlora", "dora", "ia3", "bottleneck"]
CAUSAL = ["full", "probe", "lora", "qlora", "dora", "ia3", "bottleneck", "prompt", "prefix"]


def chat_set(tmp: Path) -> Path:
    from peftkit.demo.tasks import TASKS
    path = tmp / "orders.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in TASKS[2].examples(64, seed=0)))
    return path


def runs(tmp: Path, name: str, data: Path, methods: list[str], extra: list[str]) -> list[dict]:
    common = ["--batch-size", "8", "--steps", "2", "--val-split", "0", "--seed", "0"]
    compare("smollm2-135m", str(data), methods, str(tmp / name), common + extra)
    return [json.loads((tmp / name / m / "report.json").read_text()) for m in methods]


def row(label: str, r: dict) -> list[tuple[str, str, str]]:
    pred, meas = r["predicted_peak_rss"]["total"], r["peak_rss_bytes"]
    state, state_meas = r["predicted_model_state_bytes"], r["model_state_bytes"]
    rows, length = r["largest_batch"]
    return [(f"{label} {r['method']} ({rows}x{length}): peak RSS predicted / measured",
             f"{pred / meas:.3f} ({pred / MIB:.0f} vs {meas / MIB:.0f} MiB)", "0.85-1.15"),
            (f"{label} {r['method']}: model state predicted / measured",
             f"{state / state_meas:.4f} ({state / MIB:.1f} vs {state_meas / MIB:.1f} MiB)",
             "0.95-1.05")]


def total(prediction) -> float:
    return prediction["total"] if isinstance(prediction, dict) else prediction


def main() -> None:
    table, raw = [], {"runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        chat = chat_set(tmp)
        sets = [("classify", classification_set(tmp), CLASSIFY, ["--max-length", "64"]),
                ("chat", chat, CAUSAL, ["--max-length", "128"]),
                ("chat, grad checkpointing", chat, ["lora", "full"],
                 ["--max-length", "128", "--grad-checkpointing"])]
        for label, data, methods, extra in sets:
            for r in runs(tmp, label.replace(" ", "_").replace(",", ""), data, methods, extra):
                table += row(label, r)
                raw["runs"].append({k: r[k] for k in (
                    "method", "task", "largest_batch", "peak_rss_bytes", "predicted_peak_rss",
                    "model_state_bytes", "predicted_model_state_bytes", "runtime_rss_bytes")})
        peaks = {}
        for trim in ("1", "0"):
            os.environ["PEFTKIT_MALLOC_TRIM"] = trim
            peaks[trim] = runs(tmp, f"trim{trim}", chat, ["lora"],
                               ["--max-length", "128"])[0]
        os.environ.pop("PEFTKIT_MALLOC_TRIM")
    on, off = (peaks[k]["peak_rss_bytes"] for k in ("1", "0"))
    t_on, t_off = (peaks[k]["train_loop_seconds"] for k in ("1", "0"))
    table.append(("LoRA chat: peak RSS with / without malloc_trim between layers",
                  f"{on / off:.2f} ({on / MIB:.0f} vs {off / MIB:.0f} MiB; loop {t_on:.1f} s vs "
                  f"{t_off:.1f} s)", "report"))
    for key, measured, goal in (("predicted_peak_rss", "peak_rss_bytes", "<= 15%"),
                                ("predicted_model_state_bytes", "model_state_bytes", "<= 5%")):
        errors = [abs(total(r[key]) / r[measured] - 1) for r in raw["runs"]]
        table.append((f"largest {measured} prediction error, all runs above",
                      f"{max(errors):.2%}", goal))
    raw["malloc_trim"] = {"on": on, "off": off, "loop_s_on": t_on, "loop_s_off": t_off}
    write_results("plan", "Planner vs measured CPU runs (smollm2-135m)", table, raw)


if __name__ == "__main__":
    main()
