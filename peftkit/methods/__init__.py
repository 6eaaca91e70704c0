"""Adapter methods: LoRA (rsLoRA, DoRA), IA³, bottleneck, prompt and prefix tuning.

The configs and specs import without torch (the CLI's --help, the planner); the model-side
names (`AdaptedModel`, `add_adapter`, `find_targets`) load torch when first used."""

from peftkit.methods.bottleneck_spec import BottleneckConfig
from peftkit.methods.ia3_spec import IA3Config
from peftkit.methods.lora_spec import LoraConfig
from peftkit.methods.prompt_spec import PrefixTuningConfig, PromptTuningConfig

__all__ = ["AdaptedModel", "add_adapter", "find_targets", "LoraConfig", "IA3Config",
           "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig"]


def __getattr__(name: str):
    if name in ("AdaptedModel", "add_adapter", "find_targets"):
        from peftkit.methods import inject
        return getattr(inject, name)
    raise AttributeError(f"module 'peftkit.methods' has no attribute '{name}'")
