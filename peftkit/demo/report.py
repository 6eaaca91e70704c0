"""The demo's summary: a table on stdout, demo_report.md and three PNG plots."""

import json
from pathlib import Path

MIB = 2 ** 20
PLOTS = ("demo_accuracy.png", "demo_memory.png", "demo_load.png")


# held-out exact match per customer: what each baseline is (run.evaluate)
COLUMNS = {"base": "base", "icl": "base, 4 examples in prompt", "shared": "one adapter for all",
           "adapter": "own adapter"}


def summary_table(result: dict) -> str:
    lines = ["| customer | " + " | ".join(COLUMNS.values()) + " | adapter size | cold load |",
             "| --- " * (len(COLUMNS) + 3) + "|"]
    for c, acc in result["accuracy"].items():
        size = result["memory"]["adapter_bytes"][c] / MIB
        load = result["load_seconds"].get(c)
        lines.append(f"| {c} | " + " | ".join(f"{acc[k]:.0%}" for k in COLUMNS)
                     + f" | {size:.1f} MiB | "
                     + (f"{load * 1000:.0f} ms |" if load is not None else "- |"))
    mean = {k: sum(a[k] for a in result["accuracy"].values()) / len(result["accuracy"])
            for k in COLUMNS}
    lines.append("| **mean** | " + " | ".join(f"{mean[k]:.0%}" for k in COLUMNS) + " | | |")
    return "\n".join(lines)


def write_report(result: dict, out: Path) -> None:
    m, s = result["memory"], result["served"]
    table = summary_table(result)
    text = [
        "# peftkit demo: five customers, one base", "",
        f"Base: {result['config']['model']} in NF4; five QLoRA adapters and one trained on all "
        f"five customers' data mixed "
        f"(r={result['config']['rank']}, {result['config']['steps']} steps each). "
        f"Total wall time {result['wall_seconds']:.0f} s.", "",
        table, "",
        f"Served over HTTP, concurrently: {s['correct']}/{s['total']} correct, {s['foreign']} "
        f"showing another customer's behaviour ({s['seconds']:.1f} s).", "",
        f"Memory: five separate NF4 models {m['separate_models_bytes'] / MIB:.0f} MiB vs one shared "
        f"base + five adapters {m['shared_bytes'] / MIB:.0f} MiB (measured tensor bytes).", "",
        "| customer | prompt | served answer |", "| --- | --- | --- |"]
    text += [f"| {x['customer']} | {x['prompt']} | `{x['answer']}` |" for x in s["samples"]]
    text += ["", "![accuracy](demo_accuracy.png) ![memory](demo_memory.png) "
             "![load](demo_load.png)"]
    (out / "demo_report.md").write_text("\n".join(text) + "\n")
    (out / "demo_result.json").write_text(json.dumps(result, indent=2, default=str))
    plots(result, out)
    print("\n== 6. Summary\n" + table)
    print(f"\nwrote {out / 'demo_report.md'} and plots in {out}")


def plots(result: dict, out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["accuracy"])
    width = 0.8 / len(COLUMNS)
    fig, ax = plt.subplots(figsize=(8, 3.8))
    for j, (key, label) in enumerate(COLUMNS.items()):
        ax.bar([i - 0.4 + width * (j + 0.5) for i in range(len(names))],
               [result["accuracy"][n][key] * 100 for n in names], width, label=label)
    ax.set_xticks(list(range(len(names))), names)
    ax.set_ylabel("held-out exact match (%)")
    ax.set_ylim(0, 125)
    ax.legend(loc="upper center", ncols=4, fontsize=8)
    ax.set_title("Each customer's task: the base, in-context learning, one shared adapter, its own")
    fig.tight_layout()
    fig.savefig(out / "demo_accuracy.png", dpi=110)
    plt.close(fig)

    m = result["memory"]
    _bars(plt, out / "demo_memory.png", ["5 separate\nNF4 models", "1 shared base\n+ 5 adapters"],
          [m["separate_models_bytes"] / MIB, m["shared_bytes"] / MIB], "MiB (measured tensors)",
          "Serving memory")
    loads = result["load_seconds"]
    _bars(plt, out / "demo_load.png", list(loads), [v * 1000 for v in loads.values()],
          "cold load, disk -> slot (ms)", "Adapter load latency")


def _bars(plt, path: Path, labels: list[str], values: list[float], ylabel: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(labels, values)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
