"""vLLM's `/v1/load_lora_adapter` with a `lora_path` (issue 33.4): a name serving a directory
inside the adapters directory (anywhere else a 400), listed and answered as that directory's
adapter until it is unloaded (then a 404, as vLLM's)."""

import httpx
import pytest

from peftkit.serve.config import ServeConfig
from peftkit.serve.server import Server
from tests.serve_harness import adapter_root, running

ADMIN, ACME = "sk-admin-0001", "sk-acme-0001"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = adapter_root(tmp_path_factory)
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"admin_keys: [{ADMIN}]\n"
                    f"tenants:\n  acme: {{keys: [{ACME}], adapters: ['a*', 'mine*']}}\n")
    keys.chmod(0o600)
    return root, Server(ServeConfig(base="tiny-llama", adapters=str(root), max_rank=12,
                                    api_keys=str(keys)))


def test_lora_path_names_a_directory_inside_the_adapters_directory(served, tmp_path):
    root, server = served
    with running(server) as url:
        admin = {"Authorization": f"Bearer {ADMIN}"}
        acme = {"Authorization": f"Bearer {ACME}"}

        def load(**body):
            return httpx.post(f"{url}/v1/load_lora_adapter", headers=admin, json=body,
                              timeout=60)

        def answer(model):
            r = httpx.post(f"{url}/v1/completions", headers=acme, timeout=60, json={
                "model": model, "prompt": "say one:", "max_tokens": 6, "temperature": 0})
            return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 \
                else r.json()["error"]["message"]

        assert load(lora_name="mine", lora_path=str(root / "a03")).status_code == 200
        assert answer("mine") == answer("a03") and answer("mine")[1] != answer("a04")[1]
        listed = httpx.get(f"{url}/v1/models", headers=acme).json()["data"]
        assert "mine" in {m["id"] for m in listed}
        # the same name pointed elsewhere (a relative path) serves the new directory at once
        assert load(lora_name="mine", lora_path="a04").status_code == 200
        assert answer("mine") == answer("a04")
        outside = tmp_path / "elsewhere"
        outside.mkdir()
        for path in (str(outside), str(root / ".." / root.name / "a05" / ".."), "/etc"):
            r = load(lora_name="mine2", lora_path=path)
            assert r.status_code == 400 and "inside the server's --adapters" in r.text, path
        assert answer("mine2")[0] == 404
        assert httpx.post(f"{url}/v1/unload_lora_adapter", headers=admin,
                          json={"lora_name": "mine"}).status_code == 200
        assert answer("mine")[0] == 404  # gone with its unload, as vLLM's
        assert answer("a04")[0] == 200
