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
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.data.templates import recorded_template
from peftkit.device import module_device
from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, adapter_dir, load_adapter, save_adapter
from peftkit.models import Base, load_base
from peftkit.train.build import Trainee, quant_for
from peftkit.train.config import TrainConfig
from peftkit.train.heads import Head, SequenceClassifier

CONFIG, ADAPTER, MODEL, HEAD = "config.json", "adapter", "model", "head.json"
# everything a run writes into its directory (claim clears these, never other files)
RUN_OUTPUTS = (CONFIG, ADAPTER, MODEL, HEAD, "head.safetensors", "report.json", "report.md",
               "checkpoint", ".checkpoint-tmp", ".checkpoint-old", "joint_summary.json",
               "chat_template.jinja", "tensorboard")


# what a resumed run must share with the run it continues (its length may change: a run is
# often continued for longer; `resume_changes` says so)
SAME_ON_RESUME = ("model", "data", "val_data", "method", "task", "batch_size", "grad_accum",
                  "rank", "alpha", "targets", "seed", "max_length", "chat_template", "packing")
LENGTH = ("steps", "epochs")


def resume_changes(out: Path, cfg: TrainConfig) -> list[str]:
    """The run-length options a resume changes from the saved run, worded for the log."""
    saved = _saved_config(out) or {}
    return [f"--{k} {saved[k]!r} -> {getattr(cfg, k)!r}" for k in LENGTH
            if k in saved and saved[k] != getattr(cfg, k)]


def claim(out: Path, cfg: TrainConfig, who: str = "") -> None:
    """A run directory has one owner. An --output that holds a run's outputs is refused unless
    --overwrite (which removes those outputs, and only those) or --resume (which must continue
    the same run: the options in SAME_ON_RESUME as saved). Checked before anything loads, so a
    second run never leaves the first's head or model beside its own adapter."""
    held = [out / name for name in RUN_OUTPUTS if (out / name).exists()] if out.is_dir() else []
    if not held:
        return
    where = f"{who}--output {out}"
    saved = _saved_config(out)
    if cfg.resume:
        differ = [k for k in SAME_ON_RESUME if saved and k in saved
                  and saved[k] != getattr(cfg, k)]
        if differ:
            k = differ[0]
            raise PeftkitError(f"{where}: --resume continues the saved run, whose {k} is "
                               f"{saved[k]!r}, not {getattr(cfg, k)!r}; give the same options, "
                               "or --overwrite to start over")
        return
    if not cfg.overwrite:
        what = f"a {saved['method']} run" if saved else f"a run's {held[0].name}"
        raise PeftkitError(f"{where}: holds {what} already; give --overwrite to replace it, "
                           "--resume to continue it, or another --output")
    for path in held:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _saved_config(out: Path) -> dict | None:
    try:
        saved = json.loads((out / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    return saved if isinstance(saved, dict) and "method" in saved else None


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
                paths["adapter"] = str(save_adapter(t.adapted, out / ADAPTER, slot=t.slot,
                                                    base_name=t.config.model,
                                                    modules=t.modules))
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


def recorded_base(path: str | Path | None, default: str = "smollm2-135m") -> str:
    """The base a run or adapter directory was trained on (its config.json, head.json or
    adapter_config.json), so `eval` and `generate` need no --model; else `default`."""
    if path is None:
        return default
    path = Path(path)
    for file, key in ((path / CONFIG, "model"), (path / HEAD, "base"),
                      (adapter_dir(path) / CONFIG_NAME, "base_model_name_or_path")):
        try:
            value = json.loads(file.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, str) and value:
            return value
    return default


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
    if path.name == ADAPTER and ((path.parent / HEAD).exists() or (path.parent / CONFIG).exists()):
        path = path.parent  # a run's adapter/ given: the run (its head, its base) is meant
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
    recorded_template(base.tokenizer, path)  # the template the run trained with, if its own
    if head_meta:  # causal-LM probe: the trained output head replaces the base's
        head, _ = Head.load(path, module_device(base.model))
        return Loaded(base, base.model, "causal-lm", head=head.eval())
    if not has_adapter:
        raise PeftkitError(f"{path}: no {CONFIG_NAME}, {ADAPTER}/, {MODEL}/ or {HEAD} inside")
    return Loaded(base, load_adapter(base.model, adapter).eval(), "causal-lm")
