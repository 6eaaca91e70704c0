"""One completion or chat request through a `Server`: admission, tokenization and the
adapter's slot off the event loop, the engine, then OpenAI's response body or its SSE stream."""

import asyncio
import dataclasses
import json
import time
import uuid

from fastapi import Request as HTTPRequest
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from peftkit.engine import Request, Sampling
from peftkit.errors import PeftkitError
from peftkit.serve.api import ApiError, SamplingParams, api_error, busy
from peftkit.serve.logprobs import chat_logprobs, completion_logprobs
from peftkit.serve.server import Server
from peftkit.serve.store import StoreFull
from peftkit.serve.tickets import Ticket
from peftkit.serve.tools import ToolPlan, plan_tools, tool_calls


class Completions:
    def __init__(self, server: Server):
        self.server = server
        self.waiting_for_slot = 0  # requests polling for an adapter slot (event-loop state)

    async def handle(self, http: HTTPRequest, who, model: str, body: SamplingParams,
                     prompts: list[tuple[str | None, list[int] | None]] | None = None,
                     messages: list[dict] | None = None):
        """`who` may use `model` (checked by the caller); the response or the stream. Each
        prompt is (text, None) or (None, token ids); chat has `messages` instead. `n` choices
        per prompt, each its own row of the shared batch (choice index = prompt x n + j)."""
        server = self.server
        plan, grammar = self.tools(body) if messages is not None else (None, body.grammar)
        offered = [t.model_dump(exclude_none=True) for t in body.tools or []] \
            if messages is not None else None
        sources = prompts or [(None, None)]
        per = max(body.n, getattr(body, "best_of", None) or 1)  # rows per prompt
        rows = per * len(sources)
        if rows > server.cfg.max_batch:
            what = "best_of" if per > body.n else "n"
            raise ApiError(400, f"{what}: {per} choices x {len(sources)} prompts = {rows} rows, "
                                f"over this server's --max-batch {server.cfg.max_batch}",
                           param=what)
        scored = body.alternatives if per == body.n else (body.alternatives or 0)
        try:  # every row counts toward the tenant's in-flight limit
            tickets = server.admit(model, who.tenant, rows)
        except PeftkitError as e:
            raise api_error(e) from None
        reqs, sink, loop = [], asyncio.Queue(), asyncio.get_running_loop()
        try:
            prepared = []
            for text, ids in sources:  # every prompt checked before any row is submitted
                if ids is None:
                    ids = await run_in_threadpool(server.prompt_ids, text, messages, offered)
                # chat with no limit: until a stop, EOS or the context (the engine's own bound)
                max_tokens = body.max_tokens or max(server.engine.max_len - len(ids), 1)
                server.engine.check(len(ids), max_tokens)
                prepared.append((ids, max_tokens))
            bias = logit_bias(body.logit_bias, len(server.base.tokenizer))  # before a slot
            stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
            echoed = []  # per prompt, its own log-probabilities (echo with logprobs)
            for ids, max_tokens in prepared:
                if getattr(body, "echo", False) and body.alternatives is not None:
                    ticket = tickets[len(reqs)]
                    await self.take_slot(ticket)
                    echoed.append(await run_in_threadpool(
                        server.engine.prompt_logprobs, ids, ticket.slot, body.alternatives))
                for j in range(per):  # choice j of a seeded request: seed + j, so n differ
                    seed = None if body.seed is None else (body.seed + j) % 2 ** 64
                    sampling = Sampling(max_tokens, body.temperature, body.top_p, stop, seed,
                                        bias, grammar, scored,
                                        body.frequency_penalty, body.presence_penalty)
                    ticket = tickets[len(reqs)]
                    await self.take_slot(ticket)
                    reqs.append(server.submit(model, ids, sampling, loop, sink, ticket,
                                              stream=body.stream and plan is None,
                                              tag=len(reqs)))
        except PeftkitError as e:  # unknown or corrupt adapter, prompt over the context, ...
            for req in reqs:
                req.cancel()  # each closes its ticket as it ends
            raise api_error(e, model) from None
        finally:  # rows never submitted (an error, or the client gone): their tickets close
            for ticket in tickets[len(reqs):]:
                ticket.close()
        chat = messages is not None
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        meta = {"id": rid, "created": int(time.time()), "model": model or server.name}
        echoes = [""] * len(reqs)
        if not chat and getattr(body, "echo", False):
            echoes = [text if text is not None else server.base.tokenizer.decode(ids)
                      for text, ids in sources for _ in range(per)]
        if body.stream:
            counted = bool((body.stream_options or {}).get("include_usage"))
            leads = [echoed[k // per] for k in range(len(reqs))] if echoed else None
            return StreamingResponse(self.stream(reqs, sink, meta, chat, counted, echoes,
                                                 body.n, server.base.tokenizer, plan, leads),
                                     media_type="text/event-stream")
        items = await self.finished(http, reqs, sink)
        failed = next((item for item in items if item.error), None)
        if failed is not None:
            status = 503 if failed.finish_reason == "timeout" else 500
            raise ApiError(status, failed.error, "server_error")
        # each prompt's n likeliest of its best_of, ranked on the answers' own tokens
        best = list(range(len(items))) if per == body.n else best_of(items, per, body.n)
        if echoed:  # the prompt's tokens first, the first without a log-probability
            items = [with_prompt(item, echoed[k // per]) for k, item in enumerate(items)]
        if per == body.n:
            return answer(items, meta, chat, echoes, body.n, server.base.tokenizer, plan)
        out = answer([items[k] for k in best], meta, chat, [echoes[k] for k in best], body.n,
                     server.base.tokenizer)
        for choice in out["choices"]:
            if body.alternatives is None:  # scored for the ranking, not asked for
                choice["logprobs"] = None
        return {**out, "usage": usage(items, per)}  # every candidate's tokens, as OpenAI

    def tools(self, body) -> tuple[ToolPlan | None, object]:
        """A chat request's tool plan and the grammar its rows decode under (the tools', or
        its structured output's: one per request); a 400 naming the field otherwise."""
        template = getattr(self.server.base.tokenizer, "chat_template", None)
        try:
            plan, grammar = plan_tools(body.tools or [], body.tool_choice, template,
                                       body.parallel_tool_calls is not False)
        except ValueError as e:
            param, reason = e.args
            raise ApiError(400, f"{param}: {reason}", param=param) from None
        except PeftkitError as e:  # a tool's parameters no grammar can be made of
            raise ApiError(400, str(e), param="tools") from None
        if grammar is not None and body.grammar is not None:
            raise ApiError(400, "tools: one structured output per request (tool_choice "
                                "'required' or a named function, and a response_format)",
                           param="tools")
        return plan, grammar if grammar is not None else body.grammar

    async def take_slot(self, ticket: Ticket) -> None:
        """The ticket's adapter slot, waiting (bounded in time and in waiters) while every
        slot is busy, as vLLM queues requests for a cold LoRA; loads run off the event loop
        (a client gone meanwhile closes the ticket, which then lets the slot go itself)."""
        cfg, loop = self.server.cfg, asyncio.get_running_loop()
        deadline, delay = loop.time() + cfg.slot_wait_s, 0.005
        while True:
            taking = asyncio.ensure_future(run_in_threadpool(ticket.take_slot))
            taking.add_done_callback(lambda f: f.cancelled() or f.exception())  # seen, if left
            try:
                await asyncio.shield(taking)
                return
            except StoreFull as e:
                if loop.time() + delay > deadline or self.waiting_for_slot >= cfg.max_queue:
                    raise busy(e) from None
            self.waiting_for_slot += 1
            try:
                await asyncio.sleep(delay)
            finally:
                self.waiting_for_slot -= 1
            delay = min(delay * 2, 0.05)

    @staticmethod
    async def finished(http: HTTPRequest, reqs: list[Request],
                       sink: asyncio.Queue) -> list[Request]:
        """Wait for the engine to finish every row; a client that hangs up cancels them."""
        done: dict[int, Request] = {}
        get = asyncio.ensure_future(sink.get())
        try:
            while len(done) < len(reqs):
                ready, _ = await asyncio.wait({get}, timeout=0.5)
                if ready:
                    tag, item = get.result()  # non-streamed rows send only their final item
                    done[tag] = item
                    get = asyncio.ensure_future(sink.get())
                elif await http.is_disconnected():
                    for req in reqs:
                        req.cancel()
            return [done[k] for k in range(len(reqs))]
        finally:
            get.cancel()

    @staticmethod
    async def stream(reqs: list[Request], sink: asyncio.Queue, meta: dict, chat: bool,
                     include_usage: bool, echoes: list[str], n: int, tok=None,
                     plan: ToolPlan | None = None, leads: list | None = None):
        """SSE chunks, each naming its choice's index (and, asked for, the log-probabilities
        of the tokens chosen since its last chunk); with `stream_options.include_usage`,
        every chunk carries `usage: null` and one last chunk with no choices carries the
        counts (OpenAI's shape). A chat with tools (`plan`) sends each answer whole, in its
        last chunk: its tool calls (indexed, with ids) or its text. `leads`: each row's
        prompt log-probabilities, sent with its echoed prompt."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(choice: dict) -> str:
            return f"data: {json.dumps({**meta, 'object': obj, 'choices': [choice], **extra})}\n\n"

        started, finished = set(), {}
        told, at = [0] * len(reqs), [0] * len(reqs)  # per row: log-probs sent, their chars
        for index, echo in enumerate(echoes):  # completions' `echo`: the prompt comes first
            if echo:
                lead = completion_logprobs(reqs[index], tok, leads[index]) if leads else None
                at[index] = sum(map(len, lead["tokens"])) if lead else 0
                yield chunk({"index": index, "text": echo, "logprobs": lead,
                             "finish_reason": None})

        def logprobs(index: int):
            req = reqs[index]
            entries = req.logprobs[told[index]:]  # the engine only appends
            told[index] += len(entries)
            if chat:
                return chat_logprobs(req, tok, entries)
            out = completion_logprobs(req, tok, entries, at[index])
            at[index] += sum(map(len, out["tokens"])) if out else 0
            return out

        try:
            while len(finished) < len(reqs):
                index, item = await sink.get()
                done = isinstance(item, Request)
                if done and item.error:
                    error = {"message": item.error, "type": "server_error", "code": 500}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                text = "" if done else item
                reason = item.finish_reason if done else None
                if chat and plan is not None:  # rows submitted unstreamed: only done ones
                    message, reason = reply(item, plan)
                    delta = {"role": "assistant", "content": message["content"]}
                    if "tool_calls" in message:
                        delta["tool_calls"] = [{"index": k, **call} for k, call in
                                               enumerate(message["tool_calls"])]
                    choice = {"index": index, "delta": delta, "logprobs": logprobs(index),
                              "finish_reason": reason}
                elif chat:
                    first = index not in started
                    delta = {"role": "assistant", "content": text} if first else {"content": text}
                    choice = {"index": index, "delta": delta if (text or first) else {},
                              "logprobs": logprobs(index), "finish_reason": reason}
                else:
                    choice = {"index": index, "text": text, "logprobs": logprobs(index),
                              "finish_reason": reason}
                started.add(index)
                yield chunk(choice)
                if done:
                    finished[index] = item
            if include_usage:
                last = {**meta, "object": obj, "choices": [],
                        "usage": usage([finished[k] for k in range(len(reqs))], n)}
                yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"
        finally:  # the client left mid-stream (or we are done): the rows leave the batch
            for req in reqs:
                req.cancel()


def answer(items: list[Request], meta: dict, chat: bool, echoes: list[str], n: int,
           tok, plan: ToolPlan | None = None) -> dict:
    """OpenAI's non-streamed body for finished rows (`echoes`: each choice's prompt, first;
    `plan`: answers read as tool calls)."""
    counts = usage(items, n)
    if chat:
        choices = []
        for i, item in enumerate(items):
            message, reason = reply(item, plan)
            choices.append({"index": i, "message": message, "logprobs": chat_logprobs(item, tok),
                            "finish_reason": reason})
        return {**meta, "object": "chat.completion", "choices": choices, "usage": counts}
    choices = [{"index": i, "text": echo + item.text,
                "logprobs": completion_logprobs(item, tok), "finish_reason": item.finish_reason}
               for i, (item, echo) in enumerate(zip(items, echoes))]
    return {**meta, "object": "text_completion", "choices": choices, "usage": counts}


def with_prompt(item: Request, prompt: list[tuple]) -> Request:
    """A finished row whose logprobs start with its prompt's (for echo's body only)."""
    return dataclasses.replace(item, logprobs=prompt + item.logprobs)


def best_of(items: list[Request], per: int, n: int) -> list[int]:
    """For each prompt's `per` candidates (consecutive), the indices of the `n` with the
    highest log-probability per token (OpenAI's `best_of`), best first."""
    def score(k: int) -> float:
        values = [lp for _, lp, _ in items[k].logprobs]
        return sum(values) / len(values) if values else float("-inf")
    return [k for start in range(0, len(items), per)
            for k in sorted(range(start, start + per), key=score, reverse=True)[:n]]


def reply(item: Request, plan: ToolPlan | None) -> tuple[dict, str]:
    """A finished chat row as OpenAI's assistant message and finish_reason: its tool calls
    (finish_reason "tool_calls") when the plan finds complete ones, else its text."""
    found = tool_calls(plan, item.text) if plan is not None and item.finish_reason == "stop" \
        else None
    if found is None:
        return {"role": "assistant", "content": item.text}, item.finish_reason
    calls, content = found
    return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"


def logit_bias(bias: dict[str, float] | None, vocab: int) -> dict[int, float]:
    """OpenAI's `logit_bias` (token ids as JSON strings) as the engine's, each id checked."""
    out = {}
    for key, value in (bias or {}).items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise ApiError(400, f"logit_bias: '{key[:20]}' is not a token id in [0, {vocab})",
                           param="logit_bias")
        out[int(key)] = value
    return out


def usage(items: list[Request], n: int) -> dict:
    """Token counts as OpenAI's: each prompt counted once (its n choices share it), every
    choice's completion tokens."""
    prompt = sum(len(item.prompt_ids) for item in items[::n])
    completion = sum(len(item.out_ids) for item in items)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
