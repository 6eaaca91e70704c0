"""The planner: the seed's figures exactly, its worked cases, validation against measured runs."""

import json
import subprocess
import sys

import pytest
import torch

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.plan import make_plan
from peftkit.plan.cpu import CpuRun, activation_bytes_cpu, predict_state_bytes
from peftkit.plan.memory import Settings, adapter_params
from peftkit.plan.shapes import shape_for
from peftkit.train import TrainConfig, train
from peftkit.train.build import build
from tests.helpers import saved_activation_bytes


def test_memory_figures_for_70b():
    plan = make_plan("70B", "H100", tenants=5)
    full = plan["approaches"]["full"]
    assert (full["weights_gb"], full["grads_gb"], full["optimizer_gb"]) == (280, 280, 560)
    seed = plan["memory_figures"]
    assert seed["full_ft_parameter_state_gb"] == 1120
    assert seed["full_ft_h100s_for_parameter_state"] == 14
    assert seed["fp16_inference_gb"] == 140 and seed["fp16_inference_gb"] > 80  # not one H100
    assert seed["int4_inference_gb"] == 35
    assert seed["nf4_constants_gb"] == pytest.approx(70e9 * 0.127 / 8 / 1e9)
    assert seed["separate_4bit_models_gb"] == 175
    assert seed["shared_4bit_base_plus_adapters_gb"] < 40
    lora = plan["approaches"]["lora"]
    adapter = adapter_params(shape_for("70B"), "lora", Settings(rank=16))
    # PEFT = base at inference precision + 12 bytes per adapter parameter (+ its own 4 bytes)
    assert lora["grads_gb"] + lora["optimizer_gb"] == pytest.approx(12 * adapter / 1e9)
    assert lora["weights_gb"] == pytest.approx(140 + 4 * adapter / 1e9)
    assert not full["fits"] and plan["approaches"]["qlora"]["fits"]


def test_worked_case_70b_one_h100_five_customers():
    plan = make_plan("70B", "H100", gpus=1, tenants=5, dataset_tokens=10_000 * 2048, epochs=3,
                     budget_days=14)
    rec = plan["recommendation"]
    assert rec["approach"] == "qlora" and rec["adapters"] == 5
    t = plan["tenants"]
    assert t["days_per_adapter"] == pytest.approx(2.0, abs=0.1)
    assert t["fits_budget"] and plan["approaches"]["qlora"]["total_gb"] < 80


@pytest.mark.parametrize("profile,approach,rule", [
    ({"task_kind": "classification"}, "probe", "frozen-features"),  # sentiment on movie reviews
    ({"domain": "far"}, "lora", "far-domain-high-rank"),  # medical summarisation
    ({"new_language": True}, "lora", "far-domain-high-rank"),  # code completion, new language
    ({"icl_enough": True}, "none", "icl"),
    ({"quality": "max", "budget": "high"}, "full", "max-quality"),
])
def test_worked_cases_7b(profile, approach, rule):
    rec = make_plan("7B", "H100", gpus=8, profile=profile)["recommendation"]
    assert (rec["approach"], rec["rule"]) == (approach, rule)
    if profile.get("new_language") or profile.get("domain") == "far":
        assert rec["rank"] >= 32
        assert any("historically full fine-tuning" in r for r in rec["reasons"])


def test_several_tenants_get_per_task_adapters():
    rec = make_plan("7B", "A100-80", tenants=3)["recommendation"]
    assert (rec["approach"], rec["rule"], rec["adapters"]) == ("lora", "per-task-adapters", 3)


def test_nothing_fits_says_what_would():
    rec = make_plan("70B", "H100", profile={"quality": "max", "budget": "high"})["recommendation"]
    assert rec["approach"] == "qlora"
    plan = make_plan("13B", "T4", profile={"quality": "max", "budget": "high"})
    assert not plan["approaches"]["full"]["fits"]
    assert plan["recommendation"]["approach"] == "qlora"


@pytest.mark.parametrize("method,kw", [("lora", {}), ("full", {}), ("qlora", {}), ("ia3", {}),
                                       ("dora", {}), ("probe", {})])
def test_plan_predicts_measured_state_bytes(method, kw, write, tmp_path):
    data = write("d.jsonl", [{"prompt": f"q{i}", "completion": "yes"} for i in range(4)])
    report = train(TrainConfig(model="tiny-llama", data=str(data), method=method, steps=1,
                               output=str(tmp_path), val_split=0.0, rank=8, batch_size=4))
    shape = shape_for("tiny-llama")
    s = Settings(rank=8, head_outputs=shape.vocab, embed_bytes=4)
    predicted = predict_state_bytes(shape, method, s)
    measured = report["model_state_bytes"]
    assert abs(predicted - measured) / measured <= 0.05, (predicted, measured)


@pytest.mark.parametrize("method,task,dropout", [
    ("full", "causal-lm", 0), ("lora", "causal-lm", 0.05), ("lora", "classify", 0.0),
    ("dora", "causal-lm", 0.05), ("ia3", "classify", 0), ("bottleneck", "causal-lm", 0),
    ("prompt", "causal-lm", 0), ("prefix", "causal-lm", 0),
])
def test_activation_count_matches_the_autograd_graph(method, task, dropout):
    """The per-op activation formula against what autograd really saved, on a padded batch."""
    cfg = TrainConfig(model="tiny-llama", method=method, data="unused", rank=8, dropout=dropout)
    torch.manual_seed(0)
    trainee = build(cfg, task, ["neg", "pos"])
    trainee.module.train()
    rows, length = 4, 24
    ids = torch.randint(5, 200, (rows, length))
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, length // 2:] = 0  # a padded row: the trainer's batches carry a mask
    if task == "classify":
        loss = trainee.module(ids, mask).sum()
    else:
        loss = trainee.module(input_ids=ids, attention_mask=mask, labels=ids).loss
    measured = saved_activation_bytes(loss, trainee.module)
    run = CpuRun(method, task, Settings(seq_len=length, batch=rows, rank=8, dropout=dropout,
                                        grad_checkpointing=False))
    predicted = activation_bytes_cpu(shape_for("tiny-llama"), run)
    assert abs(predicted - measured) / measured <= 0.10, (predicted, measured)


def test_peak_rss_is_the_processs_own():
    """A trainer started from a bigger process (pytest here) must not report its parent's peak:
    Linux's ru_maxrss survives exec, VmHWM does not."""
    ballast = bytearray(600 * 2 ** 20)
    ballast[::4096] = b"\x01" * len(ballast[::4096])  # touch every page: resident
    code = "from peftkit.train.report import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                               text=True).stdout)
    assert child < len(ballast)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_report_predicts_the_runs_peak_rss(method, write, tmp_path):
    """A real `peftkit train` process: the planner's peak-RSS prediction in its report is
    within 15% of the peak the process measured."""
    data = write("d.jsonl", [{"prompt": f"question {i} " * (1 + i % 5), "completion": "yes"}
                             for i in range(16)])
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "peftkit.cli", "train", "--model", "tiny-llama",
                    "--method", method, "--data", str(data), "--output", str(out), "--steps", "2",
                    "--val-split", "0"], check=True, capture_output=True)
    report = json.loads((out / "report.json").read_text())
    predicted, measured = report["predicted_peak_rss"]["total"], report["peak_rss_bytes"]
    assert report["largest_batch"][0] == 8 and report["largest_batch"][1] > 10
    assert report["runtime_rss_bytes"] < measured
    assert abs(predicted - measured) / measured <= 0.15, report["predicted_peak_rss"]
    state = report["predicted_model_state_bytes"]
    assert abs(state - report["model_state_bytes"]) / report["model_state_bytes"] <= 0.05


def test_shape_of_a_bare_backbone_config():
    """A saved classifier/NF4 backbone's config names `LlamaModel`: its modules have no
    `model.` prefix, and the shape must still find the block's linear layers."""
    from peftkit.plan.shapes import shape_from_config
    from peftkit.tiny import tiny_llama_config
    config = tiny_llama_config()
    config.architectures = ["LlamaModel"]
    bare = shape_from_config("bare", config)
    assert [n for n, _, _ in bare.linear] == ["q_proj", "k_proj", "v_proj", "o_proj",
                                               "gate_proj", "up_proj", "down_proj"]
    assert bare.linear == shape_for("tiny-llama").linear


def test_cpu_plan_per_method(capsys):
    assert main(["plan", "--cpu", "--model", "135M", "--batch", "8", "--seq-len", "55",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    m = plan["methods"]
    assert set(m) == {"full", "probe", "lora", "qlora", "dora", "ia3", "prefix", "prompt",
                      "bottleneck"}
    assert m["full"]["optimizer_states_gib"] == pytest.approx(2 * m["full"]["weights_gib"])
    assert m["lora"]["optimizer_states_gib"] < 0.05 * m["full"]["optimizer_states_gib"]
    assert m["qlora"]["weights_gib"] < 0.5 * m["lora"]["weights_gib"]
    assert m["dora"]["activations_gib"] > m["lora"]["activations_gib"] > m["ia3"]["activations_gib"]
    assert m["full"]["total_gib"] > m["lora"]["total_gib"] > m["probe"]["total_gib"]
    assert all(v["fits_ram"] for v in m.values())
    assert main(["plan", "--cpu", "--model", "135M", "--batch", "4096", "--seq-len", "4096",
                 "--task-kind", "classification"]) == 0
    text = capsys.readouterr().out
    assert "prefix" not in text and text.rstrip().endswith("no")  # a classifier: no prompts


def test_cli_json_and_errors(capsys):
    assert main(["plan", "--model", "70B", "--gpu", "H100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["approaches"]) >= {"full", "probe", "lora", "qlora"}
    for a in plan["approaches"].values():
        assert {"weights_gb", "grads_gb", "optimizer_gb", "activations_gb", "total_gb", "fits",
                "gpus_needed", "hours", "cost"} <= set(a)
    assert {"approach", "reasons", "rule"} <= set(plan["recommendation"])
    assert main(["plan", "--model", "70B", "--gpu", "B300"]) == 2
    assert "unknown GPU 'B300' (catalog: H100, H100-PCIE, H200" in capsys.readouterr().err
    assert main(["plan", "--model", "70x"]) == 2
    assert "malformed model size '70x'" in capsys.readouterr().err
    with pytest.raises(PeftkitError, match="must be positive"):
        make_plan("7B", gpus=0)


def test_fsdp_shards_parameter_state_but_not_activations():
    from peftkit.plan import make_plan
    one = make_plan("70B", "H100", gpus=1)["approaches"]
    # 1,120 GB of parameter state is 14 H100s; with activations (Llama 3's 128k-entry
    # vocabulary: 2 GB of logits at 2,048 tokens) and slack FSDP needs more
    needed = one["full"]["gpus_needed"]
    assert one["full"]["strategy"] == "fsdp" and 15 <= needed <= 18
    assert one["full"]["parameter_state_gb"] / 80 == pytest.approx(14, rel=0.01)
    assert one["full"]["runs_on_gpus"] == needed  # its hours and cost are on those GPUs
    enough = make_plan("70B", "H100", gpus=needed)
    full = enough["approaches"]["full"]
    assert full["fits"] and full["per_gpu_gb"] < 80 < one["full"]["per_gpu_gb"]
    assert not make_plan("70B", "H100", gpus=needed - 1)["approaches"]["full"]["fits"]
    ddp = make_plan("70B", "H100", gpus=needed, strategy="ddp")["approaches"]["full"]
    assert not ddp["fits"] and ddp["gpus_needed"] == 0  # replicas never share memory
    assert one["lora"]["strategy"] == "ddp" and not one["lora"]["fits"]


def test_the_plan_prints_the_torchrun_command():
    from peftkit.plan import format_plan, make_plan
    plan = make_plan("smollm2-135m", "H100", gpus=4)
    assert plan["command"].startswith("torchrun --standalone --nproc_per_node 4 -m peftkit train "
                                      "--model smollm2-135m")
    assert "Run it: torchrun" in format_plan(plan)
    big = make_plan("70B", "H100", gpus=16)
    assert big["command"].startswith("torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d")
    assert "--model MODEL_DIR" in big["command"]
    assert make_plan("smollm2-135m", "H100")["command"].startswith("python -m peftkit train")


@pytest.mark.parametrize("kw", [dict(method="prompt", num_virtual_tokens=4),
                                dict(method="prefix", num_virtual_tokens=4),
                                dict(method="bottleneck", bottleneck_size=8),
                                dict(method="ia3", targets="k_proj,v_proj"),
                                dict(method="ia3", targets="k_proj,down_proj")])
def test_the_plan_of_a_run_uses_the_runs_own_sizes(kw, write, tmp_path):
    """Issue 28.6: one run shape from the training config. The planner counted virtual tokens
    and bottleneck widths at their defaults and IA³ at its default layers; a run with its own
    gets its own prediction (measured: within 0.03% of the trainer's state)."""
    data = write("lm.jsonl", [{"prompt": f"Q {i}", "completion": f"A{i}"} for i in range(8)])
    report = train(TrainConfig(model="tiny-llama", data=str(data), steps=1, batch_size=4,
                               val_split=0.0, output=str(tmp_path / "run"), **kw))
    assert report["predicted_model_state_bytes"] == pytest.approx(report["model_state_bytes"],
                                                                  rel=5e-3)


def test_small_and_large_plans_speak_in_units_that_say_something():
    """Issue 28.6: a 135M model's plan said "0.0 days" and "0 GB"; times are now seconds,
    minutes, hours or days, and memory MB under a GB."""
    from peftkit.plan import format_plan
    small = format_plan(make_plan("smollm2-135m", "H100", tenants=3, budget_days=1))
    assert "0.0 days" not in small and " 0 GB" not in small and "~0 H100s" not in small
    assert "s each" in small and "(budget 1 day: fits)" in small
    assert "67 MB" in small  # its 4-bit weights
    big = format_plan(make_plan("70B", "H100", tenants=5, budget_days=14))
    assert "h each" in big and "days total" in big and "~14 H100s" in big
