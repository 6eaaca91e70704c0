"""Adapter methods: LoRA (rsLoRA, DoRA), IA³, bottleneck, prompt and prefix tuning."""

from peftkit.methods.config import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                                    PromptTuningConfig)
from peftkit.methods.inject import AdaptedModel, add_adapter, find_targets

__all__ = ["AdaptedModel", "add_adapter", "find_targets", "LoraConfig", "IA3Config",
           "BottleneckConfig", "PromptTuningConfig", "PrefixTuningConfig"]
