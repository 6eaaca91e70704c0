"""Bottleneck adapters: the config (our own BOTTLENECK type, docs/adapter-format.md) and the
spec. Torch-free; the layer is methods/bottleneck.py."""

from dataclasses import dataclass, field

from peftkit.methods.base import (MAX_RANK, MethodSpec, Targets, frozen_embeddings, placement,
                                  read_int, read_targets, shown)

# Houlsby et al. 2019: after the attention and MLP output projections, per architecture.
BOTTLENECK_TARGETS = {"llama": ["o_proj", "down_proj"], "bert": ["output.dense"]}


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
            placed = placement(model_type, linear, BOTTLENECK_TARGETS,
                                ("attn_out", "mlp_out"), "bottleneck")
            targets = placed if isinstance(placed, list) else \
                placed["attn_out"] + placed["mlp_out"]
        return cls(size=run.bottleneck_size, targets=targets)

    @classmethod
    def from_peft(cls, cfg: dict) -> "BottleneckConfig":
        act = cfg.get("non_linearity", "gelu")
        if not isinstance(act, str):  # the layer checks the name itself
            raise ValueError(f"'non_linearity' must be a string, got {shown(act)}")
        return cls(size=read_int(cfg, "bottleneck_size", 1, MAX_RANK), non_linearity=act,
                   targets=read_targets(cfg))


# -- the planner's rules --

def _bottleneck_params(shape, s) -> int:  # two adapters a layer: down, up and their biases
    return shape.layers * 2 * (2 * s.bottleneck * shape.hidden + s.bottleneck + shape.hidden)


def _bottleneck_saved(shape, s, d) -> float:  # its input (the wrapped layer's output), 2 x width
    return sum(d["lin"][n][1] + 2 * s.bottleneck for n in BOTTLENECK_TARGETS["llama"]
               if n in d["lin"])


def _bottleneck_first_layer(shape, s, d) -> float:  # nothing trains before the o_proj adapter
    return frozen_embeddings(shape, s, d) + 4 * d["q"] + d["heads"]


SPECS = {
    "bottleneck": MethodSpec(BottleneckConfig, "peftkit.methods.bottleneck:BottleneckLinear",
                             lr=1e-3, classify_lr=1e-3, mixed_batch=False, joint=False,
                             params=_bottleneck_params, saved=_bottleneck_saved,
                             first_layer=_bottleneck_first_layer,
                             not_mergeable="bottleneck adapters are nonlinear (up(f(down(h)))) "
                                           "and cannot be folded into a linear weight"),
}
