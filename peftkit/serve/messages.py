"""A chat turn as OpenAI's API sends one, checked as OpenAI checks it (strict types, unknown
fields refused), in the form the chat template renders."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from peftkit.serve.tools import ToolCall


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class Message(BaseModel):
    """A chat turn: content as a string or as parts (text parts are joined; any other part is
    refused by name); `developer` is OpenAI's newer name for `system`; an assistant turn may
    carry `tool_calls` instead of content, answered by `tool` turns (rendered by the chat
    template: tools.renders_tool_calls); the legacy `function` turns are refused by name."""
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart | dict] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _roles(cls, data):
        if isinstance(data, dict) and (data.get("role") == "function" or
                                       data.get("function_call")):
            raise PydanticCustomError("not_implemented", "{param}: the legacy function turns "
                                      "are not supported (use tools and tool turns)",
                                      {"param": "messages"})
        return data

    @model_validator(mode="after")
    def _plain(self):
        if isinstance(self.content, list):
            other = [p for p in self.content if not isinstance(p, TextPart)]
            if other:
                kind = other[0].get("type", "?") if isinstance(other[0], dict) else "?"
                raise PydanticCustomError("not_implemented", "{param}: content parts of type "
                                          "'" + str(kind)[:40] + "' are not supported (text "
                                          "only)", {"param": "messages"})
            self.content = "".join(p.text for p in self.content)
        if self.role == "developer":
            self.role = "system"
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise PydanticCustomError("bad_param", "{param}: a " + self.role + " turn needs "
                                      "content", {"param": "messages"})
        if self.tool_calls and self.role != "assistant":
            raise PydanticCustomError("bad_param", "{param}: only assistant turns carry "
                                      "tool_calls", {"param": "messages"})
        if self.role == "tool" and not self.tool_call_id:
            raise PydanticCustomError("bad_param", "{param}: a tool turn needs the "
                                      "tool_call_id it answers", {"param": "messages"})
        return self
