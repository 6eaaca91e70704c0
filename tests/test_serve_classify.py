"""`peftkit serve --task classify` (issue 26.3): `train --task classify` runs (LoRA adapter +
head, or a probe's head) served from one backbone, rows of different tenants' classifiers in one
batch each equal to its run alone; vLLM's /classify shape; tenancy, limits and the refusals
between the two kinds of server."""

import json
import threading
import time

import pytest
import torch
from fastapi.testclient import TestClient

from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.serve.app import create_app
from peftkit.serve.config import ServeConfig
from peftkit.serve.server import Server
from peftkit.train import TrainConfig, train
from peftkit.train.run_dir import load_run
from tests.helpers import tiny_llama

ACME, BOLT, ADMIN = "sk-acme-0001", "sk-bolt-0001", "sk-admin-0001"
TEXTS = {"acme": ["the parcel came early", "box was crushed", "fine"],
         "bolt": ["invoice overdue", "thanks a lot"], "probe": ["hello", "refund please"]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Three classifier runs on tiny-bert (two LoRA with 2 and 3 labels, one probe) and one
    causal-LM adapter, in one adapters directory."""
    root = tmp_path_factory.mktemp("classifiers")
    data = tmp_path_factory.mktemp("data")
    for name, method, labels, seed in (("acme", "lora", ["neg", "pos"], 0),
                                       ("bolt", "lora", ["billing", "praise", "other"], 1),
                                       ("probe", "probe", ["a", "b"], 2)):
        rows = [{"text": f"{name} text number {i} " + "x" * (i % 5), "label": labels[i % len(labels)]}
                for i in range(24)]
        path = data / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        train(TrainConfig(model="tiny-bert", data=str(path), method=method, task="classify",
                          output=str(root / name), steps=4, batch_size=8, val_split=0.0,
                          seed=seed, lr=5e-2))
    save_adapter(add_adapter(tiny_llama().model, LoraConfig(r=4)), root / "chatty")
    keys = tmp_path_factory.mktemp("keys") / "keys.yaml"
    keys.write_text(f"admin_keys: [{ADMIN}]\ntenants:\n"
                    f"  acme: {{keys: [{ACME}], adapters: [acme, probe, chatty]}}\n"
                    f"  bolt: {{keys: [{BOLT}], adapters: [bolt]}}\n")
    keys.chmod(0o600)
    return root, keys


def server(root, **kw) -> Server:
    adapters, keys = root
    return Server(ServeConfig(base="tiny-bert", adapters=str(adapters), task="classify",
                              api_keys=str(keys), **kw))


def alone(root, name: str, texts: list[str]) -> list[list[float]]:
    """The run's own probabilities, loaded by itself (no server, no other rows)."""
    loaded = load_run("tiny-bert", root[0] / name)
    out = []
    for text in texts:
        ids = loaded.base.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            logits = loaded.module(ids.input_ids, ids.attention_mask)
        out.append(torch.softmax(logits, -1)[0].tolist())
    return out


def post(c, key, model, texts):
    return c.post("/v1/classify", json={"model": model, "input": texts},
                  headers={"Authorization": f"Bearer {key}"})


def test_two_tenants_classifiers_share_one_batch_each_as_alone(root):
    srv = server(root)  # the engine's thread not started: the test runs the one batch itself
    got = {}
    with TestClient(create_app(srv)) as c:
        calls = [threading.Thread(target=lambda k=k, m=m: got.update({m: post(c, k, m, TEXTS[m])}))
                 for k, m in ((ACME, "acme"), (BOLT, "bolt"), (ACME, "probe"))]
        for t in calls:
            t.start()
        deadline = time.time() + 60
        while srv.engine.queue_depth() < 7 and time.time() < deadline:
            time.sleep(0.01)
        srv.engine.run_until_idle()
        for t in calls:
            t.join(timeout=60)
    assert len(srv.engine.batches) == 1 and len(srv.engine.batches[0]) == 7
    assert len(set(srv.engine.batches[0])) == 3  # acme's slot, bolt's, the bare base (probe)
    for name in ("acme", "bolt", "probe"):
        r = got[name]
        assert r.status_code == 200, r.text
        body = r.json()
        want = alone(root, name, TEXTS[name])
        labels = json.loads((root[0] / name / "head.json").read_text())["labels"]
        assert body["object"] == "list" and body["model"] == name
        for item, w in zip(body["data"], want):
            assert item["num_classes"] == len(labels) == len(w)
            assert max(abs(a - b) for a, b in zip(item["probs"], w)) < 1e-5
            assert item["label"] == labels[max(range(len(w)), key=w.__getitem__)]
        assert body["usage"]["prompt_tokens"] > 0 and body["usage"]["completion_tokens"] == 0


def test_classify_limits_tenancy_and_the_other_kind_of_server(root):
    srv = server(root, max_queue=4).start()
    try:
        with TestClient(create_app(srv)) as c:
            assert post(c, ACME, "acme", ["a"] * 4).status_code == 200  # at the edge
            r = post(c, ACME, "acme", ["a"] * 5)  # just past it
            assert r.status_code == 400 and "5 texts, over this server's --max-queue 4" in r.text
            assert post(c, ACME, "bolt", ["a"]).status_code == 404  # another tenant's
            assert post(c, BOLT, "nope", ["a"]).status_code == 404
            r = post(c, ACME, "chatty", ["a"])  # a causal-LM adapter
            assert r.status_code == 400 and "'chatty' is not a classifier" in r.text
            r = post(c, ACME, "acme", ["ok", "y" * 600])
            assert r.status_code == 400 and "input[1]: " in r.text and "at most 512" in r.text
            assert post(c, ACME, "acme", []).status_code == 400
            r = c.post("/v1/completions", json={"model": "acme", "prompt": "hi"},
                       headers={"Authorization": f"Bearer {ACME}"})
            assert r.status_code == 400 and "POST /v1/classify" in r.text
            cards = c.get("/v1/models", headers={"Authorization": f"Bearer {ACME}"}).json()
            assert [(m["id"], m["task"]) for m in cards["data"]] == [
                ("tiny-bert", "classify"), ("acme", "classify"), ("probe", "classify")]
            metrics = c.get("/metrics", headers={"Authorization": f"Bearer {ADMIN}"}).text
            assert 'peftkit_classified_texts_total{model="acme"} 4.0' in metrics
    finally:
        srv.stop()


def test_a_generating_server_refuses_classifiers_by_name(root):
    adapters, keys = root
    srv = Server(ServeConfig(base="tiny-llama", adapters=str(adapters), api_keys=str(keys)))
    with TestClient(create_app(srv)) as c:
        r = c.post("/v1/completions", json={"model": "acme", "prompt": "hi", "max_tokens": 2},
                   headers={"Authorization": f"Bearer {ACME}"})
        assert r.status_code == 400 and "'acme' is a classifier" in r.text
        r = post(c, ACME, "acme", ["hi"])
        assert r.status_code == 400 and "--task classify" in r.text
        cards = c.get("/v1/models", headers={"Authorization": f"Bearer {ACME}"}).json()
        assert [(m["id"], m["task"]) for m in cards["data"]] == [
            ("tiny-llama", "generate"), ("chatty", "generate")]


def test_a_broken_head_is_refused_by_name_and_others_still_served(root, tmp_path):
    """A head that does not fit the backbone would fail the shared batch for every tenant in
    it: it is refused at load, naming the classifier."""
    import shutil

    from peftkit.train.heads import Head
    for name in ("acme", "probe"):
        shutil.copytree(root[0] / name, tmp_path / name)
    meta = json.loads((tmp_path / "probe" / "head.json").read_text())
    Head(32, 2).save(tmp_path / "probe", {k: v for k, v in meta.items()
                                          if k not in ("kind", "in", "out")})
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "head.json").write_text('{"task": "classify"}')
    srv = Server(ServeConfig(base="tiny-bert", adapters=str(tmp_path), task="classify")).start()
    try:
        with TestClient(create_app(srv)) as c:
            r = post(c, "", "probe", ["hello"])
            assert r.status_code == 400 and "classifier 'probe' cannot be served: its head " \
                "reads 32 features into 2 labels" in r.text and "backbone gives 64" in r.text
            r = post(c, "", "junk", ["hello"])
            assert r.status_code == 400 and "its head does not load" in r.text
            r = post(c, "", "acme", TEXTS["acme"])
            assert r.status_code == 200
            want = alone(root, "acme", TEXTS["acme"])
            assert max(abs(a - b) for item, w in zip(r.json()["data"], want)
                       for a, b in zip(item["probs"], w)) < 1e-5
    finally:
        srv.stop()


def test_an_encoder_base_without_task_classify_is_told_so(root):
    from peftkit.errors import PeftkitError
    with pytest.raises(PeftkitError, match="an encoder does not generate; it serves `train "
                                           "--task classify` runs with --task classify"):
        Server(ServeConfig(base="tiny-bert", adapters=str(root[0])))
    with pytest.raises(PeftkitError, match="--task: choose generate or classify, got 'x'"):
        ServeConfig(task="x")


def test_the_official_client_classifies(root):
    from openai import OpenAI

    from tests.serve_harness import running
    with running(server(root)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key=BOLT)
        body = client.post("/classify", body={"model": "bolt", "input": "invoice overdue"},
                           cast_to=object)
        assert body["data"][0]["num_classes"] == 3
        assert abs(sum(body["data"][0]["probs"]) - 1) < 1e-5
        assert client.models.retrieve("bolt").model_extra["task"] == "classify"


def test_the_gateway_passes_classify_through(root):
    import httpx

    from peftkit.serve.gateway import Gateway, GatewayConfig, create_gateway_app
    from tests.serve_harness import running, serving
    with running(server(root)) as backend:
        gw = Gateway(GatewayConfig(backends=(backend,), api_keys=str(root[1]), backend_key=ADMIN,
                                   health_every_s=0.2))
        with serving(create_gateway_app(gw)) as url:
            deadline = time.time() + 10
            while not gw.bases and time.time() < deadline:
                time.sleep(0.05)
            ask = lambda key, model: httpx.post(  # noqa: E731
                f"{url}/v1/classify", json={"model": model, "input": TEXTS["bolt"]},
                headers={"Authorization": f"Bearer {key}"}, timeout=60)
            r = ask(BOLT, "bolt")
            assert r.status_code == 200, r.text
            want = alone(root, "bolt", TEXTS["bolt"])
            assert max(abs(a - b) for item, w in zip(r.json()["data"], want)
                       for a, b in zip(item["probs"], w)) < 1e-5
            assert ask(ACME, "bolt").status_code == 404  # the gateway's own tenancy


def test_the_queue_bound_counts_rows(root):
    """--max-queue bounds rows waiting: a request whose rows would pass it is refused whole."""
    from peftkit.classify_engine import ClassifyRow
    from peftkit.engine import QueueFull
    srv = server(root, max_queue=4)  # not started: the rows wait
    rows = lambda n: [ClassifyRow([1, 2], -1, None, "mean") for _ in range(n)]  # noqa: E731
    srv.engine.submit(rows(3))
    with pytest.raises(QueueFull, match="3 rows waiting, 2 more asked; the limit is 4"):
        srv.engine.submit(rows(2))
    srv.engine.submit(rows(1))  # exactly at the edge
    assert srv.engine.queue_depth() == 4
