"""`peftkit export --for merged`: a run's adapter folded into its base, written as a plain
Hugging Face model directory (config, weights, tokenizer and chat template) that transformers,
TGI or vLLM load without PEFT.

LoRA, rsLoRA, DoRA and IA³ merge exactly (W + delta, computed in float32, then cast to the
asked dtype). A QLoRA adapter trained against the NF4 base's dequantized weights, so it is
folded into exactly those (not the original 16-bit checkpoint, whose weights the adapter never
saw: the merge trap of peft#2105). Full fine-tuning runs are copied. Virtual tokens (prompt,
prefix), bottleneck adapters (nonlinear) and probes (a new head with a bias) cannot be folded
into a base's weights and are refused in one line.
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch

from peftkit.errors import PeftkitError
from peftkit.methods.spec import find_spec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPORT = "peftkit_export.json"


def export_merged(adapted, directory: str | Path, tokenizer=None, slot: int = 0,
                  dtype: torch.dtype = torch.float32, fold: bool = True) -> dict[str, torch.Tensor]:
    """Write a plain HF model directory with `slot` folded into the weights, in `dtype`.
    Works on NF4 bases too (dequantize -> add -> write). `fold` False: the base alone, as the
    adapter sees it (an NF4 base dequantized). Returns the written state dict."""
    from accelerate import init_empty_weights

    from peftkit.quant import dequantized_state_dict

    if adapted.virtual is not None:
        raise PeftkitError(f"{adapted.config.peft_type} adds tokens and cannot be merged")
    model = adapted.model
    dense = dequantized_state_dict(model)
    for name, layer in adapted.adapted_layers().items() if fold else ():
        dense.update({f"{name}.{k}": layer.stored(v) if k == "weight" else v
                      for k, v in layer.merged_params(slot).items()})
    config = type(model.config).from_dict(model.config.to_dict())
    if hasattr(config, "peftkit_quantization"):
        del config.peftkit_quantization
    config.dtype = dtype
    with init_empty_weights(include_buffers=False):
        plain = type(model)(config)
    wanted = plain.state_dict().keys()
    plain.load_state_dict({k: dense[k].detach().float().to(dtype).contiguous() for k in wanted
                           if k in dense}, strict=False, assign=True)
    plain.tie_weights()
    missing = [n for n, p in plain.named_parameters() if p.device.type == "meta"]
    if missing:
        raise PeftkitError(f"cannot export: no weights for {missing[:3]}")
    plain.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return plain.state_dict()


def export_run(run: str, out: str, dtype: str = "float32", model: str | None = None,
               overwrite: bool = False) -> dict:
    """A `peftkit train` run directory (or a bare adapter on `model`) as a merged model in
    `out`: checked, written to a fresh directory beside `out`, then renamed into place."""
    from peftkit.export import refuse_existing, replace_dir
    from peftkit.train.run_dir import ADAPTER, HEAD, MODEL, load_run, recorded_base

    src = Path(run)
    if not src.is_dir():
        raise PeftkitError(f"{src}: not a directory (give a `peftkit train` run or an adapter)")
    if dtype not in DTYPES:
        raise PeftkitError(f"--dtype {dtype}: choose {', '.join(DTYPES)}")
    target = Path(out)
    if target.resolve() == src.resolve() or src.resolve() in target.resolve().parents:
        raise PeftkitError(f"{target}: inside the run it exports; choose another OUT")
    refuse_existing(target, overwrite)
    run_cfg = _json(src / "config.json")
    method = run_cfg.get("method") or _json(src / ADAPTER / "adapter_config.json").get(
        "peft_type", "?").lower()
    if (src / HEAD).exists():
        raise PeftkitError(f"{src}: a probe's new head (with its bias) is not a base's output "
                           "layer; serve the run with `peftkit serve` or `peftkit generate`")
    spec = find_spec(method.removesuffix("_tuning"))
    if spec is not None and spec.not_mergeable:
        raise PeftkitError(f"{src}: {spec.not_mergeable} (serve it with `peftkit serve`)")
    base = model or recorded_base(src)
    fresh = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if
                                  target.parent.exists() else _made(target.parent)))
    try:
        if (src / MODEL).is_dir():  # full fine-tuning: already a plain model
            shutil.copytree(src / MODEL, fresh, dirs_exist_ok=True)
            how = "copied (full fine-tuning: the run's own model)"
        else:
            loaded = load_run(base, src)
            export_merged(loaded.module, fresh, loaded.base.tokenizer, dtype=DTYPES[dtype])
            how = ("folded into the NF4 base's dequantized weights (what the adapter trained "
                   f"against), then cast to {dtype}" if method == "qlora" else
                   f"folded in float32, then cast to {dtype}")
        architecture = _json(fresh / "config.json").get("model_type")
        report = {"source": str(src), "base": base, "method": method, "dtype": dtype,
                  "merge": how, "architecture": architecture}
        (fresh / REPORT).write_text(json.dumps(report, indent=2) + "\n")
        replace_dir(fresh, target)
    except BaseException:
        shutil.rmtree(fresh, ignore_errors=True)
        raise
    return {**report, "output": str(target)}


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
