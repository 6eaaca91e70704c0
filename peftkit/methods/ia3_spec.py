"""(IA)³: the config (PEFT's IA3 type) and the spec. Torch-free; the layer is methods/ia3.py."""

from dataclasses import dataclass, field

from peftkit.methods.base import MethodSpec, Targets, placement, read_targets

# Where Liu et al. 2022 place IA³ per architecture (PEFT uses the same table): targets, of which
# feed-forward (their input is scaled, not their output).
IA3_TARGETS = {"llama": (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
               "bert": (["key", "value", "output.dense"], ["output.dense"])}
FEEDFORWARD = ("down_proj", "dense_4h_to_h", "fc2", "w2", "c_proj")  # IA³ scales their input


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
        placed = placement(model_type, linear, IA3_TARGETS, ("key_value", "mlp_out"), "ia3")
        default, ff = (placed if isinstance(placed, tuple) else
                       (placed["key_value"] + placed["mlp_out"], placed["mlp_out"]))
        targets = run.target_list()
        if targets == "all-linear":
            return cls(targets=default, feedforward=ff)
        return cls(targets=targets, feedforward=[t for t in ff if t in targets])

    @classmethod
    def from_peft(cls, cfg: dict) -> "IA3Config":
        ff = read_targets(cfg, "feedforward_modules", required=False) or []
        return cls(targets=read_targets(cfg), feedforward=[ff] if isinstance(ff, str) else ff)


# -- the planner's rules --

def _ia3_params(shape, s) -> int:
    """A scale per output (per input of a feed-forward layer) of the run's targets; by default
    keys, values and down_proj."""
    if s.targets != "all-linear":
        return shape.layers * sum(i if n in FEEDFORWARD else o
                                  for n, i, o in shape.targeted(s.targets))
    down = dict((n, i) for n, i, _ in shape.linear).get("down_proj", 0)
    return shape.layers * (2 * shape.kv_heads * shape.hidden // shape.heads + down)


def _ia3_saved(shape, s, d) -> float:  # the vector scales the output (feed-forward: the input)
    return sum(i if n == "down_proj" else o for n, (i, o) in d["lin"].items()
               if n in IA3_TARGETS["llama"][0])


SPECS = {"ia3": MethodSpec(IA3Config, "peftkit.methods.ia3:IA3Linear", lr=3e-3, classify_lr=3e-3,
                           mixed_batch=False, joint=False, params=_ia3_params,
                           saved=_ia3_saved)}
