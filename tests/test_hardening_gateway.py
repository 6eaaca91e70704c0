"""The gateway attacked (issue 29): a backend that lies about which models are bases, and a
stream of distinct model names, against a fake backend on loopback (no model needed)."""

import asyncio
import os
import time

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from peftkit.serve.gateway import Gateway, GatewayConfig, create_gateway_app
from tests.serve_harness import serving

ALICE, BOB, ADMIN = "sk-alice-0001", "sk-bob-00001", "sk-admin-0001"
KEYS = f"admin_keys: [{ADMIN}]\ntenants:\n  alice: {{keys: [{ALICE}], adapters: ['a*']}}\n" \
       f"  bob: {{keys: [{BOB}], adapters: ['b*']}}\n"
HELD = {"a-one", "b-secret"}


def lying_backend(seen: list):
    """Serves a base and two adapters, but lists bob's adapter as a base (`parent: null`)."""
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok", "loaded": sorted(HELD)}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "parent": None},
                                           {"id": "b-secret", "parent": None},
                                           {"id": "a-one", "parent": "tiny"}]}

    @app.post("/v1/load_lora_adapter")
    async def load(request: Request):
        body = await request.json()
        name = body["lora_name"]
        seen.append(name)
        seen.append(("load", body.get("tier"), body.get("pin")))
        if name == "a-broken":
            return JSONResponse({"error": {"message": "adapter 'a-broken' cannot be served: "
                                                      "corrupt"}}, status_code=400)
        return {"status": "ok"} if name in HELD else _not_found()

    @app.post("/v1/completions")
    async def complete(request: Request):
        body = await request.json()
        seen.append(body["model"])
        shaped = {k: body[k] for k in ("response_format", "guided_choice") if k in body}
        if shaped:
            seen.append(("structured", shaped))
        if body["model"] not in HELD | {"tiny"}:
            return _not_found()
        return {"choices": [{"index": 0, "text": f"answer of {body['model']}"}]}
    return app


def _not_found():
    return JSONResponse({"error": {"message": "not found"}}, status_code=404)


@pytest.fixture(params=[None, ["tiny"]], ids=["learned-bases", "--base"])
def gateway(request, tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    seen = []
    with serving(lying_backend(seen)) as backend:
        gw = Gateway(GatewayConfig(backends=[backend], api_keys=str(keys), health_every_s=0.2,
                                   base=request.param or (), max_affinity=50))
        with serving(create_gateway_app(gw)) as url:
            deadline = time.time() + 10
            while not gw.bases and time.time() < deadline:
                time.sleep(0.05)
            yield gw, url, seen


def _ask(url, key, model):
    return httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {key}"},
                      json={"model": model, "prompt": "hi", "max_tokens": 2}, timeout=30)


def test_a_backend_cannot_widen_access(gateway):
    """A backend listed bob's adapter with parent null; alice once got bob's answer."""
    gw, url, seen = gateway
    stolen = _ask(url, ALICE, "b-secret")
    assert stolen.status_code == 404 and "b-secret" not in seen
    assert _ask(url, BOB, "b-secret").json()["choices"][0]["text"] == "answer of b-secret"
    assert _ask(url, ALICE, "tiny").json()["choices"][0]["text"] == "answer of tiny"
    listed = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {ALICE}"}).json()
    assert {m["id"] for m in listed["data"]} == {"tiny", "a-one"}


def test_distinct_model_names_leave_nothing_behind(gateway):
    """400 requests for distinct names under alice's wildcard (all 404) once grew the gateway's
    memory by 200 MB: nothing is kept for a name with nothing in flight, what a backend holds is
    bounded, and names past the length limit never reach a backend."""
    gw, url, seen = gateway

    async def flood():
        async with httpx.AsyncClient(base_url=url, timeout=60,
                                     headers={"Authorization": f"Bearer {ALICE}"}) as c:
            for start in range(0, 400, 50):
                rs = await asyncio.gather(*(c.post("/v1/completions", json={
                    "model": f"a-{i:04d}", "prompt": "hi", "max_tokens": 2})
                    for i in range(start, start + 50)))
                assert {r.status_code for r in rs} == {404}
    asyncio.run(flood())
    backend = gw.router.backends[0]
    assert not backend.routed and backend.inflight == 0
    assert len(backend.adapters) <= 50
    before = len(seen)
    huge = _ask(url, ALICE, "a" * 500_000)
    assert huge.status_code == 404 and len(seen) == before  # refused before routing


def test_a_gateway_without_keys_refuses_to_start_unless_told(tmp_path):
    """With --backend-key and no --api-keys anyone was admin (anonymous unload: 200)."""
    from peftkit.errors import PeftkitError
    with pytest.raises(PeftkitError, match="--insecure-open"):
        Gateway(GatewayConfig(backends=["http://127.0.0.1:9"], backend_key="sk-backend-01"))
    Gateway(GatewayConfig(backends=["http://127.0.0.1:9"], insecure_open=True))


def test_preflight_refuses_itself_and_a_backend_that_refuses_its_key(tmp_path):
    from peftkit.errors import PeftkitError
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    with pytest.raises(PeftkitError, match="is this gateway itself"):
        Gateway(GatewayConfig(backends=["http://localhost:8080"], api_keys=str(keys))
                ).preflight(listen=("127.0.0.1", 8080))
    locked = FastAPI()

    @locked.get("/v1/models")
    async def models():
        return JSONResponse({"error": {"message": "invalid key"}}, status_code=401)
    with serving(locked) as backend:
        with pytest.raises(PeftkitError, match="refuses the gateway's key .401.; give its key "
                                               "with --backend-key"):
            Gateway(GatewayConfig(backends=[backend], api_keys=str(keys))).preflight()
    Gateway(GatewayConfig(backends=["http://127.0.0.1:9"], api_keys=str(keys))).preflight()


def test_tenant_in_flight_limit_at_the_gateway(gateway):
    gw, url, _ = gateway
    gw.cfg.tenant_max_inflight = 1
    gw.inflight["alice"] = 1  # one request of hers already running
    busy = _ask(url, ALICE, "a-one")
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert _ask(url, BOB, "b-secret").status_code == 200  # another tenant is not held up
    gw.inflight.clear()
    assert _ask(url, ALICE, "a-one").status_code == 200 and not gw.inflight


def test_errors_have_openai_shape_on_every_route(gateway):
    gw, url, _ = gateway
    auth = {"Authorization": f"Bearer {ALICE}"}
    for r in (httpx.get(f"{url}/v1/nothing", headers=auth),
              httpx.get(f"{url}/v1/completions", headers=auth),
              httpx.post(f"{url}/v1/completions", headers={**auth, "content-type":
                         "application/json"}, content=b"{not json"),
              httpx.post(f"{url}/v1/completions", headers={**auth, "content-type":
                         "application/json"}, content=b"[" * 100_000 + b"]" * 100_000)):
        body = r.json()
        assert r.status_code in (400, 404, 405) and set(body) == {"error"}, (r.status_code, body)
        assert {"message", "type", "param", "code"} <= set(body["error"])


def test_admin_load_passes_the_backends_answer_and_options(gateway):
    """The gateway once said 200 when its backend said 400, and dropped "tier"."""
    gw, url, seen = gateway
    admin = {"Authorization": f"Bearer {ADMIN}"}
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, json={"lora_name": "a-broken"})
    assert r.status_code == 400 and "corrupt" in r.json()["error"]["message"]
    r = httpx.post(f"{url}/v1/load_lora_adapter", headers=admin,
                   json={"lora_name": "a-one", "tier": "host", "pin": False})
    assert r.status_code == 200 and ("load", "host", False) in seen
    alice = httpx.post(f"{url}/v1/load_lora_adapter", headers={"Authorization": f"Bearer {ALICE}"},
                       json={"lora_name": "a-one"})
    assert alice.status_code == 403  # admin endpoints are never forwarded for tenants


def _silent_backend(stream_then_hang: bool = False):
    """Passes /health, then never answers a request (or stops mid-stream)."""
    from fastapi.responses import StreamingResponse
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "tiny", "parent": None}]}

    @app.post("/v1/completions")
    async def complete(request: Request):
        if not stream_then_hang:
            await asyncio.sleep(3600)

        async def chunks():
            yield b'data: {"choices": [{"index": 0, "text": "par"}]}\n\n'
            await asyncio.sleep(3600)
        return StreamingResponse(chunks(), media_type="text/event-stream")
    return app


def test_a_silent_backend_is_timed_out_and_the_request_retried(tmp_path):
    """A backend that passed /health but never answered held clients 40 s and more."""
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    seen = []
    with serving(_silent_backend()) as silent, serving(lying_backend(seen)) as honest:
        gw = Gateway(GatewayConfig(backends=[silent, honest], api_keys=str(keys),
                                   base=("tiny",), timeout_s=1.0, health_every_s=0.1))
        with serving(create_gateway_app(gw)) as url:
            start = time.perf_counter()
            answers = [_ask(url, ALICE, "tiny") for _ in range(3)]
            seconds = time.perf_counter() - start
    assert [r.json()["choices"][0]["text"] for r in answers] == ["answer of tiny"] * 3
    assert seconds < 5  # one timeout, then the silent backend stays out despite its /health
    assert not gw.router.backends[0].up


def test_a_stream_that_goes_silent_ends_with_one_error_event(tmp_path):
    keys = tmp_path / "keys.yaml"
    keys.write_text(KEYS)
    os.chmod(keys, 0o600)
    with serving(_silent_backend(stream_then_hang=True)) as silent:
        gw = Gateway(GatewayConfig(backends=[silent], api_keys=str(keys), base=("tiny",),
                                   chunk_timeout_s=1.0))
        with serving(create_gateway_app(gw)) as url:
            start = time.perf_counter()
            with httpx.stream("POST", f"{url}/v1/completions", timeout=30,
                              headers={"Authorization": f"Bearer {ALICE}"},
                              json={"model": "tiny", "prompt": "hi", "stream": True}) as r:
                events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
            seconds = time.perf_counter() - start
    assert events[-1] == "[DONE]" and "error" in events[-2] and "par" in events[0]
    assert seconds < 5 and not gw.inflight


def test_gateway_answers_a_model_card_as_serve_does(gateway):
    gw, url, _ = gateway
    auth = {"Authorization": f"Bearer {ALICE}"}
    assert httpx.get(f"{url}/v1/models/a-one", headers=auth).json()["id"] == "a-one"
    assert httpx.get(f"{url}/v1/models/tiny", headers=auth).json()["id"] == "tiny"
    hidden = httpx.get(f"{url}/v1/models/b-secret", headers=auth)
    assert hidden.status_code == 404 and hidden.json()["error"]["code"] == "model_not_found"


def test_structured_outputs_pass_through_and_bad_ones_stop_at_the_gateway(gateway):
    """response_format and guided_* reach the backend as sent; a schema no grammar can be
    made of is the gateway's own 400 naming the field, and no backend sees it."""
    gw, url, seen = gateway
    fmt = {"type": "json_schema", "json_schema": {"name": "o", "schema": {"type": "object"}}}
    for extra in ({"response_format": fmt}, {"guided_choice": ["yes", "no"]}):
        r = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                       json={"model": "a-one", "prompt": "hi", "max_tokens": 2, **extra},
                       timeout=30)
        assert r.status_code == 200 and ("structured", extra) in seen
    before = len(seen)
    r = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {ALICE}"},
                   json={"model": "a-one", "prompt": "hi", "guided_regex": "(unclosed"},
                   timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_regex"
    assert len(seen) == before
