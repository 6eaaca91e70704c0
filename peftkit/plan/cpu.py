"""The memory model for the trainer's own CPU runs: what `peftkit train` will measure, predicted
from the model's shape before anything runs. The GPU plan (memory.py) and this share the
parameter-state model; what differs is the runtime (a Python process instead of a CUDA context)
and the activations (fp32 eager PyTorch, counted per op, instead of Korthikanti's 16-bit GPU
formula).

  peak RSS = runtime      the process before the model loads (interpreter + libraries;
                          measured by the trainer, `runtime_rss_bytes`)
           + framework    tokenizer + model code, 32 MiB + 1 KiB per vocabulary entry
           + weights      fp32; a classifier's frozen embedding table stays in the mapped
                          safetensors file, and only the rows the data uses get paged in
           + Adam states  two fp32 moments per trainable parameter
           + the larger of
               forward peak   tensors autograd saves for backward; for a causal LM the logits
                              and their gradient (2 V floats a token) and, in full FT, the
                              output head's weight gradient, the first one backward makes
               step peak      gradients, and the two temporaries torch's single-tensor AdamW
                              makes per parameter (the largest trained tensor counts: full
                              FT's embedding, a causal-LM probe's vocabulary head)
No allocator slack: the trainer returns freed heap memory after every decoder layer
(peftkit/train/allocator.py), so RSS follows the live tensors.

Saved activations of one Llama decoder layer (transformers' LlamaDecoderLayer, SDPA attention,
which on CPU saves q, k and v (repeated to every head when a padding mask is passed, as in every
padded training batch), the output and a log-sum-exp per head), floats per token:
  frozen weights   RMSNorm inputs 2h + 2 rsqrt; SDPA q + 2q + out + heads; SiLU input and output
                   and the up projection 3i. Frozen linears save their weight, not their input.
  full FT          + the linear inputs (3h + i) and the normalised RMSNorm outputs (2h, for the
                   norm weights' gradient), less the attention output the o_proj input aliases (h)
  LoRA             + per target: the input A multiplies (in), dropout's noise (in, if dropout > 0;
                   without dropout targets sharing an input share it) and x·Aᵀ (r)
  DoRA             + per target, on top of LoRA: a second dropout noise (in) and the base and
                   LoRA outputs the magnitude scaling saves (2 out)
  IA³              + per target: the vector scales the output (out) or, feed-forward, the input (in)
  bottleneck       + per adapter: its input (out of the wrapped layer) and 2 x bottleneck size
  prompt / prefix  frozen, over the virtual tokens too (prompt) or their keys and values (prefix)
The probe runs the backbone without autograd: one layer's temporaries at a time.
Checked op by op against the autograd graph (tests/test_plan.py) and end to end against peak RSS
(bench/plan.py, docs/bench-plan.md). Architectures other than Llama fall back to Korthikanti's
per-layer formula at fp32 (memory.activation_bytes), which is looser.
"""

from dataclasses import dataclass, field

from peftkit.plan.memory import Settings, activation_bytes, parameter_state, train_flops
from peftkit.plan.shapes import Shape
from peftkit.methods.spec import spec_for, virtual_at

MIB = 2 ** 20
FP32 = 4
RUNTIME_BYTES = 374 * MIB  # measured here: Python 3.11 + torch 2.13 + transformers 5.23 imported
FRAMEWORK_BYTES = 32 * MIB  # calibrated on tiny models: model code, tokenizer object, dataset
TOKENIZER_BYTES_PER_ENTRY = 1024  # calibrated: smollm2's 49k-entry BPE tokenizer adds ~48 MiB


@dataclass
class CpuRun:
    """One `peftkit train` run on CPU, as far as memory goes: its method and task, and its
    sizes (the largest batch as `batch` x `seq_len`, rank, targets, dropout, ...) as the GPU
    plan's Settings, built from the run's config (Settings.from_train)."""
    method: str
    task: str = "causal-lm"  # or "classify"
    s: Settings = field(default_factory=lambda: Settings(batch=8, seq_len=64, rank=8,
                                                         grad_checkpointing=False))

    @classmethod
    def from_train(cls, cfg, task: str, shape: Shape, labels: int, largest_batch) -> "CpuRun":
        outputs = shape.vocab if task == "causal-lm" else labels
        return cls(cfg.method, task, Settings.from_train(cfg, largest_batch, outputs, FP32))

    @property
    def tokens(self) -> int:
        virtual = self.s.virtual_tokens if virtual_at(self.method) == "input" else 0
        return self.s.batch * (self.s.seq_len + virtual)


def predict_state_bytes(shape: Shape, method: str, s: Settings) -> int:
    """The trainer's `model_state_bytes` for a CPU run: fp32 base, fp32 adapters and Adam."""
    return int(sum(parameter_state(shape, method, s, base_bytes=FP32).values()))


def _dims(shape: Shape) -> dict:
    lin = {n: (i, o) for n, i, o in shape.linear}
    head_dim = shape.hidden // shape.heads
    return {"h": shape.hidden, "q": shape.heads * head_dim, "heads": shape.heads,
            "i": lin.get("down_proj", (4 * shape.hidden, 0))[0], "lin": lin}


def layer_floats(shape: Shape, run: CpuRun) -> float:
    """Floats autograd saves per token in one Llama decoder layer (see the module docstring):
    a frozen layer's, full fine-tuning's own, or an adapter method's on top (its spec)."""
    d = _dims(shape)
    h, q, i = d["h"], d["q"], d["i"]
    frozen = 2 * h + 2 + (q + 2 * q + q + d["heads"]) + 3 * i
    if run.method == "full":
        return frozen + 3 * h + i + 2 * h - q
    return frozen + spec_for(run.method).saved(shape, run.s, d)


def first_layer_saving(shape: Shape, run: CpuRun) -> float:
    """Floats per token layer 0 does NOT save under PEFT: the embeddings are frozen, so ops
    before the first trainable one have no input that needs a gradient."""
    if run.method in ("full", "probe"):  # the embeddings train / nothing is saved
        return 0
    return spec_for(run.method).first_layer(shape, run.s, _dims(shape))


def activation_bytes_cpu(shape: Shape, run: CpuRun) -> float:
    """Bytes autograd holds at the end of the forward pass of the run's largest batch."""
    s = run.s
    if shape.model_type != "llama":
        return activation_bytes(shape, s, run.method, bytes_per_value=FP32)
    d, tokens = _dims(shape), run.tokens
    if run.method == "probe":  # no autograd: one layer's intermediates at a time
        return tokens * (2 * d["h"] + 3 * d["i"]) * FP32
    per_layer = layer_floats(shape, run) * tokens
    prefix = s.virtual_tokens if virtual_at(run.method) == "kv" else 0
    per_layer += s.batch * prefix * 2 * d["q"]  # prefix keys and values, in every layer
    if s.grad_checkpointing:  # each layer keeps its input; one layer is recomputed at a time
        layers = shape.layers * tokens * d["h"] + per_layer
    else:
        layers = shape.layers * per_layer - tokens * first_layer_saving(shape, run)
    head = tokens * shape.vocab if run.task == "causal-lm" else 0  # log-softmax output
    mask = s.batch * s.seq_len * (s.seq_len + prefix)
    return (layers + tokens * 2 * d["h"] + head + mask) * FP32


def largest_trained_tensor(shape: Shape, run: CpuRun) -> int:
    """Elements of the biggest parameter Adam updates (adapters' are too small to matter)."""
    if run.method == "full":
        return max([shape.vocab * shape.hidden] + [i * o for _, i, o in shape.linear])
    if run.method == "probe":
        return shape.hidden * run.s.head_outputs
    return 0


def predict_peak_rss(shape: Shape, run: CpuRun, runtime_bytes: float) -> dict:
    """Predicted peak RSS of a `peftkit train` run on CPU, term by term. Activations and
    gradients peak at different moments (the forward's end; the optimizer step), so the larger
    of the two counts, on top of what is resident throughout."""
    state = parameter_state(shape, run.method, run.s, base_bytes=FP32)
    weights = state["weights"]
    if run.task == "classify" and run.method != "full":  # see the module docstring
        weights -= shape.vocab * shape.hidden * FP32
    act = activation_bytes_cpu(shape, run)
    forward = act
    if run.task == "causal-lm":  # the logits and their gradient, as backward starts
        forward += 2 * run.tokens * shape.vocab * FP32
        if run.method == "full":  # ... when the output head's weight gradient is made first
            forward += shape.vocab * shape.hidden * FP32
    step = state["grads"] + 2 * largest_trained_tensor(shape, run) * FP32  # AdamW temporaries
    terms = {"runtime": runtime_bytes,
             "framework": FRAMEWORK_BYTES + TOKENIZER_BYTES_PER_ENTRY * shape.vocab,
             "weights": weights, "optimizer_states": state["optimizer"],
             "activations": act, "forward_peak": forward, "optimizer_step_peak": step}
    resident = runtime_bytes + terms["framework"] + weights + state["optimizer"]
    return {**terms, "total": resident + max(forward, step)}


def cpu_plan(shape: Shape, methods: list[str], rows: int, length: int, rank: int = 8,
             task: str = "causal-lm", grad_checkpointing: bool = False,
             runtime_bytes: float = RUNTIME_BYTES) -> dict:
    """`peftkit plan --cpu`: each method's predicted peak RSS for `peftkit train` here."""
    import psutil
    ram = psutil.virtual_memory().total
    out = {}
    for method in methods:
        outputs = shape.vocab if task == "causal-lm" else 2
        run = CpuRun(method, task, Settings(seq_len=length, batch=rows, rank=rank,
                                            grad_checkpointing=grad_checkpointing,
                                            head_outputs=outputs, embed_bytes=FP32))
        terms = predict_peak_rss(shape, run, runtime_bytes)
        out[method] = {**{f"{k}_gib": v / 2 ** 30 for k, v in terms.items()},
                       "fits_ram": terms["total"] <= ram}
    return {"ram_gib": ram / 2 ** 30, "rows": rows, "length": length, "task": task,
            "methods": out}


def format_cpu_plan(plan: dict, model: str) -> str:
    lines = [f"CPU training of {model} ({plan['task']}, batch {plan['rows']} x {plan['length']} "
             f"tokens), predicted peak RSS; this machine has {plan['ram_gib']:.1f} GiB", "",
             f"{'method':<11}{'weights':>9}{'Adam':>8}{'activ':>8}{'peak GiB':>10}{'fits':>6}"]
    for name, m in plan["methods"].items():
        lines.append(f"{name:<11}{m['weights_gib']:>9.2f}{m['optimizer_states_gib']:>8.2f}"
                     f"{m['activations_gib']:>8.2f}{m['total_gib']:>10.2f}"
                     f"{'yes' if m['fits_ram'] else 'no':>6}")
    return "\n".join(lines)


# Time. The planner's FLOPs per trained token (memory.train_flops) over this CPU's float32
# matmul rate, measured in-process in a fraction of a second, times the share of that rate a
# training step reaches. Calibrated on `peftkit demo` (SmolLM2-135M, joint QLoRA, 2-core
# AVX-512 CPU): small matmuls, NF4 dequantization and the ops between them keep it well below 1.
CPU_TRAIN_EFFICIENCY = {"qlora": 0.5, "lora": 0.6, "dora": 0.5, "full": 0.6, "probe": 0.6}


def matmul_flops_per_second(size: int = 768, seconds: float = 0.25) -> float:
    """Float32 matmul FLOP/s of this process on this machine (its threads, its load), now."""
    import time
    import torch
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and kernels
    start, done = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        a @ b
        done += 1
    return done * 2 * size ** 3 / (time.perf_counter() - start)


def cpu_train_seconds(shape: Shape, method: str, tokens: float, flops_per_second: float) -> float:
    """Seconds to train on `tokens` tokens at `flops_per_second` (matmul_flops_per_second)."""
    efficiency = CPU_TRAIN_EFFICIENCY.get(method, CPU_TRAIN_EFFICIENCY["lora"])
    return train_flops(shape, method, tokens) / (flops_per_second * efficiency)
