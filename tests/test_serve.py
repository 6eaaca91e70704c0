"""Serving: one base, many adapters in one batch, the OpenAI-compatible API and its errors."""

import asyncio
import json
import shutil

import httpx
import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.formats import load_adapter, save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.serve.app import create_app
from peftkit.engine import Request, Sampling
from peftkit.serve.server import ServeConfig, Server
from peftkit.serve.store import AdapterInvalid, AdapterNotFound
from peftkit.train import TrainConfig, train
from tests.helpers import generate_direct, randomize, tiny_llama

ANSWERS = {"alpha": "aaaa", "beta": "bbbb"}
PROMPT = "say one:"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two `peftkit train` run directories whose adapters answer differently."""
    work = tmp_path_factory.mktemp("runs")
    for name, answer in ANSWERS.items():
        data = work / f"{name}.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"say {w}:", "completion": answer}) + "\n"
                                for w in ("one", "two", "three", "four")))
        report = train(TrainConfig(model="tiny-llama", data=str(data), method="lora",
                                   output=str(work / name), steps=30, lr=1e-2, batch_size=4,
                                   schedule="constant", warmup=0, val_split=0.0, val_data=str(data),
                                   rank=8, dropout=0.0, exact_match_max=4))
        assert report["metrics"]["exact_match"] == 1.0
    return work


@pytest.fixture(scope="module")
def adapters(runs, tmp_path_factory):
    """The two trained adapters (bare PEFT directories), and two random ones."""
    root = tmp_path_factory.mktemp("adapters")
    for name in ANSWERS:
        shutil.copytree(runs / name / "adapter", root / name)
    for i, r in enumerate((2, 16)):  # random adapters of other ranks and targets
        a = add_adapter(tiny_llama().model, LoraConfig(r=r, targets=["q_proj", "down_proj"]))
        randomize(a, seed=i)
        with torch.no_grad():
            for p in a.adapter_parameters():
                p.mul_(5)
        save_adapter(a, root / f"rand{r}")
    return root


def tokenize(server, text: str) -> list[int]:
    return server.base.tokenizer(text).input_ids


def make_server(adapters, **kw) -> Server:
    return Server(ServeConfig(base="tiny-llama", adapters=str(adapters), max_rank=16, **kw))


def test_mixed_batch_matches_each_request_alone(adapters):
    server = make_server(adapters, max_loaded=4)
    tok = server.base.tokenizer
    jobs = [("alpha", PROMPT), ("rand2", "hello there"), ("", "base row"), ("rand16", "x"),
            ("beta", "say two:"), ("", "another base row, longer"), ("rand2", "z")]
    greedy = Sampling(max_tokens=8, temperature=0.0)
    reqs = []
    for model, prompt in jobs:
        reqs.append(server.submit(model, tok(prompt).input_ids, greedy))
    server.engine.run_until_idle()
    together = [r.out_ids for r in reqs]
    alone = [generate_direct(server, m, tok(p).input_ids, greedy).out_ids for m, p in jobs]
    assert together == alone
    # and the engine agrees with plain transformers generation on a single-adapter model
    ref_model = load_adapter(tiny_llama().model, adapters / "rand16")
    x = torch.tensor([tok("x").input_ids])
    ref = ref_model.model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                                   do_sample=False, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.eos_token_id)[0, x.shape[1]:].tolist()
    assert together[3] == ref


@pytest.mark.parametrize("base, slots, tol", [("float32", "float16", 2e-3),
                                               ("float32", "bfloat16", 2e-2),
                                               ("bfloat16", "auto", 5e-2)])  # bf16 maths
def test_half_precision_slots_answer_as_float32_slots(adapters, base, slots, tol):
    """--adapter-dtype (vLLM's --lora-dtype; auto: the base's): slots held in half the bytes;
    a mixed batch's logits within the format's rounding of float32 slots' on the same base,
    and trained adapters' answers unchanged."""
    full = make_server(adapters, max_loaded=4, dtype=base, adapter_dtype="float32")
    half = make_server(adapters, max_loaded=4, dtype=base, adapter_dtype=slots)
    layer = next(iter(half.adapted.adapted_layers().values()))
    want = torch.bfloat16 if slots == "auto" else getattr(torch, slots)
    assert layer.lora_A.dtype == layer.lora_B.dtype == want
    tok = full.base.tokenizer
    ids = torch.tensor([tok("say one: and more").input_ids] * 4)
    names = ["alpha", "rand2", "rand16", "beta"]
    out = {}
    for server in (full, half):
        slots_of = torch.tensor([server.store.acquire(m) for m in names])
        with torch.no_grad():
            out[server] = server.adapted(input_ids=ids, slots=slots_of).logits.float()
    gap = (out[half] - out[full]).abs().max()
    assert 0 < gap <= tol * out[full].abs().max()  # rounded, and only by the format
    greedy = Sampling(max_tokens=4, temperature=0.0)
    for name, answer in ANSWERS.items():
        got = generate_direct(half, name, tok(PROMPT).input_ids, greedy).out_ids
        assert tok.decode(got) == answer


def test_an_unknown_adapter_dtype_is_named(adapters):
    with pytest.raises(PeftkitError, match="--adapter-dtype int8: choose auto"):
        make_server(adapters, adapter_dtype="int8")


def test_prefilled_together_a_failing_request_fails_alone(adapters):
    """Requests joining in one step share one prefill forward; when it raises (here a token id
    outside the vocabulary), each is prefilled alone and only the bad one fails."""
    server = make_server(adapters, max_loaded=2)
    tok = server.base.tokenizer
    greedy = Sampling(max_tokens=6, temperature=0.0)
    prompts = ["hello there", "a longer prompt than that", "x"]
    good = [server.engine.submit(Request(tok(p).input_ids, -1, greedy)) for p in prompts[:2]]
    bad = server.engine.submit(Request(tok(prompts[2]).input_ids + [10**6], -1, greedy))
    server.engine.run_until_idle()
    assert bad.finish_reason == "error" and bad.error.startswith("prefill failed")
    alone = [generate_direct(server, "", tok(p).input_ids, greedy).out_ids for p in prompts[:2]]
    assert [r.out_ids for r in good] == alone and all(r.error is None for r in good)


@pytest.fixture(scope="module")
def live(adapters, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text("admin_keys: [sk-admin-0001]\ntenants:\n"
                    "  acme: {keys: [sk-acme-0001], adapters: [alpha, 'rand*', broken]}\n"
                    "  bolt: {keys: [sk-bolt-0001], adapters: [beta]}\n")
    server = make_server(adapters, max_loaded=3, api_keys=str(keys), max_batch=8).start()
    yield server
    server.stop()


def client(server, key="sk-acme-0001"):
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                             base_url="http://test", headers={"Authorization": f"Bearer {key}"},
                             timeout=60)


def complete(model, key, prompt=PROMPT, **kw):
    return {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, **kw}


def test_concurrent_requests_keep_their_own_behaviour(live):
    async def go():
        async with client(live, "sk-acme-0001") as a, client(live, "sk-bolt-0001") as b:
            calls = []
            for i in range(6):
                calls.append(a.post("/v1/completions", json=complete("alpha", "sk-acme-0001")))
                calls.append(b.post("/v1/completions", json=complete("beta", "sk-bolt-0001")))
                calls.append(a.post("/v1/completions", json=complete("tiny-llama", "sk-acme-0001")))
            return await asyncio.gather(*calls)
    answers = [r.json()["choices"][0]["text"] for r in asyncio.run(go())]
    assert answers[0::3] == ["aaaa"] * 6 and answers[1::3] == ["bbbb"] * 6
    assert all(t not in ("aaaa", "bbbb") for t in answers[2::3])


def test_error_contract(live, adapters):
    broken = adapters / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "adapter_config.json").write_text((adapters / "alpha" / "adapter_config.json").read_text())
    (broken / "adapter_model.safetensors").write_bytes(b"garbage")

    async def go():
        async with client(live) as c:
            r = {}
            r["unknown"] = await c.post("/v1/completions", json=complete("nope", ""))
            r["broken"] = await c.post("/v1/completions", json=complete("broken", ""))
            r["after"] = await c.post("/v1/completions", json=complete("alpha", ""))
            r["long"] = await c.post("/v1/completions", json=complete("alpha", "", prompt="x" * 600))
            r["temp"] = await c.post("/v1/completions", json=complete("alpha", "", temperature=5))
            r["n"] = await c.post("/v1/completions", json=complete("alpha", "", n=2))
            r["traversal"] = await c.post("/v1/completions", json=complete("../alpha", ""))
            r["cross"] = await c.post("/v1/completions", json=complete("beta", ""))
            r["models"] = await c.get("/v1/models")
            r["admin"] = await c.post("/v1/load_lora_adapter", json={"lora_name": "alpha"})
            async with client(live, "sk-wrong-0001") as w:
                r["nokey"] = await w.get("/v1/models")
            async with client(live, "sk-admin-0001") as adm:
                r["load"] = await adm.post("/v1/load_lora_adapter", json={"lora_name": "rand2"})
                r["load_missing"] = await adm.post("/v1/load_lora_adapter",
                                                   json={"lora_name": "ghost"})
            return r
    r = asyncio.run(go())
    assert r["unknown"].status_code == 404 and "does not exist" in r["unknown"].json()["error"]["message"]
    assert r["broken"].status_code == 400 and "corrupt safetensors" in r["broken"].json()["error"]["message"]
    assert r["after"].status_code == 200 and r["after"].json()["choices"][0]["text"] == "aaaa"
    assert r["long"].status_code == 400 and "context is 512" in r["long"].json()["error"]["message"]
    assert r["temp"].status_code == 400 and "temperature" in r["temp"].json()["error"]["message"]
    assert r["temp"].json()["error"]["param"] == "temperature"
    assert r["n"].status_code == 200  # two rows of the batch, greedy: alike
    assert [(c["index"], c["text"]) for c in r["n"].json()["choices"]] == [(0, "aaaa"),
                                                                          (1, "aaaa")]
    assert r["traversal"].status_code == 404
    assert r["cross"].status_code == 404  # bolt's adapter does not exist for acme
    ids = [m["id"] for m in r["models"].json()["data"]]
    assert "alpha" in ids and "beta" not in ids and "tiny-llama" in ids
    assert all(m["parent"] == "tiny-llama" for m in r["models"].json()["data"][1:])
    assert r["admin"].status_code == 403 and r["nokey"].status_code == 401
    assert r["load"].status_code == 200 and r["load_missing"].status_code == 404


def test_queue_full_is_429_with_retry_after(adapters):
    server = make_server(adapters, max_queue=1)  # engine not started: nothing drains
    tok = server.base.tokenizer
    server.engine.submit(Request(tok(PROMPT).input_ids, -1, Sampling(max_tokens=2)))  # the 1

    async def go():
        async with client(server) as c:
            return await c.post("/v1/completions", json=complete("", ""))
    r = asyncio.run(go())
    assert r.status_code == 429 and r.headers["retry-after"] == "1"


@pytest.mark.parametrize("threaded", [False, True])
def test_in_process_work_past_the_queue_limit_gets_every_answer(adapters, threaded):
    """Ten times the queue's admission limit and more than a batch, over every slot: run_all
    feeds rows as room frees (the demo's evaluation once died at 'queue full' after training)."""
    server = make_server(adapters, max_loaded=2, max_queue=4, max_batch=3)
    tok = server.base.tokenizer
    greedy = Sampling(max_tokens=6, temperature=0.0)
    models = ["alpha", "beta", ""] * 14  # 42 rows > max_queue 4, max_batch 3; 2 slots used
    if threaded:
        server.start()
    try:
        reqs = server.engine.run_all([server.request(m, tok(PROMPT).input_ids, greedy)
                                      for m in models])
        if not threaded:  # nothing drains: the HTTP path still stops at its limit
            with pytest.raises(PeftkitError, match="queue full"):
                for _ in range(5):
                    server.engine.submit(Request(tok(PROMPT).input_ids, -1, greedy))
    finally:
        server.stop()
    texts = [tok.decode(r.out_ids, skip_special_tokens=True) for r in reqs]
    assert all(r.finish_reason in ("stop", "length") and r.error is None for r in reqs)
    assert texts[0::3] == ["aaaa"] * 14 and texts[1::3] == ["bbbb"] * 14
    assert len(set(texts[2::3])) == 1 and texts[2] not in ("aaaa", "bbbb")
    assert not any(s.users for s in server.store.slots)  # every row's slot released


def test_in_process_work_is_checked_before_any_row_runs(adapters):
    server = make_server(adapters)
    tok = server.base.tokenizer
    fine = [Request(tok(PROMPT).input_ids, -1, Sampling(max_tokens=4)) for _ in range(3)]
    over = Request(tok(PROMPT).input_ids, -1, Sampling(max_tokens=10**6))
    with pytest.raises(PeftkitError, match="max_tokens"):
        server.engine.run_all(fine + [over])
    assert all(r.finish_reason is None for r in fine) and server.engine.queue_depth() == 0


def test_lru_store_pins_reloads_and_counts(adapters, tmp_path):
    root = tmp_path / "ads"
    for name in ("alpha", "beta", "rand2"):
        shutil.copytree(adapters / name, root / name)
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=2,
                                preload=("alpha",)))
    store = server.store
    s_beta = store.acquire("beta")
    store.release(s_beta)
    store.release(store.acquire("rand2"))  # evicts beta (alpha is pinned)
    assert set(store.stats()["loaded"]) == {"alpha", "rand2"}
    with pytest.raises(AdapterNotFound):
        store.acquire("../alpha")
    # reload: a request in flight keeps its slot and weights; new requests get the new ones
    old = store.acquire("alpha")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(root / "beta" / f, root / "alpha" / f)
    store.release(store.acquire("rand2"))
    store.unload("rand2")  # make room without waiting for eviction
    new = store.reload("alpha")
    assert new.slot != old
    greedy = Sampling(max_tokens=6, temperature=0.0)
    tok = server.base.tokenizer
    inflight = server.engine.submit(Request(tok(PROMPT).input_ids, old, greedy))
    server.engine.run_until_idle()
    assert tok.decode(inflight.out_ids, skip_special_tokens=True) == "aaaa"
    assert tok.decode(generate_direct(server, "alpha", tok(PROMPT).input_ids, greedy).out_ids,
                      skip_special_tokens=True) == "bbbb"
    (root / "alpha" / "adapter_model.safetensors").write_bytes(b"bad")
    with pytest.raises(AdapterInvalid):
        store.reload("alpha")
    assert "alpha" in store.entries  # the old weights keep serving
    text = server.metrics.render().decode()
    assert 'peftkit_adapter_cache_total{event="evict"}' in text
    assert "peftkit_adapter_load_seconds_count" in text


@pytest.mark.slow
def test_smollm2_mixed_batch_matches_alone(tmp_path):
    from peftkit.models import load_base
    for i, r in enumerate((8, 16)):
        a = add_adapter(load_base("smollm2-135m").model, LoraConfig(r=r, targets="all-linear"))
        randomize(a, seed=i)
        save_adapter(a, tmp_path / f"a{i}")
    server = Server(ServeConfig(base="smollm2-135m", adapters=str(tmp_path), max_loaded=2))
    tok = server.base.tokenizer
    jobs = [("a0", "Hello"), ("a1", "The capital of France is"), ("", "Once upon a time")]
    greedy = Sampling(max_tokens=8, temperature=0.0)
    reqs = [server.submit(m, tok(p).input_ids, greedy) for m, p in jobs]
    server.engine.run_until_idle()
    alone = [generate_direct(server, m, tok(p).input_ids, greedy).out_ids for m, p in jobs]
    assert [r.out_ids for r in reqs] == alone


def test_serves_what_train_writes(runs, tmp_path):
    """`peftkit serve --adapters runs/` over `peftkit train --output runs/<name>` directories;
    a run without an adapter (full fine-tuning) is refused by name."""
    root = tmp_path / "runs"
    for name in ANSWERS:
        shutil.copytree(runs / name, root / name)
    data = root.parent / "d.jsonl"
    data.write_text(json.dumps({"text": "one two three"}) + "\n")
    train(TrainConfig(model="tiny-llama", data=str(data), method="full", output=str(root / "whole"),
                      steps=1, batch_size=1, val_split=0.0))
    server = make_server(root, max_loaded=2)
    assert server.store.available() == sorted(ANSWERS)
    greedy = Sampling(max_tokens=8, temperature=0.0)
    tok = server.base.tokenizer
    for name, answer in ANSWERS.items():
        out = generate_direct(server, name, tok(PROMPT).input_ids, greedy)
        assert tok.decode(out.out_ids, skip_special_tokens=True).strip() == answer
    with pytest.raises(AdapterInvalid, match="'whole' is a peftkit run without an adapter"):
        server.store.acquire("whole")


def test_pins_never_take_the_last_free_slot_and_refusals_hide_server_paths(adapters, tmp_path):
    """Admin pins once filled every slot, so requests for any other adapter got a 429 that
    could never succeed; and a refused adapter's 400 showed tenants the server's paths."""
    server = make_server(adapters, max_loaded=2)
    server.store.load("alpha", pin=True)
    with pytest.raises(PeftkitError, match="would leave no free slot"):
        server.store.load("beta", pin=True)
    server.store.load("alpha", pin=True)  # pinning it again is fine
    assert server.store.acquire("beta") >= 0  # the last slot stays for everyone else
    root = tmp_path / "ads"
    shutil.copytree(adapters / "alpha", root / "broken")
    (root / "broken" / "adapter_model.safetensors").write_bytes(b"bad")
    bad = make_server(root)
    with pytest.raises(AdapterInvalid) as err:
        bad.store.acquire("broken")
    message = str(err.value)
    assert message.startswith("adapter 'broken' cannot be served: ") and "corrupt" in message
    assert str(tmp_path) not in message and "base_model.model" not in message


def test_models_lists_exactly_what_can_be_served(adapters, tmp_path):
    """An adapter reached through a link out of the adapters directory was listed, and every
    request for it answered 404."""
    root = tmp_path / "ads"
    shutil.copytree(adapters / "alpha", root / "alpha")
    outside = tmp_path / "elsewhere"
    shutil.copytree(adapters / "beta", outside)
    (root / "linked").symlink_to(outside)
    server = make_server(root)
    assert server.store.available() == ["alpha"]
    with pytest.raises(AdapterNotFound):
        server.store.acquire("linked")
