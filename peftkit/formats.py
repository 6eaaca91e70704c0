"""Adapters on disk in Hugging Face PEFT's layout: `adapter_config.json` +
`adapter_model.safetensors` with PEFT's key names (`base_model.model.<path>.lora_A.weight`, ...).
Safetensors only: a pickle (`adapter_model.bin`) is refused, never opened.
"""

import difflib
import json
import stat
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from peftkit.methods.base import AdapterConfig
from peftkit.methods.spec import config_from_peft
from peftkit.methods.inject import AdaptedModel, add_adapter
from peftkit.methods.prompt import VirtualTokens
from peftkit.methods.registry import KEYS, spec_of

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
VIRTUAL_KEY, = VirtualTokens.KEYS


def adapter_dir(path: Path) -> Path:
    """Where a directory's adapter is: the directory itself (PEFT's layout) or, for a
    `peftkit train --output` run directory, its `adapter/` (PEFT's layout inside)."""
    return path if (path / CONFIG_NAME).exists() or not (path / "adapter").is_dir() \
        else path / "adapter"


def save_adapter(adapted: AdaptedModel, directory: str | Path, slot: int | str = 0,
                 base_name: str | None = None, modules: list[str] | None = None) -> Path:
    """Write one slot as a PEFT adapter directory (deterministic bytes for the same weights);
    `modules`: only these adapted modules (a slot of a stack whose targets are a union)."""
    k = adapted.slot_index(slot) if isinstance(slot, str) else slot
    config = adapted.slot_configs[k]
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, written, fields = {}, [], {}
    for path, module in adapted.slot_modules().items():
        if modules is not None and path and path not in modules:
            continue
        tensors.update({peft_key(path, key): v for key, v in module.read_slot(k, config).items()})
        written += [path] if path else []
        fields.update(module.peft_fields())
    tensors = {key: v.detach().to(torch.float32).contiguous().clone() for key, v in tensors.items()}
    peft = {**config.to_peft(), **fields}
    if peft.get("target_modules") == "all-linear":  # written resolved, as PEFT writes it
        peft["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in written})
    peft["base_model_name_or_path"] = base_name
    peft["inference_mode"] = True
    (directory / CONFIG_NAME).write_text(json.dumps(peft, indent=2, sort_keys=True) + "\n")
    save_file(dict(sorted(tensors.items())), directory / WEIGHTS_NAME, metadata={"format": "pt"})
    return directory


def read_adapter(directory: str | Path, root: Path | None = None
                 ) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """Config and tensors of an adapter directory, validated before anything is allocated from
    them; errors name the file. With `root`, both files must resolve inside it (a served adapter
    directory may not point at files elsewhere)."""
    directory = Path(directory)
    cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not directory.is_dir():
        raise PeftkitError(f"adapter directory not found: {directory}")
    if not cfg_path.exists() and not cfg_path.is_symlink():
        raise PeftkitError(f"{cfg_path}: missing (not a PEFT adapter directory)")
    if not w_path.exists() and not w_path.is_symlink():
        pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")]
        if pickles:
            raise PeftkitError(f"{directory / pickles[0]}: pickle adapters are refused, never loaded;"
                               f" convert it to {WEIGHTS_NAME}")
        raise PeftkitError(f"{w_path}: missing adapter weights")
    _regular_file(cfg_path, root, MAX_CONFIG_BYTES)
    try:
        raw = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, int digits
        raise PeftkitError(f"{cfg_path}: invalid JSON ({str(e)[:120]})") from None
    if not isinstance(raw, dict):
        raise PeftkitError(f"{cfg_path}: expected a JSON object")
    config = config_from_peft(raw, str(cfg_path))
    _regular_file(w_path, root)
    try:
        tensors = load_file(w_path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise PeftkitError(f"{w_path}: corrupt safetensors file ({str(e)[:160]})") from None
    if not tensors:
        raise PeftkitError(f"{w_path}: holds no tensors")
    _check_values(w_path, tensors)
    _check_rank(w_path, config, tensors)
    return config, tensors


MAX_CONFIG_BYTES = 1 << 20
# Trained adapter weights are O(1); |w| past this is corruption or an attack, and its products
# would overflow to Inf in the next layers.
MAX_ABS_WEIGHT = 1e4


def _regular_file(path: Path, root: Path | None, max_bytes: int | None = None) -> None:
    """Refuse what would hang or escape: FIFOs and devices (open() blocks), directories,
    dangling links, links out of `root`, oversize configs."""
    try:
        real = path.resolve(strict=True)
        st = real.stat()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        raise PeftkitError(f"{path}: missing or a dangling link") from None
    if root is not None and not real.is_relative_to(root.resolve()):
        raise PeftkitError(f"{path}: points outside the adapters directory")
    if not stat.S_ISREG(st.st_mode):
        raise PeftkitError(f"{path}: not a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise PeftkitError(f"{path}: {st.st_size} bytes, over the {max_bytes} byte limit")


def _check_values(where: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Floating point, finite and within ±MAX_ABS_WEIGHT. A served adapter holds hundreds of
    tensors, so first one batched L2 norm each (an upper bound of max |w|; NaN and Inf carry
    through), and the exact check only on a tensor that bound does not clear."""
    for key, t in tensors.items():
        if not t.is_floating_point():
            raise PeftkitError(f"{where}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; "
                               "adapter weights are floating point")
    keys = [k for k, t in tensors.items() if t.numel()]
    bounds = torch.stack([n.float() for n in torch._foreach_norm([tensors[k] for k in keys])]) \
        if keys else torch.zeros(0)
    for i in (~(bounds <= MAX_ABS_WEIGHT)).nonzero().flatten().tolist():
        key, t = keys[i], tensors[keys[i]]
        if not bool(torch.isfinite(t).all()):
            raise PeftkitError(f"{where}: {key} holds NaN or Inf values; refusing to load it")
        largest = float(t.abs().max())
        if largest > MAX_ABS_WEIGHT:
            raise PeftkitError(f"{where}: {key} holds values beyond ±{MAX_ABS_WEIGHT:g} "
                               f"(max |w| = {largest:.3g}); refusing to load it")


def _check_rank(where: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor]) -> None:
    """The declared rank / token count must be what the tensors hold, so nothing is ever
    allocated from a number the file merely claims."""
    if isinstance(config, LoraConfig):
        for key, t in tensors.items():
            axis = 0 if key.endswith("lora_A.weight") else 1 if key.endswith("lora_B.weight") else None
            if axis is not None and (t.dim() != 2 or t.shape[axis] != config.r):
                rank = t.shape[axis] if t.dim() == 2 else f"? (shape {tuple(t.shape)})"
                raise PeftkitError(f"{where}: {key} has rank {rank} but {CONFIG_NAME} says "
                                   f"r={config.r}")
    elif isinstance(config, (PromptTuningConfig, PrefixTuningConfig)):
        t = tensors.get(VIRTUAL_KEY)
        if t is not None and (t.dim() != 2 or t.shape[0] != config.num_virtual_tokens):
            raise PeftkitError(f"{where}: {VIRTUAL_KEY} has shape {tuple(t.shape)}, not "
                               f"{config.num_virtual_tokens} virtual tokens as {CONFIG_NAME} says")


def load_adapter(model: nn.Module, directory: str | Path, name: str = "default",
                 trainable: bool = False) -> AdaptedModel:
    return load_adapters(model, {name: directory}, trainable=trainable)


def load_adapters(model: nn.Module, directories: dict[str, str | Path],
                  trainable: bool = False) -> AdaptedModel:
    """Load several adapters of one method family into one multi-slot model (slot order = dict
    order). LoRA slots of different ranks and targets share one zero-padded stack."""
    items = [(name, Path(d), *read_adapter(d)) for name, d in directories.items()]
    kinds = {type(cfg).__name__ for _, _, cfg, _ in items}
    if len(kinds) > 1:
        raise PeftkitError(f"adapters of different methods cannot share a model ({', '.join(kinds)})")
    first = items[0][2]
    if isinstance(first, LoraConfig) and len({c.use_dora for _, _, c, _ in items}) > 1:
        raise PeftkitError("LoRA and DoRA adapters cannot share one stack; serve them apart")
    per_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, (name, directory, cfg, tensors) in enumerate(items):
        for path, local in by_module(tensors, directory / WEIGHTS_NAME).items():
            per_module.setdefault(path, {})[k] = local
    virtual = spec_of(first).layer is None
    for name, directory, cfg, tensors in items if virtual else ():
        if cfg.num_virtual_tokens != first.num_virtual_tokens:
            raise PeftkitError(f"adapter '{name}': {cfg.num_virtual_tokens} virtual tokens, but "
                               f"'{items[0][0]}' has {first.num_virtual_tokens}; one stack "
                               "needs one length")
    for path, slots in per_module.items():  # model-level tensors in a layer adapter, or back
        if (path == "") != virtual:
            raise PeftkitError(f"{items[min(slots)][1] / WEIGHTS_NAME}: unexpected tensor for "
                               f"'{path or VIRTUAL_KEY}' in a {first.peft_type} adapter")
        if path:
            _in_model(model, path, items[min(slots)][1] / WEIGHTS_NAME)
    layers = {path: items[min(slots)][2] for path, slots in per_module.items()}
    max_r = max((c.r for _, _, c, _ in items if isinstance(c, LoraConfig)), default=None)
    try:
        adapted = add_adapter(model, first, len(items), [n for n, *_ in items], init=False,
                              modules=None if virtual else layers, r=max_r)
    except PeftkitError as e:
        raise PeftkitError(f"adapter '{items[0][0]}': {e}") from None
    adapted.slot_configs = [c for _, _, c, _ in items]
    holders = adapted.slot_modules()
    for k, (name, directory, cfg, tensors) in enumerate(items):
        for path, holder in holders.items():
            local = per_module.get(path, {}).get(k)
            if local is None and virtual:
                raise PeftkitError(f"{directory / WEIGHTS_NAME}: no '{VIRTUAL_KEY}' tensor")
            if local is not None:
                check_module(holder, local, cfg, directory / WEIGHTS_NAME, path or VIRTUAL_KEY)
                holder.write_slot(k, local, cfg)
    for p in adapted.adapter_parameters():
        p.requires_grad_(trainable)
    return adapted


def _in_model(model: nn.Module, path: str, where: Path) -> None:
    try:
        model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules()]
        close = difflib.get_close_matches(path, names, n=2)
        raise PeftkitError(f"{where}: module '{path}' is not in the base"
                           + (f" (closest: {', '.join(close)})" if close else "")) from None


def check_module(holder, local: dict, config, where: Path, path: str) -> None:
    """A module's tensors are the ones its slot module needs for `config`, in its shapes."""
    shapes = holder.slot_shapes(config)
    _require(local, list(shapes), where, path)
    for key, shape in shapes.items():
        _check_shape(where, key if key == path else f"{path}.{key}", shape, local[key])


def peft_key(path: str, key: str) -> str:
    """PEFT's name of a slot module's tensor: model-level ones (virtual tokens) are bare."""
    return f"{PREFIX}{path}.{key}" if path else key


def by_module(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT keys -> {module path ("" model-level): {local name (lora_A.weight, ...): tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, local = _split_key(key, where)
        out.setdefault(path, {})[local] = t
    return out


def _split_key(key: str, where: Path) -> tuple[str, str]:
    if key in VirtualTokens.KEYS:
        return "", key
    if not key.startswith(PREFIX):
        raise PeftkitError(f"{where}: unexpected tensor '{key}' (PEFT keys start with '{PREFIX}')")
    rest = key[len(PREFIX):]
    for suffix in KEYS:  # every method's per-module tensor names (methods/registry.py)
        if rest.endswith("." + suffix):
            return rest[: -len(suffix) - 1], suffix
    raise PeftkitError(f"{where}: unsupported tensor '{key}'")


def _require(local: dict, keys: list[str], where: Path, path: str) -> None:
    missing = [k for k in keys if k not in local]
    if missing:
        raise PeftkitError(f"{where}: {path} lacks {', '.join(missing)}")


def _check_shape(where: Path, key: str, expected: tuple, t: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(expected):
        raise PeftkitError(f"{where}: shape mismatch for {key}: expected {tuple(expected)}, "
                           f"got {tuple(t.shape)}")
