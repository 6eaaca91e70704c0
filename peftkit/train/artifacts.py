"""Load what a run wrote — a PEFT adapter, a full model directory, or a probe head — back onto
its base, for `peftkit eval` and `peftkit generate`."""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from peftkit.data import load_dataset, tokenize
from peftkit.device import module_device
from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, adapter_dir, load_adapter
from peftkit.models import Base, load_base
from peftkit.train.build import quant_for
from peftkit.train.evaluate import evaluate_run
from peftkit.train.heads import Head, SequenceClassifier


@dataclass
class Loaded:
    base: Base
    module: torch.nn.Module  # causal LM (maybe adapted) or SequenceClassifier
    task: str
    head: Head | None = None  # causal-LM probe head
    label_names: list[str] = field(default_factory=list)


def load_run(model: str, path: str | Path | None, device="cpu",
             dtype: torch.dtype = torch.float32, attn: str | None = None) -> Loaded:
    """The run at `path` (or the bare base) on `device`, its frozen base in `dtype`; adapters
    and heads keep the float32 they were trained in."""
    where = dict(device=device, dtype=dtype, attn=attn)
    if path is None:
        base = load_base(model, task="causal-lm", **where)
        return Loaded(base, base.model, "causal-lm")
    path = Path(path)
    if not path.is_dir():
        raise PeftkitError(f"adapter or run directory not found: {path}")
    adapter = adapter_dir(path)
    head_meta = json.loads((path / "head.json").read_text()) if (path / "head.json").exists() else None
    run_cfg = json.loads((path / "config.json").read_text()) if (path / "config.json").exists() else {}
    trained_in = run_cfg.get("dtype", "auto")  # the precision the run computed in
    quant = quant_for(run_cfg.get("method"), dtype if trained_in == "auto" else trained_in)
    full_dir = path / "model"
    if head_meta and head_meta["task"] == "classify":
        spec = str(full_dir) if full_dir.is_dir() else model
        base = load_base(spec, task="encoder", quantize=quant, **where)
        backbone = load_adapter(base.model, adapter) if (adapter / CONFIG_NAME).exists() else base.model
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
    if not (adapter / CONFIG_NAME).exists():
        raise PeftkitError(f"{path}: no adapter_config.json, adapter/, model/ or head.json inside")
    return Loaded(base, load_adapter(base.model, adapter).eval(), "causal-lm")


def evaluate_file(loaded: Loaded, data: str, max_length: int = 256, batch_size: int = 8,
                  exact_match_max: int = 64, text_field="text", label_field="label") -> dict:
    ds = load_dataset(data, text_field, label_field)
    tok = loaded.base.tokenizer
    device = module_device(loaded.base.model)
    if loaded.task == "classify":
        if ds.kind != "classification":
            raise PeftkitError(f"{data}: a classifier needs text+label records, got {ds.kind}")
        unknown = sorted({r.label for r in ds.records} - set(loaded.label_names))
        if unknown:
            raise PeftkitError(f"{data}: labels {unknown} were not in training "
                               f"({', '.join(loaded.label_names)})")
        ds.label_names = loaded.label_names
    ex = tokenize(ds, tok, max_length).examples
    return evaluate_run(loaded.module, loaded.task, tok, ex, ds.records,
                        n_classes=len(loaded.label_names), batch_size=batch_size, device=device,
                        exact_match_max=exact_match_max, head=loaded.head,
                        loss_fn=None if loaded.head is None else _head_loss(loaded))


def _head_loss(loaded: Loaded):
    """A causal-LM probe's loss: its trained head on the base's final hidden states."""
    def loss(b):
        hidden = loaded.base.model.base_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = loaded.head(hidden[:, :-1].float())
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 b["labels"][:, 1:].flatten())
    return loss
