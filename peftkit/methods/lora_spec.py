"""LoRA and DoRA: the config (PEFT's LORA type) and the specs. Torch-free; the layer is
methods/lora.py."""

import math
from dataclasses import dataclass, field

from peftkit.errors import PeftkitError
from peftkit.methods.base import (MAX_ALPHA, MAX_RANK, MethodSpec, Targets, frozen_embeddings,
                                  read_bool, read_float, read_int, read_targets)


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
        return cls(r=read_int(cfg, "r", 1, MAX_RANK), alpha=read_float(cfg, "lora_alpha", 8.0, MAX_ALPHA),
                   dropout=read_float(cfg, "lora_dropout", 0.0, 1.0),
                   targets=read_targets(cfg), use_rslora=read_bool(cfg, "use_rslora"),
                   use_dora=read_bool(cfg, "use_dora"),
                   init="kaiming" if init is True else str(init))


# -- the planner's rules --

def _lora_params(shape, s) -> int:
    return shape.layers * sum(s.rank * (i + o) for _, i, o in shape.targeted(s.targets))


def _dora_params(shape, s) -> int:  # + a magnitude per output
    return _lora_params(shape, s) + shape.layers * sum(o for _, _, o in shape.targeted(s.targets))


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
        return frozen_embeddings(shape, s, d)
    noise = sum(i for n, i, _ in shape.targeted(s.targets) if n in ("q_proj", "k_proj", "v_proj"))
    return frozen_embeddings(shape, s, d) + noise


def _dora_first_layer(shape, s, d) -> float:
    return 2 * _lora_first_layer(shape, s, d) - frozen_embeddings(shape, s, d)


SPECS = {
    "lora": MethodSpec(LoraConfig, "peftkit.methods.lora:LoraLinear", lr=2e-4, classify_lr=5e-4,
                       mixed_batch=True, joint=True, params=_lora_params, saved=_lora_saved,
                       first_layer=_lora_first_layer),
    "dora": MethodSpec(LoraConfig, "peftkit.methods.lora:LoraLinear", lr=2e-4, classify_lr=5e-4,
                       mixed_batch=False, joint=True, params=_dora_params, saved=_dora_saved,
                       first_layer=_dora_first_layer),
}
