"""Hardening, tenancy and secrets: a strict keys file, constant-time keys never logged, and
tenants that can neither use, list nor detect each other's adapters (real loopback server)."""

import asyncio
import json
import logging

import pytest

from peftkit.errors import PeftkitError
from peftkit.serve.server import ServeConfig, Server
from peftkit.serve.tenancy import Tenancy
from tests.serve_harness import ACME, ADMIN, BOLT, adapter_root, ask, client, running

@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory)


BAD_KEYS = {
    "string_keys": "tenants:\n  acme: {keys: sk-acme-1111, adapters: [a0*]}\n",
    "string_adapters": f"tenants:\n  acme: {{keys: [{ACME}], adapters: 'a0*'}}\n",
    "string_admin": "admin_keys: sk-admin-1111\n",
    "unknown_field": f"tenants:\n  acme: {{keys: [{ACME}], adaptors: [a0*]}}\n",
    "short_key": "tenants:\n  acme: {keys: [s], adapters: [a0*]}\n",
    "duplicate_key": f"admin_keys: [{ACME}]\ntenants:\n  acme: {{keys: [{ACME}], adapters: []}}\n",
    "not_a_mapping": "- a\n- b\n",
    "no_keys": "tenants: {}\n",
    "top_level_typo": f"tenant:\n  acme: {{keys: [{ACME}]}}\n",
}


@pytest.mark.parametrize("name", sorted(BAD_KEYS))
def test_a_malformed_keys_file_refuses_to_start(tmp_path, name):
    path = tmp_path / "keys.yaml"
    path.write_text(BAD_KEYS[name])
    with pytest.raises(PeftkitError) as err:
        Tenancy(str(path))
    assert str(path) in str(err.value) and ACME not in str(err.value)


def test_keys_file_readable_by_others_warns(tmp_path, caplog):
    path = tmp_path / "keys.yaml"
    path.write_text(f"admin_keys: [{ADMIN}]\n")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="peftkit.serve"):
        Tenancy(str(path))
    assert "readable by other users" in caplog.text and ADMIN not in caplog.text
    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level(logging.WARNING, logger="peftkit.serve"):
        Tenancy(str(path))
    assert caplog.text == ""


def test_tenants_cannot_reach_each_other(root, tmp_path, caplog):
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"admin_keys: [{ADMIN}]\ntenants:\n"
                    f"  acme: {{keys: [{ACME}], adapters: ['a0*']}}\n"
                    f"  bolt: {{keys: [{BOLT}], adapters: ['a1*']}}\n")
    keys.chmod(0o600)
    (root / "a19" / "adapter_model.safetensors").rename(root / "a19" / "moved")  # bolt's, broken
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=16,
                                api_keys=str(keys)))
    hostile = ["../outside/secret", "..%2Foutside%2Fsecret", "a00/../a10", "a00\x00", "a00\n",
               "ａ00", "a0０", "a\u200b00", "x" * 10_000, "%2e%2e", ".", "..", "/etc", "a00/"]

    async def go(url):
        async with client(url, ACME) as acme, client(url, ADMIN) as admin, \
                client(url) as anon, client(url, "s") as one_letter:
            r = {"own": await ask(acme, "a01", "completion"),
                 "other": await ask(acme, "a11", "completion"),
                 "other_broken": await ask(acme, "a19", "completion"),
                 "missing": await ask(acme, "a09x", "completion"),
                 "hostile": [await ask(acme, h, "completion") for h in hostile],
                 "hostile_admin": [(await admin.post("/v1/load_lora_adapter",
                                                     json={"lora_name": h})).status_code
                                   for h in hostile],
                 "models": [m["id"] for m in (await acme.get("/v1/models")).json()["data"]],
                 "admin_ops": [(await acme.post(f"/v1/{op}_lora_adapter",
                                                json={"lora_name": "a01"})).status_code
                               for op in ("load", "unload", "reload")],
                 "health_anon": (await anon.get("/health")).json(),
                 "health_tenant": (await acme.get("/health")).json(),
                 "health_admin": (await admin.get("/health")).json(),
                 "metrics_anon": (await anon.get("/metrics")).status_code,
                 "metrics_tenant": (await acme.get("/metrics")).status_code,
                 "metrics_admin": await admin.get("/metrics"),
                 "one_letter": (await one_letter.get("/v1/models")).status_code,
                 "wrong_key": await anon.get("/v1/models",
                                             headers={"Authorization": "Bearer sk-guess-1234"})}
            return r
    with caplog.at_level(logging.DEBUG), running(server) as url:
        r = asyncio.run(go(url))
    (root / "a19" / "moved").rename(root / "a19" / "adapter_model.safetensors")
    assert r["own"][0] == 200
    # another tenant's adapter, broken or not, is exactly a missing one: 404, same words
    assert r["other"][0] == r["other_broken"][0] == r["missing"][0] == 404
    assert {t.replace(m, "?") for (_, t, _), m in
            zip([r["other"], r["other_broken"], r["missing"]], ["a11", "a19", "a09x"])} == \
        {"The model `?` does not exist."}
    assert all(s == 404 for s, _, _ in r["hostile"]), r["hostile"]
    assert all(s == 404 for s in r["hostile_admin"]), r["hostile_admin"]
    assert set(r["models"]) == {"tiny-llama"} | {f"a{i:02d}" for i in range(10)}
    assert r["admin_ops"] == [403, 403, 403]
    assert r["health_anon"] == {"status": "ok"}
    assert "a01" not in json.dumps(r["health_tenant"]) and r["health_tenant"]["loaded"] >= 1
    assert "a01" in r["health_admin"]["loaded"]
    assert r["metrics_anon"] == 401 and r["metrics_tenant"] == 403
    assert r["metrics_admin"].status_code == 200 and "a01" in r["metrics_admin"].text
    assert r["one_letter"] == 401 and r["wrong_key"].status_code == 401
    everything = caplog.text + r["metrics_admin"].text + r["wrong_key"].text
    assert not any(k in everything for k in (ADMIN, ACME, BOLT, "sk-guess-1234"))
