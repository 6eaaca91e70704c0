"""What every method's spec file (methods/*_spec.py) builds on, torch-free: `MethodSpec`, the
bounds and strict readers of PEFT's adapter_config.json fields, the roles of linear layers by
their names, and the planner's rule shared by most methods."""

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Protocol

from peftkit.errors import PeftkitError

# Bounds no real adapter comes near; past them a config is corrupt or hostile (a rank of 1e9
# would allocate terabytes before any shape check).
MAX_RANK = 65536
MAX_ALPHA = 1e6
MAX_VIRTUAL_TOKENS = 65536

Targets = list[str] | str  # module names, a regex (full match), or "all-linear"


class AdapterConfig(Protocol):
    """A method's config: its PEFT type, its adapter_config.json, a training run's flags."""
    peft_type: str

    def to_peft(self) -> dict: ...

    @classmethod
    def from_peft(cls, cfg: dict) -> "AdapterConfig": ...

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "AdapterConfig": ...


def frozen_embeddings(shape, s, d) -> float:
    """Floats per token layer 0 does not save under PEFT: the embeddings are frozen, so the
    input norm's input needs no gradient."""
    return d["h"] + 1


@dataclass(frozen=True)
class MethodSpec:
    config: type[AdapterConfig]  # PEFT's adapter_config.json and the run's flags (from_run)
    layer: str | None  # "module:Class", imported when a model is built; None: virtual tokens
    lr: float  # default peak learning rate for a causal LM (--lr 0)
    classify_lr: float  # ... for a classifier (a new head on a pretrained body)
    mixed_batch: bool  # served in the shared LoRA batch (vLLM's rule: LoRA/rsLoRA only)
    joint: bool  # trains beside other tenants in one LoRA stack (`--tenants`)
    params: Callable  # (shape, sizes) -> trainable parameters the planner counts
    saved: Callable  # (shape, sizes, dims) -> floats per token one Llama layer saves beyond a frozen one
    first_layer: Callable = frozen_embeddings  # (shape, sizes, dims) -> floats layer 0 does not save
    virtual: str | None = None  # "input": tokens before every row; "kv": before every layer's keys/values
    not_mergeable: str | None = None  # why it cannot fold into the base's weights (None: it can)

    def layer_class(self) -> type:
        if self.layer is None:
            raise PeftkitError(f"{self.config.__name__} adds virtual tokens, not layers")
        module, name = self.layer.split(":")
        return getattr(importlib.import_module(module), name)


# Roles of linear layers by their names across transformers' families, for placing IA³ (the
# attention's keys and values, the MLP's output; Liu et al. 2022) and bottleneck adapters (each
# sublayer's output; Houlsby et al. 2019) on an architecture without a table entry. A fused
# projection (q, k and v in one layer) stands for keys and values, as in PEFT's own defaults.
KEY_VALUE = {"k_proj", "v_proj", "key", "value", "k_lin", "v_lin", "key_proj", "value_proj",
             "query_key_value", "qkv_proj", "Wqkv", "W_pack", "c_attn"}
MLP_OUT = {"down_proj", "dense_4h_to_h", "fc2", "lin2", "w2", "fc_out", "c_proj", "Wo",
           "dense"}
ATTN_OUT = {"o_proj", "out_proj", "out_lin", "dense", "c_proj", "Wo"}
ATTENTION_PARENTS = {"attn", "self_attn", "attention", "self_attention", "mixer"}
MLP_PARENTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "output", "experts"}


def roles(linear: list[str]) -> dict[str, list[str]]:
    """{"key_value", "mlp_out", "attn_out"} -> the full names among `linear` with that role
    (full names: BERT's attention output and MLP output are both `...output.dense`)."""
    found = {"key_value": [], "mlp_out": [], "attn_out": []}
    for name in linear:
        parts = name.split(".")
        leaf, parent = parts[-1], parts[-2] if len(parts) > 1 else ""
        in_attention = "attention.output" in name or parent in ATTENTION_PARENTS
        if leaf in KEY_VALUE:
            found["key_value"].append(name)
        elif leaf in ATTN_OUT and in_attention:
            found["attn_out"].append(name)
        elif leaf in MLP_OUT and not in_attention and (parent in MLP_PARENTS
                                                       or leaf not in ATTN_OUT):
            found["mlp_out"].append(name)
    return found


def placement(model_type: str, linear, table: dict, need: tuple[str, ...], method: str):
    if model_type in table:
        return table[model_type]
    if not linear:  # no model to read the structure from: the Llama names
        return table["llama"]
    found = roles(list(linear))
    missing = [r for r in need if not found[r]]
    if missing:
        raise PeftkitError(f"--method {method}: cannot tell the {missing[0].replace('_', ' ')} "
                           f"layers of this {model_type} model by their names; give --targets")
    return found


# -- strict field readers: types as PEFT's dataclass declares them, no bool("false") == True --

def read_int(cfg: dict, key: str, lo: int, hi: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"'{key}' must be an integer, got {shown(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"'{key}' = {shown(v)} is outside [{lo}, {hi}]")
    return v


def read_float(cfg: dict, key: str, default: float, hi: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {shown(v)}")
    if not math.isfinite(v) or abs(v) > hi:  # json reads 1e999 as inf
        raise ValueError(f"'{key}' = {shown(v)} is not a finite number within ±{hi:g}")
    return float(v)


def read_bool(cfg: dict, key: str) -> bool:
    v = cfg.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"'{key}' must be true or false, got {shown(v)}")
    return v


def read_targets(cfg: dict, key: str = "target_modules", required: bool = True):
    v = cfg[key] if required else cfg.get(key)
    if v is None and not required:
        return None
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return v
    raise ValueError(f"'{key}' must be a module name, a regex or a list of names, got {shown(v)}")


def shown(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
