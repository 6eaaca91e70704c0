"""Adapter method configs. Field docs cite where each hyperparameter comes from.

`to_peft()` / `from_peft()` map to and from Hugging Face PEFT's `adapter_config.json`, so adapters
move between peftkit, PEFT and vLLM unchanged. Bottleneck adapters have no PEFT type; their JSON
is our own (`"peft_type": "BOTTLENECK"`, documented in docs/adapter-format.md).
"""

import math
from dataclasses import dataclass, field

from peftkit.errors import PeftkitError

# Bounds no real adapter comes near; past them a config is corrupt or hostile (a rank of 1e9
# would allocate terabytes before any shape check).
MAX_RANK = 65536
MAX_ALPHA = 1e6
MAX_VIRTUAL_TOKENS = 65536

Targets = list[str] | str  # module names, a regex (full match), or "all-linear"

# Per-architecture module names where a method's paper places it (PEFT uses the same table):
# IA³ (targets, of which feed-forward), Liu et al. 2022; bottleneck adapters after the attention
# and MLP output projections, Houlsby et al. 2019.
IA3_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert": (["key", "value", "output.dense"], ["output.dense"])}
BOTTLENECK_TARGETS = {"llama": ["o_proj", "down_proj"], "bert": ["output.dense"]}

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


def _placement(model_type: str, linear, table: dict, need: tuple[str, ...], method: str):
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


@dataclass
class LoraConfig:
    """LoRA (Hu et al. 2021, arXiv:2106.09685): W + (alpha/r)·B·A with A: r×in, B: out×r."""
    r: int = 8  # rank; Hu et al. §7.2 find r as low as 1-8 suffices on GPT-3
    alpha: float = 16.0  # scale numerator; Hu et al. §4.1 fix alpha and tune lr instead
    dropout: float = 0.0  # on the adapter input (Hu et al. used 0.05-0.1 on GPT-2)
    targets: Targets = field(default_factory=lambda: ["q_proj", "v_proj"])  # Hu et al. §7.1
    use_rslora: bool = False  # rank-stabilised scale alpha/sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732)
    use_dora: bool = False  # weight-decomposed LoRA (Liu et al. 2024, arXiv:2402.09353)
    init: str = "kaiming"  # A kaiming-uniform(a=sqrt 5), B = 0 (Hu et al. §4.1); "gaussian": A~N(0,1/r)
    peft_type = "LORA"

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft(self) -> dict:
        return {"peft_type": "LORA", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": self.targets,
                "use_rslora": self.use_rslora, "use_dora": self.use_dora,
                "init_lora_weights": True if self.init == "kaiming" else self.init,
                "bias": "none", "fan_in_fan_out": False, "rank_pattern": {}, "alpha_pattern": {},
                "modules_to_save": None, "task_type": None}

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "LoraConfig":
        """From a training run's settings (train/config.TrainConfig): its flags."""
        return cls(r=run.rank, alpha=run.alpha, dropout=run.dropout, targets=run.target_list(),
                   use_dora=run.method == "dora", use_rslora=run.rslora)

    @classmethod
    def from_peft(cls, cfg: dict) -> "LoraConfig":
        for key in ("rank_pattern", "alpha_pattern"):
            if cfg.get(key):
                raise PeftkitError(f"adapter_config.json: '{key}' is not supported")
        init = cfg.get("init_lora_weights", True)
        return cls(r=_int(cfg, "r", 1, MAX_RANK), alpha=_float(cfg, "lora_alpha", 8.0, MAX_ALPHA),
                   dropout=_float(cfg, "lora_dropout", 0.0, 1.0),
                   targets=_targets(cfg), use_rslora=_bool(cfg, "use_rslora"),
                   use_dora=_bool(cfg, "use_dora"),
                   init="kaiming" if init is True else str(init))


@dataclass
class IA3Config:
    """(IA)³ (Liu et al. 2022, arXiv:2205.05638 §3.3): learned vectors rescale keys, values and the
    feed-forward input; initialised to ones, so the model starts unchanged."""
    targets: Targets = field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward: list[str] = field(default_factory=lambda: ["down_proj"])  # scale input, not output
    peft_type = "IA3"

    def to_peft(self) -> dict:
        return {"peft_type": "IA3", "target_modules": self.targets,
                "feedforward_modules": self.feedforward, "fan_in_fan_out": False,
                "init_ia3_weights": True, "modules_to_save": None, "task_type": None}

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "IA3Config":
        """The paper's placement for the architecture (a table entry, else found from the
        model's layer names), or the run's own targets (its feed-forward scales on the ones
        among them that are feed-forward)."""
        placed = _placement(model_type, linear, IA3_TARGETS, ("key_value", "mlp_out"), "ia3")
        default, ff = (placed if isinstance(placed, tuple) else
                       (placed["key_value"] + placed["mlp_out"], placed["mlp_out"]))
        targets = run.target_list()
        if targets == "all-linear":
            return cls(targets=default, feedforward=ff)
        return cls(targets=targets, feedforward=[t for t in ff if t in targets])

    @classmethod
    def from_peft(cls, cfg: dict) -> "IA3Config":
        ff = _targets(cfg, "feedforward_modules", required=False) or []
        return cls(targets=_targets(cfg), feedforward=[ff] if isinstance(ff, str) else ff)


@dataclass
class BottleneckConfig:
    """Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751 §2.1): h + up(f(down(h))) after
    the attention output and the feed-forward output of each layer; up = 0 so init is identity."""
    size: int = 64  # bottleneck width m; Houlsby et al. sweep m in {8, 64, 256}
    non_linearity: str = "gelu"  # f; Houlsby et al. Fig. 2
    targets: Targets = field(default_factory=lambda: ["o_proj", "down_proj"])
    peft_type = "BOTTLENECK"

    def to_peft(self) -> dict:
        return {"peft_type": "BOTTLENECK", "bottleneck_size": self.size,
                "non_linearity": self.non_linearity, "target_modules": self.targets,
                "task_type": None}

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "BottleneckConfig":
        targets = run.target_list()
        if targets == "all-linear":  # Houlsby et al.'s placement for the architecture
            placed = _placement(model_type, linear, BOTTLENECK_TARGETS,
                                ("attn_out", "mlp_out"), "bottleneck")
            targets = placed if isinstance(placed, list) else \
                placed["attn_out"] + placed["mlp_out"]
        return cls(size=run.bottleneck_size, targets=targets)

    @classmethod
    def from_peft(cls, cfg: dict) -> "BottleneckConfig":
        act = cfg.get("non_linearity", "gelu")
        if not isinstance(act, str):  # the layer checks the name itself
            raise ValueError(f"'non_linearity' must be a string, got {_show(act)}")
        return cls(size=_int(cfg, "bottleneck_size", 1, MAX_RANK), non_linearity=act,
                   targets=_targets(cfg))


@dataclass
class PromptTuningConfig:
    """Prompt tuning (Lester et al. 2021, arXiv:2104.08691): trainable virtual-token embeddings
    prepended to the input. §3: init from vocabulary text beats random."""
    num_virtual_tokens: int = 20  # Lester et al. Fig. 3: gains flatten past ~20 tokens
    init_text: str | None = None  # initialise from this text's token embeddings (repeated)
    peft_type = "PROMPT_TUNING"

    def to_peft(self) -> dict:
        return {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": self.num_virtual_tokens, "num_transformer_submodules": 1,
                "prompt_tuning_init": "TEXT" if self.init_text else "RANDOM",
                "prompt_tuning_init_text": self.init_text}

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "PromptTuningConfig":
        return cls(num_virtual_tokens=run.num_virtual_tokens)

    @classmethod
    def from_peft(cls, cfg: dict) -> "PromptTuningConfig":
        text = cfg.get("prompt_tuning_init_text")
        if text is not None and not isinstance(text, str):
            raise ValueError("prompt_tuning_init_text must be a string or null")
        return cls(num_virtual_tokens=_int(cfg, "num_virtual_tokens", 1, MAX_VIRTUAL_TOKENS),
                   init_text=text)


@dataclass
class PrefixTuningConfig:
    """Prefix tuning (Li & Liang 2021, arXiv:2101.00190): trainable key/value prefixes at every
    layer, fed through the model's KV cache. Stored directly (no reparametrisation MLP)."""
    num_virtual_tokens: int = 20  # Li & Liang §7.1: prefix length 10-200, 200 best on summarisation
    peft_type = "PREFIX_TUNING"

    def to_peft(self) -> dict:
        """The model's geometry (num_layers, num_attention_heads, token_dim) is added by the
        slot module that holds the prefixes (prompt.VirtualTokens.peft_fields)."""
        return {"peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM",
                "num_virtual_tokens": self.num_virtual_tokens, "num_transformer_submodules": 1,
                "prefix_projection": False}

    @classmethod
    def from_run(cls, run, model_type: str, linear=()) -> "PrefixTuningConfig":
        return cls(num_virtual_tokens=run.num_virtual_tokens)

    @classmethod
    def from_peft(cls, cfg: dict) -> "PrefixTuningConfig":
        if _bool(cfg, "prefix_projection"):
            raise ValueError("prefix_projection=true is not supported")
        return cls(num_virtual_tokens=_int(cfg, "num_virtual_tokens", 1, MAX_VIRTUAL_TOKENS))


CONFIGS = {c.peft_type: c for c in (LoraConfig, IA3Config, BottleneckConfig, PromptTuningConfig,
                                    PrefixTuningConfig)}
AdapterConfig = LoraConfig | IA3Config | BottleneckConfig | PromptTuningConfig | PrefixTuningConfig


def config_from_peft(cfg: dict, where: str) -> AdapterConfig:
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        shown = repr(kind)[:60]
        raise PeftkitError(f"{where}: unknown peft_type {shown} (supported: {', '.join(CONFIGS)})")
    try:
        return CONFIGS[kind].from_peft(cfg)
    except KeyError as e:
        raise PeftkitError(f"{where}: {kind} config lacks field {e}") from None
    except (TypeError, ValueError, PeftkitError) as e:
        raise PeftkitError(f"{where}: {str(e)[:200]}") from None


# -- strict field readers: types as PEFT's dataclass declares them, no bool("false") == True --

def _int(cfg: dict, key: str, lo: int, hi: int) -> int:
    v = cfg[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"'{key}' must be an integer, got {_show(v)}")
    if not lo <= v <= hi:
        raise ValueError(f"'{key}' = {_show(v)} is outside [{lo}, {hi}]")
    return v


def _float(cfg: dict, key: str, default: float, hi: float) -> float:
    v = cfg.get(key, default)
    if v is None:
        v = default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"'{key}' must be a number, got {_show(v)}")
    if not math.isfinite(v) or abs(v) > hi:  # json reads 1e999 as inf
        raise ValueError(f"'{key}' = {_show(v)} is not a finite number within ±{hi:g}")
    return float(v)


def _bool(cfg: dict, key: str) -> bool:
    v = cfg.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"'{key}' must be true or false, got {_show(v)}")
    return v


def _targets(cfg: dict, key: str = "target_modules", required: bool = True):
    v = cfg[key] if required else cfg.get(key)
    if v is None and not required:
        return None
    if isinstance(v, str) and v:
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return v
    raise ValueError(f"'{key}' must be a module name, a regex or a list of names, got {_show(v)}")


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."
