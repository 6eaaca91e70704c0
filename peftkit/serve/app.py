"""The OpenAI-compatible HTTP API over a `Server` (so the `openai` client works unchanged).

/v1/completions, /v1/chat/completions (SSE streaming), /v1/models, /health, /metrics, and the
admin endpoints /v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/reload_lora_adapter (vLLM's
names). Errors use OpenAI's body: {"error": {"message", "type", "code"}}.
"""

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from peftkit.errors import PeftkitError
from peftkit.serve.engine import QueueFull, Request, Sampling
from peftkit.serve.limits import BodyLimit
from peftkit.serve.server import Server, TenantBusy
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


def create_app(server: Server):
    """The FastAPI app wrapped in the body-size limit (an ASGI app either way)."""
    app = FastAPI(title="peftkit", version="0.1.0")
    install_errors(app)
    cfg = server.cfg
    waiting_for_slot = 0  # requests polling for an adapter slot (event-loop state only)

    def caller(http: HTTPRequest, admin: bool = False):
        return authenticate(server.tenancy, http, admin)

    def missing(model: str) -> str:
        return f"The model `{model[:128]}` does not exist."

    def resolve(who, model: str) -> str:
        """The model a caller may use; anything else is 404 before any file is looked at, so
        another tenant's adapter and a missing one look (and take) the same."""
        if model in ("", server.name):
            return model
        if not who.may_use(model):
            raise ApiError(404, missing(model), "not_found_error")
        return model

    @app.get("/health")
    async def health(http: HTTPRequest):
        """Liveness for anyone; totals for a tenant key; adapter ids for an admin (or open)."""
        who = server.tenancy.caller(http.headers.get("authorization"))
        if who is None:
            return {"status": "ok"}
        stats = server.store.stats()
        out = {"status": "ok", "model": server.name, "loaded": len(stats["loaded"]),
               "capacity": stats["capacity"], "host_cached": len(stats["host"]["adapters"]),
               "queue": server.engine.queue_depth(), "batch_rows": len(server.engine.active),
               "cache_events": server.metrics.cache_counts()}
        return {**out, **stats} if who.admin else out

    @app.get("/metrics")
    async def metrics(http: HTTPRequest):
        caller(http, admin=True)  # labels name adapters: admin only when keys are configured
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
                 for a in await run_in_threadpool(server.store.available) if who.may_use(a)]
        return {"object": "list", "data": data}

    async def slot_for(model: str) -> int:
        """The adapter's slot, waiting (bounded in time and in waiters) while every slot is
        busy, as vLLM queues requests for a cold LoRA; loads run off the event loop."""
        nonlocal waiting_for_slot
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + cfg.slot_wait_s, 0.005
        while True:
            acquiring = asyncio.ensure_future(run_in_threadpool(server.slot_for, model))
            try:
                return await asyncio.shield(acquiring)
            except asyncio.CancelledError:  # the caller is gone; the thread still finishes
                acquiring.add_done_callback(release_unused)
                raise
            except StoreFull as e:
                if loop.time() + delay > deadline or waiting_for_slot >= cfg.max_queue:
                    raise busy(e) from None
            waiting_for_slot += 1
            try:
                await asyncio.sleep(delay)
            finally:
                waiting_for_slot -= 1
            delay = min(delay * 2, 0.05)

    def release_unused(acquiring: asyncio.Future) -> None:
        if not acquiring.cancelled() and acquiring.exception() is None and acquiring.result() >= 0:
            server.store.release(acquiring.result())

    async def run(http, body: SamplingParams, prompt=None, messages=None):
        who = caller(http)
        model = resolve(who, body.model)
        try:
            server.admit(who.tenant)
        except TenantBusy as e:
            raise busy(e) from None
        submitted = False
        try:
            ids = await run_in_threadpool(server.prompt_ids, prompt, messages)
            server.engine.check(len(ids), body.max_tokens)
            slot = await slot_for(model)
            stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
            sampling = Sampling(body.max_tokens, body.temperature, body.top_p, stop, body.seed)
            sink = asyncio.Queue()
            req = server.submit(model, ids, sampling, asyncio.get_running_loop(), sink,
                                slot=slot, tenant=who.tenant, admitted=True,
                                stream=body.stream)
            submitted = True
        except AdapterNotFound:
            raise ApiError(404, missing(model), "not_found_error") from None
        except QueueFull as e:
            raise busy(e) from None
        except PeftkitError as e:  # AdapterInvalid, prompt over the context, bad seed, ...
            raise ApiError(400, str(e)) from None
        finally:
            if not submitted:
                server.leave(who.tenant)
        chat = messages is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        name = model or server.name
        if body.stream:
            return StreamingResponse(stream(req, sink, rid, created, name, chat),
                                     media_type="text/event-stream")
        item = await finished(http, req, sink)
        if item.error:
            status = 503 if item.finish_reason == "timeout" else 500
            raise ApiError(status, item.error, "server_error")
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

    async def finished(http, req: Request, sink: asyncio.Queue) -> Request:
        """Wait for the engine to finish `req`; a client that hangs up cancels it."""
        get = asyncio.ensure_future(sink.get())
        try:
            while True:
                done, _ = await asyncio.wait({get}, timeout=0.5)
                if done:
                    return get.result()  # non-streamed requests get only the final item
                if await http.is_disconnected():
                    req.cancel()
        finally:
            get.cancel()

    async def stream(req: Request, sink, rid, created, name, chat):
        obj = "chat.completion.chunk" if chat else "text_completion"
        first = True
        try:
            while True:
                item = await sink.get()
                done = isinstance(item, Request)
                if done and item.error:
                    error = {"message": item.error, "type": "server_error", "code": 500}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
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
        finally:  # the client left mid-stream (or we are done): the row leaves the batch
            req.cancel()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, http: HTTPRequest):
        prompt = body.prompt if isinstance(body.prompt, str) else (
            body.prompt[0] if len(body.prompt) == 1 else None)
        if prompt is None:
            raise ApiError(422, "prompt: give one string (batched prompts are not supported)")
        return await run(http, body, prompt=prompt)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, http: HTTPRequest):
        return await run(http, body, messages=[m.model_dump() for m in body.messages])

    def admin(action):
        async def endpoint(body: AdapterBody, http: HTTPRequest):
            caller(http, admin=True)
            try:
                entry = await run_in_threadpool(action, body)
            except AdapterNotFound as e:
                raise ApiError(404, str(e), "not_found_error") from None
            except StoreFull as e:
                raise busy(e) from None
            except PeftkitError as e:
                raise ApiError(400, str(e)) from None
            return {"status": "ok", "lora_name": body.lora_name,
                    "slot": getattr(entry, "slot", None)}
        return endpoint

    app.post("/v1/load_lora_adapter")(admin(
        lambda b: server.store.load(b.lora_name, pin=b.pin, tier=b.tier)))
    app.post("/v1/unload_lora_adapter")(admin(lambda b: server.store.unload(b.lora_name)))
    app.post("/v1/reload_lora_adapter")(admin(lambda b: server.store.reload(b.lora_name)))
    return BodyLimit(app, int(cfg.max_body_mb * 2**20))
