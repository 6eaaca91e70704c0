"""The decision rules: a task profile -> approach, reasons and the rule that fired.

Rules are checked in order; the first that matches decides (the seed's table):
  1. in-context learning is enough            -> no fine-tuning (prompting)
  2. embeddings / a classification head       -> feature extraction (frozen backbone + head)
  3. bf16 LoRA does not fit the GPUs (70B+ on one) -> QLoRA (per-tenant adapters when tenants > 1)
  4. several tasks or tenants to serve         -> one LoRA adapter per task on a shared base
  5. maximum quality, budget, and it fits      -> full fine-tuning
  6. far from pretraining / a new language     -> LoRA with a higher rank (r >= 32)
  7. otherwise                                 -> LoRA (r = 16)
"""

from dataclasses import dataclass


@dataclass
class TaskProfile:
    params: float  # model size N
    gpus: int = 1
    tenants: int = 1
    task_kind: str = "generation"  # generation | classification | embedding
    quality: str = "normal"  # normal | max
    budget: str = "normal"  # low | normal | high
    icl_enough: bool = False  # does prompting with examples already work?
    domain: str = "near"  # near | far (from the pretraining data)
    new_language: bool = False  # e.g. code completion in a language the base never saw


def advise(profile: TaskProfile, fits: dict[str, bool]) -> dict:
    """`fits[approach]`: whether that approach fits the given GPUs."""
    p, reasons = profile, []
    if p.icl_enough:
        return _rec("none", "icl", ["in-context learning already solves the task: no training, "
                                     "no adapter to serve, change prompts any time"])
    if p.task_kind in ("classification", "embedding"):
        return _rec("probe", "frozen-features", [
            f"a {p.task_kind} task on a pretrained encoder: a frozen backbone's features plus "
            "a small head usually suffice (e.g. sentiment on movie reviews)",
            "forward pass only, features cached once: about 1x model memory, minutes of compute"])
    big = p.params >= 65e9
    # QLoRA when bf16 LoRA does not fit the GPUs given (and 4-bit does, or the model is
    # 70B-class anyway); where LoRA fits (several GPUs, FSDP) it is faster (no dequantization)
    if not fits.get("lora", True) and (fits.get("qlora", False) or big):
        why = ["70B-class model: full fine-tuning needs about 16 bytes/param "
               f"({16 * p.params / 1e9:,.0f} GB)" if big else
               "bf16 LoRA does not fit the given GPUs"]
        why.append("NF4 4-bit base (~0.52 bytes/param) + LoRA adapters fits "
                   + ("one GPU" if p.gpus == 1 else f"{p.gpus} GPUs"))
        if p.tenants > 1:
            why.append(f"{p.tenants} tenants: one shared 4-bit base, one small adapter each")
        return _rec("qlora", "large-model-single-gpu" if p.gpus == 1 else "large-model", why,
                    rank=32 if (p.domain == "far" or p.new_language) else 16, tenants=p.tenants)
    if p.tenants > 1:
        return _rec("lora", "per-task-adapters", [
            f"{p.tenants} tasks/tenants: one LoRA adapter each on one shared base, "
            "served together in one batch; each adapter is MBs, not GBs"], tenants=p.tenants)
    if p.quality == "max" and p.budget == "high" and fits.get("full", False):
        return _rec("full", "max-quality", ["maximum quality with the budget for it, and full "
                                            "fine-tuning fits: every weight adapts"])
    if p.domain == "far" or p.new_language:
        reasons = ["far from the pretraining data (e.g. a new programming language or a "
                   "specialist domain): LoRA with a higher rank (r >= 32) on all linear layers",
                   "historically full fine-tuning; today PEFT reaches comparable quality at a "
                   "fraction of the memory"]
        return _rec("lora", "far-domain-high-rank", reasons, rank=32)
    return _rec("lora", "default-peft", ["LoRA r=16 on all linear layers: near full-FT "
                                         "quality on most tasks at a fraction of the memory"])


def _rec(approach: str, rule: str, reasons: list[str], rank: int | None = None,
         tenants: int = 1) -> dict:
    out = {"approach": approach, "rule": rule, "reasons": reasons}
    if rank is not None or approach in ("lora", "qlora"):
        out["rank"] = rank or 16
    if tenants > 1:
        out["adapters"] = tenants
    return out
