"""Chat `tools` (issue 33.2): a named function or tool_choice "required" decoded through the
structured-output grammar, so the calls the official client reads back validate against the
tools' schemas (streamed too); "auto" only where the chat template defines tool calls; tool
turns rendered by the chat template, refused by name where it cannot render them."""

import json

import jsonschema
import pytest
from fastapi.testclient import TestClient

from peftkit.serve.app import create_app
from peftkit.serve.config import ServeConfig
from peftkit.serve.server import Server
from peftkit.serve.tools import ToolPlan, tool_calls
from tests.serve_harness import running

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                            "days": {"type": "integer", "minimum": 1,
                                                     "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "ping", "description": "no arguments"}}]
HI = [{"role": "user", "content": "weather in Paris for two days?"}]
HERMES = """{%- if tools %}<|im_start|>system
Tools: <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant
{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": \
{{ c.function.arguments }}}</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>{{ m.content }}</tool_response><|im_end|>
{% else %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


@pytest.fixture
def servers(tmp_path_factory):
    adapters = tmp_path_factory.mktemp("none")
    hermes = tmp_path_factory.mktemp("t") / "hermes.jinja"
    hermes.write_text(HERMES)
    return (Server(ServeConfig(base="tiny-llama", adapters=str(adapters))),
            Server(ServeConfig(base="tiny-llama", adapters=str(adapters),
                               chat_template=str(hermes))))


def test_named_and_required_tools_through_the_official_client(servers):
    from openai import OpenAI
    with running(servers[0]) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        for seed in range(3):
            out = client.chat.completions.create(
                model="tiny-llama", messages=HI, tools=TOOLS, max_tokens=150, temperature=1.0,
                seed=seed, tool_choice={"type": "function", "function": {"name": "get_weather"}})
            choice = out.choices[0]
            assert choice.finish_reason == "tool_calls", choice
            call = choice.message.tool_calls[0]
            assert call.function.name == "get_weather" and call.id.startswith("call_")
            jsonschema.validate(json.loads(call.function.arguments), WEATHER)
        out = client.chat.completions.create(model="tiny-llama", messages=HI, tools=TOOLS,
                                             tool_choice="required", max_tokens=120,
                                             temperature=1.0, seed=4, parallel_tool_calls=False)
        calls = out.choices[0].message.tool_calls
        assert out.choices[0].finish_reason == "tool_calls" and len(calls) == 1
        for call in calls:
            schema = WEATHER if call.function.name == "get_weather" else {"type": "object"}
            jsonschema.validate(json.loads(call.function.arguments), schema)
        deltas = [c.choices[0].delta for c in client.chat.completions.create(
            model="tiny-llama", messages=HI, tools=TOOLS, max_tokens=150, temperature=1.0,
            seed=0, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_weather"}})]
        streamed = [t for d in deltas for t in d.tool_calls or []]
        assert len(streamed) == 1 and streamed[0].function.name == "get_weather"
        jsonschema.validate(json.loads(streamed[0].function.arguments), WEATHER)


def test_tool_requests_refused_by_name(servers):
    with TestClient(create_app(servers[0])) as c:
        def ask(**kw):
            return c.post("/v1/chat/completions",
                          json={"model": "tiny-llama", "messages": HI, "max_tokens": 4, **kw})
        r = ask(tools=TOOLS)  # "auto" by default; ChatML defines no tool calls
        assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
        assert "'auto' needs a chat template that defines tool calls" in r.text
        r = ask(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}})
        assert r.status_code == 400 and "names no function of `tools` ('nope')" in r.text
        r = ask(tools=TOOLS, tool_choice="required",
                response_format={"type": "json_object"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
        r = ask(tools=[{"type": "function", "function": {"name": "bad name!"}}],
                tool_choice="required")
        assert r.status_code == 400
        servers[0].start()
        assert ask(tools=TOOLS, tool_choice="none").status_code == 200  # tools unused
        turns = HI + [{"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": turns})
        assert r.status_code == 400 and "does not render an assistant turn's tool_calls" in r.text
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [
            {"role": "tool", "content": "sunny"}]})
        assert r.status_code == 400 and "tool_call_id" in r.text
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": [
            {"role": "function", "name": "f", "content": "x"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    servers[0].stop()


def test_a_template_with_tool_calls_renders_tools_and_tool_turns(servers):
    server = servers[1]
    turns = HI + [{"role": "assistant", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    text = server.base.tokenizer.decode(server.prompt_ids(messages=turns, tools=TOOLS))
    assert '"name": "get_weather"' in text and "<tool_response>sunny</tool_response>" in text
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"' in text
    with running(server), TestClient(create_app(server)) as c:  # "auto" allowed here
        r = c.post("/v1/chat/completions", json={"model": "tiny-llama", "messages": turns,
                                                 "tools": TOOLS[1:], "max_tokens": 3})
        assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] == "length"


def test_auto_reads_hermes_tool_call_blocks():
    found = tool_calls(ToolPlan("auto"), 'Let me check.\n<tool_call>\n{"name": "get_weather", '
                                         '"arguments": {"city": "Oslo", "days": 1}}\n'
                                         '</tool_call>')
    calls, content = found
    assert content == "Let me check." and calls[0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "days": 1}
    assert tool_calls(ToolPlan("auto"), "just words") is None
    assert tool_calls(ToolPlan("named", "f"), '[{"name": "f", "argu') is None  # cut short
