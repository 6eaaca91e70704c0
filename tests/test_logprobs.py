"""Token log-probabilities (issue 26.2): what the engine reports for each row of a mixed batch
equals a separate forward pass over prompt + answer (<= 1e-4), and the API gives them in
OpenAI's chat and completions shapes."""

import asyncio

import httpx
import pytest
import torch

from peftkit.engine import Sampling
from peftkit.serve.app import create_app
from tests.serve_harness import ACME, keyed_server

KEY = ACME


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return keyed_server(tmp_path_factory, max_loaded=4, max_batch=8)


def _forward(server, model: str, ids: list[int]) -> torch.Tensor:
    """Log-probabilities at every position of `ids`, one row alone, no cache."""
    slot = -1 if not model else server.store.acquire(model)
    try:
        with torch.no_grad():
            logits = server.adapted(input_ids=torch.tensor([ids]),
                                    slots=torch.tensor([slot])).logits[0]
    finally:
        if slot >= 0:
            server.store.release(slot)
    return torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_of_a_mixed_batch_equal_a_forward_pass(server):
    jobs = [("a00", "say one:", 0.0), ("a01", "hello there", 1.0), ("", "x y z", 0.0),
            ("a02", "tell me", 1.0)]
    reqs = [server.submit(m, server.prompt_ids(prompt=p), Sampling(
        max_tokens=6, temperature=t, seed=5, logprobs=3)) for m, p, t in jobs]
    server.engine.run_until_idle()
    for (model, _, temperature), req in zip(jobs, reqs):
        assert len(req.logprobs) == len(req.out_ids) > 0
        lp = _forward(server, model, req.prompt_ids + req.out_ids)
        start = len(req.prompt_ids) - 1
        for k, (token, value, top) in enumerate(req.logprobs):
            want = lp[start + k]
            assert token == req.out_ids[k] and abs(value - float(want[token])) <= 1e-4
            best = want.topk(3)
            assert [i for i, _ in top] == best.indices.tolist()
            assert max(abs(v - w) for (_, v), w in zip(top, best.values.tolist())) <= 1e-4
            if temperature == 0.0:  # greedy: the chosen token is the likeliest
                assert token == top[0][0]


def _post(server, path, body):
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                                     base_url="http://test", timeout=60,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await c.post(path, json=body)
    return asyncio.run(go())


def test_openai_shapes_for_chat_and_completions(server):
    server.start()
    try:
        chat = _post(server, "/v1/chat/completions", {
            "model": "a03", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
            "temperature": 0, "logprobs": True, "top_logprobs": 2}).json()
        content = chat["choices"][0]["logprobs"]["content"]
        assert len(content) == chat["usage"]["completion_tokens"]
        whole = b"".join(bytes(e["bytes"]) for e in content)  # pieces of a character join
        assert whole.decode(errors="replace") == chat["choices"][0]["message"]["content"]
        for e in content:
            assert e["logprob"] <= 0 and len(e["top_logprobs"]) == 2
            assert e["top_logprobs"][0]["logprob"] == e["logprob"]  # greedy: the top one
            assert bytes(e["bytes"]).decode(errors="replace") == e["token"]
        plain = _post(server, "/v1/completions", {"model": "a03", "prompt": "hi",
                                                  "max_tokens": 4, "temperature": 0,
                                                  "logprobs": 0}).json()["choices"][0]
        lp = plain["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) and lp["top_logprobs"] is None
        assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i])
                                     for i in range(len(lp["tokens"]))]
        none = _post(server, "/v1/completions", {"model": "a03", "prompt": "hi",
                                                 "max_tokens": 2}).json()
        assert none["choices"][0]["logprobs"] is None
        for path, body, param in [
                ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
                ("/v1/chat/completions", {"top_logprobs": 21, "logprobs": True},
                 "top_logprobs"),
                ("/v1/completions", {"logprobs": 6}, "logprobs")]:
            shape = ({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                     else {"prompt": "hi"})
            r = _post(server, path, {"model": "a03", **shape, **body})
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    finally:
        server.stop()


def test_streamed_logprobs_join_to_the_whole_answers(tmp_path_factory):
    """Each chunk carries the tokens chosen since the last one: joined, they are the
    non-streamed answer's (the official client reading both)."""
    from openai import OpenAI

    from tests.serve_harness import running
    with running(keyed_server(tmp_path_factory, max_loaded=2)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        ask = dict(model="a04", messages=[{"role": "user", "content": "hi"}], max_tokens=8,
                   temperature=0, logprobs=True, top_logprobs=2)
        whole = client.chat.completions.create(**ask).choices[0].logprobs.content
        parts = [e for chunk in client.chat.completions.create(**ask, stream=True)
                 if chunk.choices and chunk.choices[0].logprobs
                 for e in chunk.choices[0].logprobs.content]
        assert len(whole) >= 2 and [e.model_dump() for e in parts] == \
            [e.model_dump() for e in whole]
        plain = dict(model="a04", prompt="say one:", max_tokens=8, temperature=0, logprobs=2)
        want = client.completions.create(**plain).choices[0].logprobs
        got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for chunk in client.completions.create(**plain, stream=True):
            lp = chunk.choices[0].logprobs
            for key in got:
                got[key] += getattr(lp, key) if lp else []
        assert len(want.tokens) >= 2 and got == {k: getattr(want, k) for k in got}


def test_echo_gives_the_prompts_own_logprobs_first(tmp_path_factory):
    """completions' echo with logprobs (OpenAI's legacy shape): the prompt's tokens lead, the
    first with null, each of the others its log-probability after the ones before it (a
    forward pass's, on the adapter), then the answer's."""
    from openai import OpenAI

    from tests.serve_harness import running
    server = keyed_server(tmp_path_factory, max_loaded=2)
    with running(server) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=KEY)
        ask = dict(model="a05", prompt="say one:", max_tokens=4, temperature=0, logprobs=2)
        echoed = client.completions.create(**ask, echo=True).choices[0]
        plain = client.completions.create(**ask).choices[0]
        got = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for chunk in client.completions.create(**ask, echo=True, stream=True):
            for key in got:
                got[key] += getattr(chunk.choices[0].logprobs, key) if \
                    chunk.choices[0].logprobs else []
    ids = server.prompt_ids(prompt="say one:")
    lp = echoed.logprobs
    assert got == {k: getattr(lp, k) for k in got}  # streamed: the same, the prompt's first
    assert echoed.text == "say one:" + plain.text
    assert lp.tokens[len(ids):] == plain.logprobs.tokens
    assert lp.token_logprobs[len(ids):] == plain.logprobs.token_logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert "".join(lp.tokens) == echoed.text and lp.text_offset[0] == 0
    want = _forward(server, "a05", ids)
    for k in range(1, len(ids)):
        assert abs(lp.token_logprobs[k] - float(want[k - 1][ids[k]])) <= 1e-4
        assert 1 <= len(lp.top_logprobs[k]) <= 2  # keyed by text: byte pieces may share one


def test_a_character_split_across_tokens_joins_back_from_the_bytes(server):
    """tiny-llama's vocabulary is byte-level: 'é' is two tokens, each half a character."""
    from peftkit.serve.logprobs import token_bytes
    tok = server.base.tokenizer
    ids = tok("é€", add_special_tokens=False).input_ids
    assert len(ids) > 2 and b"".join(token_bytes(tok, i) for i in ids) == "é€".encode()
