"""The adapter methods' torch side, derived from their specs (methods/spec.py): each method's
layer class, and every layer's per-module tensor names.

Every layer class has the same slot interface, which formats.py and the server use without
knowing the method: `KEYS` (its PEFT tensor names per module), `from_config(base, name, config,
router, slots, r)`, `init_slot(k, config, rank=None)`, `slot_shapes(config)`,
`write_slot(k, tensors, config)`, `read_slot(k, config)`, `clear_slot(k)`. Every config class
maps a training run's flags to itself (`from_run`).
"""

from peftkit.errors import PeftkitError
from peftkit.methods.lora_spec import LoraConfig
from peftkit.methods.spec import SPECS, MethodSpec

LAYERS = tuple(dict.fromkeys(s.layer_class() for s in SPECS.values() if s.layer))
KEYS = tuple(key for layer in LAYERS for key in layer.KEYS)  # every per-module tensor name


def method_of(config) -> str:
    """The spec name of an adapter config (DoRA is a LoRA config with use_dora)."""
    if isinstance(config, LoraConfig):
        return "dora" if config.use_dora else "lora"
    for name, spec in SPECS.items():
        if isinstance(config, spec.config):
            return name
    raise PeftkitError(f"unsupported adapter config {type(config).__name__}")


def spec_of(config) -> MethodSpec:
    return SPECS[method_of(config)]


def layer_for(config) -> type:
    return spec_of(config).layer_class()
