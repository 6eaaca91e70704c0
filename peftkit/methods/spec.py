"""One spec per adapter method: all that the rest of peftkit knows of a method outside its layer,
torch-free (the CLI's --help and the planner import it without torch).

The registry (its layer), the trainer (its name, default learning rates, what it can join or
run on), the planner (its parameters and the activations it saves) and export (whether it folds
into a weight) read these specs; none keeps a table of methods of its own. Every field without
a default is required, so a spec left incomplete fails when this module is imported, not after
a run has trained. Adding a per-layer method: its config class and layer file, one spec here.

The planner's rules take a model shape (plan/shapes.Shape), the run's sizes (plan/memory
.Settings: rank, targets, virtual tokens, bottleneck width, dropout) and, for the CPU memory
model, the Llama decoder layer's dimensions (plan/cpu._dims: h, q, heads, i, lin).
"""

import importlib
from dataclasses import dataclass
from typing import Callable

from peftkit.errors import PeftkitError
from peftkit.methods.config import (BOTTLENECK_TARGETS, IA3_TARGETS, BottleneckConfig, IA3Config,
                                    LoraConfig, PrefixTuningConfig, PromptTuningConfig)

FEEDFORWARD = ("down_proj", "dense_4h_to_h", "fc2", "w2", "c_proj")  # IA³ scales their input


def _frozen_embeddings(shape, s, d) -> float:
    """Floats per token layer 0 does not save under PEFT: the embeddings are frozen, so the
    input norm's input needs no gradient."""
    return d["h"] + 1


@dataclass(frozen=True)
class MethodSpec:
    config: type  # its config class: PEFT's adapter_config.json and the run's flags (from_run)
    layer: str | None  # "module:Class", imported when a model is built; None: virtual tokens
    lr: float  # default peak learning rate for a causal LM (--lr 0)
    classify_lr: float  # ... for a classifier (a new head on a pretrained body)
    mixed_batch: bool  # served in the shared LoRA batch (vLLM's rule: LoRA/rsLoRA only)
    joint: bool  # trains beside other tenants in one LoRA stack (`--tenants`)
    params: Callable  # (shape, sizes) -> trainable parameters the planner counts
    saved: Callable  # (shape, sizes, dims) -> floats per token one Llama layer saves beyond a frozen one
    first_layer: Callable = _frozen_embeddings  # (shape, sizes, dims) -> floats layer 0 does not save
    virtual: str | None = None  # "input": tokens before every row; "kv": before every layer's keys/values
    not_mergeable: str | None = None  # why it cannot fold into the base's weights (None: it can)

    def layer_class(self) -> type:
        if self.layer is None:
            raise PeftkitError(f"{self.config.__name__} adds virtual tokens, not layers")
        module, name = self.layer.split(":")
        return getattr(importlib.import_module(module), name)


# -- the planner's rules, per method --

def _lora_params(shape, s) -> int:
    return shape.layers * sum(s.rank * (i + o) for _, i, o in shape.targeted(s.targets))


def _dora_params(shape, s) -> int:  # + a magnitude per output
    return _lora_params(shape, s) + shape.layers * sum(o for _, _, o in shape.targeted(s.targets))


def _ia3_params(shape, s) -> int:
    """A scale per output (per input of a feed-forward layer) of the run's targets; by default
    keys, values and down_proj."""
    if s.targets != "all-linear":
        return shape.layers * sum(i if n in FEEDFORWARD else o
                                  for n, i, o in shape.targeted(s.targets))
    down = dict((n, i) for n, i, _ in shape.linear).get("down_proj", 0)
    return shape.layers * (2 * shape.kv_heads * shape.hidden // shape.heads + down)


def _bottleneck_params(shape, s) -> int:  # two adapters a layer: down, up and their biases
    return shape.layers * 2 * (2 * s.bottleneck * shape.hidden + s.bottleneck + shape.hidden)


def _prompt_params(shape, s) -> int:
    return s.virtual_tokens * shape.hidden


def _prefix_params(shape, s) -> int:  # a key and a value per layer, grouped-query heads
    return s.virtual_tokens * shape.layers * 2 * shape.kv_heads * (shape.hidden // shape.heads)


def _lora_saved(shape, s, d) -> float:
    """The input A multiplies (and dropout's noise, when dropout > 0) and x·Aᵀ per target;
    without dropout, targets sharing an input (q/k/v, gate/up) share its saved copy."""
    chosen = shape.targeted(s.targets)
    extra = s.rank * len(chosen)
    if s.dropout > 0:
        return extra + sum(2 * i for _, i, _ in chosen)
    groups = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "gate_proj": "mlp",
              "up_proj": "mlp"}
    return extra + sum(dict((groups.get(n, n), i) for n, i, _ in chosen).values())


def _dora_saved(shape, s, d) -> float:  # + a second dropout noise, the base and LoRA outputs
    return _lora_saved(shape, s, d) + sum((i if s.dropout > 0 else 0) + 2 * o
                                          for _, i, o in shape.targeted(s.targets))


def _lora_first_layer(shape, s, d) -> float:  # dropout's noise on a frozen input is not saved
    if s.dropout <= 0:
        return _frozen_embeddings(shape, s, d)
    noise = sum(i for n, i, _ in shape.targeted(s.targets) if n in ("q_proj", "k_proj", "v_proj"))
    return _frozen_embeddings(shape, s, d) + noise


def _dora_first_layer(shape, s, d) -> float:
    return 2 * _lora_first_layer(shape, s, d) - _frozen_embeddings(shape, s, d)


def _ia3_saved(shape, s, d) -> float:  # the vector scales the output (feed-forward: the input)
    return sum(i if n == "down_proj" else o for n, (i, o) in d["lin"].items()
               if n in IA3_TARGETS["llama"][0])


def _bottleneck_saved(shape, s, d) -> float:  # its input (the wrapped layer's output), 2 x width
    return sum(d["lin"][n][1] + 2 * s.bottleneck for n in BOTTLENECK_TARGETS["llama"]
               if n in d["lin"])


def _bottleneck_first_layer(shape, s, d) -> float:  # nothing trains before the o_proj adapter
    return _frozen_embeddings(shape, s, d) + 4 * d["q"] + d["heads"]


def _none_saved(shape, s, d) -> float:  # a frozen layer, over a longer sequence
    return 0


def _nothing_before(shape, s, d) -> float:  # the virtual tokens need gradients from layer 0
    return 0


VIRTUAL = "{} tuning adds virtual tokens at every request; there is no weight to fold them into"
SPECS = {
    "lora": MethodSpec(LoraConfig, "peftkit.methods.lora:LoraLinear", lr=2e-4, classify_lr=5e-4,
                       mixed_batch=True, joint=True, params=_lora_params, saved=_lora_saved,
                       first_layer=_lora_first_layer),
    "dora": MethodSpec(LoraConfig, "peftkit.methods.lora:LoraLinear", lr=2e-4, classify_lr=5e-4,
                       mixed_batch=False, joint=True, params=_dora_params, saved=_dora_saved,
                       first_layer=_dora_first_layer),
    "ia3": MethodSpec(IA3Config, "peftkit.methods.ia3:IA3Linear", lr=3e-3, classify_lr=3e-3,
                      mixed_batch=False, joint=False, params=_ia3_params, saved=_ia3_saved),
    "prefix": MethodSpec(PrefixTuningConfig, None, lr=1e-2, classify_lr=1e-2, mixed_batch=False,
                         joint=False, params=_prefix_params, saved=_none_saved, virtual="kv",
                         not_mergeable=VIRTUAL.format("prefix")),
    "prompt": MethodSpec(PromptTuningConfig, None, lr=3e-2, classify_lr=3e-2, mixed_batch=False,
                         joint=False, params=_prompt_params, saved=_none_saved, virtual="input",
                         first_layer=_nothing_before, not_mergeable=VIRTUAL.format("prompt")),
    "bottleneck": MethodSpec(BottleneckConfig, "peftkit.methods.bottleneck:BottleneckLinear",
                             lr=1e-3, classify_lr=1e-3, mixed_batch=False, joint=False,
                             params=_bottleneck_params, saved=_bottleneck_saved,
                             first_layer=_bottleneck_first_layer,
                             not_mergeable="bottleneck adapters are nonlinear (up(f(down(h)))) "
                                           "and cannot be folded into a linear weight"),
}
VARIANTS = {"qlora": "lora"}  # training names for a method on an NF4-quantized base (QLoRA)


def find_spec(method: str) -> MethodSpec | None:
    """The spec of an adapter method or of a variant's method (qlora: lora); None for the
    rest (full fine-tuning, the probe)."""
    return SPECS.get(VARIANTS.get(method, method))


def spec_for(method: str) -> MethodSpec:
    """`find_spec`, for a method that must be an adapter method."""
    spec = find_spec(method)
    if spec is None:
        raise PeftkitError(f"'{method}' is not an adapter method ({', '.join(SPECS)})")
    return spec


def training_names() -> tuple[str, ...]:
    """Every adapter method's name as `--method` takes it, each variant after its method."""
    return tuple(n for m in SPECS for n in (m, *[v for v, of in VARIANTS.items() if of == m]))


def virtual_at(method: str) -> str | None:
    """Where a training method adds virtual tokens ("input", "kv"); None for the rest, full
    fine-tuning and the probe included."""
    spec = find_spec(method)
    return spec.virtual if spec else None
