"""Structured outputs (issue 26.1): OpenAI's `response_format` (json_object, json_schema) and
vLLM's guided_json / guided_regex / guided_choice, per row of the mixed batch. Every answer
parses and validates against its own schema (jsonschema, a third party, checks it), a row's
grammar never changes another row's answer, a bad grammar is a 400 naming its field before
admission, and a grammar that cannot finish within max_tokens ends at "length"."""

import asyncio
import json
import re

import httpx
import jsonschema
import pytest

from peftkit.serve.app import create_app
from tests.serve_harness import ACME, keyed_server

KEY = ACME
# Schemas a random model can finish: enums, bounded integers, booleans, short arrays.
SCHEMAS = [
    {"type": "object", "properties": {"label": {"enum": ["billing", "bug", "sales"]}},
     "required": ["label"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                      "ok": {"type": "boolean"}},
     "required": ["n", "ok"], "additionalProperties": False},
    {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 1, "maxItems": 3},
    {"enum": ["yes", "no"]},
    {"type": "object", "properties": {"route": {"type": "object", "properties": {
        "team": {"enum": ["a", "b"]}}, "required": ["team"], "additionalProperties": False}},
     "required": ["route"], "additionalProperties": False},
    {"type": "boolean"},
]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = keyed_server(tmp_path_factory, max_loaded=8, max_batch=8).start()
    yield server
    server.stop()


def _post_all(server, bodies: list[dict], path="/v1/completions") -> list[httpx.Response]:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                                     base_url="http://test", timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            return await asyncio.gather(*[c.post(path, json=b) for b in bodies])
    return asyncio.run(go())


def _schema(i: int) -> dict:
    return {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": SCHEMAS[i]}}


def test_every_row_answers_its_own_schema_in_one_mixed_batch(server):
    """Six tenants' rows, each its own adapter and schema, sampled at temperature 1: every
    answer validates, and each equals its request sent alone (seeded)."""
    bodies = [{"model": f"a{i:02d}", "prompt": "give it:", "max_tokens": 48,
               "temperature": 1.0, "seed": i, "response_format": _schema(i)}
              for i in range(len(SCHEMAS))]
    together = _post_all(server, bodies)
    assert all(r.status_code == 200 for r in together), [r.text for r in together]
    texts = [r.json()["choices"][0]["text"] for r in together]
    for text, schema, r in zip(texts, SCHEMAS, together):
        assert r.json()["choices"][0]["finish_reason"] == "stop", text
        jsonschema.validate(json.loads(text), schema)
    alone = [_post_all(server, [b])[0].json()["choices"][0]["text"] for b in bodies]
    assert texts == alone
    free = _post_all(server, [{**b, "response_format": {"type": "text"}} for b in bodies])
    assert [r.json()["choices"][0]["text"] for r in free] != texts  # the grammar did something


def test_choice_regex_and_json_object_hold_even_against_a_forced_token(server):
    """logit_bias +100 on a token the grammar forbids cannot get it out: the mask comes first."""
    tok = server.base.tokenizer
    forced = {str(tok.convert_tokens_to_ids("z")): 100}
    base = {"model": "a01", "prompt": "pick:", "max_tokens": 40, "temperature": 1.0, "seed": 3,
            "logit_bias": forced}
    choice, regex, obj, gbnf, lark = _post_all(server, [
        {**base, "guided_choice": ["yes", "no", "maybe"]},
        {**base, "guided_regex": "[0-9]{3}-[ab]"},
        {**base, "response_format": {"type": "json_object"}, "max_tokens": 200},
        {**base, "guided_grammar": 'root ::= ("ab" | "cd") [0-9] [0-9]?'},  # GBNF
        {**base, "guided_grammar": 'start: WORD ("," WORD)*\nWORD: /[xy]{2}/'},  # Lark
    ])
    chat, = _post_all(server, [{"model": "a01", "max_tokens": 40, "guided_choice": ["up", "down"],
                             "messages": [{"role": "user", "content": "which?"}]}],
                   "/v1/chat/completions")
    assert choice.json()["choices"][0]["text"] in ("yes", "no", "maybe")
    text = regex.json()["choices"][0]["text"]
    assert len(text) == 5 and text[:3].isdigit() and text[3] == "-" and text[4] in "ab", text
    answer = obj.json()["choices"][0]
    if answer["finish_reason"] == "stop":  # a random model may also run out of tokens first
        assert isinstance(json.loads(answer["text"]), dict)
    else:
        assert answer["text"].lstrip().startswith("{")
    assert chat.json()["choices"][0]["message"]["content"] in ("up", "down")
    assert re.fullmatch(r"(ab|cd)[0-9][0-9]?", gbnf.json()["choices"][0]["text"]), gbnf.text
    assert re.fullmatch(r"[xy]{2}(,[xy]{2})*", lark.json()["choices"][0]["text"]), lark.text


def test_a_grammar_that_cannot_finish_ends_at_length_with_its_partial_text(server):
    r, = _post_all(server, [{"model": "a02", "prompt": "x:", "max_tokens": 5, "temperature": 0,
                             "guided_regex": "x{40}"}])
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"] == "xxxxx"


@pytest.mark.parametrize("field,value,says", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}, "schema"),
    ("response_format", {"type": "xml"}, "type must be"),
    ("response_format", {"type": "json_schema",
                         "json_schema": {"schema": {"type": "object", "required": 5}}}, ""),
    ("guided_regex", "(unclosed", ""),
    ("guided_choice", ["yes", ""], "non-empty"),
    ("guided_json", "{not json", "not valid JSON"),
    ("guided_grammar", "root ::= (", "GBNF"),
    ("guided_grammar", 5, "a GBNF or Lark grammar"),
])
def test_a_bad_grammar_is_a_400_naming_its_field_before_admission(server, field, value, says):
    loaded = set(server.store.entries)
    r, = _post_all(server, [{"model": "a19", "prompt": "x", field: value}])
    error = r.json()["error"]
    assert r.status_code == 400 and error["param"] == field and says in error["message"], error
    assert set(server.store.entries) == loaded and not server.admission.inflight  # not admitted


def test_one_structured_output_per_request(server):
    r, = _post_all(server, [{"model": "a00", "prompt": "x", "guided_choice": ["a"],
                             "response_format": {"type": "json_object"}}])
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_choice"


def test_a_streamed_constrained_answer_is_the_same_answer(server):
    body = {"model": "a03", "prompt": "give it:", "max_tokens": 48, "temperature": 1.0,
            "seed": 11, "response_format": _schema(1)}
    whole = _post_all(server, [body])[0].json()["choices"][0]["text"]

    async def stream():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(server)),
                                     base_url="http://test", timeout=120,
                                     headers={"Authorization": f"Bearer {KEY}"}) as c:
            text = ""
            async with c.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        text += json.loads(line[6:])["choices"][0]["text"]
            return text
    assert asyncio.run(stream()) == whole
    jsonschema.validate(json.loads(whole), SCHEMAS[1])
