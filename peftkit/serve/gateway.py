"""`peftkit gateway`: one OpenAI-compatible endpoint in front of several backends (`peftkit
serve` processes or vLLM servers, which share the API), routing by adapter.

Routing: a request goes to a backend that already holds its adapter (affinity: learned from
what was routed there and from each backend's /health), the least loaded of those, unless it has
`spill` more requests in flight than the least-loaded backend; otherwise to the least-loaded
backend, which is first told to load the adapter through vLLM's admin endpoint
(/v1/load_lora_adapter). Keys, tenants and adapter visibility are the gateway's own (the same
keys file as `serve`); backends see the gateway's `backend_key`.

Failures: every backend's /health is polled; one that fails (or drops a connection) leaves the
rotation until it answers again. A request whose backend fails before answering is retried on
another backend (the client has received nothing, so it gets one answer); a stream that had
started gets a clean error event and [DONE], never a second answer from elsewhere.
"""

import asyncio
import contextlib
import json
import time
from collections import Counter

import httpx
from fastapi import Depends, FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client import Counter as Total

from peftkit.errors import PeftkitError
from peftkit.serve.config import GatewayConfig
from peftkit.serve.api import (AdapterBody, ApiError, ChatBody, ClassifyBody, CompletionBody,
                               authenticate, install_errors, missing)
from peftkit.serve.limits import BodyLimit
from peftkit.serve.routing import Backend, Router
from peftkit.serve.tenancy import Tenancy


MAX_MODEL_ID = 256  # longer model names are refused before routing (nothing is remembered)
LOOPBACK = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class Gateway:
    def __init__(self, cfg: GatewayConfig):
        self.cfg = cfg
        if cfg.api_keys is None and not cfg.insecure_open:
            raise PeftkitError("gateway: no --api-keys, so anyone could use every adapter and the "
                               "admin endpoints; give --api-keys FILE, or --insecure-open to "
                               "serve without keys (bind to localhost)")
        self.router = Router(cfg.backends, cfg.spill, cfg.max_affinity)
        self.tenancy = Tenancy(cfg.api_keys)
        self.inflight: Counter = Counter()  # tenant -> requests in flight through the gateway
        self.headers = {"Authorization": f"Bearer {cfg.backend_key}"} if cfg.backend_key else {}
        self.client: httpx.AsyncClient | None = None
        # the base model ids (no adapter to route by): --base, or what the backends list with
        # no parent; a learned one never widens access (see `base_for`)
        self.bases: set[str] = set(cfg.base)
        self.learn_bases = not cfg.base
        r = self.registry = CollectorRegistry()
        self.requests = Total("peftkit_gateway_requests", "Requests by backend and status",
                                ["backend", "status"], registry=r)
        self.affinity = Total("peftkit_gateway_affinity", "Routed to a backend holding the "
                                "adapter (hit) or not (miss)", ["result"], registry=r)
        self.retries = Total("peftkit_gateway_retries", "Requests retried on another backend",
                               registry=r)
        self.up = Gauge("peftkit_gateway_backend_up", "Backend in rotation", ["backend"],
                        registry=r)

    # -- backends -----------------------------------------------------------------------------
    async def check(self, backend: Backend) -> None:
        """One health poll: up or down, and (peftkit serve, admin key) what it holds."""
        try:
            r = await self.client.get(f"{backend.url}/health", headers=self.headers, timeout=5)
            backend.up = r.status_code == 200 and time.monotonic() >= backend.down_until
            loaded = r.json().get("loaded") if backend.up and r.content else None
            if isinstance(loaded, list):  # what it holds now, and what is on its way there
                backend.adapters.replace([*loaded, *backend.routed])
            if backend.up and self.learn_bases and not self.bases:
                r = await self.client.get(f"{backend.url}/v1/models", headers=self.headers,
                                          timeout=5)
                self.bases = {m["id"] for m in r.json()["data"] if m.get("parent") is None}
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            self.router.down(backend)
        self.up.labels(backend.url).set(int(backend.up))

    async def watch(self) -> None:
        while True:
            await asyncio.gather(*(self.check(b) for b in self.router.backends))
            await asyncio.sleep(self.cfg.health_every_s)

    async def place(self, backend: Backend, model: str, body: dict | None = None) -> None:
        """Ask `backend` to load `model` (vLLM's admin endpoint; `body` the admin's own, pin and
        tier included); its 4xx answer is the caller's, 5xx fails the backend."""
        r = await self.client.post(f"{backend.url}/v1/load_lora_adapter", headers=self.headers,
                                   json=body or {"lora_name": model})
        if r.status_code == 404:
            raise ApiError(404, missing(model), "not_found_error")
        if r.status_code >= 500:
            raise httpx.RemoteProtocolError(f"load failed with {r.status_code}")
        if r.status_code >= 400:
            try:
                message = r.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = f"the backend refused the load ({r.status_code})"
            raise ApiError(r.status_code, message)

    def preflight(self, listen: tuple[str, int] | None = None) -> None:
        """What would fail every request, said before serving: the gateway listed as its own
        backend, or a backend that refuses the gateway's key. A backend not up yet is fine."""
        for backend in self.router.backends:
            url = httpx.URL(backend.url)
            if listen and url.port == listen[1] and url.host in LOOPBACK | {listen[0]}:
                raise PeftkitError(f"--backends: {backend.url} is this gateway itself")
            try:
                r = httpx.get(f"{backend.url}/v1/models", headers=self.headers, timeout=5)
            except httpx.HTTPError:
                continue
            if r.status_code in (401, 403):
                raise PeftkitError(f"--backends: {backend.url} refuses the gateway's key "
                                   f"({r.status_code}); give its key with --backend-key")

    def admit(self, who) -> None:
        limit = self.cfg.tenant_max_inflight
        if limit and who.tenant is not None and self.inflight[who.tenant] >= limit:
            raise ApiError(429, f"tenant '{who.tenant}' has {limit} requests in flight (the "
                                "limit); retry when one ends", "rate_limit_error",
                           {"Retry-After": "1"})
        self.inflight[who.tenant] += 1

    def leave(self, who) -> None:
        self.inflight[who.tenant] -= 1
        if self.inflight[who.tenant] <= 0:
            del self.inflight[who.tenant]

    # -- requests -----------------------------------------------------------------------------
    async def forward(self, path: str, model: str, body: dict, stream: bool, who=None):
        """`body` to a backend for `model` (an adapter id; "" for the base), counted in the
        caller's in-flight limit until its answer (or stream) ends."""
        if who is None:
            return await self._forward(path, model, body, stream, lambda: None)
        self.admit(who)
        ended = []

        def end():  # once, whichever way the request ends
            if not ended:
                ended.append(True)
                self.leave(who)
        try:
            response = await self._forward(path, model, body, stream, end)
        except BaseException:
            end()
            raise
        if not isinstance(response, StreamingResponse):
            end()
        return response

    async def _forward(self, path: str, model: str, body: dict, stream: bool, end):
        tried: set[str] = set()
        while True:
            backend, hit = self.router.pick(model, tried)
            if model:
                self.affinity.labels("hit" if hit else "miss").inc()
            backend.inflight += 1
            backend.routed[model] += 1
            if model:  # routed here: later requests for it follow while this one runs
                backend.adapters.add(model)
            try:
                if not hit:
                    await self.place(backend, model)
                if stream:
                    request = self.client.build_request("POST", backend.url + path, json=body,
                                                        headers=self.headers)
                    response = await self.client.send(request, stream=True)
                else:
                    response = await self.client.post(backend.url + path, json=body,
                                                      headers=self.headers)
            except httpx.TransportError:  # nothing reached the client: try another backend
                self.done(backend, model)
                self.drop(backend)
                tried.add(backend.url)
                self.retries.inc()
                continue
            except BaseException:
                self.done(backend, model)
                backend.adapters.discard(model)
                raise
            self.requests.labels(backend.url, str(response.status_code)).inc()
            if response.status_code == 404:  # it does not hold it after all
                backend.adapters.discard(model)
            if stream and response.status_code == 200:
                return StreamingResponse(self.relay(backend, model, response, end),
                                         media_type="text/event-stream")
            try:
                content = await response.aread()
            finally:
                self.done(backend, model)
                await response.aclose()
            return Response(content, status_code=response.status_code,
                            media_type=response.headers.get("content-type", "application/json"))

    def drop(self, backend: Backend) -> None:
        """Out of the rotation: a backend that failed a request (silent past a timeout, or a
        dropped connection) until `down_for_s` has passed and a health check finds it up."""
        self.router.down(backend)
        backend.down_until = time.monotonic() + self.cfg.down_for_s
        self.up.labels(backend.url).set(0)

    def done(self, backend: Backend, model: str) -> None:
        backend.inflight -= 1
        backend.routed[model] -= 1
        if backend.routed[model] <= 0:  # a name with nothing in flight is not kept
            del backend.routed[model]

    def base_for(self, who, model: str) -> bool:
        """Whether `model` is a base (served to any caller). Tenancy is the keys file's alone:
        a base the backends named is not one where the keys file scopes that name to a tenant,
        so a backend listing a tenant's adapter as a base cannot open it to the others."""
        if model not in self.bases:
            return False
        return not self.learn_bases or who.may_use(model) or not self.tenancy.claimed(model)

    async def relay(self, backend: Backend, model: str, response: httpx.Response, end):
        """A started stream, chunk by chunk; if its backend fails now, one error event ends it."""
        chunks = response.aiter_raw().__aiter__()
        try:
            while True:
                try:
                    chunk = await asyncio.wait_for(anext(chunks), self.cfg.chunk_timeout_s)
                except StopAsyncIteration:
                    break
                yield chunk
        except (httpx.HTTPError, asyncio.TimeoutError):
            self.drop(backend)
            error = {"message": "the backend serving this stream failed; the answer is "
                                "incomplete (not retried, to never answer twice)",
                     "type": "server_error", "code": 502}
            yield f"\n\ndata: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()
        finally:
            self.done(backend, model)
            end()
            await response.aclose()


def create_gateway_app(gw: Gateway):
    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # A backend that is silent past a timeout fails like one that dropped the connection:
        # out of the rotation, and the request retried elsewhere if nothing was sent yet.
        timeout = httpx.Timeout(gw.cfg.timeout_s, connect=gw.cfg.connect_timeout_s)
        gw.client = httpx.AsyncClient(timeout=timeout,
                                      limits=httpx.Limits(max_connections=1000))
        watcher = asyncio.create_task(gw.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await gw.client.aclose()

    app = FastAPI(title="peftkit gateway", version="0.1.0", lifespan=lifespan)
    install_errors(app)

    def visible(http: HTTPRequest, model: str):
        """(caller, the adapter to route by: "" for the base), if the caller may use it."""
        who = authenticate(gw.tenancy, http)
        if len(model) > MAX_MODEL_ID:  # refused before routing: no name that long is served
            raise ApiError(404, missing(model), "not_found_error")
        if gw.base_for(who, model):
            return who, ""
        if model and not who.may_use(model):
            # another tenant's adapter and a missing one look the same, as in `serve`
            raise ApiError(404, missing(model), "not_found_error")
        return who, model

    def keyed(http: HTTPRequest):
        """The caller's key before its body: 401 before any 400, as OpenAI answers."""
        authenticate(gw.tenancy, http)

    @app.post("/v1/completions", dependencies=[Depends(keyed)])
    async def completions(body: CompletionBody, http: HTTPRequest):
        who, model = visible(http, body.model)
        return await gw.forward("/v1/completions", model, await http.json(), body.stream, who)

    @app.post("/v1/chat/completions", dependencies=[Depends(keyed)])
    async def chat(body: ChatBody, http: HTTPRequest):
        who, model = visible(http, body.model)
        return await gw.forward("/v1/chat/completions", model, await http.json(), body.stream,
                                who)

    @app.post("/v1/classify", dependencies=[Depends(keyed)])
    @app.post("/classify", dependencies=[Depends(keyed)])
    async def classify(body: ClassifyBody, http: HTTPRequest):
        who, model = visible(http, body.model)
        return await gw.forward("/v1/classify", model, await http.json(), False, who)

    @app.get("/v1/models")
    async def models(http: HTTPRequest):
        who = authenticate(gw.tenancy, http)
        for backend in gw.router.backends:
            if backend.up:
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await gw.client.get(f"{backend.url}/v1/models", headers=gw.headers)
                    data = [m for m in r.json()["data"]
                            if gw.base_for(who, m["id"]) or who.may_use(m["id"])]
                    return {"object": "list", "data": data}
        raise ApiError(503, "no backend is available", "server_error")

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, http: HTTPRequest):
        """One model's card, as `serve` answers it: what the caller may not use is a 404."""
        who = authenticate(gw.tenancy, http)
        listed = await models(http)
        for card in listed["data"]:
            if card["id"] == model_id and (gw.base_for(who, model_id) or who.may_use(model_id)):
                return card
        raise ApiError(404, missing(model_id), "not_found_error")

    @app.get("/health")
    async def health(http: HTTPRequest):
        who = gw.tenancy.caller(http.headers.get("authorization"))
        up = sum(b.up for b in gw.router.backends)
        out = {"status": "ok" if up else "unavailable"}
        if who is not None and who.admin:
            out["backends"] = [{"url": b.url, "up": b.up, "inflight": b.inflight,
                                "adapters": sorted(b.adapters)} for b in gw.router.backends]
        return JSONResponse(out, status_code=200 if up else 503)

    @app.get("/metrics")
    async def metrics(http: HTTPRequest):
        authenticate(gw.tenancy, http, admin=True)
        return Response(generate_latest(gw.registry), media_type="text/plain; version=0.0.4")

    @app.post("/v1/load_lora_adapter")
    async def load(body: AdapterBody, http: HTTPRequest):
        authenticate(gw.tenancy, http, admin=True)
        backend, hit = gw.router.pick(body.lora_name, set())
        if not hit or body.pin or body.tier != "device":  # the admin's own options reach it
            await gw.place(backend, body.lora_name, body.model_dump())
            if body.tier == "device":
                backend.adapters.add(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name, "backend": backend.url}

    async def everywhere(path: str, body: AdapterBody, http: HTTPRequest):
        authenticate(gw.tenancy, http, admin=True)
        done = []
        for backend in gw.router.backends:
            if backend.up:
                with contextlib.suppress(httpx.HTTPError):
                    r = await gw.client.post(backend.url + path, headers=gw.headers,
                                             json=body.model_dump())
                    done.append({"backend": backend.url, "status": r.status_code})
                backend.adapters.discard(body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name, "backends": done}

    @app.post("/v1/unload_lora_adapter")
    async def unload(body: AdapterBody, http: HTTPRequest):
        return await everywhere("/v1/unload_lora_adapter", body, http)

    @app.post("/v1/reload_lora_adapter")
    async def reload(body: AdapterBody, http: HTTPRequest):
        return await everywhere("/v1/reload_lora_adapter", body, http)

    return BodyLimit(app, int(gw.cfg.max_body_mb * 2**20))
