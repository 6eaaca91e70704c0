"""`n` choices and several prompts in one request (issues 26.2 and 33.1): each choice is a row
of the shared batch, answering exactly as that prompt alone would with seed + j, indexed
prompt x n + j, streamed with its index, counted once per prompt in `usage`, and bounded by
--max-batch and the tenant's in-flight limit."""

import asyncio
import json

from tests.test_serve import PROMPT, adapters, client, live, make_server, runs  # noqa: F401

ACME = "sk-acme-0001"


def _post(server, body, key=ACME):
    async def go():
        async with client(server, key) as c:
            return await c.post("/v1/completions", json=body)
    return asyncio.run(go())


def test_n_choices_are_the_seeded_solo_answers(live):
    body = {"model": "rand2", "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 7}
    many = _post(live, {**body, "n": 3}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2]
    solo = [_post(live, {**body, "seed": 7 + j}).json() for j in range(3)]
    assert [c["text"] for c in many["choices"]] == [s["choices"][0]["text"] for s in solo]
    assert len({c["text"] for c in many["choices"]}) > 1  # seed + j: not three copies
    prompt_tokens = solo[0]["usage"]["prompt_tokens"]
    assert many["usage"]["prompt_tokens"] == prompt_tokens  # the prompt once, not n times
    assert many["usage"]["completion_tokens"] == sum(s["usage"]["completion_tokens"]
                                                     for s in solo)


def test_several_prompts_times_n_stream_and_answer_alike(live):
    prompts = [PROMPT, "hello there", "x y"]
    body = {"model": "alpha", "prompt": prompts, "max_tokens": 6, "temperature": 0, "n": 2}
    whole = _post(live, body).json()
    texts = [c["text"] for c in whole["choices"]]
    assert [c["index"] for c in whole["choices"]] == list(range(6))
    for p, prompt in enumerate(prompts):
        alone = _post(live, {**body, "prompt": prompt, "n": 1}).json()["choices"][0]["text"]
        assert texts[2 * p] == texts[2 * p + 1] == alone  # greedy: both choices alike
    assert texts[0] == "aaaa"
    ids = [[5, 17, 33], [40, 41]]  # token-id prompts batch the same way
    by_ids = _post(live, {**body, "prompt": ids, "n": 1}).json()["choices"]
    assert [c["text"] for c in by_ids] == [
        _post(live, {**body, "prompt": p, "n": 1}).json()["choices"][0]["text"] for p in ids]

    async def stream():
        async with client(live, ACME) as c:
            got, usage = {}, None
            async with c.stream("POST", "/v1/completions",
                                json={**body, "stream": True,
                                      "stream_options": {"include_usage": True}}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        chunk = json.loads(line[6:])
                        for choice in chunk["choices"]:
                            got[choice["index"]] = got.get(choice["index"], "") + choice["text"]
                        usage = chunk["usage"] or usage
            return got, usage
    got, usage = asyncio.run(stream())
    assert [got[i] for i in range(6)] == texts
    assert usage == whole["usage"]


def test_rows_past_the_batch_or_the_tenant_limit_are_refused_whole(adapters, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"tenants:\n  acme: {{keys: [{ACME}], adapters: [alpha]}}\n")
    keys.chmod(0o600)
    server = make_server(adapters, max_batch=6, tenant_max_inflight=4,
                         api_keys=str(keys)).start()
    try:
        body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        over = _post(server, {**body, "n": 7})
        assert over.status_code == 400 and over.json()["error"]["param"] == "n"
        assert "7 rows, over this server's --max-batch 6" in over.json()["error"]["message"]
        two = [PROMPT, "x"]
        assert _post(server, {**body, "n": 2, "prompt": two}).status_code == 200  # 4: the edge
        assert _post(server, {**body, "n": 3, "prompt": two}).status_code == 429  # 6 rows > 4
        assert _post(server, {**body, "n": 129}).status_code == 400  # OpenAI's bound
        assert _post(server, {**body, "n": 4}).status_code == 200  # nothing leaked
        assert not any(s.users for s in server.store.slots)
        assert not server.admission.inflight
    finally:
        server.stop()


def test_the_openai_client_sends_lists_of_prompts_and_n(live):
    import openai
    import httpx
    from peftkit.serve.app import create_app
    transport = httpx.ASGITransport(app=create_app(live))

    async def go():
        oa = openai.AsyncOpenAI(base_url="http://test/v1", api_key=ACME,
                                http_client=httpx.AsyncClient(transport=transport))
        out = await oa.completions.create(model="alpha", prompt=[PROMPT, PROMPT], n=2,
                                          max_tokens=6, temperature=0)
        chat = await oa.chat.completions.create(
            model="alpha", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3,
            temperature=1.0, seed=1)
        return out, chat
    out, chat = asyncio.run(go())
    assert [c.text for c in out.choices] == ["aaaa"] * 4
    assert [c.index for c in chat.choices] == [0, 1]
