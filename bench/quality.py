"""Issue 15: quality on real data, the measurements the planner's rules rest on.

(a) SST-2 sentence classification (../shared/data/sst2; GLUE dev set, 872 sentences, for
    evaluation): MiniLM-L6 with full FT, probe, LoRA, DoRA, IA³, bottleneck; SmolLM2-135M as a
    classifier with full FT, probe, LoRA, QLoRA, and prompt tuning (as Lester et al. 2021 use it:
    text to text, the label word generated; scored by exact match, which is accuracy here).
    Every method of a model sees the same training examples (a seeded, label-balanced slice).
(b) A causal LM far from its pretraining data (the Coq standard library; bench/quality_lm.py):
    full FT, LoRA r=8/32/64, QLoRA r=32, prompt tuning, probe; held-out perplexity and exact
    next line. (c) LoRA rank sweep r = 1..64 on (a)'s SmolLM2 task and on (b).
(d) The demo's five customers: in-context learning (k=4), one adapter shared by all five, and
    per-customer adapters, exact match per customer (runs `peftkit demo`).

Each experiment runs `peftkit train` in its own process (peak RSS is its own) and is recorded in
docs/results.json as it finishes; a rerun skips recorded experiments (`--redo` to run them
again), so an interrupted bench resumes. Results: docs/results.md, results-sst2.png.
Hyper-parameters are the papers' (cited per row below), not tuned on the dev set.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench import quality_lm
from peftkit.data import sst2
from bench.common import DOCS, machine
from peftkit.train.compare import compare

RUNS = Path(__file__).resolve().parents[1] / "runs" / "quality"
RESULTS = DOCS / "results.json"
MODEL_LM = "smollm2-135m"

# (model, method, flags, source of the hyper-parameters)
SST2_RUNS = [
    ("minilm-l6", "full", "--lr 5e-5 --epochs 3",
     "Devlin et al. 2019: lr {2,3,5}e-5, batch 32, 3 epochs"),
    ("minilm-l6", "probe", "--lr 1e-3 --epochs 30",
     "linear probe on cached features: epochs cost only the head"),
    ("minilm-l6", "lora", "--lr 5e-4 --epochs 3 --rank 8 --alpha 16",
     "Hu et al. 2021 Table 9 (RoBERTa-base SST-2): lr 5e-4, r 8"),
    ("minilm-l6", "dora", "--lr 5e-4 --epochs 3 --rank 8 --alpha 16",
     "Liu et al. 2024: LoRA's settings"),
    ("minilm-l6", "ia3", "--lr 3e-3 --epochs 3", "Liu et al. 2022 (T-Few): lr 3e-3"),
    ("minilm-l6", "bottleneck", "--lr 1e-3 --epochs 3 --bottleneck-size 64",
     "Houlsby et al. 2019: lr grid 3e-4..3e-3, size 64"),
    ("smollm2-135m", "full", "--lr 2e-5 --epochs 1 --batch-size 16",
     "decoder full FT: lr 2e-5"),
    ("smollm2-135m", "probe", "--lr 1e-3 --epochs 30 --batch-size 16", "as MiniLM's probe"),
    ("smollm2-135m", "lora", "--lr 5e-4 --epochs 1 --batch-size 16 --rank 8 --alpha 16",
     "Hu et al. 2021"),
    ("smollm2-135m", "qlora", "--lr 5e-4 --epochs 1 --batch-size 16 --rank 8 --alpha 16",
     "Dettmers et al. 2023: LoRA's settings on an NF4 base"),
    ("smollm2-135m", "prompt", "--lr 3e-1 --epochs 1 --batch-size 16 --num-virtual-tokens 20",
     "Lester et al. 2021: lr 0.3, 20 tokens, label words generated"),
]
# (a) again on SmolLM2 at three epochs (120 steps of 16): do the methods that move the backbone
# reach the probe, whose head trains 30 epochs on cached features, once they train longer?
LONGER_RUNS = [(model, method, flags.replace("--epochs 1", "--epochs 3"), source)
               for model, method, flags, source in SST2_RUNS
               if model == "smollm2-135m" and method in ("full", "lora")]
# training examples per model, every method: what this 2-core CPU trains in minutes
BUDGET = {"minilm-l6": 2000, "smollm2-135m": 640}
SWEEP_EXAMPLES, SWEEP_DEV = 320, 436  # (c) on SmolLM2, a smaller slice
SST2_SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)
PROMPT_DEV = 400  # prompt tuning answers by generation (no KV cache with virtual tokens): slow
COMMON = "--batch-size 32 --max-length 64 --seed 0 --dropout 0.0"


def load() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.exists() else {}


def record(results: dict, key: str, row: dict) -> None:
    results[key] = row
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")


def text_to_text(path: Path) -> Path:
    """The same rows as prompt -> label word, for methods that generate their answer."""
    out = path.with_name(path.stem + "-t2t.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    out.write_text("".join(json.dumps({"prompt": f"Review: {r['text']}\nSentiment:",
                                       "completion": f" {r['label']}"}) + "\n" for r in rows))
    return out


def run_sst2(results: dict, redo: bool, only: str, runs=SST2_RUNS, prefix="sst2") -> None:
    for model, method, flags, source in runs:
        key = f"{prefix}/{model}/{method}"
        if not key.startswith(only) or key in results and not redo:
            continue
        out = RUNS / (model.split("-")[0] + prefix.removeprefix("sst2"))
        train, dev = sst2.write_split(RUNS / "data" / model, BUDGET[model], seed=0)
        extra = f"{COMMON} {flags}".split()
        if method == "prompt":  # text to text: exact match over the whole dev set
            train, dev = text_to_text(train), text_to_text(dev)
            extra += ["--task", "causal-lm", "--exact-match-max", str(PROMPT_DEV)]
        else:
            extra += ["--task", "classify"]
        start = time.perf_counter()
        row = compare(model, str(train), [method], str(out), extra + ["--val-data", str(dev)])[0]
        report = json.loads((out / method / "report.json").read_text())
        m = report["metrics"]
        record(results, key, {**row, "model": model, "train_examples": BUDGET[model],
                              "dev_examples": PROMPT_DEV if method == "prompt" else 872,
                              "flags": flags, "source": source,
                              "accuracy": m.get("accuracy", m.get("exact_match")),
                              "macro_f1": m.get("macro_f1"),
                              "bench_seconds": time.perf_counter() - start})


def run_lm(results: dict, redo: bool, only: str) -> None:
    """(b) and (c) on the Coq corpus (bench/quality_lm.py), then (c) on SST-2."""
    root = RUNS / "coq"
    todo = [(f"coq/{name}", method, flags) for name, method, flags in quality_lm.LM_RUNS]
    todo += [(f"coq/lora-r{r}", "lora", f"--rank {r} --alpha {2 * r} --lr 1e-3")
             for r in quality_lm.COQ_SWEEP_RANKS]
    todo = [t for t in dict((t[0], t) for t in todo).values()  # r8/32/64 are (b)'s rows
            if t[0].startswith(only) and (t[0] not in results or redo)]
    want_base = "coq/base".startswith(only) and ("coq/base" not in results or redo)
    if not todo and not want_base:
        return
    data = quality_lm.write_data(root)
    if want_base:
        record(results, "coq/base", {
            "heldout": quality_lm.evaluate(MODEL_LM, None, data["heldout"]),
            "nextline": quality_lm.evaluate(MODEL_LM, None, data["nextline"]),
            "english": quality_lm.evaluate(MODEL_LM, None, data["english"]),
            "train_chunks": len(data["train"].read_text().splitlines())})
    for key, method, flags in todo:
        name = key.split("/", 1)[1]
        row = compare(MODEL_LM, str(data["train"]), [method], str(root / name),
                      f"{quality_lm.COMMON} {flags} --task causal-lm --val-data "
                      f"{data['heldout']} --exact-match-max 0".split())[0]
        run_dir = root / name / method
        report = json.loads((run_dir / "report.json").read_text())
        nextline = quality_lm.evaluate(MODEL_LM, run_dir, data["nextline"])
        record(results, key, {**row, "name": name, "flags": flags,
                              "perplexity": report["metrics"]["perplexity"],
                              "next_line": nextline.get("exact_match")})


def run_sst2_sweep(results: dict, redo: bool, only: str) -> None:
    """(c) on (a)'s SmolLM2 task: LoRA at every rank, alpha = 2r, (a)'s LoRA settings on a
    smaller slice (SWEEP_EXAMPLES), every rank run here so the curve is one budget."""
    model = MODEL_LM
    lora = next(flags for m, meth, flags, _ in SST2_RUNS if m == model and meth == "lora")
    for r in SST2_SWEEP_RANKS:
        key = f"sweep-sst2/r{r}"
        if not key.startswith(only) or key in results and not redo:
            continue
        flags = lora.replace("--rank 8 --alpha 16", f"--rank {r} --alpha {2 * r}")
        train, dev = sst2.write_split(RUNS / "data" / "sweep", SWEEP_EXAMPLES, seed=0,
                                      n_dev=SWEEP_DEV)
        row = compare(model, str(train), ["lora"], str(RUNS / "sweep" / f"r{r}"),
                      f"{COMMON} {flags} --task classify --val-data {dev}".split())[0]
        report = json.loads((RUNS / "sweep" / f"r{r}" / "lora" / "report.json").read_text())
        record(results, key, {**row, "rank": r, "accuracy": report["metrics"]["accuracy"],
                              "macro_f1": report["metrics"]["macro_f1"],
                              "train_examples": SWEEP_EXAMPLES, "dev_examples": SWEEP_DEV})


def run_customers(results: dict, redo: bool, only: str) -> None:
    """(d): `peftkit demo --quick` (what this CPU had time for); its report holds the four
    baselines."""
    if not "customers".startswith(only) or "customers" in results and not redo:
        return
    out = RUNS / "demo"
    subprocess.run([sys.executable, "-m", "peftkit", "demo", "--quick", "--output", str(out)],
                   check=True)
    demo = json.loads((out / "demo_result.json").read_text())
    record(results, "customers", {"accuracy": demo["accuracy"], "model": demo["config"]["model"],
                                  "steps": demo["config"]["steps"],
                                  "train_seconds": demo["train"]["seconds"]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redo", action="store_true", help="run recorded experiments again")
    ap.add_argument("--only", default="", help="experiments whose key starts with this")
    args = ap.parse_args()
    if not sst2.available():
        raise SystemExit(sst2.MISSING)
    results = load()
    results["machine"] = machine()
    run_sst2(results, args.redo, args.only)
    run_lm(results, args.redo, args.only)
    run_sst2_sweep(results, args.redo, args.only)
    run_sst2(results, args.redo, args.only, LONGER_RUNS, "sst2-3ep")
    run_customers(results, args.redo, args.only)
    from bench.quality_report import write_report
    write_report(results)


if __name__ == "__main__":
    main()
