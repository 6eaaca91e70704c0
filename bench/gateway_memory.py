"""Gateway memory under a stream of distinct model names (issue 29.3): 2,000 requests, each for
a name no adapter has (all 404 from the backend), through `peftkit gateway` in front of a fake
backend on loopback. Before the fix every name stayed in the affinity tables (+200 MB per 400
requests of 500 KB names); the goal is RSS within +50 MB. Result: docs/bench-gateway.md."""

import asyncio
import os
import tempfile
import time

import httpx
import psutil

from peftkit.serve.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.serve_harness import serving
from tests.test_hardening_gateway import ALICE, KEYS, lying_backend

REQUESTS, NAME_BYTES = 2000, 250


def main() -> dict:
    keys = os.path.join(tempfile.mkdtemp(), "keys.yaml")
    with open(keys, "w") as f:
        f.write(KEYS)
    os.chmod(keys, 0o600)
    proc = psutil.Process()
    with serving(lying_backend([])) as backend:
        gw = Gateway(GatewayConfig(backends=[backend], api_keys=keys, base=("tiny",)))
        with serving(create_gateway_app(gw)) as url:
            async def flood(start: int, n: int):
                async with httpx.AsyncClient(base_url=url, timeout=60, headers={
                        "Authorization": f"Bearer {ALICE}"}) as c:
                    for s in range(start, start + n, 50):
                        await asyncio.gather(*(c.post("/v1/completions", json={
                            "model": f"a-{i:06d}".ljust(NAME_BYTES, "x"), "prompt": "hi",
                            "max_tokens": 2}) for i in range(s, s + 50)))
            asyncio.run(flood(0, 200))  # warm-up: connections, allocator pools
            before, start = proc.memory_info().rss, time.time()
            asyncio.run(flood(10_000, REQUESTS))
            out = {"requests": REQUESTS, "name_bytes": NAME_BYTES,
                   "rss_before_mib": before / 2**20, "rss_after_mib": proc.memory_info().rss / 2**20,
                   "seconds": time.time() - start,
                   "affinity_entries": len(gw.router.backends[0].adapters),
                   "routed_entries": len(gw.router.backends[0].routed)}
    out["rss_growth_mib"] = out["rss_after_mib"] - out["rss_before_mib"]
    print(f"{REQUESTS} requests with distinct {NAME_BYTES}-byte names: RSS +{out['rss_growth_mib']:.1f}"
          f" MiB (goal <= 50), {out['affinity_entries']} affinity and {out['routed_entries']} "
          f"in-flight entries left")
    return out


if __name__ == "__main__":
    main()
