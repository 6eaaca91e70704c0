"""The OpenAI API's contract, shared by `serve` and `gateway`: request bodies, errors in
OpenAI's body ({"error": {"message", "type", "code"}}), one mapping from peftkit's errors to
HTTP statuses, and key checks."""

from typing import Annotated, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from peftkit.engine import QueueFull
from peftkit.errors import PeftkitError
from peftkit.serve.server import TenantBusy
from peftkit.serve.store import AdapterNotFound, StoreFull


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


def busy(e: Exception) -> ApiError:
    """429: a full queue, every slot busy, or a tenant at its in-flight limit."""
    return ApiError(429, str(e), "rate_limit_error", {"Retry-After": "1"})


MAX_STOP = 16  # OpenAI allows 4; enough for any template, few enough to check per token
Stop = Annotated[str, Field(min_length=1, max_length=256)]


class SamplingParams(BaseModel):
    model: str = ""  # any length: an unknown id is a 404 like any other
    max_tokens: int = Field(16, ge=1)  # and prompt + max_tokens within the context (400)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)  # torch.Generator's range
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionBody(SamplingParams):
    prompt: str | list[str]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(SamplingParams):
    messages: list[Message] = Field(min_length=1)


class AdapterBody(BaseModel):
    lora_name: str
    pin: bool = False
    tier: Literal["device", "host"] = "device"  # load: into a slot, or prefetch to host memory


def install_errors(app: FastAPI) -> None:
    """OpenAI's error body for ApiError and for request validation (422)."""
    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}"
                        for err in e.errors())
        return JSONResponse({"error": {"message": msg[:1000], "type": "invalid_request_error",
                                       "code": 422}}, status_code=422)


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
    return ApiError(400, str(e))

