"""Adding adapters to a loaded transformers model: target selection, module replacement, the
`AdaptedModel` wrapper (routing, disable, merge), and PEFT's trainable-parameter report.

Target rules follow PEFT: a list matches a module whose name equals an entry or ends with
`.entry`; a string is a regex that must match the full name; "all-linear" takes every linear
layer except the output head (and a classification head).
"""

import difflib
import re
from contextlib import contextmanager

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterConfig
from peftkit.methods.layers import FrozenLinear, SlotRouter, is_linear
from peftkit.methods.prompt import VirtualTokens
from peftkit.methods.registry import layer_for, spec_of

HEAD_NAMES = ("lm_head", "score", "classifier")


def find_targets(model: nn.Module, targets) -> list[str]:
    """Names of the linear modules `targets` selects; an error names what matched nothing."""
    linear = [n for n, m in model.named_modules() if is_linear(m) or isinstance(m, FrozenLinear)]
    if targets == "all-linear":
        out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        return [n for n in linear if model.get_submodule(n) is not out_emb
                and n.split(".")[-1] not in HEAD_NAMES]
    if isinstance(targets, str):
        chosen = [n for n in linear if re.fullmatch(targets, n)]
        if not chosen:
            raise PeftkitError(f"target regex {targets!r} matches no linear module "
                               f"(e.g. {', '.join(linear[:3])})")
        return chosen
    chosen = []
    leaf_names = sorted({n.split(".")[-1] for n in linear})
    for t in targets:
        hits = [n for n in linear if n == t or n.endswith("." + t)]
        if not hits:
            close = difflib.get_close_matches(t, leaf_names, n=3, cutoff=0.5) or leaf_names[:5]
            raise PeftkitError(f"target module '{t}' not found in the base "
                               f"(closest: {', '.join(close)})")
        chosen += hits
    return sorted(set(chosen), key=linear.index)


BLOCK = re.compile(r"^(.*?\.)?\d+\.")  # "model.layers.3." -> the rest is block-relative


def in_block(name: str) -> str:
    """A module's name within its block ("model.layers.3.mlp.c_proj" -> "mlp.c_proj"): what
    tells GPT-2's attention c_proj from its MLP c_proj."""
    return BLOCK.sub("", name, count=1)


def fused_weights(model: nn.Module) -> dict[str, int]:
    """Weights no adapter here wraps, by block-relative name -> parameters over all blocks:
    the 3-D stacks in which transformers keeps a mixture of experts (Mixtral, Qwen3-MoE).
    They stay frozen (and unquantized by QLoRA); reports and `inspect` name them."""
    found: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, (FrozenLinear, VirtualTokens)):  # adapters' own stacks are 3-D
            continue
        for name, p in module.named_parameters(recurse=False):
            if p.dim() >= 3:
                key = in_block(f"{module_name}.{name}")
                found[key] = found.get(key, 0) + p.numel()
    return found


def not_adapted_note(model: nn.Module) -> str | None:
    """One line naming the fused expert weights a layer adapter leaves out, or None."""
    fused = fused_weights(model)
    if not fused:
        return None
    return (f"not adapted: {', '.join(fused)} ({sum(fused.values()):,d} parameters of fused "
            "3-D expert weights stay frozen; the adapter covers the linear layers)")


def _checkpointing(model: nn.Module) -> bool:
    """Whether `model` recomputes activations in backward (transformers 5 renamed the flag;
    the old name warns)."""
    if hasattr(type(model), "is_activation_checkpointing"):
        return bool(model.is_activation_checkpointing)
    return bool(getattr(model, "is_gradient_checkpointing", False))


class AdaptedModel(nn.Module):
    """A transformers model with one adapter method in S slots.

    `forward(..., slots=None)` runs every row on slot 0; `slots=LongTensor(B)` picks a slot per
    row (-1 = base only). The wrapped model keeps its own parameter names.
    """

    def __init__(self, model: nn.Module, config: AdapterConfig, slot_names: list[str]):
        super().__init__()
        self.model = model
        self.config = config
        self.slot_names = list(slot_names)
        self.slot_configs: list[AdapterConfig] = [config] * len(slot_names)
        self.router = SlotRouter()
        self.virtual: VirtualTokens | None = None

    @property
    def n_slots(self) -> int:
        return len(self.slot_names)

    def adapted_layers(self) -> dict[str, FrozenLinear]:
        return {n: m for n, m in self.model.named_modules() if isinstance(m, FrozenLinear)}

    def slot_modules(self) -> dict[str, nn.Module]:
        """Every module holding adapter slots, by its path in the model: the adapted layers,
        or the virtual tokens (path "": model-level). All share one slot interface."""
        return {"": self.virtual} if self.virtual is not None else self.adapted_layers()

    def adapter_parameters(self) -> list[nn.Parameter]:
        """Every adapter parameter (never a base weight), whether trainable now or not."""
        return [p for m in self.slot_modules().values() for p in m.adapter_parameters()]

    def slot_index(self, name: str) -> int:
        if name not in self.slot_names:
            raise PeftkitError(f"unknown adapter '{name}' (loaded: {', '.join(self.slot_names)})")
        return self.slot_names.index(name)

    def forward(self, input_ids=None, attention_mask=None, labels=None, slots=None, **kw):
        if attention_mask is None and input_ids is not None and "position_ids" not in kw:
            attention_mask = torch.ones_like(input_ids)  # (packed rows bring positions instead)
        self.router.slots = slots
        try:
            if self.virtual is not None and self.router.enabled:
                return self.virtual(self.model, input_ids, attention_mask, labels, slots, **kw)
            if labels is not None:
                kw["labels"] = labels
            return self.model(input_ids=input_ids, attention_mask=attention_mask, **kw)
        finally:
            if not self._recomputed():
                self.router.slots = None

    def _recomputed(self) -> bool:
        """Whether backward will run this forward's layers again (gradient checkpointing): then
        the routing stays until the next forward (or `train()`/`eval()`), or the recomputed
        rows would run unrouted (PEFT keeps its forward hooks alive for the same reason)."""
        return (self.training and torch.is_grad_enabled()
                and _checkpointing(self.model))

    def train(self, mode: bool = True):
        self.router.slots = None  # a training forward's routing ends with training
        return super().train(mode)

    @contextmanager
    def pinned(self, k: int):
        """Every row of every forward (generation included) on slot k inside this block."""
        self.router.pinned = k
        try:
            yield self
        finally:
            self.router.pinned = 0

    @contextmanager
    def disable_adapter(self):
        """Run the base model alone inside this block."""
        self.router.enabled = False
        try:
            yield self
        finally:
            self.router.enabled = True

    def merge(self, slot: int = 0) -> None:
        """Fold one slot into the base weights (explicit; never a side effect of eval())."""
        if self.virtual is not None:
            raise PeftkitError(f"{self.config.peft_type} adds tokens and cannot be merged")
        for layer in self.adapted_layers().values():
            layer.merge(slot)

    def unmerge(self) -> None:
        for layer in self.adapted_layers().values():
            layer.unmerge()

    def trainable_report(self) -> str:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return (f"trainable params: {trainable:,d} || all params: {total:,d} || "
                f"trainable%: {100 * trainable / total:.4f}")


def add_adapter(model: nn.Module, config: AdapterConfig, slots: int = 1,
                names: list[str] | None = None, tokenizer=None, init: bool = True,
                modules: dict[str, AdapterConfig] | None = None,
                r: int | None = None) -> AdaptedModel:
    """Freeze `model` and add `config`'s method with `slots` slots, initialised (trainable) or,
    with `init` False, left empty for `write_slot`. `modules`: the layers to adapt, each with
    the config it is built from (loading adapters whose targets differ), instead of the
    config's targets; `r`: a LoRA stack's rank when it exceeds the config's."""
    names = names or (["default"] if slots == 1 else [f"slot{i}" for i in range(slots)])
    if len(names) != slots:
        raise PeftkitError(f"{slots} slots need {slots} names, got {len(names)}")
    for p in model.parameters():
        p.requires_grad_(False)
    adapted = AdaptedModel(model, config, names)
    if spec_of(config).layer is None:  # model-level: virtual tokens
        adapted.virtual = VirtualTokens.from_config(model, config, slots, tokenizer)
    else:
        for name, cfg in (modules or dict.fromkeys(find_targets(model, config.targets),
                                                   config)).items():
            model.set_submodule(name, make_layer(model.get_submodule(name), name, cfg,
                                                 adapted.router, slots, r))
    for module in adapted.slot_modules().values() if init else ():
        for k in range(slots):
            module.init_slot(k, config)
    return adapted


def make_layer(base: nn.Module, name: str, config: AdapterConfig, router: SlotRouter, slots: int,
               r: int | None = None) -> FrozenLinear:
    if isinstance(base, FrozenLinear):
        raise PeftkitError(f"module '{name}' already has an adapter")
    return layer_for(config).from_config(base, name, config, router, slots, r)
