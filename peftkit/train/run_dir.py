"""A run directory — what `peftkit train` writes and `eval`, `generate` and `serve` read back —
written by one function and read by its twin (as PEFT's save_pretrained / from_pretrained):

  config.json                     the TrainConfig, with the dtype the run computed in, so the
                                  reader rebuilds the same base (a QLoRA run's NF4 settings too)
  adapter/                        a PEFT adapter (every PEFT method)
  model/                          a Hugging Face model directory (full fine-tuning)
  head.json, head.safetensors     a new head: a classifier's, or a causal-LM probe's LM head
  report.json, checkpoint/        metrics (train/report.py) and the resumable state (checkpoint.py)
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.device import module_device
from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, adapter_dir, load_adapter, save_adapter
from peftkit.models import Base, load_base
from peftkit.train.build import Trainee, quant_for
from peftkit.train.config import TrainConfig
from peftkit.train.heads import Head, SequenceClassifier

CONFIG, ADAPTER, MODEL, HEAD = "config.json", "adapter", "model", "head.json"


def write_config(out: Path, cfg: TrainConfig, dtype: torch.dtype) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG).write_text(cfg.to_json(dtype))


def save_run(t: Trainee, out: Path, write: bool = True) -> dict[str, str]:
    """Write the run's outputs: PEFT adapter, HF model directory and/or head. Every rank of a
    distributed run calls it (FSDP shards are gathered); only `write` ones write."""
    from peftkit.train.distributed import full, unsharded
    paths = {}
    if t.adapted is not None:
        with unsharded(t.adapted):
            if write:
                paths["adapter"] = str(save_adapter(t.adapted, out / ADAPTER,
                                                    base_name=t.config.model))
    if t.config.method == "full":
        model = t.base.model if t.task == "causal-lm" else t.module.backbone
        first = {}  # tied weights (one parameter, two names) are written once, as HF does
        for name, p in model.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), name)
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if first[id(p)] != n}
        whole = {k: full(v) for k, v in model.state_dict().items() if k not in tied}
        if write:
            model.save_pretrained(out / MODEL, state_dict=whole)
            t.base.tokenizer.save_pretrained(out / MODEL)
        paths["model"] = str(out / MODEL)
    if write and t.head is not None:
        extra = {"task": t.task, "labels": t.label_names, "base": t.config.model,
                 "method": t.config.method, "pooling": getattr(t.module, "pooling", None)}
        paths["head"] = str(t.head.save(out, extra))
    return paths


@dataclass
class Loaded:
    base: Base
    module: torch.nn.Module  # causal LM (maybe adapted) or SequenceClassifier
    task: str
    head: Head | None = None  # causal-LM probe head
    label_names: list[str] = field(default_factory=list)


def load_run(model: str, path: str | Path | None, device="cpu",
             dtype: torch.dtype = torch.float32, attn: str | None = None) -> Loaded:
    """The run (or bare PEFT adapter) at `path`, or the bare base when None, on `device`, its
    frozen base in `dtype`; adapters and heads keep the float32 they were trained in."""
    where = dict(device=device, dtype=dtype, attn=attn)
    if path is None:
        base = load_base(model, task="causal-lm", **where)
        return Loaded(base, base.model, "causal-lm")
    path = Path(path)
    if not path.is_dir():
        raise PeftkitError(f"adapter or run directory not found: {path}")
    adapter = adapter_dir(path)
    has_adapter = (adapter / CONFIG_NAME).exists()
    head_meta = json.loads((path / HEAD).read_text()) if (path / HEAD).exists() else None
    run_cfg = json.loads((path / CONFIG).read_text()) if (path / CONFIG).exists() else {}
    trained_in = run_cfg.get("dtype", "auto")  # the precision the run computed in
    quant = quant_for(run_cfg.get("method"), dtype if trained_in == "auto" else trained_in)
    full_dir = path / MODEL
    if head_meta and head_meta["task"] == "classify":
        spec = str(full_dir) if full_dir.is_dir() else model
        base = load_base(spec, task="encoder", quantize=quant, **where)
        backbone = load_adapter(base.model, adapter) if has_adapter else base.model
        head, _ = Head.load(path, module_device(base.model))
        clf = SequenceClassifier(backbone, head, head_meta["pooling"]).eval()
        return Loaded(base, clf, "classify", label_names=head_meta["labels"])
    if full_dir.is_dir():
        base = load_base(str(full_dir), task="causal-lm", **where)
        return Loaded(base, base.model, "causal-lm")
    base = load_base(model, task="causal-lm", quantize=quant, **where)
    if head_meta:  # causal-LM probe: the trained output head replaces the base's
        head, _ = Head.load(path, module_device(base.model))
        return Loaded(base, base.model, "causal-lm", head=head.eval())
    if not has_adapter:
        raise PeftkitError(f"{path}: no {CONFIG_NAME}, {ADAPTER}/, {MODEL}/ or {HEAD} inside")
    return Loaded(base, load_adapter(base.model, adapter).eval(), "causal-lm")
