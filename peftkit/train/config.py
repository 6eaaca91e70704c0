"""The trainer's one config: a dataclass, loadable from YAML/TOML, overridable from the CLI."""

import json
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from peftkit.bounds import check_bounds, flag_name
from peftkit.errors import PeftkitError
from peftkit.methods.spec import spec_for, training_names

METHODS = ("full", "probe", *training_names())  # the adapter methods' from their specs


@dataclass
class TrainConfig:
    model: str = "smollm2-135m"  # alias (peftkit models), HF directory or .gguf file
    data: str = ""  # training data: .jsonl/.json (chat, Alpaca, ShareGPT, prompt/completion, text, text+label), .csv, .tsv, .parquet, .arrow, a datasets directory
    method: str = "lora"  # how to adapt: full, probe (frozen body + head) or a PEFT method
    output: str = "runs/latest"  # run directory: adapter/, report.json, checkpoint/
    task: str = "auto"  # "causal-lm" | "classify" | "auto" (classify when records carry labels)
    steps: int = 0  # optimizer steps; 0 = run `epochs` epochs
    epochs: float = 1.0  # passes over the training data (fractions allowed) when --steps is 0
    batch_size: int = 8  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 0.0  # 0 = the method's usual default for the task (see default_lr)
    head_lr: float = 0.0  # a classifier's new head; 0 = the larger of --lr and the probe's 1e-3
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup: float = 0.06  # fraction of steps with linear warmup (RoBERTa/LoRA GLUE recipe)
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" decay after warmup
    clip: float = 1.0  # max gradient norm; 0 = off
    seed: int = 0  # data order, split and adapter initialisation
    max_length: int = 256  # tokens per example; longer ones are truncated
    chat_template: str = ""  # for a base without one: chatml, zephyr, or a Jinja file
    packing: bool = False  # several examples per row of --max-length tokens, each attending only to itself
    val_data: str = ""  # validation file; empty = hold out --val-split of the data
    val_split: float = 0.1  # fraction held out for validation when --val-data is empty
    eval_every: int = 0  # steps between evaluations; 0 = once per epoch and at the end
    save_every: int = 0  # steps between checkpoints; 0 = only at the end and on a signal
    patience: int = 0  # stop after this many evaluations without a better --metric; 0 = never
    metric: str = "eval_loss"  # what best means: eval_loss, perplexity (lower); accuracy, macro_f1, exact_match (higher)
    keep: str = "auto"  # the adapter saved: best (evaluated) or last; auto = best with validation data
    report_to: str = "none"  # run tracking: none, or tensorboard, wandb, mlflow (comma-separated)
    exact_match_max: int = 64  # validation examples scored by greedy generation (causal LM)
    # method hyperparameters (their sources: each method's config, peftkit/methods/*_spec.py)
    rank: int = 8  # LoRA/DoRA rank r (Hu et al. 2021 §7.2: 1-8 often suffice)
    alpha: float = 16.0  # LoRA scale numerator: scale = alpha/r (alpha/sqrt(r) with --rslora)
    dropout: float = 0.05  # on the LoRA/DoRA input (Hu et al. 2021: 0.05-0.1)
    rslora: bool = False  # LoRA scale alpha/sqrt(r) instead of alpha/r (Kalajdzievski 2023)
    targets: str = "all-linear"  # "all-linear", a regex, or a comma-separated list of names
    num_virtual_tokens: int = 20  # prompt/prefix tuning length (Lester et al. 2021: 20-100)
    bottleneck_size: int = 64  # bottleneck adapter width (Houlsby et al. 2019: 8-256)
    probe_head: str = "linear"  # the probe's head: linear, or an MLP with one hidden layer
    # where and how: the names transformers / accelerate users know (peftkit.device)
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps; auto = CUDA when available
    dtype: str = "auto"  # frozen base precision and autocast dtype; auto = bf16 on GPU, fp32 on CPU
    attn: str = "auto"  # auto (the model's own choice) | sdpa | eager | flash_attention_2
    # adamw (torch) | adamw8bit | paged_adamw8bit: bitsandbytes' 8-bit states (Dettmers et al.
    # 2022, arXiv:2110.02861) and, paged, the optimizer states QLoRA pages to the CPU (§3)
    optim: str = "adamw"  # optimizer; 8-bit states need bitsandbytes
    # beyond one device (torchrun): --nproc N relaunches this command under torchrun
    nproc: int = 1  # processes (GPUs) on this machine; > 1 runs under torchrun
    strategy: str = "auto"  # auto | ddp (adapters) | fsdp (full fine-tuning; FSDP2)
    dist_timeout: float = 120.0  # seconds a rank waits for the others before it gives up
    grad_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    text_field: str = "text"  # the text column/key of classification and text records
    label_field: str = "label"  # the label column/key of classification records
    skip_invalid: bool = False  # drop bad records (each reported as FILE:LINE) instead of failing
    max_record_mb: float = 16.0  # a record (JSONL line, CSV field) over this is a bad record
    resume: bool = False  # continue from the run directory's checkpoint, exactly
    overwrite: bool = False  # replace the run already in --output (default: refuse it)

    def load_data(self, path: str):
        """One of this run's data files, read with its field names, skipping and size limit."""
        from peftkit.data.records import load_dataset, report_skipped
        ds = load_dataset(path, self.text_field, self.label_field, self.skip_invalid,
                          max_record_mb=self.max_record_mb)
        report_skipped(ds)
        return ds

    def validate(self) -> "TrainConfig":
        """Every option typed and in range (RANGES, CHOICES), named by its flag."""
        typed_options(asdict(self), flag_name)
        if not self.data:
            raise PeftkitError("no training data: give --data FILE")
        from peftkit.train.tracking import trackers
        trackers(self.report_to)  # a tracker asked for and not installed: said now
        if self.chat_template:  # a missing or broken template: said before any model loads
            from peftkit.data.templates import chat_template
            chat_template(self.chat_template)
        self.placement()
        from peftkit.train.distributed import World, choose_strategy
        choose_strategy(self.strategy, self.method, World(size=max(self.nproc, 2)))
        return self

    def placement(self):
        """(device, base dtype, attention) resolved, or a one-line error naming the flag."""
        from peftkit.device import placement
        device, dtype, attn = placement(self.device, self.dtype, self.attn, training=True)
        if self.optim not in OPTIMIZERS:
            raise PeftkitError(f"--optim {self.optim}: choose {', '.join(OPTIMIZERS)}")
        if self.optim == "paged_adamw8bit" and device.type != "cuda":
            raise PeftkitError(f"--optim paged_adamw8bit: pages optimizer states between a CUDA "
                               f"device and the CPU; this run is on {device}")
        return device, dtype, attn

    def target_list(self):
        if self.targets == "all-linear" or not all(c.isalnum() or c in "_,." for c in self.targets):
            return self.targets
        return [t for t in self.targets.split(",") if t]

    def to_json(self, dtype=None) -> str:
        """The run's config.json; `dtype`, the precision the run resolved (a torch dtype), is
        written in place of "auto", so loading the run back rebuilds the same base."""
        values = asdict(self)
        if dtype is not None:
            values["dtype"] = str(dtype).removeprefix("torch.")
        return json.dumps(values, indent=2)


OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
STRATEGIES = ("auto", "ddp", "fsdp")  # beyond one device; the planner's too
# Peak learning rates for --lr 0. A causal LM: the usual LLM-tuning values (LoRA/QLoRA 2e-4,
# Dettmers et al. 2023; IA³ 3e-3, Liu et al. 2022). A classifier (a new head on a pretrained
# body): the GLUE recipes, full FT 5e-5 (Devlin et al. 2019's grid {2,3,5}e-5) and LoRA 5e-4
# (Hu et al. 2021, Table 9, SST-2), as validated on SST-2 by bench/quality.py (docs/results.md).
# The adapter methods' own are in their specs (methods/spec.py).
_SPEC = {n: spec_for(n) for n in training_names()}
DEFAULT_LR = {"full": 2e-5, "probe": 1e-3, **{n: s.lr for n, s in _SPEC.items()}}
CLASSIFY_LR = {"full": 5e-5, "probe": 1e-3, **{n: s.classify_lr for n, s in _SPEC.items()}}


# the options with a fixed set of values (validate() and the CLI's choices)
CHOICES = {"method": METHODS, "task": ("auto", "causal-lm", "classify"),
           "schedule": ("cosine", "linear", "constant"), "optim": OPTIMIZERS,
           "strategy": STRATEGIES, "probe_head": ("linear", "mlp"),
           "attn": ("auto", "sdpa", "eager", "flash_attention_2"),
           "metric": ("eval_loss", "perplexity", "accuracy", "macro_f1", "exact_match"),
           "keep": ("auto", "best", "last")}
# --metric -> (the evaluation's key, +1 when higher is better), and the tasks that report it
METRICS = {"eval_loss": ("loss", -1), "perplexity": ("perplexity", -1),
           "accuracy": ("accuracy", 1), "macro_f1": ("macro_f1", 1),
           "exact_match": ("exact_match", 1)}
METRIC_TASKS = {"causal-lm": ("eval_loss", "perplexity", "exact_match"),
                "classify": ("eval_loss", "accuracy", "macro_f1")}


# Ranges, declared once: checked on flags (naming the flag), config files and tenant files
# (naming FILE:KEY) alike. field -> (test, what it must be)
def _whole(v) -> bool:
    return float(v).is_integer()


RANGES = {
    "steps": (lambda v: v >= 0, ">= 0"), "epochs": (lambda v: v > 0, "> 0"),
    "batch_size": (lambda v: v >= 1, ">= 1"), "grad_accum": (lambda v: v >= 1, ">= 1"),
    "lr": (lambda v: v >= 0, ">= 0 (0: the method's default)"),
    "head_lr": (lambda v: v >= 0, ">= 0 (0: the default)"),
    "weight_decay": (lambda v: v >= 0, ">= 0"),
    "warmup": (lambda v: v >= 0 and (v < 1 or _whole(v)),
               "a fraction of the steps in [0, 1) or a whole number of steps"),
    "clip": (lambda v: v >= 0, ">= 0 (0: off)"), "max_length": (lambda v: v >= 1, ">= 1"),
    "val_split": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "eval_every": (lambda v: v >= 0, ">= 0"), "save_every": (lambda v: v >= 0, ">= 0"),
    "patience": (lambda v: v >= 0, ">= 0 (0: never stop early)"),
    "exact_match_max": (lambda v: v >= 0, ">= 0"), "rank": (lambda v: v >= 1, ">= 1"),
    "alpha": (lambda v: v > 0, "> 0"), "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "num_virtual_tokens": (lambda v: v >= 1, ">= 1"),
    "bottleneck_size": (lambda v: v >= 1, ">= 1"), "nproc": (lambda v: v >= 1, ">= 1"),
    "dist_timeout": (lambda v: v > 0, "> 0"), "max_record_mb": (lambda v: v > 0, "> 0"),
}


def typed_options(values: dict, where) -> dict:
    """A config or tenant file's options as TrainConfig's types, in range: numbers written as
    text are numbers (YAML 1.1 reads `1e-3` as a string), `targets` may be a list; anything
    else is a one-line error naming `where(key)` (FILE:KEY)."""
    kinds = {f.name: f.type for f in fields(TrainConfig)}
    out = {}
    for key, value in values.items():
        kind = kinds[key]
        if key == "targets" and isinstance(value, list) and all(isinstance(t, str) for t in value):
            value = ",".join(value)
        try:
            out[key] = _as(kind, value)
        except (TypeError, ValueError):
            raise PeftkitError(f"{where(key)}: expected {kind.__name__}, got "
                               f"{json.dumps(value, default=str)[:60]}") from None
        _in_range(key, out[key], where)
    return out


def _as(kind, value):
    if kind is bool:
        if not isinstance(value, bool):
            raise TypeError
        return value
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        raise TypeError
    if kind is int:
        number = float(value) if isinstance(value, str) else value
        if not float(number).is_integer():
            raise ValueError
        return int(number)
    if kind is float:
        return float(value)
    if not isinstance(value, str):
        raise TypeError
    return value


def _in_range(key: str, value, where) -> None:
    check_bounds({key: value}, RANGES, where)
    if key in CHOICES and value not in CHOICES[key]:
        raise PeftkitError(f"{where(key)}: '{value}' is not one of {', '.join(CHOICES[key])}")


def default_lr(method: str, task: str) -> float:
    return (CLASSIFY_LR if task == "classify" else DEFAULT_LR)[method]


def load_config(path: str | None, overrides: dict) -> TrainConfig:
    """Config file values, then explicit CLI overrides (keys left None are not given)."""
    values = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise PeftkitError(f"config file not found: {p}")
        try:
            values = tomllib.loads(p.read_text()) if p.suffix == ".toml" else yaml.safe_load(p.read_text())
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as e:
            raise PeftkitError(f"{p}: cannot parse ({str(e).splitlines()[0]})") from None
        values = values or {}
        if not isinstance(values, dict):
            raise PeftkitError(f"{p}: expected a mapping of option: value")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise PeftkitError(f"{p}: unknown option(s) {', '.join(unknown)}")
        values = typed_options(values, lambda key: f"{p}:{key}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig(**values).validate()
