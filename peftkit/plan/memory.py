"""The memory and time model, per approach. One model for GPU plans and for validating the
trainer's measured CPU runs (cpu.py).

Parameter state, bytes per parameter (Adam: two fp32 moments):
  full, fp32            weights 4 + grads 4 + Adam 8             = 16  (70B: 1120 GB)
  full, mixed precision bf16 weights 2 + bf16 grads 2 + fp32 master 4 + Adam 8 = 16
  probe                 base at inference precision + a head trained like full
  LoRA                  base at inference precision + adapter weights 4 + (grads 4 + Adam 8 = 12)
  QLoRA                 NF4 linear layers at 4.127 bits (codes + double-quantized absmax),
                        embeddings/head at 16 bit, + the adapter as in LoRA
  8-bit Adam            the two moments take 1 byte each instead of 4 (Dettmers et al. 2022)
Activations per layer (Korthikanti et al. 2022, arXiv:2205.05198, Eq. 2, 16-bit, no tensor
parallelism): s·b·h·(34 + 5·a·s/h) bytes; with full activation checkpointing 2·s·b·h per layer
plus one layer recomputed; fp32 training doubles both. Logits: s·b·V at 4 bytes, twice (the
values and their gradient). PEFT backpropagates through the frozen base, so its activations are
those of full fine-tuning; the probe runs forward only (one layer's activations at a time).
Time: FLOPs per trained token = 6N (full), 4N (PEFT: no weight gradients for the base), 2N
(probe: forward only), at a stated utilisation of the GPU's bf16 peak.
"""

import math
from dataclasses import dataclass

from peftkit.methods.spec import spec_for
from peftkit.plan.shapes import Shape

GB = 1e9
NF4_BITS = 4.127  # 4-bit codes + 8-bit absmax per 64 + fp32 absmax per 64·256 (QLoRA §3)
NF4_TABLE_BYTES = (16 + 256) * 4 + 170  # per quantized matrix: code tables + packed state
CUDA_CONTEXT_GB = 1.0  # assumption: context + cuBLAS workspace
FRAGMENTATION = 0.05  # assumption: allocator slack on top of tensors
UTILISATION = {"full": 0.4, "full_mixed": 0.4, "probe": 0.4, "lora": 0.4, "qlora": 0.1}
# QLoRA's default is lower: every matmul dequantizes its NF4 weight first (assumption).
FLOPS_PER_TOKEN = {"full": 6, "full_mixed": 6, "probe": 2}
ADAPTER_FLOPS_PER_TOKEN = 4  # forward + input gradients; the frozen weights get none


@dataclass
class Settings:
    seq_len: int = 2048
    batch: int = 1
    rank: int = 16
    targets: object = "all-linear"
    grad_checkpointing: bool = True
    adam_8bit: bool = False
    head_outputs: int = 2  # classes for a probe head (the vocabulary for a causal-LM probe)
    embed_bytes: int = 2  # QLoRA: bytes per non-quantized parameter (QLoRA recipe: bf16)
    virtual_tokens: int = 20  # prompt / prefix tuning length (the run's, when planning a run)
    bottleneck: int = 64  # bottleneck adapter width
    dropout: float = 0.05  # LoRA / DoRA input dropout: the CPU model counts its saved noise

    @classmethod
    def from_train(cls, cfg, largest_batch, head_outputs: int, embed_bytes: int) -> "Settings":
        """A training run's own sizes (train/config.TrainConfig), at its largest batch."""
        rows, length = largest_batch
        return cls(seq_len=length, batch=rows, rank=cfg.rank, targets=cfg.target_list(),
                   grad_checkpointing=cfg.grad_checkpointing,
                   adam_8bit=cfg.optim != "adamw", head_outputs=head_outputs,
                   embed_bytes=embed_bytes, virtual_tokens=cfg.num_virtual_tokens,
                   bottleneck=cfg.bottleneck_size, dropout=cfg.dropout)


def adapter_params(shape: Shape, method: str, s: Settings) -> int:
    """Trainable parameters of an adapter method (or variant: qlora) at the sizes `s`."""
    return spec_for(method).params(shape, s)


def activation_bytes(shape: Shape, s: Settings, method: str, bytes_per_value: int = 2) -> float:
    sbh = s.seq_len * s.batch * shape.hidden
    per_layer = sbh * (34 + 5 * shape.heads * s.seq_len / shape.hidden) * bytes_per_value / 2
    logits = 2 * s.seq_len * s.batch * shape.vocab * 4
    if method == "probe":
        return per_layer + logits / 2
    if s.grad_checkpointing:
        return shape.layers * 2 * sbh * bytes_per_value / 2 + per_layer + logits
    return shape.layers * per_layer + logits


def parameter_state(shape: Shape, method: str, s: Settings, base_bytes: int = 2) -> dict:
    """Bytes of weights, gradients and optimizer states (no activations)."""
    n = shape.params
    moments = 2 if s.adam_8bit else 8
    if method == "full":
        return {"weights": 4 * n, "grads": 4 * n, "optimizer": moments * n}
    if method == "full_mixed":
        return {"weights": 2 * n, "grads": 2 * n, "optimizer": (4 + moments) * n}
    if method == "probe":
        head = shape.hidden * s.head_outputs + s.head_outputs
        return {"weights": base_bytes * n + 4 * head, "grads": 4 * head, "optimizer": moments * head}
    p = adapter_params(shape, method, s)
    if method == "qlora":
        q = shape.quantizable_params
        tables = shape.layers * len(shape.linear) * NF4_TABLE_BYTES
        base = q * NF4_BITS / 8 + tables + (n - q) * s.embed_bytes
    else:
        base = base_bytes * n
    return {"weights": base + 4 * p, "grads": 4 * p, "optimizer": moments * p}


def device_bytes(shape: Shape, method: str, s: Settings, base_bytes: int = 2) -> dict:
    """Peak bytes of one training process on one GPU, term by term (a run's report puts its
    measured `peak_device_bytes` beside this)."""
    state = parameter_state(shape, method, s, base_bytes)
    act = activation_bytes(shape, s, method, bytes_per_value=base_bytes)
    tensors = sum(state.values()) + act
    out = {**state, "activations": act, "context": CUDA_CONTEXT_GB * GB,
           "fragmentation": FRAGMENTATION * tensors}
    return {**out, "total": sum(out.values())}


def train_flops(shape: Shape, method: str, tokens: float) -> float:
    """FLOPs to train on `tokens` tokens; every adapter method backpropagates through the frozen
    base without its weight gradients (DoRA's extra norms are O(d·k), IA³'s and the virtual
    tokens' work is negligible); a mixture of experts computes with the parameters a token is
    routed through."""
    if method not in FLOPS_PER_TOKEN:
        spec_for(method)  # an unknown method is refused by name
    return FLOPS_PER_TOKEN.get(method, ADAPTER_FLOPS_PER_TOKEN) * shape.active * tokens


def sequential_seconds(load_seconds: float, tenant_flops: list[float],
                       flops_per_second: float) -> float:
    """Tenants trained one after another: a model load (and quantization) each, then each
    tenant's FLOPs at the given rate."""
    return len(tenant_flops) * load_seconds + sum(tenant_flops) / flops_per_second


def estimate(shape: Shape, method: str, s: Settings, gpu: dict, gpus: int, tokens: float,
             price: float, strategy: str = "auto") -> dict:
    """Memory per GPU, GPUs needed, hours and cost under a distributed `strategy`: FSDP shards
    weights, gradients and optimizer states over the GPUs (activations stay per GPU: each runs
    its own micro-batch); DDP replicates everything, so more GPUs add speed, not room.
    auto = FSDP where the whole model trains, DDP where adapters do (as `peftkit train`)."""
    if strategy == "auto":
        strategy = "fsdp" if method in ("full", "full_mixed") else "ddp"
    parts = device_bytes(shape, method, s)
    state = {k: parts[k] for k in ("weights", "grads", "optimizer")}
    act, mem = parts["activations"], gpu["memory_gb"] * GB

    def per_gpu(n: int) -> float:
        shared = sum(state.values()) / (n if strategy == "fsdp" else 1)
        return shared + act + parts["context"] + FRAGMENTATION * (shared + act)
    total = per_gpu(gpus)
    if strategy == "fsdp":  # the fewest GPUs whose shards fit, or none when activations alone don't
        floor = act + parts["context"] + FRAGMENTATION * act
        needed = max(1, math.ceil(sum(state.values()) * (1 + FRAGMENTATION) / (mem - floor))) \
            if mem > floor else 0
    else:
        needed = 1 if per_gpu(1) <= mem else 0
    # Time and cost on the GPUs the row runs on: the ones given, or as many as FSDP needs to
    # hold it (the same per-GPU memory is then shown); a row that fits nowhere keeps the given.
    runs_on = needed if strategy == "fsdp" and needed > gpus else gpus
    per = per_gpu(runs_on)
    flops = train_flops(shape, method, tokens)
    hours = flops / (runs_on * gpu["bf16_tflops"] * 1e12 * UTILISATION[method]) / 3600
    return {"strategy": strategy, "weights_gb": state["weights"] / GB,
            "grads_gb": state["grads"] / GB, "optimizer_gb": state["optimizer"] / GB,
            "activations_gb": act / GB, "overhead_gb": (total - sum(state.values()) / (
                gpus if strategy == "fsdp" else 1) - act) / GB,
            "total_gb": total / GB, "per_gpu_gb": total / GB,
            "parameter_state_gb": sum(state.values()) / GB, "fits": total <= mem,
            "gpus_needed": needed, "runs_on_gpus": runs_on, "per_gpu_gb_when_run": per / GB,
            "hours": hours, "gpu_hours": hours * runs_on, "cost": hours * runs_on * price,
            "utilisation": UTILISATION[method]}
