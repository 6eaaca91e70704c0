"""The one table of adapter methods: name -> config class (which carries PEFT's `peft_type`
and its to/from_peft mapping), layer class, default targets per architecture, and whether its
adapters join the server's shared LoRA batch.

Every layer class has the same slot interface, which formats.py and the server use without
knowing the method: `KEYS` (its PEFT tensor names per module), `from_config(base, name, config,
router, slots, r)`, `init_slot(k, config, rank=None)`, `slot_shapes(config)`,
`write_slot(k, tensors, config)`, `read_slot(k, config)`, `clear_slot(k)`. Every config class
maps a training run's flags to itself (`from_run`). Adding a method: its config class
(config.py), its layer (one file), and one line here.
"""

from dataclasses import dataclass

from peftkit.errors import PeftkitError
from peftkit.methods.bottleneck import BottleneckLinear
from peftkit.methods.config import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                                    PromptTuningConfig)
from peftkit.methods.ia3 import IA3Linear
from peftkit.methods.lora import LoraLinear


@dataclass(frozen=True)
class Method:
    config: type
    layer: type | None  # None: model-level virtual tokens (methods/prompt.py), no layer
    mixed_batch: bool  # served in the shared LoRA batch (vLLM's rule: LoRA/rsLoRA only)


ADAPTER_METHODS = {
    "lora": Method(LoraConfig, LoraLinear, mixed_batch=True),
    "dora": Method(LoraConfig, LoraLinear, mixed_batch=False),
    "ia3": Method(IA3Config, IA3Linear, mixed_batch=False),
    "bottleneck": Method(BottleneckConfig, BottleneckLinear, mixed_batch=False),
    "prompt": Method(PromptTuningConfig, None, mixed_batch=False),
    "prefix": Method(PrefixTuningConfig, None, mixed_batch=False),
}
LAYERS = tuple(dict.fromkeys(m.layer for m in ADAPTER_METHODS.values() if m.layer))
KEYS = tuple(key for layer in LAYERS for key in layer.KEYS)  # every per-module tensor name


def method_of(config) -> str:
    """The registry name of an adapter config (DoRA is a LoRA config with use_dora)."""
    if isinstance(config, LoraConfig):
        return "dora" if config.use_dora else "lora"
    for name, m in ADAPTER_METHODS.items():
        if isinstance(config, m.config):
            return name
    raise PeftkitError(f"unsupported adapter config {type(config).__name__}")


def layer_for(config) -> type:
    layer = ADAPTER_METHODS[method_of(config)].layer
    if layer is None:
        raise PeftkitError(f"{type(config).__name__} adds virtual tokens, not layers")
    return layer
