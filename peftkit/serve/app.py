"""The OpenAI-compatible HTTP API over a `Server` (so the `openai` client works unchanged).

/v1/completions, /v1/chat/completions (SSE streaming), or with --task classify /v1/classify
(and vLLM's /classify); /v1/models, /health, /metrics, and the admin endpoints
/v1/load_lora_adapter, /v1/unload_lora_adapter, /v1/reload_lora_adapter (vLLM's names). The
contract (bodies, errors, keys) is api.py's; a request's path, completions.py's.
"""

from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from peftkit.errors import PeftkitError
from peftkit.serve.api import (AdapterBody, ApiError, ChatBody, ClassifyBody, CompletionBody,
                               api_error, authenticate, install_errors, missing)
from peftkit.serve.classify import Classify, served
from peftkit.serve.store import CLASSIFY
from peftkit.serve.completions import Completions
from peftkit.serve.fim import fill_in_middle
from peftkit.serve.limits import BodyLimit
from peftkit.serve.server import Server


def create_app(server: Server):
    """The FastAPI app wrapped in the body-size limit (an ASGI app either way)."""
    app = FastAPI(title="peftkit", version="0.1.0")
    install_errors(app)
    completions = Completions(server)
    classify = Classify(server, completions) if server.task == CLASSIFY else None

    def visible(http: HTTPRequest, model: str):
        """(caller, model): the model a caller may use; anything else is 404 before any file
        is looked at, so another tenant's adapter and a missing one look (and take) the same."""
        who = authenticate(server.tenancy, http)
        if model not in ("", server.name) and not who.may_use(model):
            raise ApiError(404, missing(model), "not_found_error")
        return who, model

    def keyed(http: HTTPRequest):
        """A caller's key is checked before its body (401 before any 400)."""
        authenticate(server.tenancy, http)

    def generating(model: str) -> str:
        """A completion or chat request's model, refused when this server classifies (a
        classifier run asked of a generating server is refused by its store's load)."""
        if classify is not None:
            raise ApiError(400, "this server classifies (started with --task classify): POST "
                                "/v1/classify; completions and chat are served without it")
        return model

    def card(model_id: str, parent: str | None) -> dict:
        return {"id": model_id, "object": "model", "created": 0, "owned_by": "peftkit",
                "parent": parent, "root": server.name, "task": server.task}

    def listed() -> list[str]:
        return served(server.store, server.task)

    @app.post("/v1/completions", dependencies=[Depends(keyed)])
    async def complete(body: CompletionBody, http: HTTPRequest):
        prompt, vocab = body.prompt, len(server.base.tokenizer)
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]  # one prompt: a string or a list of token ids
        if not prompt or any(isinstance(p, list) and not p for p in prompt):
            raise ApiError(400, "prompt: give a string, token ids, or a list of either (no "
                                "empty list)", param="prompt")
        prompts = [(p, None) if isinstance(p, str) else (None, p) for p in prompt]
        if body.suffix:  # fill-in-the-middle: a text prompt, wrapped in the model's markers
            if any(text is None for text, _ in prompts):
                raise ApiError(400, "suffix: needs text prompts (not token ids)", param="suffix")
            try:
                prompts = [(fill_in_middle(server.base.tokenizer, text, body.suffix), None)
                           for text, _ in prompts]
            except PeftkitError as e:
                raise ApiError(400, str(e), param="suffix") from None
        if any(ids is not None and not all(0 <= t < vocab for t in ids) for _, ids in prompts):
            raise ApiError(400, f"prompt: token ids must be in [0, {vocab})", param="prompt")
        who, model = visible(http, body.model)
        return await completions.handle(http, who, generating(model), body, prompts=prompts)

    @app.post("/v1/chat/completions", dependencies=[Depends(keyed)])
    async def chat(body: ChatBody, http: HTTPRequest):
        who, model = visible(http, body.model)
        return await completions.handle(http, who, generating(model), body,
                                        messages=[m.model_dump(exclude_none=True)
                                                  for m in body.messages])

    @app.post("/v1/classify", dependencies=[Depends(keyed)])
    @app.post("/classify", dependencies=[Depends(keyed)])
    async def classify_texts(body: ClassifyBody, http: HTTPRequest):
        """Texts through a classifier run (vLLM's pooling API shape)."""
        if classify is None:
            raise ApiError(400, "this server generates: serve classifier runs with `peftkit "
                                "serve --task classify` (POST /v1/classify there)")
        who, model = visible(http, body.model)
        if model in ("", server.name):
            raise ApiError(400, f"model: name a classifier run, not the base '{server.name}' "
                                "(a base has no labels)", param="model")
        return await classify.handle(who, model, body)

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, http: HTTPRequest):
        """One model's card (`client.models.retrieve`); what the caller cannot use is 404."""
        who = authenticate(server.tenancy, http)
        if model_id == server.name:
            return card(server.name, None)
        if model_id not in await run_in_threadpool(listed) or not who.may_use(model_id):
            raise ApiError(404, missing(model_id), "not_found_error")
        return card(model_id, server.name)

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        """The base and every run this server answers for, each with the task it serves."""
        who = authenticate(server.tenancy, http)
        data = [card(server.name, None)]
        data += [card(a, server.name) for a in await run_in_threadpool(listed) if who.may_use(a)]
        return {"object": "list", "data": data}

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
        authenticate(server.tenancy, http, admin=True)  # labels name adapters: admin only
        server.metrics.queue.set(server.engine.queue_depth())
        server.metrics.active.set(len(server.engine.active))
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4")

    def admin(action):
        async def endpoint(body: AdapterBody, http: HTTPRequest):
            authenticate(server.tenancy, http, admin=True)
            try:
                entry = await run_in_threadpool(action, body)
            except PeftkitError as e:
                raise api_error(e) from None
            return {"status": "ok", "lora_name": body.lora_name,
                    "slot": getattr(entry, "slot", None)}
        return endpoint

    def load(b: AdapterBody):
        if b.lora_path is not None:  # the name now serves that directory, loaded afresh
            server.store.name(b.lora_name, b.lora_path)
            if b.lora_name in server.store.stats()["loaded"]:
                return server.store.reload(b.lora_name)
        return server.store.load(b.lora_name, pin=b.pin, tier=b.tier)

    app.post("/v1/load_lora_adapter")(admin(load))
    app.post("/v1/unload_lora_adapter")(admin(lambda b: server.store.unload(b.lora_name)))
    app.post("/v1/reload_lora_adapter")(admin(lambda b: server.store.reload(b.lora_name)))
    return BodyLimit(app, int(server.cfg.max_body_mb * 2**20))
