"""`peftkit plan`: memory, GPUs, time and cost of full fine-tuning, feature extraction, LoRA and
QLoRA for a model on given hardware, and a recommendation with its reasons."""

import json
import math
import os
import re
from dataclasses import asdict
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.plan.advisor import TaskProfile, advise
from peftkit.plan.evidence import for_rule
from peftkit.plan.memory import GB, NF4_BITS, Settings, adapter_params, estimate
from peftkit.plan.shapes import Shape, parse_size, shape_for
from peftkit.train.config import STRATEGIES

APPROACHES = ("full", "full_mixed", "probe", "lora", "qlora")
CATALOG = Path(__file__).with_name("gpus.json")


def gpu_catalog() -> dict:
    path = Path(os.environ.get("PEFTKIT_GPUS", CATALOG))
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PeftkitError(f"{path}: cannot read the GPU catalog ({e})") from None
    return {k: v for k, v in data.items() if not k.startswith("_")}


def _norm(name: str) -> str:
    """A GPU name as people write it, compared without case, spaces, dashes or vendor."""
    name = re.sub(r"^(nvidia|amd|geforce|tesla|instinct)\s+", "", name.strip().lower())
    return re.sub(r"[\s_-]+", "", name)


def find_gpu(name: str, memory_gb: float | None = None) -> tuple[str, dict]:
    """The catalog GPU `name` names (key, full name or an alias: A100-80GB, "A100 80GB",
    RTX 3090, H100 PCIe, ...), or with `memory_gb` any GPU of that memory."""
    if memory_gb is not None:
        if not memory_gb > 0:
            raise PeftkitError(f"--gpu-memory: must be > 0 GB, got {memory_gb}")
        known = _lookup(name) if name else None
        base = dict(known[1]) if known else {"name": name or "GPU", "bf16_tflops": 100.0,
                                             "price_per_hour": 1.0}
        return (known[0] if known else name or "GPU"), {**base, "memory_gb": memory_gb}
    found = _lookup(name)
    if found is None:
        raise PeftkitError(f"unknown GPU '{name}' (catalog: {', '.join(gpu_catalog())}); give "
                           "--gpu-memory GB for any other, or add it to a copy of "
                           f"{CATALOG.name} and set PEFTKIT_GPUS")
    return found


def _lookup(name: str) -> tuple[str, dict] | None:
    want = _norm(name)
    for key, spec in gpu_catalog().items():
        if want in {_norm(n) for n in [key, spec["name"], *spec.get("aliases", [])]}:
            return key, {k: v for k, v in spec.items() if k != "aliases"}
    return None


def make_plan(model: str, gpu: str = "H100", gpus: int = 1, seq_len: int | None = None,
              batch: int = 1, dataset_tokens: float = 10_000 * 2048, epochs: float = 1.0,
              tenants: int = 1, budget_days: float | None = None, price: float | None = None,
              rank: int = 16, adam_8bit: bool = False, grad_checkpointing: bool = True,
              profile: dict | None = None, strategy: str = "auto",
              gpu_memory: float | None = None) -> dict:
    """`seq_len` None: 2048, or the model's context where that is shorter."""
    if gpus < 1 or tenants < 1 or (seq_len is not None and seq_len < 1) or batch < 1 \
            or epochs <= 0 or dataset_tokens <= 0 or rank < 1:
        raise PeftkitError("--gpus, --tenants, --seq-len, --batch, --epochs, --dataset-tokens "
                           "and --rank must be positive")
    if budget_days is not None and budget_days <= 0:
        raise PeftkitError(f"--budget-days: must be > 0, got {budget_days:g}")
    if price is not None and price < 0:
        raise PeftkitError(f"--price-per-gpu-hour: must be >= 0, got {price:g}")
    shape = shape_for(model)
    if seq_len is None:
        seq_len = min(2048, shape.context or 2048)
    elif shape.context and seq_len > shape.context:
        raise PeftkitError(f"--seq-len {seq_len}: over {model}'s {shape.context}-token context")
    key, spec = find_gpu(gpu, gpu_memory)
    price = spec["price_per_hour"] if price is None else price
    s = Settings(seq_len=seq_len, batch=batch, rank=rank, grad_checkpointing=grad_checkpointing,
                 adam_8bit=adam_8bit)
    tokens = dataset_tokens * epochs
    if strategy not in STRATEGIES:
        raise PeftkitError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    approaches = {a: estimate(shape, a, s, spec, gpus, tokens, price, strategy)
                  for a in APPROACHES}
    prof = TaskProfile(params=shape.params, gpus=gpus, tenants=tenants, **(profile or {}))
    rec = advise(prof, {a: v["fits"] for a, v in approaches.items()})
    rec["measured"] = for_rule(rec["rule"])  # docs/results.md's lines for this rule
    chosen = approaches.get(rec["approach"])
    if chosen is not None and not chosen["fits"]:
        rec["reasons"].append(_what_fits(approaches, key, gpus))
    plan = {"model": {"spec": model, "params": shape.params, "active_params": shape.active,
                      "layers": shape.layers, "hidden": shape.hidden, "vocab": shape.vocab,
                      "assumed": shape.assumed,
                      "adapted": "attention (experts frozen)" if shape.other_linear else
                                 "every linear layer"},
            "gpu": {"key": key, **spec, "count": gpus, "price_per_hour": price},
            "settings": {**asdict(s), "dataset_tokens": dataset_tokens, "epochs": epochs},
            "approaches": approaches, "recommendation": rec,
            "memory_figures": memory_figures(shape, tenants, rank)}
    if tenants > 1 or budget_days is not None:
        plan["tenants"] = tenant_plan(approaches, rec, tenants, budget_days, shape, rank)
    chosen = approaches.get(rec["approach"])
    if chosen is not None and chosen["strategy"] == "fsdp" and rec["approach"] in ("lora",
                                                                                   "qlora"):
        rec["reasons"].append("peftkit trains adapters with DDP (FSDP for adapters is not "
                              "built): run this sharded with torchtune or accelerate, or take "
                              "QLoRA with peftkit (--strategy ddp)")
    elif chosen is not None:
        plan["command"] = train_command(model, rec["approach"], chosen, gpus, seq_len, batch,
                                        rank)
    return plan


def train_command(model: str, approach: str, a: dict, gpus: int, seq_len: int, batch: int,
                  rank: int) -> str:
    """The exact command for the recommended run on `gpus` GPUs (torchrun past one; one node
    holds 8, so more span nodes with a c10d rendezvous)."""
    method = "full" if approach.startswith("full") else approach
    model = "MODEL_DIR" if parse_size(model) is not None else model  # a bare size names no files
    args = (f"-m peftkit train --model {model} --method {method} --strategy {a['strategy']} "
            f"--max-length {seq_len} --batch-size {batch} --data DATA --output runs/{method}"
            + (f" --rank {rank}" if method in ("lora", "qlora") else ""))
    if gpus == 1:
        return f"python {args}"
    if gpus <= 8:
        return f"torchrun --standalone --nproc_per_node {gpus} {args}"
    nodes = math.ceil(gpus / 8)
    return (f"torchrun --nnodes {nodes} --nproc_per_node 8 --rdzv-backend c10d "
            f"--rdzv-endpoint HEAD_NODE:29500 --rdzv-id peftkit {args}  # on each of {nodes} nodes")


def _what_fits(approaches: dict, gpu: str, gpus: int) -> str:
    ok = [a for a, v in approaches.items() if v["fits"]]
    need = {a: v["gpus_needed"] or math.inf for a, v in approaches.items()}
    worst = max(need, key=need.get)
    needs = (f"{worst} needs {need[worst]}x{gpu}" if need[worst] != math.inf else
             f"{worst} does not fit one {gpu} and its {approaches[worst]['strategy']} copies "
             "do not share memory")
    return f"does not fit {gpus}x{gpu}: {needs}; " + (
        f"{', '.join(ok)} fit{'s' if len(ok) == 1 else ''} on {gpus}" if ok else "nothing fits")


def memory_figures(shape: Shape, tenants: int, rank: int) -> dict:
    """The memory arithmetic of the seed: inference precision, 4-bit, shared serving."""
    n = shape.params
    adapter = adapter_params(shape, "lora", Settings(rank=rank)) * 2 / GB  # served in bf16
    k = tenants
    return {"fp16_inference_gb": 2 * n / GB, "int4_inference_gb": 0.5 * n / GB,
            "nf4_constants_gb": (NF4_BITS - 4) / 8 * n / GB,
            "full_ft_parameter_state_gb": 16 * n / GB,
            "full_ft_h100s_for_parameter_state": 16 * n / GB / 80,
            "adapter_gb_bf16": adapter, "tenants_compared": k,
            "separate_4bit_models_gb": k * 0.5 * n / GB,
            "shared_4bit_base_plus_adapters_gb": 0.5 * n / GB + k * adapter}


def tenant_plan(approaches: dict, rec: dict, tenants: int, budget_days: float | None,
                shape: Shape, rank: int) -> dict:
    approach = rec["approach"] if rec["approach"] in approaches else "qlora"
    per = approaches[approach]["hours"]
    total_days = per * tenants / 24
    adapter_gb = adapter_params(shape, "lora", Settings(rank=rank)) * 2 / GB
    base_gb = (approaches["qlora"]["weights_gb"] if approach == "qlora"
               else approaches["probe"]["weights_gb"])
    out = {"approach": approach, "adapters": tenants, "hours_per_adapter": per,
           "days_per_adapter": per / 24, "days_total": total_days, "adapter_gb": adapter_gb,
           "serving_shared_gb": base_gb + tenants * adapter_gb,
           "serving_separate_gb": tenants * base_gb}
    if budget_days is not None:
        out["budget_days"] = budget_days
        out["fits_budget"] = total_days <= budget_days
        out["adapters_within_budget"] = math.floor(budget_days * 24 / per) if per else tenants
    return out


def _num(v: float) -> str:
    """A table figure in at most seven characters: three significant digits, or <0.01."""
    return "0" if v == 0 else "<0.01" if v < 0.01 else f"{v:.3g}" if v < 1e5 else f"{v:.2e}"


def _gb(v: float) -> str:
    """Memory in the unit that says something: MB under a GB."""
    return f"{v * 1000:.0f} MB" if v < 1 else f"{v:.1f} GB" if v < 10 else f"{v:.0f} GB"


def _duration(hours: float) -> str:
    """A time in the unit that says something: seconds, minutes, hours or days."""
    s = hours * 3600
    return (f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 90 * 60 else
            f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days")


def format_plan(plan: dict) -> str:
    m, g = plan["model"], plan["gpu"]
    active = (f", {m['active_params'] / 1e9:.3g}B active per token; LoRA on {m['adapted']}"
              if m["active_params"] != m["params"] else "")
    lines = [f"Plan: {m['spec']} ({m['params'] / 1e9:.3g}B params{active}) on {g['count']}x "
             f"{g['name']} ({g['memory_gb']} GB, ${g['price_per_hour']:.2f}/h assumed)"]
    lines += [f"Assumed: {m['assumed']}"] if m["assumed"] else []
    lines += ["", f"{'approach':<11}{'strategy':>9}{'weights':>9}{'grads':>8}{'optim':>8}"
                  f"{'activ':>8}{'GB/GPU':>9}{'fits':>6}{'GPUs':>6}{'time':>10}{'cost $':>10}"]
    for name, a in plan["approaches"].items():  # time and cost on the GPUs the row runs on
        lines.append(f"{name:<11}{a['strategy']:>9}{_num(a['weights_gb']):>9}"
                     f"{_num(a['grads_gb']):>8}{_num(a['optimizer_gb']):>8}"
                     f"{_num(a['activations_gb']):>8}{_num(a['per_gpu_gb']):>9}"
                     f"{'yes' if a['fits'] else 'no':>6}"
                     f"{a['runs_on_gpus'] if a['gpus_needed'] else '-':>6}"
                     f"{_duration(a['hours']):>10}{a['cost']:>10,.2f}")
    s = plan["memory_figures"]
    h100s = s["full_ft_h100s_for_parameter_state"]
    lines += ["", f"fp16 weights {_gb(s['fp16_inference_gb'])}; 4-bit "
              f"{_gb(s['int4_inference_gb'])} + {_gb(s['nf4_constants_gb'])} quantization "
              f"constants; full-FT parameter state {_gb(s['full_ft_parameter_state_gb'])} ("
              + (f"~{h100s:.0f} H100s just for that)" if h100s >= 1.5 else
                 f"{h100s:.0%} of one H100)"),
              f"{s['tenants_compared']} separate 4-bit model{'s' * (s['tenants_compared'] > 1)} "
              f"{_gb(s['separate_4bit_models_gb'])} vs one shared base + "
              f"{s['tenants_compared']} adapter{'s' * (s['tenants_compared'] > 1)} "
              f"{_gb(s['shared_4bit_base_plus_adapters_gb'])}"]
    if "tenants" in plan:
        t = plan["tenants"]
        lines.append(f"{t['adapters']} adapters ({t['approach']}): "
                     f"{_duration(t['hours_per_adapter'])} each, "
                     f"{_duration(t['days_total'] * 24)} total"
                     + (f" (budget {t['budget_days']:g} day{'s' * (t['budget_days'] != 1)}: "
                        f"{'fits' if t['fits_budget'] else 'over'})"
                        if "budget_days" in t else ""))
    r = plan["recommendation"]
    lines += ["", f"Recommendation: {r['approach']}"
              + (f" (r={r['rank']})" if "rank" in r else "") + f"  [rule: {r['rule']}]"]
    lines += [f"  - {why}" for why in r["reasons"]]
    lines += [f"    evidence: {line}" for line in r["measured"]]
    if "command" in plan:
        lines += ["", f"Run it: {plan['command']}"]
    return "\n".join(lines)
