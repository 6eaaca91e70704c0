"""The rest of the sampling contract (issue 26.2): OpenAI's frequency and presence penalties on
the answer so far, equal to a plain greedy loop applying the same formula; a request's n
choices prefilled once (one row of the forward, its KV shared), answering as before."""

import asyncio

import httpx
import pytest
import torch

from peftkit.engine import Sampling
from peftkit.serve.app import create_app
from peftkit.serve.server import ServeConfig, Server
from tests.serve_harness import adapter_root


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = adapter_root(tmp_path_factory)
    return Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=4, max_rank=12,
                              max_batch=8))


def _reference(server, model: str, ids: list[int], steps: int, freq: float, pres: float):
    """Greedy, one token at a time from a full forward, penalties applied by hand."""
    slot = -1 if not model else server.store.acquire(model)
    out = []
    try:
        for _ in range(steps):
            with torch.no_grad():
                logits = server.adapted(input_ids=torch.tensor([ids + out]),
                                        slots=torch.tensor([slot])).logits[0, -1].float()
            for t in set(out):
                logits[t] -= freq * out.count(t) + pres
            token = int(logits.argmax())
            if token == server.base.tokenizer.eos_token_id:
                break
            out.append(token)
    finally:
        if slot >= 0:
            server.store.release(slot)
    return out


@pytest.mark.parametrize("model,freq,pres", [("", 1.5, 0.0), ("a01", 0.0, 2.0),
                                             ("a02", 0.7, 0.7), ("a03", -1.0, 0.0)])
def test_penalties_equal_the_formula_applied_by_hand(server, model, freq, pres):
    ids = server.prompt_ids(prompt="say it again and again:")
    penalised = server.submit(model, ids, Sampling(max_tokens=10, frequency_penalty=freq,
                                                   presence_penalty=pres))
    plain = server.submit(model, ids, Sampling(max_tokens=10))
    server.engine.run_until_idle()
    assert penalised.out_ids == _reference(server, model, ids, 10, freq, pres)
    assert penalised.out_ids != plain.out_ids  # the penalty changed the answer


def test_n_choices_share_one_prefill_row(server, monkeypatch):
    rows = []
    real = server.engine.adapted

    def counted(**kw):
        rows.append(kw["input_ids"].shape)
        return real(**kw)
    monkeypatch.setattr(server.engine, "adapted", counted)
    ids = server.prompt_ids(prompt="one prompt")
    choices = [server.submit("a00", ids, Sampling(max_tokens=5, temperature=1.0, seed=s))
               for s in range(4)]
    other = server.submit("a01", ids, Sampling(max_tokens=5, temperature=1.0, seed=0))
    server.engine.run_until_idle()
    assert rows[0] == (2, len(ids))  # 5 requests, 2 distinct (slot, prompt): 2 prefill rows
    alone = []
    for s in range(4):
        req = server.submit("a00", ids, Sampling(max_tokens=5, temperature=1.0, seed=s))
        server.engine.run_until_idle()
        alone.append(req.out_ids)
    assert [c.out_ids for c in choices] == alone and len({tuple(a) for a in alone}) > 1
    assert other.error is None


def test_penalties_through_http_and_their_bounds(server):
    async def post(body):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                                     base_url="http://test", timeout=60) as c:
            return await c.post("/v1/completions", json=body)
    server.start()
    try:
        ok = asyncio.run(post({"model": "a01", "prompt": "again:", "max_tokens": 6,
                               "temperature": 0, "presence_penalty": 2}))
        assert ok.status_code == 200
        for field in ("frequency_penalty", "presence_penalty"):
            r = asyncio.run(post({"model": "a01", "prompt": "x", field: 2.5}))
            assert r.status_code == 400 and r.json()["error"]["param"] == field
    finally:
        server.stop()


def test_the_penalty_formula_on_known_logits():
    """Token 3 (seen twice) and 5 (once) lose frequency x count + presence; 7 (unseen) wins
    only when both are counted in full."""
    from peftkit.sampling import sample
    logits = torch.full((10,), -5.0)
    logits[3], logits[5], logits[7] = 2.0, 1.2, 0.05
    s = Sampling(frequency_penalty=0.5, presence_penalty=1.0)
    assert sample(s, logits, None, history=[3, 3, 5]) == 7  # 3: 0.0, 5: -0.3, 7: 0.05
    assert sample(Sampling(frequency_penalty=0.5, presence_penalty=0.9), logits, None,
                  history=[3, 3, 5]) == 3  # 3: 0.1
    assert sample(s, logits, None, history=[]) == 3 and logits[3] == 2.0  # untouched
