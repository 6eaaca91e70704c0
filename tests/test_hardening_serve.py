"""Hardening, the server: load, abuse, fairness, memory, disconnects, poisoned slots, SIGTERM.

A real uvicorn server on 127.0.0.1 (an ephemeral port) over tiny-llama; every loop is bounded
in count and time. Greedy answers under load must equal each adapter's answer alone.
"""

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import time

import httpx
import psutil
import pytest
import torch

from peftkit.engine import Sampling
from peftkit.serve.server import ServeConfig, Server
from tests.helpers import free_port
from tests.serve_harness import (ACME, GREEDY, N_ADAPTERS, PROMPTS, adapter_root, ask, client,
                                 metric, reference, running)

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory)


def test_200_concurrent_requests_over_20_adapters_are_exact(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                max_body_mb=0.0625))
    models = [f"a{i:02d}" for i in range(N_ADAPTERS)] + ["tiny-llama"]
    jobs = [(models[i % 21], list(PROMPTS)[(i // 21) % 3]) for i in range(200)]
    expected = {job: reference(server, *job) for job in set(jobs)}
    assert len({expected[(m, "completion")] for m in models}) >= 15  # adapters differ

    async def go(url):
        async with client(url) as c:
            return await asyncio.wait_for(asyncio.gather(*[ask(c, m, k) for m, k in jobs]), 120)
    with running(server) as url:
        results = asyncio.run(go(url))
    statuses = [s for s, _, _ in results]
    assert statuses == [200] * 200, [r for r in results if r[0] != 200][:3]
    wrong = [(job, text, expected[job]) for job, (_, text, _) in zip(jobs, results)
             if text != expected[job]]
    assert not wrong, wrong[:3]
    lat = sorted(t for _, _, t in results)
    print(f"200 requests: p50 {statistics.median(lat) * 1e3:.0f} ms, "
          f"p99 {lat[197] * 1e3:.0f} ms, max {lat[-1] * 1e3:.0f} ms")


def test_limits_are_clear_4xx_and_requests_always_end(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                max_body_mb=0.0625))

    async def go(url):
        async with client(url) as c:
            post = lambda **kw: c.post("/v1/completions",  # noqa: E731
                                       json={"model": "a00", "prompt": "hi", "max_tokens": 4, **kw})
            r = {"body": await c.post("/v1/completions", content=b'{"prompt": "' + b"x" * 200_000
                                      + b'"}', headers={"content-type": "application/json"}),
                 "context": await post(max_tokens=100_000), "n": await post(n=129),
                 "rows": await post(n=33), "batch": await post(prompt=[[5], []]), "temp": await post(temperature=-1),
                 "top_p0": await post(top_p=0),  # OpenAI accepts 0: greedy
                 "top_p2": await post(top_p=1.5),
                 "stops": await post(stop=[f"s{i}" for i in range(100)]),
                 "empty_messages": await c.post("/v1/chat/completions",
                                                json={"model": "a00", "messages": []}),
                 "empty_prompt": await post(prompt=""), "seed": await post(seed=2**70),
                 "surrogate": await c.post("/v1/completions", content=b'{"model": "a00", '
                                           b'"prompt": "\\ud800", "max_tokens": 2}',
                                           headers={"content-type": "application/json"}),
                 "tiny_temp": await post(temperature=1e-45, seed=1),
                 "denormal_temp": await post(temperature=5e-324, seed=1),
                 "tiny_top_p": await post(temperature=1.0, top_p=1e-300, seed=1),
                 "ok": await post(temperature=0)}
            r["health"] = await c.get("/health")  # still alive and answering after all that
            return r
    with running(server) as url:
        r = asyncio.run(go(url))
    expect = {"body": 413, "context": 400, "n": 400, "rows": 400, "batch": 400, "temp": 400, "top_p0": 200,
              "top_p2": 400, "stops": 400, "empty_messages": 400, "empty_prompt": 400,
              "seed": 400, "surrogate": 400, "tiny_temp": 200, "denormal_temp": 200,
              "tiny_top_p": 200, "ok": 200, "health": 200}
    assert {k: v.status_code for k, v in r.items()} == expect
    names = {"context": "max_tokens", "n": "n", "rows": "n", "batch": "prompt", "temp": "temperature",
             "stops": "stop", "empty_messages": "messages", "empty_prompt": "prompt",
             "seed": "seed", "surrogate": "prompt"}
    for key, field in names.items():
        assert r[key].json()["error"]["message"].startswith(field), (key, r[key].json())


def test_a_flooding_tenant_gets_429_while_others_keep_their_latency(root, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: {{keys: [{ACME}], adapters: ['a0*']}}\n"
                    f"  greedy: {{keys: [{GREEDY}], adapters: ['a1*']}}\n")
    keys.chmod(0o600)
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                api_keys=str(keys), tenant_max_inflight=4, max_batch=8))

    async def go(url):
        async with client(url, ACME) as calm, client(url, GREEDY) as flood:
            alone = [(await ask(calm, "a01", "completion"))[2] for _ in range(4)]
            flood_task = asyncio.gather(*[ask(flood, "a11", "completion", max_tokens=48)
                                          for _ in range(60)])
            await asyncio.sleep(0.3)
            during = [await ask(calm, "a01", "completion") for _ in range(4)]
            return alone, during, await flood_task
    with running(server) as url:
        alone, during, flooded = asyncio.run(go(url))
    assert all(s == 200 for s, _, _ in during)
    codes = [s for s, _, _ in flooded]
    assert codes.count(429) >= 50 and set(codes) <= {200, 429}, codes
    assert "tenant 'greedy'" in next(t for s, t, _ in flooded if s == 429)
    worst = max(t for _, _, t in during)
    print(f"calm tenant alone {max(alone) * 1e3:.0f} ms, during the flood {worst * 1e3:.0f} ms")
    assert worst < 4 * max(alone) + 1.0  # at most 4 greedy rows share its batch


def test_memory_is_flat_over_2000_requests_loads_and_abandoned_streams(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16))
    proc = psutil.Process()

    async def wave(c, start, n):
        async def abandoned(i):  # a stream the client drops after its first chunk
            async with c.stream("POST", "/v1/completions", json={
                    "model": f"a{i % N_ADAPTERS:02d}", "prompt": "x", "max_tokens": 40,
                    "stream": True}) as r:
                async for _ in r.aiter_lines():
                    break
            return 200
        calls = [abandoned(i) if i % 10 == 0 else
                 ask(c, f"a{i % N_ADAPTERS:02d}" if i % 4 else "tiny-llama", "completion",
                      max_tokens=2) for i in range(start, start + n)]
        return await asyncio.gather(*calls)

    async def go(url):
        async with client(url) as c:
            rss = []
            for start in range(0, 2000, 50):
                results = await asyncio.wait_for(wave(c, start, 50), 60)
                assert all((r == 200) if isinstance(r, int) else r[0] == 200 for r in results)
                if start + 50 in (200, 2000):
                    rss.append(proc.memory_info().rss)
            return rss
    with running(server) as url:
        after_200, after_2000 = asyncio.run(go(url))
        text = server.metrics.render().decode()
    evictions = metric(text, 'peftkit_adapter_cache_total{event="evict"}')
    print(f"RSS after 200: {after_200 / 2**20:.0f} MiB, after 2000: {after_2000 / 2**20:.0f} MiB,"
          f" {evictions:.0f} evictions")
    assert evictions > 100  # adapters did cycle through the 8 slots
    assert after_2000 <= after_200 * 1.10


def test_a_client_leaving_mid_stream_frees_its_row_and_slot(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16))

    async def go(url):
        async with client(url) as c:
            async with c.stream("POST", "/v1/completions", json={
                    "model": "a03", "prompt": "x", "max_tokens": 400, "stream": True,
                    "temperature": 0}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break
            gone = time.perf_counter()
            while (server.engine.active or any(s.users for s in server.store.slots)) and \
                    time.perf_counter() - gone < 5:
                await asyncio.sleep(0.01)
            return time.perf_counter() - gone
    with running(server) as url:
        seconds = asyncio.run(go(url))
        text = server.metrics.render().decode()
    assert not server.engine.active and not any(s.users for s in server.store.slots)
    assert 'peftkit_requests_total{model="a03",status="abort"} 1.0' in text
    tokens = metric(text, 'peftkit_generated_tokens_total{model="a03"}')
    print(f"row left the batch {seconds * 1e3:.0f} ms after the client, at {tokens:.0f} tokens")
    assert tokens < 400 and seconds < 2


def test_no_other_slot_can_reach_a_row(root):
    """Defence in depth behind the load-time checks: NaN in an idle slot (and in base rows'
    clamped slot 0) must not change any other row, prefill or decode."""
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=4, max_rank=16))
    jobs = [("a00", "completion"), ("tiny-llama", "completion"), ("a01", "chat")]
    before = [reference(server, *job) for job in jobs]
    slot = server.store.acquire("a05")
    server.store.release(slot)
    with torch.no_grad():
        for layer in server.adapted.adapted_layers().values():
            layer.lora_A[slot].fill_(float("nan"))
            layer.lora_B[slot].fill_(float("nan"))
    assert [reference(server, *job) for job in jobs] == before
    # a sampled request on the poisoned slot itself fails alone; a base row beside it does not
    ids = server.prompt_ids(prompt=PROMPTS["completion"])
    poisoned = server.submit("a05", ids, Sampling(max_tokens=4, temperature=0.7))
    assert server.store.slots[slot].users == 1  # its ticket holds the slot until it ends
    beside = server.submit("tiny-llama", ids, Sampling(max_tokens=6))
    server.engine.run_until_idle()
    assert poisoned.finish_reason == "error" and "non-finite" in poisoned.error
    assert beside.error is None and beside.text == before[1]
    server.store.unload("a05")  # unloading zeroes the slot
    assert all(not layer.lora_A[slot].any() and float(layer.scale[slot]) == 0
               for layer in server.adapted.adapted_layers().values())


def test_sigterm_drains_and_exits(root, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "peftkit.cli", "serve", "--base", "tiny-llama",
                             "--adapters", str(root), "--port", str(port)],
                            env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            time.sleep(0.2)
        for prompt in ("", "x"):  # an empty prompt once hung and blocked SIGTERM
            r = httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 2},
                           timeout=30)
            assert r.status_code in (200, 400)
        lines = []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=30, json={
                "model": "a02", "prompt": "x", "max_tokens": 60, "stream": True,
                "temperature": 0}) as stream:
            for line in stream.iter_lines():
                if not lines:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: it must still finish
                lines.append(line)
        assert "data: [DONE]" in lines and sum(x.startswith("data: {") for x in lines) > 1
        # uvicorn re-raises the signal after its graceful shutdown: -SIGTERM is a clean exit
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        proc.kill()
    assert "Traceback" not in proc.stderr.read()
