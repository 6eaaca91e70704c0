"""Joint multi-tenant training (issue 14): N tenants' adapters in one batched pass over one base
equal N separate runs, tenant by tenant (dropout 0, same seeds and data order)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml
from safetensors.torch import load_file

from peftkit.errors import DataError, PeftkitError
from peftkit.formats import load_adapter
from peftkit.train import TrainConfig, train
from peftkit.train.joint import train_joint
from tests.helpers import tiny_llama

SHARED = {"model": "tiny-llama", "device": "cpu", "val_split": 0.0, "dropout": 0.0,
          "schedule": "cosine", "warmup": 0.2, "batch_size": 3, "exact_match_max": 2}
TENANTS = [  # ranks 2/4/8, rsLoRA, other targets, learning rates, step counts and seeds
    {"name": "acme", "rank": 2, "alpha": 4, "lr": 1e-2, "steps": 6, "seed": 1},
    {"name": "bolt", "rank": 4, "alpha": 8, "lr": 5e-3, "steps": 9, "rslora": True,
     "targets": "q_proj,v_proj", "seed": 2},
    {"name": "core", "rank": 8, "alpha": 16, "lr": 2e-2, "steps": 4, "grad_accum": 2, "seed": 3,
     "method": "dora"},  # a DoRA slot in the same stack (QLoRA runs: every tenant qlora)
]


def _rows(word: str):
    return [{"prompt": f"say {word} {i}:", "completion": f"{word}{i % 3} ok"} for i in range(9)]


def _setup(tmp_path, write, method="lora"):
    tenants = []
    for t in TENANTS:
        data = write(f"{t['name']}.jsonl", _rows(t["name"]))
        t = {k: v for k, v in t.items() if k != "method" or method == "lora"}
        tenants.append({**t, "data": str(data), "output": str(tmp_path / "joint" / t["name"])})
    spec = tmp_path / "tenants.yaml"
    spec.write_text(yaml.safe_dump({**SHARED, "method": method, "tenants": tenants}))
    return spec, tenants


def _alone(tenant, out, method):
    return train(TrainConfig(**{**SHARED, "method": method, **tenant, "output": str(out)}))


def test_a_dora_slot_and_a_lora_slot_share_one_stack():
    """A plain LoRA slot in a DoRA stack computes exactly LoRA, beside a DoRA slot."""
    import torch
    from peftkit.methods import LoraConfig, add_adapter
    from tests.helpers import batch, randomize
    lora = add_adapter(tiny_llama().model, LoraConfig(r=4, targets=["q_proj"]))
    randomize(lora, seed=0)
    mixed = add_adapter(tiny_llama().model, LoraConfig(r=4, targets=["q_proj"], use_dora=True),
                        slots=2)
    randomize(mixed, seed=1)
    for name, layer in mixed.adapted_layers().items():
        layer.set_plain(0)
        src = lora.adapted_layers()[name]
        with torch.no_grad():
            layer.lora_A[0], layer.lora_B[0] = src.lora_A[0], src.lora_B[0]
            layer.scale[0] = src.scale[0]
    ids = batch()
    with torch.no_grad():
        want = lora(input_ids=ids).logits
        got = mixed(input_ids=ids, slots=torch.tensor([0, 0, 0])).logits
        dora = mixed(input_ids=ids, slots=torch.tensor([1, 1, 1])).logits
    assert (want - got).abs().max() < 1e-5 and (want - dora).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_joint_run_equals_separate_runs(tmp_path, write, method):
    spec, tenants = _setup(tmp_path, write, method)
    result = train_joint(str(spec))
    summary = result["summary"]
    assert summary["steps"] == {"acme": 6, "bolt": 9, "core": 4}
    # the planner's sequential estimate: three model loads where the joint run had one
    planner = summary["planner"]
    assert planner["trained_tokens"][1] > planner["trained_tokens"][2] > 0  # 9 steps vs 4
    assert planner["sequential_seconds"] == pytest.approx(
        summary["wall_seconds"] + 2 * planner["model_load_seconds"], rel=1e-6)
    assert planner["speedup"] > 1
    for t in tenants:
        alone = _alone({k: v for k, v in t.items() if k != "name"},
                       tmp_path / "alone" / t["name"], method)
        mine = json.loads((tmp_path / "joint" / t["name"] / "report.json").read_text())
        assert max(abs(a - b) for a, b in zip(alone["train_losses"], mine["train_losses"])) <= 1e-5
        a = load_file(tmp_path / "alone" / t["name"] / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "joint" / t["name"] / "adapter" / "adapter_model.safetensors")
        assert a.keys() == b.keys()
        # DoRA's multi-slot path rounds differently from its one-slot path and AdamW's
        # 1/sqrt(v) scales that up on near-zero gradients: measured 1.5e-5 at lr 2e-2
        bound = 5e-5 if t.get("method") == "dora" else 1e-5
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= bound
    bolt = tmp_path / "joint" / "bolt" / "adapter"
    cfg = json.loads((bolt / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == 4
    assert {k.split(".")[-3] for k in load_file(bolt / "adapter_model.safetensors")} == \
        {"q_proj", "v_proj"}
    load_adapter(tiny_llama().model, bolt)  # each adapter loads alone


def test_a_bad_tenant_file_fails_everything_before_training(tmp_path, write):
    spec, tenants = _setup(tmp_path, write)
    bad = write("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "oops"}\n')
    raw = yaml.safe_load(spec.read_text())
    raw["tenants"][1]["data"] = str(bad)
    spec.write_text(yaml.safe_dump(raw))
    with pytest.raises(DataError) as err:
        train_joint(str(spec))
    assert f"tenant 'bolt': {bad}:2: missing field 'completion'" in str(err.value)
    assert not (tmp_path / "joint").exists()


def test_resume_after_sigterm_equals_an_uninterrupted_joint_run(tmp_path, write):
    spec, tenants = _setup(tmp_path, write)
    raw = yaml.safe_load(spec.read_text())
    for t in raw["tenants"]:
        t["steps"] = 150
    whole = tmp_path / "whole.yaml"
    whole.write_text(yaml.safe_dump({**raw, "tenants": [
        {**t, "output": t["output"].replace("joint", "whole")} for t in raw["tenants"]]}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "peftkit", "train", "--tenants"]
    subprocess.run(cmd + [str(whole)], env=env, check=True, capture_output=True, timeout=300)
    spec.write_text(yaml.safe_dump(raw))
    proc = subprocess.Popen(cmd + [str(spec)], env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / "joint" / "acme" / "config.json").exists() and time.time() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "stopped by SIGTERM" in err, err[-2000:]
    raw["resume"] = True
    spec.write_text(yaml.safe_dump(raw))
    subprocess.run(cmd + [str(spec)], env=env, check=True, capture_output=True, timeout=300)
    for t in TENANTS:
        a = load_file(tmp_path / "whole" / t["name"] / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "joint" / t["name"] / "adapter" / "adapter_model.safetensors")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


@pytest.mark.parametrize("outputs", [
    ("same", "same"),  # one path twice
    (None, None),  # both left at the default runs/latest
    ("out/x", "out/x/../x/"),  # one directory spelled two ways
    ("out/a", "out/a/adapter/b"),  # one inside another's run directory
    ("link", "real"),  # a symlink to another tenant's directory
])
def test_tenants_writing_one_directory_are_refused_before_loading(tmp_path, write, outputs,
                                                                  monkeypatch):
    """Two tenants whose outputs meet once both printed the same adapter path, and only the
    second survived; now the run stops before any model is loaded, naming both and their lines."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    data = write("d.jsonl", _rows("a"))
    tenants = [{"name": n, "data": str(data), **({"output": o} if o else {})}
               for n, o in zip(("acme", "bolt"), outputs)]
    spec = tmp_path / "tenants.yaml"
    spec.write_text(yaml.safe_dump({**SHARED, "method": "lora", "steps": 1, "tenants": tenants},
                                   sort_keys=False))
    lines = spec.read_text().splitlines()
    at = [f"{spec}:{i + 1}" for i, line in enumerate(lines) if line.startswith("- ")]
    import peftkit.train.joint as joint
    monkeypatch.setattr(joint, "load_base", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(PeftkitError) as err:
        train_joint(str(spec))
    msg = str(err.value)
    assert f"{at[0]}: tenant 'acme'" in msg and f"{at[1]}: tenant 'bolt'" in msg
    assert "own `output`" in msg and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("option,reason", [
    ({"rank": [8]}, "tenant 'acme': rank: expected int"),
    ({"lr": -1}, "tenant 'acme': lr: must be >= 0"),
    ({"targets": 5}, "tenant 'acme': targets: expected str"),
    ({"rank": 0}, "tenant 'acme': rank: must be >= 1")])
def test_tenant_options_are_typed_like_config_files(tmp_path, write, option, reason):
    """`rank: "8"` or a list, `targets` as a list, `lr: -1` in a tenant once gave tracebacks."""
    from peftkit.train.joint import load_tenants
    data = write("d.jsonl", _rows("a"))
    good = {"name": "bolt", "data": str(data), "output": str(tmp_path / "b"), "rank": "8",
            "lr": "1e-3", "targets": ["q_proj", "v_proj"]}
    spec = tmp_path / "tenants.yaml"
    spec.write_text(yaml.safe_dump({**SHARED, "method": "lora", "tenants": [
        good, {"name": "acme", "data": str(data), "output": str(tmp_path / "a"), **option}]}))
    with pytest.raises(PeftkitError) as err:
        load_tenants(str(spec))
    assert reason in str(err.value) and str(spec) in str(err.value)
    spec.write_text(yaml.safe_dump({**SHARED, "method": "lora", "tenants": [good]}))
    (_, cfg), = load_tenants(str(spec))
    assert (cfg.rank, cfg.lr, cfg.targets) == (8, 1e-3, "q_proj,v_proj")


def test_every_flag_means_what_it_means_alone(tmp_path, write):
    """One run loop (issue 28): gradient checkpointing recomputes each tenant's rows on its own
    slot (the routing survives until backward), evaluation runs every `eval_every` steps per
    tenant, and each tenant writes the report a single run writes (report.md, compare's keys)."""
    spec, _ = _setup(tmp_path, write)
    raw = yaml.safe_load(spec.read_text())
    plain = train_joint(str(spec))["reports"]
    raw.update(grad_checkpointing=True, val_split=0.25, eval_every=2)
    for t in raw["tenants"]:
        t["output"] = t["output"].replace("joint", "ckpt")
    spec.write_text(yaml.safe_dump(raw))
    ckpt = train_joint(str(spec))["reports"]
    raw.update(grad_checkpointing=False)
    for t in raw["tenants"]:
        t["output"] = t["output"].replace("ckpt", "again")
    spec.write_text(yaml.safe_dump(raw))
    again = train_joint(str(spec))["reports"]
    for name in ckpt:
        assert max(abs(a - b) for a, b in zip(ckpt[name]["train_losses"],
                                              again[name]["train_losses"])) <= 1e-6
        a = load_file(tmp_path / "ckpt" / name / "adapter" / "adapter_model.safetensors")
        b = load_file(tmp_path / "again" / name / "adapter" / "adapter_model.safetensors")
        assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
        report = ckpt[name]
        steps = len(report["train_losses"])
        assert [h["step"] for h in report["history"]] == list(range(2, steps, 2)) + [steps]
        assert "loss" in report["history"][0]
        for key in ("trainable_params", "peak_rss_bytes", "wall_seconds", "metrics",
                    "model_state_bytes", "predicted_peak_rss", "tokens_per_second"):
            assert key in report, key
        assert (tmp_path / "ckpt" / name / "report.md").read_text().startswith("# ")
        assert plain[name]["joint"] is True and plain[name]["tenant"] == name
