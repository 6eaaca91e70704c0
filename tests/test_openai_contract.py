"""The OpenAI contract as clients meet it (issues 31.6 and 33): the official `openai` client
against `peftkit serve` — request shapes and defaults, fields honoured or refused by name, errors
in OpenAI's shape — and the conformance table kept true against the client's request types."""

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import pytest

from peftkit.serve.app import create_app
from tests.helpers import free_port
from tests.test_serve import (PROMPT, adapters, client, live, make_server,  # noqa: F401
                              runs, tokenize)


def test_openai_client_completions_chat_and_stream(adapters):
    import openai
    import uvicorn
    server = make_server(adapters).start()
    port = free_port()
    config = uvicorn.Config(create_app(server), host="127.0.0.1", port=port, log_level="warning")
    web = uvicorn.Server(config)
    thread = threading.Thread(target=web.run, daemon=True)
    thread.start()
    try:
        deadline = time.time() + 30
        while not web.started and time.time() < deadline:
            time.sleep(0.05)
        oa = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        out = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0)
        assert out.choices[0].text == "aaaa" and out.usage.completion_tokens == 4
        chunks = oa.completions.create(model="beta", prompt=PROMPT, max_tokens=8, temperature=0,
                                       stream=True)
        assert "".join(c.choices[0].text for c in chunks) == "bbbb"
        chat = oa.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4, temperature=0.7, seed=3)
        assert chat.choices[0].message.role == "assistant"
        stream = oa.chat.completions.create(model="tiny-llama", stream=True, max_tokens=4,
                                            messages=[{"role": "user", "content": "hi"}])
        assert [c.choices[0].finish_reason for c in stream][-1] in ("stop", "length")
        assert {m.id for m in oa.models.list().data} >= {"tiny-llama", "alpha", "beta"}
        # no field silently dropped: unimplemented ones refused by name, unknown ones as OpenAI
        hi = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model="alpha", messages=hi, max_tokens=4,
                                       modalities=["audio"])
        assert e.value.status_code == 400 and "modalities: not supported" in str(e.value)
        with pytest.raises(openai.BadRequestError) as e:  # tools: "auto" needs a template's
            oa.chat.completions.create(model="alpha", messages=hi, max_tokens=4,
                                       tools=[{"type": "function", "function": {"name": "f"}}])
        assert e.value.body["param"] == "tool_choice"
        penalised = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=4,
                                          temperature=0, presence_penalty=2.0,
                                          frequency_penalty=1.0)
        assert penalised.choices[0].text != "aaaa"  # 'a' again and again is penalised
        # logprobs in the client's own types
        scored = oa.chat.completions.create(model="alpha", messages=hi, max_tokens=3,
                                            temperature=0, logprobs=True, top_logprobs=2)
        tokens = scored.choices[0].logprobs.content
        assert len(tokens) == scored.usage.completion_tokens
        assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in tokens)
        legacy = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=4,
                                       temperature=0, logprobs=2)
        assert "".join(legacy.choices[0].logprobs.tokens) == "aaaa"
        # structured outputs: OpenAI's response_format, vLLM's guided_* through extra_body
        schema = {"type": "object", "properties": {"ok": {"type": "boolean"}},
                  "required": ["ok"], "additionalProperties": False}
        shaped = oa.chat.completions.create(
            model="alpha", messages=hi, max_tokens=30, temperature=1.0, seed=2,
            response_format={"type": "json_schema", "json_schema": {"name": "o", "schema": schema}})
        assert isinstance(json.loads(shaped.choices[0].message.content)["ok"], bool)
        picked = oa.completions.create(model="beta", prompt=PROMPT, max_tokens=8,
                                       extra_body={"guided_choice": ["left", "right"]})
        assert picked.choices[0].text in ("left", "right")
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model="alpha", messages=hi, response_format={
                "type": "json_schema", "json_schema": {"name": "o"}})
        assert e.value.body["param"] == "response_format"
        # echo and logit_bias are honoured: the prompt first; a banned token never appears
        echoed = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=8,
                                       temperature=0, echo=True)
        assert echoed.choices[0].text == PROMPT + "aaaa"
        streamed = "".join(c.choices[0].text for c in oa.completions.create(
            model="alpha", prompt=PROMPT, max_tokens=8, temperature=0, echo=True, stream=True))
        assert streamed == PROMPT + "aaaa"
        a_id = tokenize(server, "a")[-1]
        banned = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=6,
                                       temperature=0, logit_bias={str(a_id): -100})
        assert "a" not in banned.choices[0].text
        forced = oa.completions.create(model="tiny-llama", prompt=PROMPT, max_tokens=3,
                                       temperature=0.7, seed=1, logit_bias={str(a_id): 100})
        assert forced.choices[0].text == "aaa"
        with pytest.raises(openai.BadRequestError) as e:
            oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=2,
                                  logit_bias={"999999": 5})
        assert e.value.body["param"] == "logit_bias"
        with pytest.raises(openai.BadRequestError) as e:
            oa.chat.completions.create(model="alpha", messages=hi, extra_body={"bogus": 1})
        assert "Unrecognized request argument supplied: bogus" in str(e.value)
        assert e.value.body["param"] == "bogus"
        # fields that change nothing are accepted; the newer token limit is honoured
        fine = oa.chat.completions.create(model="alpha", messages=hi, user="u-7", temperature=0,
                                          metadata={"k": "v"}, store=False, logprobs=False,
                                          response_format={"type": "text"},
                                          max_completion_tokens=2)
        assert fine.usage.completion_tokens <= 2 and fine.choices[0].logprobs is None
        chunks = list(oa.chat.completions.create(model="beta", messages=hi, max_tokens=3,
                                                 stream=True,
                                                 stream_options={"include_usage": True}))
        assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 3
        assert all(c.usage is None for c in chunks[:-1])
        # issue 33: OpenAI's request shapes and defaults
        said = oa.completions.create(model="alpha", prompt=PROMPT, max_tokens=8, temperature=0)
        by_ids = oa.completions.create(model="alpha", prompt=tokenize(server, PROMPT),
                                       max_tokens=8, temperature=0)
        assert by_ids.choices[0].text == said.choices[0].text == "aaaa"
        parts = [{"type": "text", "text": "say "}, {"type": "text", "text": "one:"}]
        plain = oa.chat.completions.create(model="alpha", temperature=0, max_tokens=6,
                                           messages=[{"role": "developer", "content": "Be brief."},
                                                     {"role": "user", "content": "say one:"}])
        joined = oa.chat.completions.create(model="alpha", temperature=0, max_tokens=6,
                                            messages=[{"role": "system", "content": "Be brief."},
                                                      {"role": "user", "content": parts}])
        assert plain.choices[0].message.content == joined.choices[0].message.content
        assert plain.choices[0].logprobs is None
        free = oa.chat.completions.create(model="tiny-llama", messages=hi, temperature=0,
                                          extra_body={"top_p": None})  # no max_tokens: no 16 cap
        assert free.choices[0].finish_reason == "stop" or free.usage.completion_tokens > 16
        for bad, param in (({"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "x"}}]}]}, "messages"),
                ({"messages": [{"role": "function", "content": "x", "name": "f"}]},
                 "messages"), ({"messages": hi, "max_tokens": "5"}, "max_tokens")):
            with pytest.raises(openai.BadRequestError) as e:
                oa.chat.completions.create(model="alpha", **bad)
            assert e.value.body["param"] == param, e.value.body
        assert oa.models.retrieve("alpha").id == "alpha"
        with pytest.raises(openai.NotFoundError) as e:
            oa.models.retrieve("nope")
        assert e.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError) as e:
            oa.completions.create(model="alpha", prompt="x " * 600, max_tokens=4)
        assert e.value.body["code"] == "context_length_exceeded"
        assert chunks[-1].usage.total_tokens == (chunks[-1].usage.prompt_tokens
                                                 + chunks[-1].usage.completion_tokens)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'peftkit_requests_total{model="alpha",status="stop"}' in metrics
    finally:
        web.should_exit = True
        thread.join(timeout=10)
        server.stop()


def test_a_key_is_checked_before_the_body_and_errors_keep_openais_shape(live):
    """A keyless request with a bad body got 422 before 401; unknown routes and wrong methods
    answered FastAPI's {"detail"}; another tenant's adapter card is a 404 like a missing one."""
    async def go():
        async with client(live, key="sk-wrong-000") as c:
            nokey = await c.post("/v1/completions", json={"prompt": 5, "max_tokens": "x"})
        async with client(live) as c:
            route = await c.get("/v1/nothing")
            method = await c.get("/v1/completions")
            theirs = await c.get("/v1/models/beta")
            mine = await c.get("/v1/models/alpha")
        return nokey, route, method, theirs, mine
    nokey, route, method, theirs, mine = asyncio.run(go())
    assert nokey.status_code == 401 and nokey.json()["error"]["code"] == "invalid_api_key"
    assert route.status_code == 404 and set(route.json()) == {"error"}
    assert method.status_code == 405 and set(method.json()) == {"error"}
    assert theirs.status_code == 404 and mine.json()["id"] == "alpha"


@pytest.mark.parametrize("params,body", [
    ("openai.types.chat.completion_create_params", "ChatBody"),
    ("openai.types.completion_create_params", "CompletionBody")])
def test_every_openai_request_field_is_supported_or_refused_by_name(params, body):
    """The conformance table (docs/openai-conformance.md) stays true: every field the official
    client can send is a field here (honoured, accepted as changing nothing, or refused by
    name unless neutral); none gets 'Unrecognized request argument'."""
    import importlib
    from peftkit.serve import api
    sent = set(importlib.import_module(params).CompletionCreateParamsBase.__annotations__)
    ours = set(getattr(api, body).model_fields)
    assert sent | {"stream"} <= ours, sorted(sent - ours)
    table = (Path(__file__).parents[1] / "docs" / "openai-conformance.md").read_text()
    assert all(f"`{f}`" in table for f in sent), sorted(f for f in sent if f"`{f}`" not in table)
