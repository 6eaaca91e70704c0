"""docs/results.md and its plot from docs/results.json (bench/quality.py's records)."""

import json
import time

from bench.common import DOCS
from bench.quality_lm import CHUNK_LINES
from peftkit.plan.evidence import PATH as EVIDENCE

MODELS = {"minilm-l6": "MiniLM-L6 (22M, encoder, mean pooling)",
          "smollm2-135m": "SmolLM2-135M (decoder, last-token pooling)"}


def sst2_rows(results: dict, model: str, prefix: str = "sst2") -> list[dict]:
    return [r for k, r in results.items() if k.startswith(f"{prefix}/{model}/")]


# (prefix of the records, how the section's title says it): (a), then (a) at a longer budget
BUDGETS = {"sst2": "", "sst2-3ep": ", three epochs"}


NAMES = {"full": "full FT", "probe": "probe", "lora": "LoRA", "qlora": "QLoRA", "dora": "DoRA",
         "ia3": "IA³", "bottleneck": "bottleneck", "prompt": "prompt tuning"}
PAIRS = {"lora-vs-full": ("lora", "full"), "qlora-vs-full": ("qlora", "full"),
         "dora-vs-full": ("dora", "full"), "probe-vs-full": ("probe", "full"),
         "qlora-vs-lora": ("qlora", "lora")}


def findings(results: dict) -> dict[str, list[str]]:
    """{finding: lines}, each line one measured comparison (peftkit/plan/evidence.py maps the
    advisor's rules to these keys)."""
    out: dict[str, list[str]] = {}
    for (prefix, budget), model in ((b, m) for b in BUDGETS.items() for m in MODELS):
        rows = {r["method"]: r for r in sst2_rows(results, model, prefix)}
        for key, (method, to) in PAIRS.items():
            if method in rows and to in rows:
                a, b = rows[method]["accuracy"], rows[to]["accuracy"]
                out.setdefault(key, []).append(
                    f"SST-2 ({rows[method]['train_examples']} sentences{budget}), {model}: "
                    f"{NAMES[method]} {a:.3f} vs {NAMES[to]} {b:.3f} accuracy "
                    f"({100 * (a - b):+.1f} points; docs/results.md)")
    coq = {r["name"]: r for r in lm_rows(results)}
    if "full" in coq:
        full = coq["full"]["perplexity"]
        out["rank-far-domain"] = [
            f"Coq (a proof language far from SmolLM2's data): LoRA r={name[6:]} held-out "
            f"perplexity {coq[name]['perplexity']:.2f} vs full FT {full:.2f} "
            f"({coq[name]['perplexity'] / full - 1:+.0%}; docs/results.md)"
            for name in ("lora-r8", "lora-r32", "lora-r64") if name in coq]
        if "probe" in coq and "coq/base" in results:
            out["probe-far-domain"] = [
                f"Coq: probe (frozen backbone, LM head trained) perplexity "
                f"{coq['probe']['perplexity']:.2f} vs full FT {full:.2f}, base "
                f"{results['coq/base']['heldout']['perplexity']:.2f} (docs/results.md)"]
    demo = results.get("customers")
    if demo:
        mean = {k: sum(c[k] for c in demo["accuracy"].values()) / len(demo["accuracy"])
                for k in ("base", "icl", "shared", "adapter")}
        where = f"five demo customers ({demo['steps']} steps, {demo['model']})"
        out["icl-vs-own"] = [f"{where}: base with 4 examples in its prompt {mean['icl']:.0%} vs "
                             f"own adapters {mean['adapter']:.0%} exact match (base alone "
                             f"{mean['base']:.0%}; docs/results.md)"]
        out["shared-vs-own"] = [f"{where}: one adapter trained on all five {mean['shared']:.0%} "
                                f"vs one adapter each {mean['adapter']:.0%} exact match "
                                "(docs/results.md)"]
    return out


def write_report(results: dict) -> None:
    lines = ["# Quality on real data (issue 15)", "",
             f"Machine: {results.get('machine', '?')}. Written {time.strftime('%Y-%m-%d')} by "
             "`make bench-quality` (`python -m bench.quality`); every row is one `peftkit train` "
             "process, hyper-parameters from the cited papers, not tuned on the dev set.", ""]
    lines += sst2_section(results) + lm_section(results) + sweep_section(results) \
        + customers_section(results)
    found = findings(results)
    lines += ["## Findings the planner cites", "",
              *[f"- `{key}`: {line}" for key, ls in found.items() for line in ls], ""]
    (DOCS / "results.md").write_text("\n".join(lines))
    EVIDENCE.write_text(json.dumps(found, indent=2, ensure_ascii=False) + "\n")
    plot(results)
    plot_sweep(results)
    print("\n".join(lines))


def sst2_section(results: dict) -> list[str]:
    lines = []
    for (prefix, budget), (model, title) in ((b, m) for b in BUDGETS.items()
                                             for m in MODELS.items()):
        rows = sst2_rows(results, model, prefix)
        if not rows:
            continue
        n = rows[0]["train_examples"]
        lines += [f"## (a) SST-2, {title}{budget}", "",
                  f"{n} training sentences (seeded, half positive), the 872 GLUE dev sentences "
                  "for evaluation. ![accuracy vs memory](results-sst2.png)", "",
                  "| method | accuracy | macro-F1 | trainable % | peak RSS (MiB) | wall (s) "
                  "| settings (source) |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            f1 = f"{r['macro_f1']:.3f}" if r.get("macro_f1") is not None else "—"
            lines.append(f"| {r['method']} | {r['accuracy']:.3f} | {f1} | "
                         f"{r['trainable_percent']:.3f} | {r['peak_rss_mib']:.0f} | "
                         f"{r['wall_seconds']:.0f} | `{r['flags']}` ({r['source']}) |")
        lines.append("")
    return lines


def lm_rows(results: dict) -> list[dict]:
    return [r for k, r in results.items() if k.startswith("coq/") and k != "coq/base"]


def lm_section(results: dict) -> list[str]:
    base = results.get("coq/base")
    if not base:
        return []
    lines = ["## (b) A domain far from pretraining: the Coq standard library, SmolLM2-135M", "",
             f"Base model, held-out Coq perplexity {base['heldout']['perplexity']:.1f} against "
             f"{base['english']['perplexity']:.1f} on ordinary English of the same length "
             "(paragraphs of Python's reference documentation); "
             f"exact next line {base['nextline'].get('exact_match', 0):.3f}. "
             f"{base['train_chunks']} training chunks of {CHUNK_LINES} lines offered, 40 steps "
             "of 4 chunks trained; held-out files never trained on (bench/quality_lm.py).", "",
             "| run | held-out perplexity | exact next line | trainable % | peak RSS (MiB) "
             "| wall (s) | settings |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in lm_rows(results):
        nl = "—" if r.get("next_line") is None else f"{r['next_line']:.3f}"
        lines.append(f"| {r['name']} | {r['perplexity']:.2f} | {nl} | "
                     f"{r['trainable_percent']:.3f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['wall_seconds']:.0f} | `{r['flags']}` |")
    return lines + [""]


def sweep_section(results: dict) -> list[str]:
    sst = {r["rank"] if "rank" in r else 8: r for k, r in results.items()
           if k.startswith("sweep-sst2/")}
    coq = {int(r["name"].split("-r")[1]): r for r in lm_rows(results)
           if r["name"].startswith("lora-r")}
    if not sst and not coq:
        return []
    any_sst = next(iter(sst.values()), {})
    lines = ["## (c) LoRA rank sweep (alpha = 2r)", "",
             f"SST-2: SmolLM2 as a classifier, {any_sst.get('train_examples', '?')} sentences, "
             f"one epoch (batch 16), {any_sst.get('dev_examples', '?')} dev sentences. Coq: "
             "(b)'s budget. ![rank sweep](results-rank.png)", "",
             "| rank | SST-2 accuracy (SmolLM2) | Coq held-out perplexity | trainable % (Coq) |",
             "| --- | --- | --- | --- |"]
    for r in sorted(set(sst) | set(coq)):
        a = f"{sst[r]['accuracy']:.3f}" if r in sst else "—"
        p = f"{coq[r]['perplexity']:.2f}" if r in coq else "—"
        t = f"{coq[r]['trainable_percent']:.3f}" if r in coq else "—"
        lines.append(f"| {r} | {a} | {p} | {t} |")
    return lines + [""]


def customers_section(results: dict) -> list[str]:
    demo = results.get("customers")
    if not demo:
        return []
    lines = ["## (d) The five customers: prompting, one adapter for all, one each", "",
             f"`peftkit demo` ({demo['model']}, NF4 base, QLoRA r=16, {demo['steps']} steps); "
             "held-out exact match.", "",
             "| customer | base | base, 4 examples in prompt | one adapter for all "
             "| own adapter |", "| --- | --- | --- | --- | --- |"]
    for c, acc in demo["accuracy"].items():
        lines.append(f"| {c} | {acc['base']:.0%} | {acc['icl']:.0%} | {acc['shared']:.0%} | "
                     f"{acc['adapter']:.0%} |")
    return lines + [""]


def plot(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for model, marker in zip(MODELS, "os"):
        for r in sst2_rows(results, model):
            ax.scatter(r["peak_rss_mib"], r["accuracy"], marker=marker, s=55)
            ax.annotate(f"{model.split('-')[0]} {r['method']}", (r["peak_rss_mib"], r["accuracy"]),
                        textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("peak RSS of the training process (MiB)")
    ax.set_ylabel("SST-2 dev accuracy")
    ax.set_title("Accuracy against memory, same training sentences per model")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(DOCS / "results-sst2.png", dpi=110)
    plt.close(fig)


def plot_sweep(results: dict) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sst = sorted((r.get("rank", 8), r["accuracy"]) for k, r in results.items()
                 if k.startswith("sweep-sst2/"))
    coq = sorted((int(r["name"].split("-r")[1]), r["perplexity"]) for r in lm_rows(results)
                 if r["name"].startswith("lora-r"))
    if not sst and not coq:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, points, label in ((axes[0], sst, "SST-2 dev accuracy (SmolLM2 classifier)"),
                              (axes[1], coq, "Coq held-out perplexity")):
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("LoRA rank r")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    full = results.get("coq/full")
    if full:
        axes[1].axhline(full["perplexity"], color="grey", ls="--", label="full FT")
        axes[1].legend()
    fig.suptitle("Quality against LoRA rank")
    fig.tight_layout()
    fig.savefig(DOCS / "results-rank.png", dpi=110)
    plt.close(fig)
