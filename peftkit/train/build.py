"""One method name -> the model to train and its trainable parameters (run_dir.py saves it)."""

from dataclasses import dataclass, field

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods import add_adapter
from peftkit.methods.inject import find_targets, not_adapted_note
from peftkit.methods.spec import SPECS, spec_for
from peftkit.models import Base, load_base, peek_config
from peftkit.quant import QuantConfig
from peftkit.train.config import TrainConfig
from peftkit.train.heads import Head, SequenceClassifier, pooling_for


@dataclass
class Trainee:
    config: TrainConfig
    task: str
    base: Base
    module: nn.Module  # causal LM: takes input_ids/attention_mask/labels; classify: a SequenceClassifier
    params: list[nn.Parameter]
    adapted: object = None  # AdaptedModel for PEFT methods
    head: Head | None = None
    label_names: list[str] = field(default_factory=list)
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # forwards autocast to it (a no-op for float32)
    not_adapted: str | None = None  # weights a layer adapter leaves out (MoE experts), said
    slot: int = 0  # its slot of the model's adapter stack (a joint run's tenant: its own)
    modules: list[str] | None = None  # the adapted modules it saves (None: all of them)


def adapter_config(cfg: TrainConfig, model=None):
    """The method's adapter config from the run's flags (each config class's `from_run`), its
    default placement read from `model`'s architecture."""
    model_type = model.config.model_type if model is not None else "llama"
    linear = find_targets(model, "all-linear") if model is not None else ()
    return spec_for(cfg.method).config.from_run(cfg, model_type, linear)


def quant_for(method: str, dtype: torch.dtype) -> QuantConfig | None:
    """The NF4 settings of a QLoRA run computing in `dtype`: one place, for training and for
    loading the run back (run_dir.load_run), so both build, and cache, the same base."""
    if method != "qlora":
        return None
    return QuantConfig(compute_dtype=str(dtype).removeprefix("torch."))


SEQ2SEQ_FAMILIES = ("t5", "mt5", "bart", "mbart", "pegasus", "marian", "umt5", "longt5")


def check_family(cfg: TrainConfig, task: str) -> None:
    """What a model family cannot do with a method, said from its config before any weight
    loads, in one line with what to use instead."""
    config = peek_config(cfg.model)
    kind = config.model_type
    if task == "classify" and cfg.method in CAUSAL_ONLY:
        raise PeftkitError(f"--method {cfg.method}: virtual tokens train a causal LM's "
                           f"generation; a {kind} classifier trains with lora, dora, qlora, ia3, "
                           "bottleneck, full or probe")
    if kind in SEQ2SEQ_FAMILIES:
        raise PeftkitError(f"--model {cfg.model}: {kind} is an encoder-decoder (seq2seq) model, "
                           "which peftkit does not train; use a decoder (llama, qwen2, ...) or "
                           "an encoder for classification")
    if cfg.method in ("ia3", "bottleneck") and cfg.targets == "all-linear" and (
            getattr(config, "num_local_experts", 0) or getattr(config, "num_experts", 0)):
        raise PeftkitError(f"--method {cfg.method}: {kind}'s MLP is a mixture of experts, whose "
                           "weights are not linear layers here; name attention layers with "
                           "--targets, or use --method lora (attention)")


def build(cfg: TrainConfig, task: str, label_names: list[str], device=None) -> Trainee:
    """`device` overrides the config's (a distributed rank's own GPU)."""
    check_family(cfg, task)
    placed, dtype, attn = cfg.placement()
    device = device or placed
    quant = quant_for(cfg.method, dtype)
    # Full fine-tuning trains every weight: float32 masters, autocast to `dtype`. Every other
    # method freezes the base, which then lives in `dtype` itself.
    where = dict(device=device, attn=attn,
                 dtype=torch.float32 if cfg.method == "full" else dtype)
    if task == "classify":
        trainee = _build_classifier(cfg, label_names, quant, where)
    else:
        trainee = _build_lm(cfg, quant, where)
    if trainee.head is not None:
        trainee.head.to(device)
    if trainee.adapted is not None and trainee.adapted.virtual is None:
        trainee.not_adapted = not_adapted_note(trainee.base.model)
    trainee.device, trainee.dtype = device, dtype
    return trainee


def _build_lm(cfg: TrainConfig, quant, where: dict) -> Trainee:
    task = "causal-lm"
    if cfg.method == "probe" and cfg.probe_head != "linear":  # before any weight loads
        raise PeftkitError(f"--probe-head {cfg.probe_head}: a causal-LM probe trains the output "
                           "head itself (linear, the vocabulary projection); mlp heads are for "
                           "classifiers")
    base = load_base(cfg.model, task=task, quantize=quant, **where)
    model = base.model
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable()
    if cfg.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return Trainee(cfg, task, base, model, list(model.parameters()))
    if cfg.method == "probe":  # the seed's "only the final layer adapts": the output head alone
        for p in model.parameters():
            p.requires_grad_(False)
        out = model.get_output_embeddings()
        head = Head(out.in_features, out.out_features)
        with torch.no_grad():  # start from the pretrained head (untied copy), no bias
            head.net.weight.copy_(out.weight)
            head.net.bias.zero_()
        return Trainee(cfg, task, base, model, list(head.parameters()), head=head)
    torch.manual_seed(cfg.seed)  # the adapter's init depends on the seed alone (joint.py too)
    adapted = add_adapter(model, adapter_config(cfg, model),
                          tokenizer=base.tokenizer)
    if cfg.grad_checkpointing:
        model.enable_input_require_grads()
    return Trainee(cfg, task, base, adapted, adapted.adapter_parameters(), adapted=adapted)


CAUSAL_ONLY = tuple(n for n, s in SPECS.items() if s.virtual)  # a causal LM's tokens or cache


def _build_classifier(cfg: TrainConfig, label_names: list[str], quant, where: dict) -> Trainee:
    base = load_base(cfg.model, task="encoder", quantize=quant, **where)  # backbone, no head
    backbone = base.model
    if cfg.grad_checkpointing:
        backbone.gradient_checkpointing_enable()
    head = Head(backbone.config.hidden_size, len(label_names),
                cfg.probe_head if cfg.method == "probe" else "linear")
    adapted = None
    if cfg.method == "full":
        for p in backbone.parameters():
            p.requires_grad_(True)
        body_params = list(backbone.parameters())
    elif cfg.method == "probe":
        for p in backbone.parameters():
            p.requires_grad_(False)
        body_params = []
    else:
        adapted = add_adapter(backbone, adapter_config(cfg, backbone))
        backbone, body_params = adapted, adapted.adapter_parameters()
    clf = SequenceClassifier(backbone, head, pooling_for(base.model.config))
    return Trainee(cfg, "classify", base, clf, body_params + list(head.parameters()),
                   adapted=adapted, head=head, label_names=label_names)
