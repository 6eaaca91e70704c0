"""Issue 7 benchmark (S-LoRA / Punica method) on smollm2-135m, one process, every figure a
ratio to the base-only run measured here too.

- 32 requests on 32 distinct r=16 adapters in one mixed batch vs base-only, vs swapping the
  adapter per request (one slot, load -> generate alone), vs PEFT's `adapter_names` batch;
- N adapters in {1, 8, 32, 128}, uniform and Zipf(1.5) popularity, Poisson arrivals: decode
  throughput and time to first token p50/p99 (32 slots, so 128 adapters exercise the LRU);
- cold load (disk -> slot), host tier -> slot and cached switch latency of an r=16 adapter;
- the decode step alone, mixed vs base-only, against the floor of reading each adapter once, on
  SmolLM2 and on Llama-7B's layer shapes (bench/serve_decode.py).
"""

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench import serve_decode
from bench.common import write_results
from peftkit.engine import Sampling
from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.serve.server import ServeConfig, Server

MODEL, RANK, TOKENS = "smollm2-135m", 16, 16
PROMPTS = ["Write a short note about the weather.", "List three fruits.",
           "Explain what a GPU is.", "Say hello to the team."]


def make_adapters(root: Path, n: int) -> list[str]:
    maker = add_adapter(load_base(MODEL).model, LoraConfig(r=RANK, alpha=32, targets="all-linear"))
    names = []
    for i in range(n):
        torch.manual_seed(i)
        with torch.no_grad():
            for p in maker.adapter_parameters():
                p.normal_(0, 0.01)
        save_adapter(maker, root / f"a{i:03d}")
        names.append(f"a{i:03d}")
    return names


def batch_run(server: Server, models: list[str]) -> float:
    """All requests at once; returns generated tokens per second."""
    tok = server.base.tokenizer
    greedy = Sampling(max_tokens=TOKENS, temperature=0.0)
    start = time.perf_counter()
    reqs = []
    for i, m in enumerate(models):
        reqs.append(server.request(m, tok(PROMPTS[i % 4]).input_ids, greedy))
    server.engine.run_all(reqs)
    return sum(len(r.out_ids) for r in reqs) / (time.perf_counter() - start)


def swap_run(server: Server, models: list[str]) -> float:
    """The naive way: one slot, each request loads its adapter and runs alone."""
    tok = server.base.tokenizer
    greedy = Sampling(max_tokens=TOKENS, temperature=0.0)
    start, tokens = time.perf_counter(), 0
    for i, m in enumerate(models):
        for name in list(server.store.entries):  # forget the previous adapter (device slot
            server.store.unload(name)  # and host tier): a real swap from disk
        req = server.submit(m, tok(PROMPTS[i % 4]).input_ids, greedy)
        server.engine.run_until_idle()
        tokens += len(req.out_ids)
    return tokens / (time.perf_counter() - start)


def peft_run(root: Path, models: list[str]) -> float:
    import peft
    tok = load_base(MODEL).tokenizer
    pm = peft.PeftModel.from_pretrained(load_base(MODEL).model, root / models[0], adapter_name=models[0])
    for m in models[1:]:
        pm.load_adapter(root / m, adapter_name=m)
    pm.eval()
    tok.padding_side = "left"
    enc = tok([PROMPTS[i % 4] for i in range(len(models))], return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = pm.generate(**enc, adapter_names=models, max_new_tokens=TOKENS, do_sample=False,
                          min_new_tokens=TOKENS, pad_token_id=tok.pad_token_id)
    return (out.shape[1] - enc.input_ids.shape[1]) * len(models) / (time.perf_counter() - start)


def poisson_run(server: Server, names: list[str], n_adapters: int, dist: str, n_req: int = 32,
                rate: float = 4.0) -> dict:
    rng = random.Random(0)
    pool = names[:n_adapters]
    weights = [1.0] * n_adapters if dist == "uniform" else [1 / (k + 1) ** 1.5 for k in range(n_adapters)]
    picks = rng.choices(pool, weights=weights, k=n_req)
    tok = server.base.tokenizer
    sampling = Sampling(max_tokens=TOKENS, temperature=0.0)
    reqs, done = [], threading.Event()
    server.start()
    start = time.perf_counter()

    def producer():
        for i, m in enumerate(picks):
            time.sleep(rng.expovariate(rate))
            reqs.append(server.submit(m, tok(PROMPTS[i % 4]).input_ids, sampling))
        done.set()
    threading.Thread(target=producer).start()
    done.wait()
    while any(r.finish_reason is None for r in reqs):
        time.sleep(0.01)
    makespan = time.perf_counter() - start
    server.engine.stop()
    server.engine._stop.clear()
    ttft = [r.t_first - r.t_submit for r in reqs]
    return {"tokens_per_s": sum(len(r.out_ids) for r in reqs) / makespan,
            "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99))}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        names = make_adapters(root, 128)
        server = Server(ServeConfig(base=MODEL, adapters=tmp, max_loaded=32, max_rank=RANK,
                                    max_batch=32, max_adapter_mb=4096))
        distinct = names[:32]
        batch_run(server, distinct)  # warm-up: loads the 32 adapters
        runs = [(batch_run(server, distinct), batch_run(server, [""] * 32)) for _ in range(3)]
        mixed, base = max(m for m, _ in runs), max(b for _, b in runs)  # interleaved, best of 3
        tok = server.base.tokenizer
        decode = [serve_decode.analyse(server.adapted, tok, PROMPTS[0],
                                       "SmolLM2-135M, r=16 all-linear")]
        cold = server.store.load_seconds[:32]
        switch = []
        for m in distinct:
            t = time.perf_counter()
            server.store.release(server.store.acquire(m))
            switch.append(time.perf_counter() - t)
        one = Server(ServeConfig(base=MODEL, adapters=tmp, max_loaded=1, max_rank=RANK,
                                 host_cache_mb=0))  # every swap reads the disk
        swap = swap_run(one, distinct[:8])
        del one
        two = Server(ServeConfig(base=MODEL, adapters=tmp, max_loaded=2, max_rank=RANK))
        for _ in range(2):  # the first pass reads the disk; the second finds the host tier
            for m in distinct[:8]:
                two.store.release(two.store.acquire(m))
        host = two.store.load_seconds[8:]
        del two
        curves = {}
        for n in (1, 8, 32, 128):
            for dist in ("uniform", "zipf"):
                curves[f"{n}-{dist}"] = poisson_run(server, names, n, dist)
        peft_tps = peft_run(root, distinct)
    del server
    half = serve_decode.filled(load_base(MODEL).model)
    for layer in half.adapted_layers().values():
        layer.hold_slots_in(torch.float16)  # --adapter-dtype float16
    decode.append(serve_decode.analyse(half, tok, PROMPTS[0],
                                       "SmolLM2-135M, r=16 all-linear, float16 slots",
                                       goal="report"))
    del half
    wide = serve_decode.filled(serve_decode.random_wide_model(tok))
    decode.append(serve_decode.analyse(wide, tok, PROMPTS[0],
                                       "Llama-7B layer shapes (2 layers, random weights), r=16"))
    del wide
    rows = [("mixed batch, 32 requests on 32 adapters / base-only (throughput)",
             f"{mixed / base:.2f} ({mixed:.1f} vs {base:.1f} tok/s)", ">= 0.90"),
            ("mixed batch / swapping the adapter per request",
             f"{mixed / swap:.1f}x ({swap:.1f} tok/s swapping)", ">= 5x"),
            ("mixed batch / PEFT adapter_names batch", f"{mixed / peft_tps:.1f}x "
             f"({peft_tps:.1f} tok/s PEFT)", ">= 2x"),
            ("cold load r=16 adapter, disk -> slot (median)",
             f"{statistics.median(cold) * 1000:.1f} ms", "<= 20 ms"),
            ("host tier -> slot r=16 adapter (median)",
             f"{statistics.median(host) * 1000:.1f} ms", "<= 5 ms"),
            ("cached switch (median)", f"{statistics.median(switch) * 1e6:.1f} us", "<= 1 ms")]
    rows += serve_decode.rows(decode)
    for key, c in curves.items():
        rows.append((f"Poisson 4 req/s, {key}: tok/s, TTFT p50 / p99",
                     f"{c['tokens_per_s']:.1f} ({c['tokens_per_s'] / base:.2f} of base batch), "
                     f"{c['ttft_p50'] * 1000:.0f} / {c['ttft_p99'] * 1000:.0f} ms", "report"))
    write_results("serve", "Serving: one base, many adapters (smollm2-135m, r=16 all-linear)", rows,
                  {"mixed_tps": mixed, "base_tps": base, "swap_tps": swap, "peft_tps": peft_tps,
                   "cold_load_s": cold, "host_load_s": host, "switch_s": switch, "curves": curves,
                   "decode_steps": decode})


if __name__ == "__main__":
    main()
