"""Chat's `tools` and `tool_choice`, as vLLM serves them: a named function or "required" goes
through the structured-output engine (the answer is a list of calls, each a function of the
request's with arguments valid against its JSON schema, by construction), "auto" only where
the model's chat template defines tool calls (Hermes/Qwen's `<tool_call>` blocks, parsed from
the answer); every other case is a 400 naming the field. The tools are rendered into the
prompt by the chat template when it takes them; the answer comes back as `tool_calls`."""

import json
import re
import uuid
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from peftkit.constrain import Grammar, grammar_for

NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for a function's name
HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)


class Function(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(pattern=NAME)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments (none: no arguments)
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: str = Field(pattern="^function$")
    function: Function


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str
    arguments: str  # JSON text, as OpenAI sends it back


class ToolCall(BaseModel):
    """An earlier assistant turn's call (rendered by the chat template)."""
    model_config = ConfigDict(extra="forbid", strict=True)
    id: str
    type: str = Field(pattern="^function$")
    function: CalledFunction


@dataclass
class ToolPlan:
    """How a request's answer becomes tool calls: `named` (a one-call list of that function)
    or `required` (a list of {name, arguments}), or `auto` (`<tool_call>` blocks in free
    text)."""
    mode: str
    name: str | None = None


def _arguments(function: Function) -> dict:
    """Its arguments' schema; a function without parameters takes none ({})."""
    return function.parameters or {"type": "object", "properties": {},
                                   "additionalProperties": False}


def _calls_grammar(functions: list[Function], one: bool) -> Grammar:
    """A JSON list of calls [{"name", "arguments"}], each one of `functions` with arguments
    valid against its schema; exactly one call when `one`."""
    calls = [{"type": "object", "properties": {"name": {"const": f.name},
                                               "arguments": _arguments(f)},
              "required": ["name", "arguments"], "additionalProperties": False}
             for f in functions]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls},
              **({"maxItems": 1} if one else {})}
    return grammar_for("json_schema", schema, "tools")


def plan_tools(tools: list[Tool], choice, template: str | None,
               parallel: bool = True) -> tuple[ToolPlan | None, Grammar | None]:
    """(plan, grammar) for a request's tools and tool_choice (`parallel`: more than one call
    allowed, OpenAI's parallel_tool_calls); ValueError(param, reason)."""
    if not tools or choice == "none":
        return None, None
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") if choice.get("type") == "function" \
            else None
        found = [t.function for t in tools if t.function.name == name]
        if not found:
            raise ValueError("tool_choice", f"names no function of `tools` ({str(name)[:64]!r})")
        # one call written with its name, as "required" writes it: the name before the
        # arguments keeps a small model on them (measured on SmolLM2: the bare arguments
        # object ran on with made-up keys until max_tokens)
        return ToolPlan("named", name), _calls_grammar(found, one=True)
    if choice == "required":
        return ToolPlan("required"), _calls_grammar([t.function for t in tools],
                                                    one=not parallel)
    if choice in (None, "auto"):
        if template and "<tool_call>" in template:
            return ToolPlan("auto"), None
        raise ValueError("tool_choice", "'auto' needs a chat template that defines tool calls "
                         "(this model's does not); use 'required' or name a function")
    raise ValueError("tool_choice", "one of 'none', 'auto', 'required' or {\"type\": "
                     "\"function\", \"function\": {\"name\": ...}}")


def tool_calls(plan: ToolPlan, text: str) -> tuple[list[dict], str | None] | None:
    """(OpenAI's tool_calls, the content left beside them) parsed from an answer, or None when
    it holds no complete call (cut by max_tokens, or `auto` answering in words)."""
    def call(name: str, arguments) -> dict:
        return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments)}}
    try:
        if plan.mode in ("named", "required"):  # the list of calls their grammar wrote
            return [call(c["name"], c["arguments"]) for c in json.loads(text)], None
        found = [json.loads(m) for m in HERMES.findall(text)]
        calls = [call(c["name"], c.get("arguments", {})) for c in found]
    except (ValueError, KeyError, TypeError):
        return None
    if not calls:
        return None
    before = text[:text.find("<tool_call>")].strip()
    return calls, before or None


def takes_tools(template: str | None) -> bool:
    return bool(template) and "tools" in template


def renders_tool_calls(template: str | None) -> bool:
    return bool(template) and "tool_calls" in template
