"""`peftkit compare`: the same data, split and seed through every method, each in a fresh
process (so peak RSS is its own), then one table and one plot of quality against memory and time.
Each method trains at its default learning rate for the task (train/config.default_lr, the
values bench/quality.py validated on SST-2) unless --lr is passed through."""

import json
import subprocess
import sys
from pathlib import Path

from peftkit.errors import PeftkitError

MIB = 2 ** 20


def quality(report: dict) -> tuple[str, float]:
    m = report["metrics"]
    for key in ("accuracy", "exact_match"):
        if key in m:
            return key, m[key]
    return "perplexity", m.get("perplexity", float("nan"))


def check_methods(methods: list[str], data: str, task: str = "auto") -> list[str]:
    """The methods named (spaces trimmed, each once), every one checked before the first
    trains: known, and able to train on this data's task."""
    from peftkit.data import load_dataset
    from peftkit.train.build import CAUSAL_ONLY
    from peftkit.train.config import METHODS
    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    if not names:
        raise PeftkitError("--methods: name at least one method")
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise PeftkitError(f"--methods: unknown method '{unknown[0]}' (choose from "
                           f"{', '.join(METHODS)})")
    if task == "auto":
        task = "classify" if load_dataset(data).kind == "classification" else "causal-lm"
    if task == "classify":
        wrong = [m for m in names if m in CAUSAL_ONLY]
        if wrong:
            raise PeftkitError(f"--methods: {', '.join(wrong)} train a causal LM; {data} is "
                               "classification data (drop them, or compare on causal-LM data)")
    return names


def compare(model: str, data: str, methods: list[str], output: str, extra: list[str]) -> list[dict]:
    task = extra[extra.index("--task") + 1] if "--task" in extra[:-1] else "auto"
    methods = check_methods(methods, data, task)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for method in methods:
        cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", model, "--data", data,
               "--method", method, "--output", str(out / method), "--overwrite", *extra]
        print(f"== {method}: {' '.join(cmd[3:])}", flush=True)
        if subprocess.run(cmd).returncode != 0:
            raise PeftkitError(f"compare: method '{method}' failed (see its output above)")
        reports.append(json.loads((out / method / "report.json").read_text()))
    rows = [summary_row(r) for r in reports]
    (out / "compare.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (out / "compare.md").write_text(f"# {model} on {data}\n\n{table}\n")
    plot(rows, out / "compare.png")
    print(table)
    print(f"wrote {out / 'compare.md'}, {out / 'compare.png'}")
    return rows


def summary_row(r: dict) -> dict:
    metric, value = quality(r)
    return {"method": r["method"], "metric": metric, "quality": value,
            "macro_f1": r["metrics"].get("macro_f1"),
            "trainable_percent": r["trainable_percent"], "trainable_params": r["trainable_params"],
            "model_state_mib": r["model_state_bytes"] / MIB, "peak_rss_mib": r["peak_rss_bytes"] / MIB,
            "predicted_peak_rss_mib": r["predicted_peak_rss"]["total"] / MIB,
            "wall_seconds": r["wall_seconds"], "steps": len(r["train_losses"]),
            "kept_step": r.get("kept_step"), "kept": r.get("kept"), "stopped": r.get("stopped")}


def markdown_table(rows: list[dict]) -> str:
    lines = ["| method | quality | macro-F1 | saved adapter | stopped | trainable % "
             "| model state (MiB) | peak RSS (MiB) | planner's peak RSS (MiB) | wall (s) |",
             "| --- " * 10 + "|"]
    for r in rows:
        f1 = "—" if r.get("macro_f1") is None else f"{r['macro_f1']:.3f}"
        saved = f"{r.get('kept') or 'last'}: step {r.get('kept_step') or r['steps']}"
        stopped = f"early, at step {r['steps']}" if r.get("stopped") else "—"
        lines.append(f"| {r['method']} | {r['metric']} {r['quality']:.3f} | {f1} | {saved} | "
                     f"{stopped} | {r['trainable_percent']:.3f} | {r['model_state_mib']:.1f} | "
                     f"{r['peak_rss_mib']:.0f} | {r['predicted_peak_rss_mib']:.0f} | "
                     f"{r['wall_seconds']:.1f} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in ((axes[0], "model_state_mib", "model state: weights + grads + Adam (MiB)"),
                           (axes[1], "wall_seconds", "wall time (s)")):
        for r in rows:
            ax.scatter(r[key], r["quality"], s=60)
            ax.annotate(r["method"], (r[key], r["quality"]), textcoords="offset points",
                        xytext=(5, 4))
        ax.set_xlabel(label)
        ax.set_ylabel(rows[0]["metric"])
        ax.grid(alpha=0.3)
    fig.suptitle("Quality against memory and time, same data and seed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
