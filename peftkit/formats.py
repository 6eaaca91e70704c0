"""Adapters on disk in Hugging Face PEFT's layout: `adapter_config.json` +
`adapter_model.safetensors` with PEFT's key names (`base_model.model.<path>.lora_A.weight`, ...).
Safetensors only: a pickle (`adapter_model.bin`) is refused, never opened.
"""

import difflib
import json
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.config import (AdapterConfig, LoraConfig, PrefixTuningConfig,
                                    PromptTuningConfig, config_from_peft)
from peftkit.methods.inject import AdaptedModel, make_layer
from peftkit.methods.layers import SlotRouter
from peftkit.methods.prompt import VirtualTokens, kv_geometry
from peftkit.methods.registry import KEYS, method_of, spec_of

CONFIG_NAME, WEIGHTS_NAME = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."
VIRTUAL_KEY = "prompt_embeddings"


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
    tensors, written = {}, []
    if adapted.virtual is not None:
        tensors[VIRTUAL_KEY] = adapted.virtual.prompt_embeddings[k]
    for name, layer in adapted.adapted_layers().items():
        if modules is not None and name not in modules:
            continue
        local = layer.read_slot(k, config)
        written.append(name)
        tensors.update({f"{PREFIX}{name}.{key}": v for key, v in local.items()})
    tensors = {key: v.detach().to(torch.float32).contiguous().clone() for key, v in tensors.items()}
    if isinstance(config, PrefixTuningConfig):
        peft = config.to_peft(*kv_geometry(adapted.model.config))
    else:
        peft = config.to_peft()
    if peft.get("target_modules") == "all-linear":  # written resolved, as PEFT writes it
        peft["target_modules"] = sorted({name.rsplit(".", 1)[-1] for name in written})
    if any(layer.conv1d for layer in adapted.adapted_layers().values()):
        peft["fan_in_fan_out"] = True  # GPT-2's Conv1D: PEFT transposes these when merging
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
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = AdaptedModel(model, first, [n for n, *_ in items])
    adapted.slot_configs = [c for _, _, c, _ in items]
    if isinstance(first, (PromptTuningConfig, PrefixTuningConfig)):
        _load_virtual(adapted, items)
    else:
        _load_layers(adapted, items)
    for p in adapted.adapter_parameters():
        p.requires_grad_(trainable)
    return adapted


def _load_virtual(adapted: AdaptedModel, items) -> None:
    kind = "prompt" if isinstance(items[0][2], PromptTuningConfig) else "prefix"
    n = items[0][2].num_virtual_tokens
    context = getattr(adapted.model.config, "max_position_embeddings", None)
    if context and n >= context:
        raise PeftkitError(f"adapter '{items[0][0]}': {n} virtual tokens leave no room in the "
                           f"model's {context}-token context")
    virtual = VirtualTokens(adapted.model, kind, n, len(items))
    for k, (name, directory, cfg, tensors) in enumerate(items):
        t = tensors.get(VIRTUAL_KEY)
        where = directory / WEIGHTS_NAME
        if t is None:
            raise PeftkitError(f"{where}: no '{VIRTUAL_KEY}' tensor")
        if cfg.num_virtual_tokens != n:
            raise PeftkitError(f"adapter '{name}': {cfg.num_virtual_tokens} virtual tokens, but "
                               f"'{items[0][0]}' has {n}; one stack needs one length")
        _check_shape(where, VIRTUAL_KEY, tuple(virtual.prompt_embeddings.shape[1:]), t)
        with torch.no_grad():
            virtual.prompt_embeddings[k] = t
    adapted.virtual = virtual


def _load_layers(adapted: AdaptedModel, items) -> None:
    model = adapted.model
    per_module: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for k, (name, directory, cfg, tensors) in enumerate(items):
        for path, local in _by_module(tensors, directory / WEIGHTS_NAME).items():
            per_module.setdefault(path, {})[k] = local
    max_r = max((c.r for _, _, c, _ in items if isinstance(c, LoraConfig)), default=None)
    router: SlotRouter = adapted.router
    for path, slots in per_module.items():
        try:
            base = model.get_submodule(path)
        except AttributeError:
            where = items[min(slots)][1] / WEIGHTS_NAME
            names = [n for n, _ in model.named_modules()]
            close = difflib.get_close_matches(path, names, n=2)
            raise PeftkitError(f"{where}: module '{path}' is not in the base"
                               + (f" (closest: {', '.join(close)})" if close else "")) from None
        cfg0 = items[min(slots)][2]
        layer = make_layer(base, path, cfg0, router, len(items), r=max_r)
        for k, local in slots.items():
            _write(layer, k, local, items[k], path)
        model.set_submodule(path, layer)


@dataclass
class SlotWrite:
    """One LoRA adapter read, checked and laid out for a serving stack's slots: per module its
    A and B already in the slot's dtype and device, so writing a slot is copies only (done
    under the engine's lock) and everything slow (disk, parsing, checks) happens before it."""
    name: str
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int  # the adapter's tensor bytes as stored


def prepare_slot(layers: dict[str, nn.Module], name: str, directory: str | Path,
                 root: Path | None = None) -> SlotWrite:
    """Read and check one adapter for the slots of a stack's `layers` (`adapted_layers()`,
    which the caller keeps: walking the model costs more than a small adapter's read); needs
    no lock."""
    directory = Path(directory)
    config, tensors = read_adapter(directory, root)
    where = directory / WEIGHTS_NAME
    method = method_of(config)
    if not spec_of(config).mixed_batch:
        kind = {"dora": "DoRA", "ia3": "IA³"}.get(method, method)
        raise PeftkitError(f"adapter '{name}': {kind} adapters cannot join the shared LoRA "
                           "batch; only LoRA/rsLoRA adapters are served")
    rank = next(iter(layers.values())).r
    if config.r > rank:
        raise PeftkitError(f"adapter '{name}': rank {config.r} exceeds the server's max rank {rank}")
    modules = {}
    for path, local in _by_module(tensors, where).items():
        layer = layers.get(path)
        if layer is None:
            raise PeftkitError(f"{where}: module '{path}' is not adapted by this server")
        _check_module(layer, local, config, where, path)
        like = layer.lora_A
        modules[path] = tuple(local[key].to(like.device, like.dtype).contiguous()
                              for key in ("lora_A.weight", "lora_B.weight"))
    return SlotWrite(name, config.scale, modules,
                     sum(t.numel() * t.element_size() for t in tensors.values()))


def _write(layer, k: int, local: dict, item, path: str) -> None:
    """One module's tensors of one adapter into slot k, after checking names and shapes."""
    _, directory, cfg, _ = item
    _check_module(layer, local, cfg, directory / WEIGHTS_NAME, path)
    layer.write_slot(k, local, cfg)


def _check_module(layer, local: dict, config, where: Path, path: str) -> None:
    """A module's tensors are the ones its layer needs for `config`, in its shapes."""
    shapes = layer.slot_shapes(config)
    _require(local, list(shapes), where, path)
    for key, shape in shapes.items():
        _check_shape(where, f"{path}.{key}", shape, local[key])


def _by_module(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT keys -> {module path: {local name (lora_A.weight, ia3_l, ...): tensor}}."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, local = _split_key(key, where)
        out.setdefault(path, {})[local] = t
    return out


def _split_key(key: str, where: Path) -> tuple[str, str]:
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
