"""`peftkit inspect MODEL`: a user's first command on a new model. Its family and size, its
linear layers by role, each method's default targets or why the method is refused, and whether
`export --for vllm` can take its LoRA adapters. Nothing is loaded but the config (the model is
built on the meta device)."""

from peftkit.errors import PeftkitError
from peftkit.train.config import METHODS, TrainConfig

ENCODER_TASK = "classify"


def inspect_model(spec: str) -> dict:
    from accelerate import init_empty_weights
    from transformers import AutoModel, AutoModelForCausalLM

    from peftkit.export import vllm_targets
    from peftkit.methods.base import roles
    from peftkit.methods.inject import find_targets, in_block, not_adapted_note
    from peftkit.models import ENCODERS, peek_config
    from peftkit.plan.shapes import shape_from_config
    from peftkit.train.build import adapter_config, check_family

    config = peek_config(spec)
    task = ENCODER_TASK if config.model_type in ENCODERS else "causal-lm"
    auto = AutoModel if task == ENCODER_TASK else AutoModelForCausalLM
    try:
        with init_empty_weights():
            model = auto.from_config(config)
    except ValueError as e:
        raise PeftkitError(f"{spec}: transformers cannot build a {config.model_type} model for "
                           f"{task} ({str(e).splitlines()[0][:120]})") from None
    linear = find_targets(model, "all-linear")
    leaves = sorted({in_block(n) for n in linear})
    methods = {}
    for method in METHODS:
        run = TrainConfig(model=spec, method=method, data="-")
        try:
            check_family(run, task)
            if method in ("full", "probe"):
                methods[method] = {"supported": True, "targets": "every weight" if method ==
                                   "full" else "a new head on the frozen body"}
                continue
            adapter = adapter_config(run, model)
            targets = getattr(adapter, "targets", None)
            shown = (sorted({in_block(t) for t in targets}) if isinstance(targets, list)
                     else leaves if targets == "all-linear" else "virtual tokens")
            methods[method] = {"supported": True, "targets": shown}
        except PeftkitError as e:
            methods[method] = {"supported": False, "why": str(e)}
    shape = shape_from_config(spec, config)
    names = {n.split(".")[-1] for n in leaves}  # what vLLM's loader compares
    try:
        allowed = vllm_targets(config.model_type) if task != ENCODER_TASK else ()
        vllm_why = None if names <= set(allowed) else (
            "vLLM's LoRA loader takes " + ", ".join(allowed) + f" on {config.model_type}")
    except PeftkitError as e:
        allowed, vllm_why = (), str(e)
    if task == ENCODER_TASK:
        vllm_why = "vLLM serves LoRA adapters of decoders"
    return {"model": spec, "family": config.model_type, "task": task,
            "params": shape.params, "layers": config.num_hidden_layers,
            "linear_layers": len(linear), "roles": {k: sorted({in_block(n) for n in v})
                                                   for k, v in roles(linear).items()},
            "not_adapted": not_adapted_note(model),
            "methods": methods,
            "vllm_lora": methods["lora"]["supported"] and task != ENCODER_TASK
            and names <= set(allowed), "vllm_lora_targets": sorted(names & set(allowed)),
            "vllm_why": vllm_why}


def format_inspection(r: dict) -> str:
    lines = [f"{r['model']}: {r['family']} ({r['task']}), {r['params'] / 1e6:,.1f}M parameters, "
             f"{r['layers']} blocks, {r['linear_layers']} linear layers",
             "roles: " + "; ".join(f"{k.replace('_', ' ')} {', '.join(v) or '-'}"
                                   for k, v in r["roles"].items())]
    if r.get("not_adapted"):
        lines.append(r["not_adapted"] + " (full fine-tuning trains them)")
    lines += ["", "methods:"]
    for method, m in r["methods"].items():
        if m["supported"]:
            targets = m["targets"] if isinstance(m["targets"], str) else ", ".join(m["targets"])
            lines.append(f"  {method:<11} yes   {targets}")
        else:
            lines.append(f"  {method:<11} no    {m['why']}")
    lines.append("")
    lines.append("export --for vllm: " + (
        "yes (LoRA on " + ", ".join(r["vllm_lora_targets"]) + ")" if r["vllm_lora"] else
        "no: " + r["vllm_why"]))
    return "\n".join(lines)
