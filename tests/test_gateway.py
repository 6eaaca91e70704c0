"""`peftkit gateway` over two `peftkit serve` replicas on loopback (issue 17): adapter affinity
on a Zipf workload, tenants isolated through it, and a replica killed under load."""

import asyncio
import json
import os
import random
import subprocess
import sys
import time

import httpx
import pytest

from peftkit.serve.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.helpers import free_port
from tests.serve_harness import ADMIN, ACME, BOLT, adapter_root, serving

KEYS = f"""admin_keys: [{ADMIN}]
tenants:
  acme: {{keys: [{ACME}], adapters: ['a*']}}
  bolt: {{keys: [{BOLT}], adapters: ['a1*']}}
"""


def _replica(root, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "peftkit", "serve", "--base", "tiny-llama", "--adapters",
           str(root), "--port", str(port), "--max-loaded", "20", "--max-rank", "12",
           "--max-batch", "64"]
    return subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = adapter_root(tmp_path_factory)
    ports = [free_port(), free_port()]
    procs = [_replica(root, p) for p in ports]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    deadline = time.time() + 120
    for url, proc in zip(urls, procs):
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "replica did not start"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    gw = Gateway(GatewayConfig(backends=urls, api_keys=str(keys), health_every_s=0.2))
    with serving(create_gateway_app(gw)) as url:
        while not gw.bases:  # the first health round has run
            time.sleep(0.05)
        yield {"gw": gw, "url": url, "urls": urls, "procs": procs}
    for proc in procs:
        proc.kill()
        proc.wait()


def _client(url, key):
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {key}"},
                             timeout=120, limits=httpx.Limits(max_connections=200))


def _body(model, tokens=4, stream=False):
    return {"model": model, "prompt": "tell me", "max_tokens": tokens, "temperature": 0,
            "stream": stream}


def _hits(gw) -> tuple[float, float]:
    got = {s.labels["result"]: s.value for m in gw.affinity.collect() for s in m.samples
           if s.name.endswith("_total")}
    return got.get("hit", 0.0), got.get("miss", 0.0)


def test_affinity_on_a_zipf_workload_and_tenants_isolated(setup):
    gw, url = setup["gw"], setup["url"]
    rng = random.Random(0)
    names = [f"a{i:02d}" for i in range(20)]
    weights = [1 / (i + 1) ** 1.2 for i in range(20)]
    models = rng.choices(names, weights, k=600)

    async def go():
        async with _client(url, ACME) as acme, _client(url, BOLT) as bolt, \
                _client(url, "sk-nobody-0001") as nobody:
            gate = asyncio.Semaphore(16)

            async def one(m):
                async with gate:
                    return await acme.post("/v1/completions", json=_body(m, 2))
            answers = await asyncio.gather(*(one(m) for m in models))
            routed.append(_hits(gw))
            checks = {"bolt_a05": (await bolt.post("/v1/completions", json=_body("a05"))),
                      "bolt_a15": (await bolt.post("/v1/completions", json=_body("a15"))),
                      "acme_secret": (await acme.post("/v1/completions", json=_body("secret"))),
                      "nobody": (await nobody.post("/v1/completions", json=_body("a01"))),
                      "base": (await bolt.post("/v1/completions", json=_body("tiny-llama")))}
            return answers, checks
    routed = [_hits(gw)]
    answers, checks = asyncio.run(go())
    assert all(r.status_code == 200 for r in answers)
    hit, miss = (a - b for a, b in zip(routed[1], routed[0]))
    assert hit + miss == len(models) and hit / len(models) >= 0.9, (hit, miss)
    assert checks["bolt_a05"].status_code == 404  # another tenant's adapter looks missing
    assert checks["acme_secret"].status_code == 404
    assert checks["bolt_a15"].status_code == 200 and checks["base"].status_code == 200
    assert checks["nobody"].status_code == 401
    # through the gateway or straight to a replica, the same greedy answer
    direct = httpx.post(f"{setup['urls'][0]}/v1/completions", json=_body("a03", 8)).json()
    via = httpx.post(f"{url}/v1/completions", json=_body("a03", 8),
                     headers={"Authorization": f"Bearer {ACME}"}).json()
    assert via["choices"][0]["text"] == direct["choices"][0]["text"]


def test_a_replica_killed_under_load(setup):
    """kill -9 one replica with requests in flight on both: every request not yet answered is
    answered once (retried on the survivor, the same greedy text), streams that had started
    end with one clean error event, and new requests go to the survivor."""
    gw, url = setup["gw"], setup["url"]
    survivor, victim = setup["urls"]
    names = [f"a{i:02d}" for i in range(10)]
    want = {m: httpx.post(f"{survivor}/v1/completions", json=_body(m, 48)).json()
            ["choices"][0]["text"] for m in names}

    async def stream(c, m):
        events = []
        async with c.stream("POST", "/v1/completions", json=_body(m, 48, stream=True)) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
        return events

    async def go():
        async with _client(url, ACME) as c:
            plain = [asyncio.ensure_future(c.post("/v1/completions", json=_body(m, 48)))
                     for m in names * 6]
            streams = [asyncio.ensure_future(stream(c, m)) for m in names[:6]]
            victim_backend = next(b for b in gw.router.backends if b.url == victim)
            for _ in range(200):  # until the victim has work in flight
                if victim_backend.inflight:
                    break
                await asyncio.sleep(0.01)
            assert victim_backend.inflight, "nothing was in flight on the victim"
            setup["procs"][1].kill()
            done = await asyncio.gather(*plain)
            ended = await asyncio.gather(*streams)
            after = await asyncio.gather(*(c.post("/v1/completions", json=_body(m, 4))
                                           for m in names))
            return done, ended, after
    done, ended, after = asyncio.run(go())
    assert [r.status_code for r in done] == [200] * len(done)
    assert [r.json()["choices"][0]["text"] for r in done] == [want[m] for m in names * 6]
    for events in ended:
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        errors = [e for e in events[:-1] if "error" in json.loads(e)]
        assert len(errors) <= 1 and (not errors or events[-2] == errors[0])
    assert all(r.status_code == 200 for r in after)
    victim_backend = next(b for b in gw.router.backends if b.url == victim)
    assert not victim_backend.up
    health = httpx.get(f"{url}/health", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert [b["up"] for b in health["backends"]] == [True, False]
