"""Adapter loads at scale (issue 17): a cold load never stalls other tenants' streams, and the
two cache tiers (host memory, device slots) evict, bound and count as documented."""

import asyncio
import json
import statistics
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

import peftkit.serve.store as store_module
from peftkit.serve.server import ServeConfig, Server
from peftkit.serve.store import AdapterInvalid
from tests.serve_harness import adapter_root, client, running

STREAMERS, STREAM_TOKENS, SLOW_READ_S, COLD_LOADS = 8, 120, 0.3, 8


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory)


async def _stream_gaps(c, model: str, stop: asyncio.Event) -> list[float]:
    """Seconds between consecutive streamed chunks, over requests repeated until `stop`."""
    body = {"model": model, "prompt": "tell me", "max_tokens": STREAM_TOKENS, "temperature": 1.0,
            "seed": 1, "stream": True}
    gaps = []
    while not stop.is_set():
        times = []
        async with c.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    times.append(time.perf_counter())
        gaps += [b - a for a, b in zip(times, times[1:])]
    return gaps


async def _cold_requests(c, names: list[str], stop: asyncio.Event, n: int = COLD_LOADS) -> None:
    """A new cold adapter every 200 ms, n of them, then `stop`; n = 0: 2 s of quiet, then stop."""
    pending = []
    if not n:
        await asyncio.sleep(2.0)
    for i in range(n):
        body = {"model": names[i % len(names)], "prompt": "x", "max_tokens": 1}
        pending.append(asyncio.ensure_future(c.post("/v1/completions", json=body)))
        await asyncio.sleep(0.2)
    for r in await asyncio.gather(*pending):
        assert r.status_code == 200, r.text
    stop.set()


def _p99(gaps: list[float]) -> float:
    return statistics.quantiles(gaps, n=100)[98]


def test_a_cold_load_never_stalls_other_tenants(root, monkeypatch):
    """Eight tenants stream while a ninth asks for a new cold adapter every 200 ms, each read
    slowed to 300 ms (a slow disk): the streams' inter-token p99 stays within 1.2x (+50 ms of
    scheduling noise) of the same streams without loads. Were a read done on the event loop or
    under the engine's lock, every gap spanning one would be >= 300 ms (checked: moving the read
    under the engine's lock fails this test)."""
    prepare = store_module.prepare_adapter

    def slow_prepare(*args, **kw):
        time.sleep(SLOW_READ_S)
        return prepare(*args, **kw)

    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=12, max_rank=12,
                                max_batch=16, host_cache_mb=0))
    streamers = [f"a{i:02d}" for i in range(STREAMERS)]
    cold = [f"a{i:02d}" for i in range(STREAMERS, 20)]  # 12 adapters, 4 free slots: always cold
    for name in streamers:
        server.store.load(name, pin=True)
    monkeypatch.setattr(store_module, "prepare_adapter", slow_prepare)

    async def run(loads: int):
        async with client(url) as c:
            stop = asyncio.Event()
            driver = asyncio.ensure_future(_cold_requests(c, cold, stop, loads))
            gaps = await asyncio.gather(*(_stream_gaps(c, m, stop) for m in streamers))
            await driver
        return [g for per in gaps for g in per]

    with running(server) as url:
        quiet = asyncio.run(run(0))
        before = len(server.store.load_seconds)
        loaded = asyncio.run(run(COLD_LOADS))
        cold_loads = len(server.store.load_seconds) - before
    assert cold_loads == COLD_LOADS, cold_loads
    assert min(server.store.load_seconds[before:]) >= SLOW_READ_S  # the reads were slow
    assert _p99(loaded) <= 1.2 * _p99(quiet) + 0.05, (_p99(quiet), _p99(loaded))


def _store(root, host_bytes, slots=2, events=None):
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=slots,
                                max_rank=12))
    store = store_module.AdapterStore(root, server.adapted, server.engine.between_steps, 2**30,
                                      on_event=lambda kind, **kw: events.append(kind),
                                      host_bytes=host_bytes)
    return store


def _bytes(root, name):
    return sum(t.numel() * t.element_size()
               for t in load_file(root / name / "adapter_model.safetensors").values())


def test_tiers_evict_in_lru_order_within_their_bounds_and_count(root):
    events = []
    a00, a03 = _bytes(root, "a00"), _bytes(root, "a03")  # rank 4 each: the same size
    store = _store(root, host_bytes=a00 + a03 + 1, events=events)  # room for two
    store.load("a00", tier="host")
    store.load("a03", tier="host")
    assert list(store.host.items) == ["a00", "a03"] and store.stats()["loaded"] == []
    assert events == ["host_miss", "host_miss"]
    events.clear()
    slot = store.acquire("a00")  # device miss, host hit: no disk read
    assert events[:2] == ["miss", "host_hit"] and "load" in events
    store.release(slot)
    store.load("a06", tier="host")  # a third: the least recently used (a03) leaves
    assert list(store.host.items) == ["a00", "a06"] and store.host.bytes <= store.host.max_bytes
    assert events[-2:] == ["host_miss", "host_evict"]
    events.clear()
    for name in ("a06", "a00", "a09"):  # two slots: a06 is the device LRU when a09 comes
        store.release(store.acquire(name))
    assert store.stats()["loaded"] == ["a00", "a09"]
    assert events.count("evict") == 1 and events.count("hit") == 1  # a00 was still in a slot


def test_a_corrupt_file_never_reaches_the_host_tier_or_a_slot(root, tmp_path):
    bad = tmp_path / "adapters"
    bad.mkdir()
    for name in ("a00", "a01"):
        (bad / name).mkdir()
        for f in (root / name).iterdir():
            (bad / name / f.name).write_bytes(f.read_bytes())
    weights = bad / "a01" / "adapter_model.safetensors"
    tensors = load_file(weights)
    key = next(iter(tensors))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, weights)
    events = []
    store = _store(bad, host_bytes=2**30, events=events)
    with pytest.raises(AdapterInvalid, match="NaN|non-finite|finite"):
        store.load("a01", tier="host")
    with pytest.raises(AdapterInvalid):
        store.acquire("a01")
    assert list(store.host.items) == [] and store.stats()["loaded"] == []
    for layer in store.adapted.adapted_layers().values():  # no slot was written
        assert not layer.lora_A.abs().sum() and not layer.scale.abs().sum()
    store.release(store.acquire("a00"))  # and the store still serves good ones
    assert store.stats()["loaded"] == ["a00"]
    assert json.dumps(store.stats())  # stats stay plain data
    assert torch.isfinite(next(iter(store.adapted.adapted_layers().values())).lora_A).all()


def test_a_slot_write_leaves_nothing_of_the_adapter_before():
    """A lower-rank adapter on fewer modules written over a full one: its rows, zero padding,
    and the identity (zero weights, zero scale) in every layer it does not touch; a clear
    leaves the identity everywhere; other slots are never written."""
    from peftkit.methods import LoraConfig, add_adapter
    from peftkit.methods.lora import SlotWriter
    from tests.helpers import randomize, tiny_llama
    stack = add_adapter(tiny_llama().model, LoraConfig(r=8, targets="all-linear"), slots=3)
    randomize(stack)
    layers = stack.adapted_layers()
    before = {p: (l.lora_A[2].clone(), l.lora_B[2].clone(), float(l.scale[2]))
              for p, l in layers.items()}
    writer = SlotWriter(layers)
    g = torch.Generator().manual_seed(5)
    full = {p: (torch.randn(8, l.in_features, generator=g),
                torch.randn(l.out_features, 8, generator=g)) for p, l in layers.items()}
    writer.write(1, full, 2.0)
    some = [p for p in layers if p.endswith(("q_proj", "down_proj"))]
    low = {p: (torch.randn(3, layers[p].in_features, generator=g),
               torch.randn(layers[p].out_features, 3, generator=g)) for p in some}
    writer.write(1, low, 0.5)
    for p, layer in layers.items():
        A, B, s = layer.lora_A[1], layer.lora_B[1], float(layer.scale[1])
        if p in low:
            assert torch.equal(A[:3], low[p][0]) and torch.equal(B[:, :3], low[p][1]), p
            assert not A[3:].any() and not B[:, 3:].any() and s == 0.5, p
        else:
            assert not A.any() and not B.any() and s == 0.0, p
        A2, B2, s2 = before[p]
        assert torch.equal(layer.lora_A[2], A2) and torch.equal(layer.lora_B[2], B2), p
        assert float(layer.scale[2]) == s2, p
    writer.write(1, full, 2.0)
    writer.clear(1)
    for p, layer in layers.items():
        assert not layer.lora_A[1].any() and not layer.lora_B[1].any(), p
        assert float(layer.scale[1]) == 0.0, p
