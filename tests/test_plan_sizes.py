"""The plan for the model a user names (issue 32): bare sizes whose parts add up, the offline
catalog of the families users fine-tune (hub ids plan without a network), mixture-of-experts,
GPU names as people write them, and the QLoRA paper's published figures."""

import math

import pytest
from hypothesis import given, settings, strategies as st

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.plan import find_gpu, gpu_catalog, make_plan
from peftkit.plan.catalog import CATALOG, counts
from peftkit.methods.spec import SPECS
from peftkit.plan.memory import Settings, adapter_params
from peftkit.plan.shapes import shape_for

SIZES = st.floats(min_value=math.log(50e6), max_value=math.log(1e12))  # log-uniform 50M-1T


def _spec(log_n: float) -> str:
    return f"{math.exp(log_n) / 1e6:.4f}M"


@settings(max_examples=200, deadline=None)
@given(SIZES)
def test_a_bare_size_is_parts_that_add_up(log_n):
    shape = shape_for(_spec(log_n))
    n = shape.params
    rest = n - shape.embedding_params - shape.quantizable_params
    assert shape.embedding_params >= 0 and shape.quantizable_params >= 0 and shape.layers >= 0
    assert rest >= -1e-6 * n  # norms: what is left, never negative
    assert shape.embedding_params + shape.quantizable_params + rest == pytest.approx(n, rel=1e-9)
    for method in SPECS:  # every method counts something at any size
        assert adapter_params(shape, method, Settings(rank=16)) > 0


APPROACHES = ("full", "full_mixed", "probe", "lora", "qlora")


@settings(max_examples=150, deadline=None)
@given(SIZES, SIZES, st.sampled_from([512, 2048]), st.booleans())
def test_memory_is_monotone_in_size_and_ordered_by_method(a, b, seq_len, checkpointing):
    small, big = sorted((a, b))
    plans = [make_plan(_spec(x), "H100", seq_len=seq_len, grad_checkpointing=checkpointing)
             for x in (small, big)]
    for name in APPROACHES:
        lo, hi = (p["approaches"][name]["total_gb"] for p in plans)
        assert lo <= hi * (1 + 1e-9), (name, _spec(small), _spec(big), lo, hi)
    for p in plans:
        rows = p["approaches"]
        assert rows["qlora"]["total_gb"] <= rows["lora"]["total_gb"] <= rows["full"]["total_gb"]


@settings(max_examples=100, deadline=None)
@given(SIZES, st.sampled_from(sorted(gpu_catalog())), st.integers(1, 64))
def test_rows_are_consistent_and_never_negative(log_n, gpu, gpus):
    plan = make_plan(_spec(log_n), gpu, gpus=gpus, tenants=3)
    memory = plan["gpu"]["memory_gb"]
    for name, row in plan["approaches"].items():
        numbers = [v for v in row.values() if isinstance(v, (int, float)) and
                   not isinstance(v, bool)]
        assert all(v >= 0 for v in numbers), (name, row)
        assert row["fits"] == (row["per_gpu_gb"] <= memory)
        assert row["gpu_hours"] == pytest.approx(row["hours"] * row["runs_on_gpus"])
        assert row["cost"] == pytest.approx(row["gpu_hours"] * plan["gpu"]["price_per_hour"])
        assert row["runs_on_gpus"] >= gpus and (row["gpus_needed"] == 0 or
                                                row["runs_on_gpus"] >= row["gpus_needed"]
                                                or row["strategy"] == "ddp")


def test_the_sweep_the_issue_found_broken():
    """35 sizes a user might type x every catalog GPU: 33 violations before (negative QLoRA
    memory for 0.36B, 0.5B, 2B, 22B-46.7B, ...; 12B below 9B; 110B not fitting at 119 GB)."""
    sizes = ["100M", "135M", "360M", "0.36B", "0.5B", "1B", "1.5B", "2B", "3B", "4B", "7B",
             "8B", "9B", "12B", "13B", "14B", "22B", "24B", "27B", "32B", "33B", "34B", "40B",
             "46.7B", "65B", "70B", "72B", "110B", "123B", "180B", "235B", "314B", "405B",
             "480B", "671B"]
    for gpu in gpu_catalog():
        previous = None
        for size in sizes:
            rows = make_plan(size, gpu)["approaches"]
            assert all(r["weights_gb"] > 0 and r["per_gpu_gb"] > 0 for r in rows.values())
            totals = [rows[a]["total_gb"] for a in APPROACHES]
            if previous:
                assert all(t >= p for t, p in zip(totals, previous)), (gpu, size)
            previous = totals
    assert make_plan("110B", "H100")["approaches"]["qlora"]["weights_gb"] < 65


def test_a_bare_size_says_what_it_assumed(capsys):
    assert main(["plan", "--model", "32B", "--gpu", "RTX4090", "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert "Assumed: 32B: a Llama-3-style dense shape, scaled to 32B parameters" in out
    assert "-" not in out.split("qlora")[1].split()[2]  # no negative weights


PUBLISHED = {  # hub id -> (total, active) parameters, billions, from the model cards
    "meta-llama/Llama-3.1-8B": (8.03, 8.03), "meta-llama/Llama-3.1-70B-Instruct": (70.6, 70.6),
    "meta-llama/Llama-3.1-405B": (405.9, 405.9), "Qwen/Qwen2.5-32B-Instruct": (32.8, 32.8),
    "Qwen/Qwen2.5-7B-Instruct": (7.62, 7.62), "Qwen/Qwen3-30B-A3B": (30.5, 3.3),
    "Qwen/Qwen3-235B-A22B": (235, 22), "mistralai/Mixtral-8x7B-Instruct-v0.1": (46.7, 12.9),
    "mistralai/Mixtral-8x22B-v0.1": (141, 39), "google/gemma-2-9b-it": (9.24, 9.24),
    "microsoft/Phi-3-mini-4k-instruct": (3.82, 3.82), "microsoft/phi-4": (14.7, 14.7),
    "deepseek-ai/DeepSeek-V3": (671, 37), "HuggingFaceTB/SmolLM2-135M-Instruct": (0.135, 0.135),
    "mistralai/Mistral-Nemo-Instruct-2407": (12.2, 12.2),
    "mistralai/Mistral-Small-24B-Instruct-2501": (23.6, 23.6),
}


@pytest.mark.parametrize("hub_id", list(PUBLISHED))
def test_hub_ids_plan_offline_with_published_counts(hub_id, monkeypatch):
    import transformers

    def offline(*_a, **_k):
        raise OSError("no network")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    shape = shape_for(hub_id)
    total, active = PUBLISHED[hub_id]
    assert shape.params / 1e9 == pytest.approx(total, rel=0.015)
    assert shape.active / 1e9 == pytest.approx(active, rel=0.03)
    assert "offline catalog" in shape.assumed


def test_every_catalog_entry_counts_positive_parts():
    for key, arch in CATALOG.items():
        c = counts(arch)
        assert all(v >= 0 for v in c.values()) and c["active"] <= c["total"], key


def test_an_unknown_hub_id_offline_is_one_clear_error(monkeypatch, capsys):
    import transformers

    def offline(*_a, **_k):
        raise OSError("We couldn't connect to 'https://huggingface.co'")
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    assert main(["plan", "--model", "someorg/NoSuchModel-7B"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("peftkit: error: --model someorg/NoSuchModel-7B: not in the offline "
                          "catalog") and "\n" not in err


def test_mixture_of_experts_memory_from_total_compute_from_active():
    moe = make_plan("mistralai/Mixtral-8x7B-v0.1", "H100", gpus=8)
    dense = make_plan("8x7B", "H100", gpus=8)
    for plan in (moe, dense):
        m = plan["model"]
        assert m["active_params"] < m["params"] and m["adapted"] == "attention (experts frozen)"
        full = plan["approaches"]["full"]
        assert full["parameter_state_gb"] == pytest.approx(16 * m["params"] / 1e9, rel=1e-6)
    # time follows the active parameters: 8x7B trains at about the cost of a 13B dense model
    assert moe["approaches"]["lora"]["gpu_hours"] == pytest.approx(
        make_plan("12.88B", "H100", gpus=8)["approaches"]["lora"]["gpu_hours"], rel=0.02)


@pytest.mark.parametrize("name,key", [
    ("A100-80GB", "A100-80"), ("A100 80GB", "A100-80"), ("a100-40gb", "A100-40"),
    ("A6000", "A6000"), ("RTX A6000", "A6000"), ("RTX 3090", "RTX3090"),
    ("GeForce RTX 4090", "RTX4090"), ("V100", "V100"), ("A40", "A40"), ("L40", "L40"),
    ("H100 PCIe", "H100-PCIE"), ("H100 SXM", "H100"), ("NVIDIA H100", "H100"),
    ("MI250", "MI250")])
def test_gpu_names_as_people_write_them(name, key):
    assert find_gpu(name)[0] == key


def test_the_help_examples_work_and_any_gpu_by_memory(capsys):
    assert main(["plan", "--model", "7B", "--gpu", "A100-80GB"]) == 0
    assert main(["plan", "--model", "7B", "--gpu", "MyCard", "--gpu-memory", "20"]) == 0
    assert "MyCard" in capsys.readouterr().out
    with pytest.raises(PeftkitError, match="--gpu-memory: must be > 0"):
        make_plan("7B", "MyCard", gpu_memory=-1)


@pytest.mark.parametrize("kw,reason", [
    ({"rank": 0}, "--rank must be positive"), ({"budget_days": -1}, "--budget-days: must be > 0"),
    ({"price": -2.0}, "--price-per-gpu-hour: must be >= 0")])
def test_impossible_plan_inputs_are_refused(kw, reason):
    with pytest.raises(PeftkitError) as err:
        make_plan("7B", "H100", **kw)
    assert reason.split(" must")[0] in str(err.value)


def test_the_qlora_papers_figures_fit():
    """QLoRA (Dettmers et al. 2023, §1 and Table 9): LLaMA-65B fine-tunes on one 48 GB GPU,
    33B on one 24 GB consumer GPU (sequence length 512, batch 1, gradient checkpointing)."""
    big = make_plan("huggyllama/llama-65b", "A6000", seq_len=512)["approaches"]
    assert big["qlora"]["fits"] and not big["lora"]["fits"]
    for gpu in ("RTX 3090", "RTX4090"):
        small = make_plan("huggyllama/llama-30b", gpu, seq_len=512)["approaches"]
        assert small["qlora"]["fits"] and not small["lora"]["fits"]


def test_seq_len_follows_the_models_context():
    assert make_plan("tiny-llama")["settings"]["seq_len"] <= 2048
    with pytest.raises(PeftkitError, match="--seq-len 4096: over tiny-llama's"):
        make_plan("tiny-llama", seq_len=4096)


def test_lora_where_it_fits_qlora_where_only_4_bit_does():
    """70B on 8 H100s with FSDP was told QLoRA, where LoRA fits at a quarter of the time."""
    sharded = make_plan("70B", "H100", gpus=8, strategy="fsdp")
    assert sharded["approaches"]["lora"]["fits"]
    assert sharded["recommendation"]["approach"] == "lora"
    assert sharded["approaches"]["lora"]["hours"] < sharded["approaches"]["qlora"]["hours"] / 3
    assert make_plan("70B", "H100")["recommendation"]["approach"] == "qlora"
    assert make_plan("70B", "H100", gpus=8)["recommendation"]["approach"] == "qlora"  # DDP
    assert "command" not in sharded  # peftkit's trainer shards only full fine-tuning
    assert any("FSDP for adapters is not built" in r for r in sharded["recommendation"]["reasons"])
