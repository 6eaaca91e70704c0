"""The OpenAI-compatible HTTP API over a `Server` (so the `openai` client works unchanged).

/v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health, /metrics, and the
admin endpoints /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/reload_lora_adapter (vLLM's
names). Errors use OpenAI's body: {"error": {"message", "type", "code"}}.
"""

import asyncio
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from peftkit.errors import PeftkitError
from peftkit.serve.engine import QueueFull, Request, Sampling
from peftkit.serve.server import Server
from peftkit.serve.store import AdapterNotFound, StoreFull


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 headers: dict | None = None):
        self.status, self.message, self.kind, self.headers = status, message, kind, headers


class SamplingParams(BaseModel):
    model: str = ""
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
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


def create_app(server: Server) -> FastAPI:
    app = FastAPI(title="peftkit", version="0.1.0")

    @app.exception_handler(ApiError)
    async def api_error(_req, e: ApiError):
        return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}},
                            status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_req, e: RequestValidationError):
        msg = "; ".join(f"{'.'.join(str(x) for x in err['loc'][1:])}: {err['msg']}"
                        for err in e.errors())
        return JSONResponse({"error": {"message": msg, "type": "invalid_request_error",
                                       "code": 422}}, status_code=422)

    def caller(http: HTTPRequest, admin: bool = False):
        who = server.tenancy.caller(http.headers.get("authorization"))
        if who is None:
            raise ApiError(401, "invalid or missing API key", "authentication_error")
        if admin and not who.admin:
            raise ApiError(403, "admin key required", "permission_error")
        return who

    def resolve(who, model: str) -> str:
        if model in ("", server.name):
            return model
        if not who.may_use(model):
            raise ApiError(404, f"The model `{model}` does not exist.", "not_found_error")
        return model

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.name, **server.store.stats(),
                "queue": server.engine.queue_depth(), "batch_rows": len(server.engine.active)}

    @app.get("/metrics")
    async def metrics():
        server.metrics.queue.set(server.engine.queue_depth())
        server.metrics.active.set(len(server.engine.active))
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        who = caller(http)
        data = [{"id": server.name, "object": "model", "created": 0, "owned_by": "peftkit",
                 "parent": None, "root": server.name}]
        data += [{"id": a, "object": "model", "created": 0, "owned_by": "peftkit",
                  "parent": server.name, "root": server.name}
                 for a in server.store.available() if who.may_use(a)]
        return {"object": "list", "data": data}

    async def run(http, body: SamplingParams, ids: list[int], chat: bool):
        who = caller(http)
        model = resolve(who, body.model)
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        sampling = Sampling(body.max_tokens, body.temperature, body.top_p, stop, body.seed)
        loop, sink = asyncio.get_running_loop(), asyncio.Queue()
        try:
            server.submit(model, ids, sampling, loop, sink)
        except AdapterNotFound as e:
            raise ApiError(404, str(e), "not_found_error") from None
        except (StoreFull, QueueFull) as e:
            raise ApiError(429, str(e), "rate_limit_error", {"Retry-After": "1"}) from None
        except PeftkitError as e:  # AdapterInvalid, prompt over the context, ...
            raise ApiError(400, str(e)) from None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = model or server.name
        if body.stream:
            return StreamingResponse(stream(sink, rid, created, name, chat),
                                     media_type="text/event-stream")
        while True:
            item = await sink.get()
            if isinstance(item, Request):
                break
        if item.error:
            raise ApiError(500, item.error, "server_error")
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(item.out_ids),
                 "total_tokens": len(ids) + len(item.out_ids)}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": item.text},
                      "finish_reason": item.finish_reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": name,
                    "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": item.text, "logprobs": None,
                  "finish_reason": item.finish_reason}
        return {"id": rid, "object": "text_completion", "created": created, "model": name,
                "choices": [choice], "usage": usage}

    async def stream(sink, rid, created, name, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        while True:
            item = await sink.get()
            done = isinstance(item, Request)
            text = "" if done else item
            if chat:
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                choice = {"index": 0, "delta": delta if (text or first) else {},
                          "finish_reason": item.finish_reason if done else None}
            else:
                choice = {"index": 0, "text": text, "logprobs": None,
                          "finish_reason": item.finish_reason if done else None}
            first = False
            chunk = {"id": rid, "object": obj, "created": created, "model": name,
                     "choices": [choice]}
            yield f"data: {json.dumps(chunk)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
                return

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt if isinstance(body.prompt, str) else (
            body.prompt[0] if len(body.prompt) == 1 else None)
        if prompt is None:
            raise ApiError(422, "prompt: give one string (batched prompts are not supported)")
        return await run(http, body, server.prompt_ids(prompt=prompt), chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        messages = [m.model_dump() for m in body.messages]
        return await run(http, body, server.prompt_ids(messages=messages), chat=True)

    def admin(action):
        async def endpoint(body: AdapterBody, http: HTTPRequest):
            caller(http, admin=True)
            try:
                entry = action(body)
            except AdapterNotFound as e:
                raise ApiError(404, str(e), "not_found_error") from None
            except StoreFull as e:
                raise ApiError(429, str(e), "rate_limit_error", {"Retry-After": "1"}) from None
            except PeftkitError as e:
                raise ApiError(400, str(e)) from None
            return {"status": "ok", "lora_name": body.lora_name,
                    "slot": getattr(entry, "slot", None)}
        return endpoint

    app.post("/v1/load_lora_adapter")(admin(lambda b: server.store.load(b.lora_name, pin=b.pin)))
    app.post("/v1/unload_lora_adapter")(admin(lambda b: server.store.unload(b.lora_name)))
    app.post("/v1/reload_lora_adapter")(admin(lambda b: server.store.reload(b.lora_name)))
    return app
