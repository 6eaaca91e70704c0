"""Issue 26.4: `serve --task classify` throughput on MiniLM (all-MiniLM-L6-v2, real weights):
rows/s when every row of every batch is one classifier vs when 8 tenants' classifiers (rank-8
LoRA on q/k/v/dense + a 2-label head each) share every batch, and the bare backbone (a probe's
head) as the ceiling; interleaved in one run (medians of 7), through the engine (no HTTP).

    python -m bench.classify
"""

import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import write_results
from peftkit.classify_engine import ClassifyRow
from peftkit.data import sst2
from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.serve.classify import Heads
from peftkit.serve.config import ServeConfig
from peftkit.serve.server import Server
from peftkit.train.heads import Head

TENANTS, ROWS, BATCH, REPEATS = 8, 512, 32, 7


def texts(n: int) -> list[str]:
    """SST-2 sentences when the data is here, else sentences of the same lengths made up."""
    if sst2.available():
        rows = [text for text, _ in sst2._rows("dev.tsv")]
        return [rows[i % len(rows)] for i in range(n)]
    words = "the film is a quiet and moving story of love loss and hope told well".split()
    return [" ".join(words[(i + k) % len(words)] for k in range(8 + i % 16)) for i in range(n)]


def classifier_runs(root: Path) -> None:
    """TENANTS random LoRA classifiers (adapter/ + head) and one probe (head only)."""
    for i in range(TENANTS):
        model = load_base("minilm-l6", task="encoder").model
        adapted = add_adapter(model, LoraConfig(r=8, targets=["query", "key", "value", "dense"]))
        with torch.no_grad():
            g = torch.Generator().manual_seed(i)
            for p in adapted.adapter_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
        (root / f"t{i}").mkdir()
        save_adapter(adapted, root / f"t{i}" / "adapter", base_name="minilm-l6")
        _head(root / f"t{i}", i)
    (root / "probe").mkdir()
    _head(root / "probe", 99)


def _head(directory: Path, seed: int) -> None:
    torch.manual_seed(seed)
    Head(384, 2).save(directory, {"task": "classify", "labels": ["neg", "pos"],
                                  "base": "minilm-l6", "method": "lora", "pooling": "mean"})


def timed(server: Server, runs: Heads, ids: list[list[int]], models: list[str]) -> float:
    """Seconds to classify every row of `ids`, row i on models[i % len(models)]."""
    engine = server.engine
    heads = {m: runs.get(m) for m in set(models)}
    slots = {m: (server.store.acquire(m) if heads[m].has_adapter else -1) for m in set(models)}
    rows = [ClassifyRow(x, slots[models[i % len(models)]], heads[models[i % len(models)]].head,
                        "mean") for i, x in enumerate(ids)]
    start = time.perf_counter()
    for k in range(0, len(rows), server.cfg.max_queue):
        engine.submit(rows[k:k + server.cfg.max_queue])
        engine.run_until_idle()
    seconds = time.perf_counter() - start
    for s in slots.values():
        if s >= 0:
            server.store.release(s)
    return seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        classifier_runs(root)
        server = Server(ServeConfig(base="minilm-l6", adapters=str(root), task="classify",
                                    max_batch=BATCH, max_loaded=TENANTS + 1, max_rank=8))
        runs = Heads(server.store, server.engine.device, server.base.model.config.hidden_size)
        ids = [server.base.tokenizer(t).input_ids for t in texts(ROWS)]
        setups = {"one": ["t0"], "mixed": [f"t{i}" for i in range(TENANTS)], "probe": ["probe"]}
        times = {name: [] for name in setups}
        for repeat in range(REPEATS + 1):  # interleaved, so a slow minute hits all three
            for name, models in setups.items():
                seconds = timed(server, runs, ids, models)
                if name == "mixed":
                    mixed_batches = {len(set(b)) for b in server.engine.batches[-ROWS // BATCH:]}
                if repeat:  # the first round warms up
                    times[name].append(seconds)
        one, mixed, probe = (ROWS / statistics.median(times[n]) for n in setups)
    table = [("one classifier (LoRA + head), rows/s", f"{one:.0f}", ""),
             (f"{TENANTS} tenants' classifiers in every batch, rows/s", f"{mixed:.0f}", ""),
             ("mixed / one", f"{mixed / one:.2f}", ">= 0.8"),
             ("bare backbone (a probe's head: no adapter math), rows/s", f"{probe:.0f}",
              "the ceiling"),
             ("distinct adapters in each mixed batch", f"{sorted(mixed_batches)}", f"[{TENANTS}]")]
    write_results("classify", "Classifier serving on MiniLM: mixed tenants vs one (issue 26.4)",
                  table, {"rows": ROWS, "batch": BATCH, "tenants": TENANTS, "one": one,
                          "mixed": mixed, "probe": probe,
                          "texts": "SST-2 dev" if sst2.available() else "made up",
                          "command": "python -m bench.classify"})


if __name__ == "__main__":
    main()
