"""One completion or chat request through a `Server`: admission, tokenization and the
adapter's slot off the event loop, the engine, then OpenAI's response body or its SSE stream."""

import asyncio
import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from peftkit.engine import Request, Sampling
from peftkit.errors import PeftkitError
from peftkit.serve.api import ApiError, SamplingParams, api_error, busy
from peftkit.serve.server import Server
from peftkit.serve.store import StoreFull


class Completions:
    def __init__(self, server: Server):
        self.server = server
        self.waiting_for_slot = 0  # requests polling for an adapter slot (event-loop state)

    async def handle(self, http: HTTPRequest, who, model: str, body: SamplingParams,
                     prompt: str | None = None, messages: list[dict] | None = None,
                     ids: list[int] | None = None):
        """`who` may use `model` (checked by the caller); the response or the stream. The
        prompt is text, chat messages, or token ids already."""
        server = self.server
        try:
            server.admit(who.tenant)
        except PeftkitError as e:
            raise api_error(e) from None
        submitted = False
        try:
            if ids is None:
                ids = await run_in_threadpool(server.prompt_ids, prompt, messages)
            # chat with no limit: until a stop, EOS or the context (the engine's own bound)
            max_tokens = body.max_tokens or max(server.engine.max_len - len(ids), 1)
            server.engine.check(len(ids), max_tokens)
            bias = logit_bias(body.logit_bias, len(server.base.tokenizer))  # before a slot
            slot = await self.slot_for(model)
            stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
            sampling = Sampling(max_tokens, body.temperature, body.top_p, stop, body.seed, bias)
            sink = asyncio.Queue()
            req = server.submit(model, ids, sampling, asyncio.get_running_loop(), sink,
                                slot=slot, tenant=who.tenant, admitted=True,
                                stream=body.stream)
            submitted = True
        except PeftkitError as e:  # unknown or corrupt adapter, prompt over the context, ...
            raise api_error(e, model) from None
        finally:
            if not submitted:
                server.leave(who.tenant)
        chat = messages is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": model or server.name}
        echo = "" if chat or not getattr(body, "echo", False) else (
            prompt if prompt is not None else server.base.tokenizer.decode(ids))
        if body.stream:
            usage = bool((body.stream_options or {}).get("include_usage"))
            return StreamingResponse(self.stream(req, sink, meta, chat, usage, echo),
                                     media_type="text/event-stream")
        item = await self.finished(http, req, sink)
        if item.error:
            status = 503 if item.finish_reason == "timeout" else 500
            raise ApiError(status, item.error, "server_error")
        return answer(item, len(ids), meta, chat, echo)

    async def slot_for(self, model: str) -> int:
        """The adapter's slot, waiting (bounded in time and in waiters) while every slot is
        busy, as vLLM queues requests for a cold LoRA; loads run off the event loop."""
        cfg, loop = self.server.cfg, asyncio.get_running_loop()
        deadline, delay = loop.time() + cfg.slot_wait_s, 0.005
        while True:
            acquiring = asyncio.ensure_future(run_in_threadpool(self.server.slot_for, model))
            try:
                return await asyncio.shield(acquiring)
            except asyncio.CancelledError:  # the caller is gone; the thread still finishes
                acquiring.add_done_callback(self.release_unused)
                raise
            except StoreFull as e:
                if loop.time() + delay > deadline or self.waiting_for_slot >= cfg.max_queue:
                    raise busy(e) from None
            self.waiting_for_slot += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.waiting_for_slot -= 1
            delay = min(delay * 2, 0.05)

    def release_unused(self, acquiring: asyncio.Future) -> None:
        if not acquiring.cancelled() and acquiring.exception() is None and acquiring.result() >= 0:
            self.server.store.release(acquiring.result())

    @staticmethod
    async def finished(http: HTTPRequest, req: Request, sink: asyncio.Queue) -> Request:
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

    @staticmethod
    async def stream(req: Request, sink: asyncio.Queue, meta: dict, chat: bool,
                     include_usage: bool = False, echo: str = ""):
        """SSE chunks; with `stream_options.include_usage`, every chunk carries `usage: null`
        and one last chunk with no choices carries the counts (OpenAI's shape)."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}
        if echo:  # completions' `echo`: the prompt comes first
            choice = {"index": 0, "text": echo, "logprobs": None, "finish_reason": None}
            yield f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice], **extra})}\n\n"
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
                reason = item.finish_reason if done else None
                if chat:
                    delta = {"role": "assistant", "content": text} if first else {"content": text}
                    choice = {"index": 0, "delta": delta if (text or first) else {},
                              "finish_reason": reason}
                else:
                    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
                first = False
                chunk = {**meta, "object": obj, "choices": [choice], **extra}
                yield f"data: {json.dumps(chunk)}\n\n"
                if done:
                    if include_usage:
                        last = {**meta, "object": obj, "choices": [],
                                "usage": usage(item, len(item.prompt_ids))}
                        yield f"data: {json.dumps(last)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
        finally:  # the client left mid-stream (or we are done): the row leaves the batch
            req.cancel()


def answer(item: Request, prompt_tokens: int, meta: dict, chat: bool, echo: str = "") -> dict:
    """OpenAI's non-streamed body for a finished request (`echo`: the prompt, first)."""
    counts = usage(item, prompt_tokens)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": item.text},
                  "logprobs": None, "finish_reason": item.finish_reason}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": counts}
    choice = {"index": 0, "text": echo + item.text, "logprobs": None,
              "finish_reason": item.finish_reason}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": counts}


def logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    """OpenAI's `logit_bias` (token ids as JSON strings) as the engine's, each id checked."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise ApiError(400, f"logit_bias: '{key[:20]}' is not a token id in [0, {vocab})",
                           param="logit_bias")
        out[int(key)] = value
    return out


def usage(item: Request, prompt_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": len(item.out_ids),
            "total_tokens": prompt_tokens + len(item.out_ids)}
