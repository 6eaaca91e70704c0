"""Prompt and prefix tuning: the configs (PEFT's PROMPT_TUNING and PREFIX_TUNING types) and the
specs. Torch-free; their virtual tokens are methods/prompt.py's `VirtualTokens`."""

from dataclasses import dataclass

from peftkit.methods.base import MAX_VIRTUAL_TOKENS, MethodSpec, read_bool, read_int


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
        return cls(num_virtual_tokens=read_int(cfg, "num_virtual_tokens", 1, MAX_VIRTUAL_TOKENS),
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
        if read_bool(cfg, "prefix_projection"):
            raise ValueError("prefix_projection=true is not supported")
        return cls(num_virtual_tokens=read_int(cfg, "num_virtual_tokens", 1, MAX_VIRTUAL_TOKENS))


# -- the planner's rules --

def _prompt_params(shape, s) -> int:
    return s.virtual_tokens * shape.hidden


def _prefix_params(shape, s) -> int:  # a key and a value per layer, grouped-query heads
    return s.virtual_tokens * shape.layers * 2 * shape.kv_heads * (shape.hidden // shape.heads)


def _none_saved(shape, s, d) -> float:  # a frozen layer, over a longer sequence
    return 0


def _nothing_before(shape, s, d) -> float:  # the virtual tokens need gradients from layer 0
    return 0


VIRTUAL = "{} tuning adds virtual tokens at every request; there is no weight to fold them into"
SPECS = {
    "prefix": MethodSpec(PrefixTuningConfig, None, lr=1e-2, classify_lr=1e-2, mixed_batch=False,
                         joint=False, params=_prefix_params, saved=_none_saved, virtual="kv",
                         not_mergeable=VIRTUAL.format("prefix")),
    "prompt": MethodSpec(PromptTuningConfig, None, lr=3e-2, classify_lr=3e-2, mixed_batch=False,
                         joint=False, params=_prompt_params, saved=_none_saved, virtual="input",
                         first_layer=_nothing_before, not_mergeable=VIRTUAL.format("prompt")),
}
