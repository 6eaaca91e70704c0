"""Hardening, the server: load, abuse, fairness, memory, disconnects, tenant isolation, secrets.

A real uvicorn server on 127.0.0.1 (an ephemeral port) over tiny-llama; every loop is bounded
in count and time. Greedy answers under load must equal each adapter's answer alone.
"""

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time

import httpx
import psutil
import pytest
import torch
import uvicorn

from peftkit.errors import PeftkitError
from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.serve.app import create_app
from peftkit.serve.engine import Request, Sampling
from peftkit.serve.server import ServeConfig, Server, generate_direct
from peftkit.serve.tenancy import Tenancy
from tests.helpers import randomize, tiny_llama

N_ADAPTERS = 20
ADMIN, ACME, BOLT, GREEDY = "sk-admin-0001", "sk-acme-0001", "sk-bolt-0001", "sk-greedy-001"
PROMPTS = {"completion": "say one:", "chat": "hello there", "stream": "tell me"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    for i in range(N_ADAPTERS):
        a = add_adapter(tiny_llama().model,
                        LoraConfig(r=4 + 4 * (i % 3), targets=["q_proj", "v_proj", "down_proj"]))
        randomize(a, seed=i)
        with torch.no_grad():
            for p in a.adapter_parameters():
                p.mul_(4)  # strong enough that every adapter answers differently
        save_adapter(a, root / f"a{i:02d}")
    outside = tmp_path_factory.mktemp("outside")
    save_adapter(add_adapter(tiny_llama().model, LoraConfig(r=4)), outside / "secret")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(server: Server):
    """The server's app on a loopback port; stopped (engine too) on exit."""
    port = _free_port()
    web = uvicorn.Server(uvicorn.Config(create_app(server), host="127.0.0.1", port=port,
                                       log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=web.run, daemon=True)
    server.start()
    thread.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(timeout=15)
        server.stop()


def _client(url, key=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                             limits=httpx.Limits(max_connections=300, max_keepalive_connections=300))


async def _ask(c, model, kind, max_tokens=6, **kw):
    """One request of `kind`; returns (status, text or error message, seconds)."""
    start = time.perf_counter()
    prompt = PROMPTS[kind]
    if kind == "completion":
        r = await c.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                  "max_tokens": max_tokens, "temperature": 0, **kw})
        body = r.json()
        text = body["choices"][0]["text"] if r.status_code == 200 else body["error"]["message"]
        return r.status_code, text, time.perf_counter() - start
    chat = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens, "temperature": 0, "stream": kind == "stream", **kw}
    if kind == "chat":
        r = await c.post("/v1/chat/completions", json=chat)
        body = r.json()
        text = body["choices"][0]["message"]["content"] if r.status_code == 200 else \
            body["error"]["message"]
        return r.status_code, text, time.perf_counter() - start
    parts = []
    async with c.stream("POST", "/v1/chat/completions", json=chat) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, r.json()["error"]["message"], time.perf_counter() - start
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                parts.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    return r.status_code, "".join(parts), time.perf_counter() - start


def _metric(text: str, name: str) -> float:
    return float(text.split(name + " ")[1].split()[0])


def _reference(server, model, kind, max_tokens=6) -> str:
    """What `model` answers alone (no HTTP, no other rows), greedy."""
    if kind == "completion":
        ids = server.prompt_ids(prompt=PROMPTS[kind])
    else:
        ids = server.prompt_ids(messages=[{"role": "user", "content": PROMPTS[kind]}])
    return generate_direct(server, model, ids, Sampling(max_tokens=max_tokens)).text


def test_200_concurrent_requests_over_20_adapters_are_exact(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                max_body_mb=0.0625))
    models = [f"a{i:02d}" for i in range(N_ADAPTERS)] + ["tiny-llama"]
    jobs = [(models[i % 21], list(PROMPTS)[(i // 21) % 3]) for i in range(200)]
    expected = {job: _reference(server, *job) for job in set(jobs)}
    assert len({expected[(m, "completion")] for m in models}) >= 15  # adapters differ

    async def go(url):
        async with _client(url) as c:
            return await asyncio.wait_for(asyncio.gather(*[_ask(c, m, k) for m, k in jobs]), 120)
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
        async with _client(url) as c:
            post = lambda **kw: c.post("/v1/completions",  # noqa: E731
                                       json={"model": "a00", "prompt": "hi", "max_tokens": 4, **kw})
            r = {"body": await c.post("/v1/completions", content=b'{"prompt": "' + b"x" * 200_000
                                      + b'"}', headers={"content-type": "application/json"}),
                 "context": await post(max_tokens=100_000), "n": await post(n=2),
                 "batch": await post(prompt=["a", "b"]), "temp": await post(temperature=-1),
                 "top_p0": await post(top_p=0), "top_p2": await post(top_p=1.5),
                 "stops": await post(stop=[f"s{i}" for i in range(100)]),
                 "empty_messages": await c.post("/v1/chat/completions",
                                                json={"model": "a00", "messages": []}),
                 "empty_prompt": await post(prompt=""), "seed": await post(seed=2**70),
                 "surrogate": await c.post("/v1/completions", content=b'{"model": "a00", '
                                           b'"prompt": "\\ud800", "max_tokens": 2}',
                                           headers={"content-type": "application/json"}),
                 "tiny_temp": await post(temperature=1e-45, seed=1),
                 "ok": await post(temperature=0)}
            r["health"] = await c.get("/health")  # still alive and answering after all that
            return r
    with running(server) as url:
        r = asyncio.run(go(url))
    expect = {"body": 413, "context": 400, "n": 422, "batch": 422, "temp": 422, "top_p0": 422,
              "top_p2": 422, "stops": 422, "empty_messages": 422, "empty_prompt": 400,
              "seed": 422, "surrogate": 400, "tiny_temp": 200, "ok": 200, "health": 200}
    assert {k: v.status_code for k, v in r.items()} == expect
    names = {"context": "max_tokens", "n": "n", "batch": "prompt", "temp": "temperature",
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
        async with _client(url, ACME) as calm, _client(url, GREEDY) as flood:
            alone = [(await _ask(calm, "a01", "completion"))[2] for _ in range(4)]
            flood_task = asyncio.gather(*[_ask(flood, "a11", "completion", max_tokens=48)
                                          for _ in range(60)])
            await asyncio.sleep(0.3)
            during = [await _ask(calm, "a01", "completion") for _ in range(4)]
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
                 _ask(c, f"a{i % N_ADAPTERS:02d}" if i % 4 else "tiny-llama", "completion",
                      max_tokens=2) for i in range(start, start + n)]
        return await asyncio.gather(*calls)

    async def go(url):
        async with _client(url) as c:
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
    evictions = _metric(text, 'peftkit_adapter_cache_total{event="evict"}')
    print(f"RSS after 200: {after_200 / 2**20:.0f} MiB, after 2000: {after_2000 / 2**20:.0f} MiB,"
          f" {evictions:.0f} evictions")
    assert evictions > 100  # adapters did cycle through the 8 slots
    assert after_2000 <= after_200 * 1.10


def test_a_client_leaving_mid_stream_frees_its_row_and_slot(root):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16))

    async def go(url):
        async with _client(url) as c:
            async with c.stream("POST", "/v1/completions", json={
                    "model": "a03", "prompt": "x", "max_tokens": 400, "stream": True,
                    "temperature": 0}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        break
            gone = time.perf_counter()
            while (server.engine.active or any(server.store.busy)) and \
                    time.perf_counter() - gone < 5:
                await asyncio.sleep(0.01)
            return time.perf_counter() - gone
    with running(server) as url:
        seconds = asyncio.run(go(url))
        text = server.metrics.render().decode()
    assert not server.engine.active and not any(server.store.busy)
    assert 'peftkit_requests_total{model="a03",status="abort"} 1.0' in text
    tokens = _metric(text, 'peftkit_generated_tokens_total{model="a03"}')
    print(f"row left the batch {seconds * 1e3:.0f} ms after the client, at {tokens:.0f} tokens")
    assert tokens < 400 and seconds < 2


def test_no_other_slot_can_reach_a_row(root):
    """Defence in depth behind the load-time checks: NaN in an idle slot (and in base rows'
    clamped slot 0) must not change any other row, prefill or decode."""
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=4, max_rank=16))
    jobs = [("a00", "completion"), ("tiny-llama", "completion"), ("a01", "chat")]
    before = [_reference(server, *job) for job in jobs]
    slot = server.store.acquire("a05")
    server.store.release(slot)
    with torch.no_grad():
        for layer in server.adapted.adapted_layers().values():
            layer.lora_A[slot].fill_(float("nan"))
            layer.lora_B[slot].fill_(float("nan"))
    assert [_reference(server, *job) for job in jobs] == before
    # a sampled request on the poisoned slot itself fails alone; a base row beside it does not
    ids = server.prompt_ids(prompt=PROMPTS["completion"])
    assert server.store.acquire("a05") == slot  # held by the request, released when it ends
    poisoned = server.engine.submit(Request(ids, slot, Sampling(max_tokens=4, temperature=0.7)))
    beside = server.submit("tiny-llama", ids, Sampling(max_tokens=6))
    server.engine.run_until_idle()
    assert poisoned.finish_reason == "error" and "non-finite" in poisoned.error
    assert beside.error is None and beside.text == before[1]
    server.store.unload("a05")  # unloading zeroes the slot
    assert all(not layer.lora_A[slot].any() and float(layer.scale[slot]) == 0
               for layer in server.adapted.adapted_layers().values())


def test_sigterm_drains_and_exits(root, tmp_path):
    port = _free_port()
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


# -- tenancy and secrets -------------------------------------------------------------------------
BAD_KEYS = {
    "string_keys": "tenants:\n  acme: {keys: sk-acme-1111, adapters: [a0*]}\n",
    "string_adapters": f"tenants:\n  acme: {{keys: [{ACME}], adapters: 'a0*'}}\n",
    "string_admin": "admin_keys: sk-admin-1111\n",
    "unknown_field": f"tenants:\n  acme: {{keys: [{ACME}], adaptors: [a0*]}}\n",
    "short_key": "tenants:\n  acme: {keys: [s], adapters: [a0*]}\n",
    "duplicate_key": f"admin_keys: [{ACME}]\ntenants:\n  acme: {{keys: [{ACME}], adapters: []}}\n",
    "not_a_mapping": "- a\n- b\n",
    "no_keys": "tenants: {}\n",
    "top_level_typo": f"tenant:\n  acme: {{keys: [{ACME}]}}\n",
}


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_a_malformed_keys_file_refuses_to_start(tmp_path, name):
    path = tmp_path / "keys.yaml"
    path.write_text(BAD_KEYS[name])
    with pytest.raises(PeftkitError) as err:
        Tenancy(str(path))
    assert str(path) in str(err.value) and ACME not in str(err.value)


def test_keys_file_readable_by_others_warns(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    path.write_text(f"admin_keys: [{ADMIN}]\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="peftkit.serve"):
        Tenancy(str(path))
    assert "readable by other users" in caplog.text and ADMIN not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="peftkit.serve"):
        Tenancy(str(path))
    assert caplog.text == ""


def test_tenants_cannot_reach_each_other(root, tmp_path, caplog):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"admin_keys: [{ADMIN}]\ntenants:\n"
                    f"  acme: {{keys: [{ACME}], adapters: ['a0*']}}\n"
                    f"  bolt: {{keys: [{BOLT}], adapters: ['a1*']}}\n")
    keys.chmod(0o600)
    (root / "a19" / "adapter_model.safetensors").rename(root / "a19" / "moved")  # bolt's, broken
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                api_keys=str(keys)))
    hostile = ["../outside/secret", "..%2Foutside%2Fsecret", "a00/../a10", "a00\x00", "a00\n",
               "ａ00", "a0０", "a\u200b00", "x" * 10_000, "%2e%2e", ".", "..", "/etc", "a00/"]

    async def go(url):
        async with _client(url, ACME) as acme, _client(url, ADMIN) as admin, \
                _client(url) as anon, _client(url, "s") as one_letter:
            r = {"own": await _ask(acme, "a01", "completion"),
                 "other": await _ask(acme, "a11", "completion"),
                 "other_broken": await _ask(acme, "a19", "completion"),
                 "missing": await _ask(acme, "a09x", "completion"),
                 "hostile": [await _ask(acme, h, "completion") for h in hostile],
                 "hostile_admin": [(await admin.post("/v1/load_lora_adapter",
                                                     json={"lora_name": h})).status_code
                                   for h in hostile],
                 "models": [m["id"] for m in (await acme.get("/v1/models")).json()["data"]],
                 "admin_ops": [(await acme.post(f"/v1/{op}_lora_adapter",
                                                json={"lora_name": "a01"})).status_code
                               for op in ("load", "unload", "reload")],
                 "health_anon": (await anon.get("/health")).json(),
                 "health_tenant": (await acme.get("/health")).json(),
                 "health_admin": (await admin.get("/health")).json(),
                 "metrics_anon": (await anon.get("/metrics")).status_code,
                 "metrics_tenant": (await acme.get("/metrics")).status_code,
                 "metrics_admin": await admin.get("/metrics"),
                 "one_letter": (await one_letter.get("/v1/models")).status_code,
                 "wrong_key": await anon.get("/v1/models",
                                             headers={"Authorization": "Bearer sk-guess-1234"})}
            return r
    with caplog.at_level(logging.DEBUG), running(server) as url:
        r = asyncio.run(go(url))
    (root / "a19" / "moved").rename(root / "a19" / "adapter_model.safetensors")
    assert r["own"][0] == 200
    # another tenant's adapter, broken or not, is exactly a missing one: 404, same words
    assert r["other"][0] == r["other_broken"][0] == r["missing"][0] == 404
    assert {t.replace(m, "?") for (_, t, _), m in
            zip([r["other"], r["other_broken"], r["missing"]], ["a11", "a19", "a09x"])} == \
        {"The model `?` does not exist."}
    assert all(s == 404 for s, _, _ in r["hostile"]), r["hostile"]
    assert all(s == 404 for s in r["hostile_admin"]), r["hostile_admin"]
    assert set(r["models"]) == {"tiny-llama"} | {f"a{i:02d}" for i in range(10)}
    assert r["admin_ops"] == [403, 403, 403]
    assert r["health_anon"] == {"status": "ok"}
    assert "a01" not in json.dumps(r["health_tenant"]) and r["health_tenant"]["loaded"] >= 1
    assert "a01" in r["health_admin"]["loaded"]
    assert r["metrics_anon"] == 401 and r["metrics_tenant"] == 403
    assert r["metrics_admin"].status_code == 200 and "a01" in r["metrics_admin"].text
    assert r["one_letter"] == 401 and r["wrong_key"].status_code == 401
    everything = caplog.text + r["metrics_admin"].text + r["wrong_key"].text
    assert not any(k in everything for k in (ADMIN, ACME, BOLT, "sk-guess-1234"))
