"""Issue 16 benchmark: the HTTP server under a realistic open-loop load on smollm2-135m.

1,000 streamed requests over 64 r=16 adapters (and some base rows), Poisson arrivals at 80% of
the request rate the machine sustains (measured first, here: a closed batch of base-only
requests through the same engine). Reports errors, time to first token and inter-token latency
p50/p99, and generated tokens per second as a ratio to that base-only batch.
"""

import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from bench.common import write_results
from bench.serve import PROMPTS, TOKENS, batch_run, make_adapters
from peftkit.serve.app import create_app
from peftkit.serve.server import ServeConfig, Server

N_ADAPTERS = int(os.environ.get("LOAD_ADAPTERS", 64))
N_REQUESTS = int(os.environ.get("LOAD_REQUESTS", 1000))
SLOTS, LOAD = 32, 0.8


async def one(c: httpx.AsyncClient, model: str, prompt: str) -> dict:
    start, stamps, error = time.perf_counter(), [], None
    body = {"model": model, "prompt": prompt, "max_tokens": TOKENS, "temperature": 0,
            "stream": True}
    try:
        async with c.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                error = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = type(e).__name__
    return {"start": start, "stamps": stamps, "error": error}


async def open_loop(url: str, models: list[str], rate: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as c:
        tasks = []
        for i in range(N_REQUESTS):
            tasks.append(asyncio.ensure_future(one(c, models[i], PROMPTS[i % len(PROMPTS)])))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="peftkit-load-"))
    names = make_adapters(root, N_ADAPTERS)
    server = Server(ServeConfig(base="smollm2-135m", adapters=str(root), max_loaded=SLOTS,
                                max_adapter_mb=4096, max_batch=32, max_queue=4096))
    base_tps = batch_run(server, [""] * 32)  # the engine alone, base rows, one closed batch
    rate = LOAD * base_tps / TOKENS  # requests per second the machine sustains, times 0.8
    rng = random.Random(1)
    models = [rng.choice(names) if rng.random() < 0.9 else "" for _ in range(N_REQUESTS)]
    port = 8765
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                        log_level="warning"))
    thread = threading.Thread(target=web.run, daemon=True)
    server.start()
    thread.start()
    while not web.started:
        time.sleep(0.05)
    start = time.perf_counter()
    results = asyncio.run(open_loop(f"http://127.0.0.1:{port}", models, rate))
    wall = time.perf_counter() - start
    web.should_exit = True
    thread.join(timeout=30)
    server.stop()

    ok = [r for r in results if r["error"] is None and r["stamps"]]
    errors = len(results) - len(ok)
    ttft = [r["stamps"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    metrics = server.metrics.render().decode().splitlines()
    tokens = sum(float(line.split()[-1]) for line in metrics
                 if line.startswith("peftkit_generated_tokens_total{"))
    tps = tokens / wall
    raw = {"adapters": N_ADAPTERS, "requests": N_REQUESTS, "slots": SLOTS,
           "arrival_rate_rps": rate, "wall_s": wall, "errors": errors,
           "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
           "itl_p50_s": statistics.median(itl), "itl_p99_s": pct(itl, 0.99),
           "tokens_per_s": tps, "base_batch_tokens_per_s": base_tps,
           "loads": len(server.store.load_seconds)}
    rows = [("requests / adapters / slots", f"{N_REQUESTS} / {N_ADAPTERS} / {SLOTS}", ""),
            ("Poisson arrival rate", f"{rate:.2f} req/s (80% of {base_tps / TOKENS:.2f})", ""),
            ("errors (non-200 or broken stream)", str(errors), "0"),
            ("time to first token p50 / p99", f"{raw['ttft_p50_s']:.2f} / {raw['ttft_p99_s']:.2f} s",
             ""),
            ("inter-token latency p50 / p99",
             f"{raw['itl_p50_s'] * 1e3:.0f} / {raw['itl_p99_s'] * 1e3:.0f} ms", ""),
            ("throughput / base-only batch", f"{tps:.1f} / {base_tps:.1f} tok/s = "
             f"{tps / base_tps:.2f}", "report"),
            ("adapter cold loads", str(raw["loads"]), "")]
    write_results("load", "Server under open-loop load (issue 16)", rows, raw)


if __name__ == "__main__":
    main()
