"""The OpenAI API's contract, shared by `serve` and `gateway`: request bodies, errors in
OpenAI's body ({"error": {"message", "type", "code"}}), one mapping from peftkit's errors to
HTTP statuses, and key checks."""

import json
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator
from pydantic_core import PydanticCustomError
from starlette.exceptions import HTTPException as StarletteHTTPException

from peftkit.constrain import Grammar, grammar_for
from peftkit.engine import QueueFull
from peftkit.errors import PeftkitError
from peftkit.serve.tickets import TenantBusy
from peftkit.serve.messages import Message
from peftkit.serve.tools import Tool
from peftkit.serve.store import AdapterNotFound, StoreFull


# OpenAI's string error codes (typed clients cannot decode an integer there)
CODES = {401: "invalid_api_key", 403: "insufficient_permissions", 404: "model_not_found",
         429: "rate_limit_exceeded"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None, code: str | None = None,
                 param: str | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers
        self.code = code or CODES.get(status)
        self.param = param


def busy(e: Exception) -> ApiError:
    """429: a full queue, every slot busy, or a tenant at its in-flight limit."""
    return ApiError(429, str(e), "rate_limit_error", {"Retry-After": "1"})


MAX_STOP = 16  # OpenAI allows 4; enough for any template, few enough to check per token
Stop = Annotated[str, Field(min_length=1, max_length=256)]


MAX_N = 128  # OpenAI's bound on `n`


def _off(value) -> bool:
    """A field left at a value that asks for nothing (absent, null, false, 0, empty)."""
    return value in (None, False, 0, "", [], {})


# OpenAI request fields not implemented here: any value but their neutral one would change the
# answer, so it is refused by name (400), never dropped silently. field -> neutral test.
NOT_IMPLEMENTED = {
    "response_format": lambda v: _off(v) or v == {"type": "text"},
    "logprobs": _off, "top_logprobs": _off, "logit_bias": _off,
    "tools": _off, "functions": _off,
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "function_call": lambda v: v in (None, "none", "auto"),
    "frequency_penalty": _off, "presence_penalty": _off,
    "echo": _off, "suffix": _off, "best_of": lambda v: v in (None, 1),
    "audio": _off, "modalities": lambda v: _off(v) or v == ["text"], "prediction": _off,
    "guided_json": _off, "guided_regex": _off, "guided_choice": _off, "guided_grammar": _off,
    "reasoning_effort": _off, "verbosity": _off, "web_search_options": _off,
}


class OpenAIBody(BaseModel):
    """A request body as OpenAI checks one: an unknown field is 400 `Unrecognized request
    argument supplied: NAME`, an unimplemented one set to anything but its neutral value is a
    400 naming it; fields clients send that change no answer are accepted."""
    model_config = ConfigDict(extra="forbid", strict=True)  # "5" is not a number here
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None  # caching hints: nothing to change in an answer
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict | None = None
    moderation: Any = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    stream_options: dict[str, bool] | None = None  # include_usage: see completions.stream
    response_format: Any = None
    logprobs: Any = None
    top_logprobs: Any = None
    logit_bias: Any = None
    tools: Any = None
    functions: Any = None
    tool_choice: Any = None
    function_call: Any = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    echo: Any = None
    suffix: Any = None
    best_of: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data):
        """`"temperature": null` (as frameworks send it) means the field's default."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) \
            else data

    IMPLEMENTED: ClassVar[frozenset] = frozenset()  # fields a body type implements itself

    @model_validator(mode="after")
    def _implemented(self):
        for name, neutral in NOT_IMPLEMENTED.items():
            if name not in self.IMPLEMENTED and not neutral(getattr(self, name)):
                raise PydanticCustomError(
                    "not_implemented", "{param}: not supported by this server (it would change "
                    "the answer, so it is refused rather than ignored)", {"param": name})
        return self


# Structured outputs, one per request: OpenAI's response_format and vLLM's guided_* fields.
GRAMMAR_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice",
                  "guided_grammar")


TEXT_GRAMMARS = {"guided_regex": ("regex", "a regular expression"),
                 "guided_grammar": ("grammar", "a GBNF or Lark grammar")}


def _grammar_asked(field: str, value) -> tuple[str, object]:
    """(grammar kind, its value) of one structured-output field, as OpenAI and vLLM shape it;
    ValueError with the reason otherwise."""
    if field == "response_format":
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object":
            return "json_object", None
        if kind == "json_schema":
            spec = value.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
                raise ValueError("json_schema.schema: a JSON schema object is required")
            return "json_schema", spec["schema"]
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got "
                         f"{str(kind)[:40]!r}")
    if field == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"not valid JSON ({e.msg})") from None
        return "json_schema", value
    if field in TEXT_GRAMMARS:
        kind, what = TEXT_GRAMMARS[field]
        if not isinstance(value, str) or not value:
            raise ValueError(f"{what} (a string) is required")
        return kind, value
    if not (isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)):
        raise ValueError("a non-empty list of non-empty strings is required")
    return "choice", value


class SamplingParams(OpenAIBody):
    IMPLEMENTED: ClassVar[frozenset] = frozenset({"logit_bias", "frequency_penalty",
                                                  "presence_penalty", *GRAMMAR_FIELDS})
    _grammar: Grammar | None = PrivateAttr(None)  # the checked structured-output grammar
    model: str = ""  # any length: an unknown id is a 404 like any other
    # token id (as a string, OpenAI's JSON) -> bias added to its logit before sampling, as
    # OpenAI: -100 bans a token, 100 all but forces it; ids are checked against the vocabulary
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    # None: chat generates until a stop, EOS or the context (OpenAI's chat has no default
    # limit); completions default to 16 (OpenAI's legacy default). Prompt + max_tokens must fit
    # the context (400).
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # chat's newer name; wins if both
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, ge=0.0, le=1.0)  # 0: only the likeliest token (greedy)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    stream: bool = False
    # OpenAI's range; applied to the answer's own tokens so far (as vLLM)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: int = Field(1, ge=1, le=MAX_N)  # choices per prompt, each a row (n x prompts <= --max-batch)

    @model_validator(mode="after")
    def _newer_name(self):
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self

    @model_validator(mode="after")
    def _structured(self):
        """The structured-output grammar, compiled and checked here: a bad schema is a 400
        naming its field before the request is admitted."""
        asked = [f for f in GRAMMAR_FIELDS if not NOT_IMPLEMENTED[f](getattr(self, f))]
        if len(asked) > 1:
            raise PydanticCustomError("bad_param", "{param}: one structured output per "
                                      "request (also given: " + asked[0] + ")",
                                      {"param": asked[1]})
        if asked:
            try:
                self._grammar = grammar_for(*_grammar_asked(asked[0], getattr(self, asked[0])),
                                            asked[0])
            except (ValueError, PeftkitError) as e:
                message = str(e).removeprefix(asked[0] + ": ")
                raise PydanticCustomError("bad_param", "{param}: " + message.replace(
                    "{", "(").replace("}", ")"), {"param": asked[0]}) from None
        return self

    @property
    def grammar(self) -> Grammar | None:
        return self._grammar

    @property
    def alternatives(self) -> int | None:
        """How many likeliest tokens to report beside each chosen one; None: no logprobs."""
        return None


class CompletionBody(SamplingParams):
    IMPLEMENTED: ClassVar[frozenset] = SamplingParams.IMPLEMENTED | {"echo", "logprobs",
                                                                     "suffix", "best_of"}
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False  # the prompt's text before the completion's, in the choice's text
    suffix: str | None = None  # the text after the completion: fill-in-the-middle (fim.py)
    # candidates per prompt, of which the n likeliest per token are returned (OpenAI's bound)
    best_of: int | None = Field(None, ge=1, le=20)
    # OpenAI's legacy logprobs: each token's log-probability and the this-many likeliest
    logprobs: int | None = Field(None, ge=0, le=5)

    @property
    def alternatives(self) -> int | None:
        return self.logprobs

    @model_validator(mode="after")
    def _best_of_n(self):
        if self.best_of is not None and self.best_of < self.n:
            raise PydanticCustomError("bad_param", "{param}: must be at least n",
                                      {"param": "best_of"})
        if (self.best_of or 1) > self.n and self.stream:  # as OpenAI: chosen at the end
            raise PydanticCustomError("bad_param", "{param}: not supported with stream",
                                      {"param": "best_of"})
        return self

    @model_validator(mode="after")
    def _suffix_alone(self):
        if self.suffix and self.echo:  # as OpenAI: the echoed prompt would hide the layout
            raise PydanticCustomError("bad_param", "{param}: not supported with echo",
                                      {"param": "suffix"})
        return self

    @model_validator(mode="after")
    def _legacy_default(self):
        if self.max_tokens is None:
            self.max_tokens = 16
        return self


class ChatBody(SamplingParams):
    IMPLEMENTED: ClassVar[frozenset] = SamplingParams.IMPLEMENTED | {
        "logprobs", "top_logprobs", "tools", "tool_choice"}
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict | None = None  # see tools.py
    logprobs: bool = False  # each content token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=20)  # and the this-many likeliest beside it

    @model_validator(mode="after")
    def _top_needs_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise PydanticCustomError("bad_param", "{param}: needs logprobs: true",
                                      {"param": "top_logprobs"})
        return self

    @property
    def alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class ClassifyBody(BaseModel):
    """vLLM's /classify body: a classifier run and one text or a list (not empty)."""
    model_config = ConfigDict(extra="forbid")
    model: str
    input: str | list[str] = Field(min_length=1)
    user: str | None = None


class AdapterBody(BaseModel):
    """vLLM's admin body. `lora_path` names a directory inside the server's --adapters
    directory that `lora_name` then serves (anywhere else: 400; a client's path is trusted no
    further); without it the adapter is the directory named `lora_name`."""
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str | None = None
    pin: bool = False
    tier: Literal["device", "host"] = "device"  # load: into a slot, or prefetch to host memory


def install_errors(app: FastAPI) -> None:
    """OpenAI's error body for ApiError and for request validation (400, as OpenAI's)."""
    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "param": e.param,
                                       "code": e.code}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_req, e: StarletteHTTPException):
        """Unknown routes, wrong methods, bodies that do not parse: OpenAI's shape too."""
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        detail = e.detail if isinstance(e.detail, str) else "invalid request"
        if e.status_code == 400:
            detail = f"the body is not valid JSON ({detail})"
        return JSONResponse({"error": {"message": detail, "type": kind, "param": None,
                                       "code": CODES.get(e.status_code)}},
                            status_code=e.status_code, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, e: RequestValidationError):
        problems = [_problem(err) for err in e.errors()]
        return JSONResponse({"error": {"message": "; ".join(m for m, _ in problems)[:1000],
                                       "type": "invalid_request_error",
                                       "param": problems[0][1] if problems else None,
                                       "code": None}}, status_code=400)


def _problem(err: dict) -> tuple[str, str | None]:
    """(message, param) of one validation error, worded as OpenAI words its own."""
    where = ".".join(str(x) for x in err["loc"][1:])
    if err["type"] == "extra_forbidden":
        return f"Unrecognized request argument supplied: {where}", where
    if err["type"] in ("not_implemented", "bad_param"):
        return err["msg"], err["ctx"]["param"]
    return f"{where}: {err['msg']}", where or None


def authenticate(tenancy, http: HTTPRequest, admin: bool = False):
    """The caller behind the request's key (401 without one, 403 where admin is needed)."""
    who = tenancy.caller(http.headers.get("authorization"))
    if who is None:
        raise ApiError(401, "invalid or missing API key", "authentication_error")
    if admin and not who.admin:
        raise ApiError(403, "admin key required", "permission_error")
    return who


def missing(model: str) -> str:
    return f"The model `{model[:128]}` does not exist."


def api_error(e: PeftkitError, model: str | None = None) -> ApiError:
    """The HTTP error for a peftkit error: unknown adapter 404 (for a request, worded as
    OpenAI words a missing model), every slot or queue full or a tenant at its limit 429, any
    other (a corrupt adapter, a prompt over the context, ...) 400."""
    if isinstance(e, AdapterNotFound):
        return ApiError(404, missing(model) if model else str(e), "not_found_error")
    if isinstance(e, (StoreFull, QueueFull, TenantBusy)):
        return busy(e)
    over = "context" in str(e) and ("prompt" in str(e) or "max_tokens" in str(e))
    return ApiError(400, str(e), code="context_length_exceeded" if over else None)

