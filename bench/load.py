"""Issue 16 benchmark: the HTTP server under a realistic open-loop load on smollm2-135m.

1,000 streamed requests over 64 r=16 adapters (10% base rows), Poisson arrivals at 80% of the
request rate the machine sustains. That rate is measured first, over HTTP with the same mix: a
closed loop of 32 clients, each sending its next request when the last one ends. Reports
errors by kind, time to first token and inter-token latency p50/p99, and generated tokens per
second as a ratio to a closed base-only batch through the same engine.
"""

import asyncio
import json
import os
import random
import statistics
from collections import Counter
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
                error = f"HTTP {r.status_code}"
            async for line in r.aiter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["text"]:
                    stamps.append(time.perf_counter())
    except httpx.HTTPError as e:
        error = type(e).__name__
    return {"start": start, "stamps": stamps, "error": error}


def client(url: str) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=2000, max_keepalive_connections=2000)
    return httpx.AsyncClient(base_url=url, timeout=600, limits=limits)


async def closed_loop(url: str, models: list[str], clients: int = 32, each: int = 3) -> float:
    """Requests per second with `clients` always waiting on one request each."""
    async with client(url) as c:
        async def worker(k):
            for j in range(each):
                i = k * each + j
                await one(c, models[i % len(models)], PROMPTS[i % len(PROMPTS)])
        start = time.perf_counter()
        await asyncio.gather(*[worker(k) for k in range(clients)])
        return clients * each / (time.perf_counter() - start)


async def open_loop(url: str, models: list[str], rate: float, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    async with client(url) as c:
        tasks = []
        for i in range(N_REQUESTS):
            tasks.append(asyncio.ensure_future(one(c, models[i], PROMPTS[i % len(PROMPTS)])))
            await asyncio.sleep(rng.expovariate(rate))
        return await asyncio.gather(*tasks)


def tokens_generated(server: Server) -> float:
    return sum(float(line.split()[-1]) for line in server.metrics.render().decode().splitlines()
               if line.startswith("peftkit_generated_tokens_total{"))


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="peftkit-load-"))
    names = make_adapters(root, N_ADAPTERS)
    server = Server(ServeConfig(base="smollm2-135m", adapters=str(root), max_loaded=SLOTS,
                                max_adapter_mb=4096, max_batch=32, max_queue=4096))
    base_tps = batch_run(server, [""] * 32)  # the engine alone, base rows, one closed batch
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
    url = f"http://127.0.0.1:{port}"
    sustained = asyncio.run(closed_loop(url, models[::-1]))
    rate = LOAD * sustained
    before = tokens_generated(server)
    start = time.perf_counter()
    results = asyncio.run(open_loop(url, models, rate))
    wall = time.perf_counter() - start
    tokens = tokens_generated(server) - before
    web.should_exit = True
    thread.join(timeout=30)
    server.stop()

    ok = [r for r in results if r["error"] is None and r["stamps"]]
    errors = len(results) - len(ok)
    ttft = [r["stamps"][0] - r["start"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["stamps"], r["stamps"][1:])]
    kinds = Counter(r["error"] for r in results if r["error"] is not None)
    tps = tokens / wall
    raw = {"adapters": N_ADAPTERS, "requests": N_REQUESTS, "slots": SLOTS,
           "sustained_rps": sustained, "arrival_rate_rps": rate, "wall_s": wall,
           "errors": errors, "error_kinds": dict(kinds),
           "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": pct(ttft, 0.99),
           "itl_p50_s": statistics.median(itl), "itl_p99_s": pct(itl, 0.99),
           "tokens_per_s": tps, "base_batch_tokens_per_s": base_tps,
           "loads": len(server.store.load_seconds)}
    rows = [("requests / adapters / slots", f"{N_REQUESTS} / {N_ADAPTERS} / {SLOTS}", ""),
            ("Poisson arrival rate", f"{rate:.2f} req/s (80% of a sustained {sustained:.2f})",
             ""),
            ("errors (non-200 or broken stream)",
             f"{errors} ({', '.join(f'{k}: {n}' for k, n in kinds.items()) or 'none'})", "0"),
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
