"""Shared by the server hardening tests: adapters, a live loopback server, a request helper."""

import contextlib
import json
import threading
import time

import httpx
import torch
import uvicorn

from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.serve.app import create_app
from peftkit.engine import Sampling
from peftkit.serve.server import Server
from tests.helpers import free_port, generate_direct, randomize, tiny_llama

N_ADAPTERS = 20
ADMIN, ACME, BOLT, GREEDY = "sk-admin-0001", "sk-acme-0001", "sk-bolt-0001", "sk-greedy-001"
PROMPTS = {"completion": "say one:", "chat": "hello there", "stream": "tell me"}


def adapter_root(tmp_path_factory):
    """20 random LoRA adapters (ranks 4/8/12) that answer differently, and one adapter in a
    sibling directory outside the root."""
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


def keyed_server(tmp_path_factory, **kw) -> Server:
    """A tiny-llama server over `adapter_root`'s adapters, tenant acme (key ACME) owning a*."""
    from peftkit.serve.config import ServeConfig
    root = adapter_root(tmp_path_factory)
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: {{keys: [{ACME}], adapters: ['a*']}}\n")
    keys.chmod(0o600)
    return Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=12,
                              api_keys=str(keys), **kw))


@contextlib.contextmanager
def serving(app):
    """An ASGI app on a loopback port, in a thread; its URL."""
    port = free_port()
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                       timeout_graceful_shutdown=5))
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not web.started and time.time() < deadline:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        web.should_exit = True
        thread.join(timeout=15)


@contextlib.contextmanager
def running(server: Server):
    """The server's app on a loopback port; stopped (engine too) on exit."""
    server.start()
    try:
        with serving(create_app(server)) as url:
            yield url
    finally:
        server.stop()


def client(url, key=None, timeout=60):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                             limits=httpx.Limits(max_connections=300, max_keepalive_connections=300))


async def ask(c, model, kind, max_tokens=6, **kw):
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


def metric(text: str, name: str) -> float:
    return float(text.split(name + " ")[1].split()[0])


def reference(server, model, kind, max_tokens=6) -> str:
    """What `model` answers alone (no HTTP, no other rows), greedy."""
    if kind == "completion":
        ids = server.prompt_ids(prompt=PROMPTS[kind])
    else:
        ids = server.prompt_ids(messages=[{"role": "user", "content": PROMPTS[kind]}])
    return generate_direct(server, model, ids, Sampling(max_tokens=max_tokens)).text
