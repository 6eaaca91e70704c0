"""NF4 4-bit bases for QLoRA (Dettmers et al. 2023, arXiv:2305.14314) through bitsandbytes.

`quantize_model` swaps a model's linear layers for bitsandbytes `Linear4bit` holding NF4 weights
(blocksize 64, double quantization on). Any adapter method then wraps those layers unchanged:
`FrozenLinear` computes the base part with `matmul_4bit` and dequantizes only to merge.
`save_quantized` / `load_quantized` keep the quantized base on disk (safetensors + quant state),
so later runs and the server never hold a full-precision copy of the quantized layers.
"""

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import PeftkitError


def bnb():
    """bitsandbytes, imported on first use: commands that never quantize neither pay its
    import time nor print its warnings. On AVX512-BF16 CPUs its import warns that an optional
    kernel package (`kernels`) is missing; peftkit turns that code path off on every layer it
    builds (`_linear4bit`), so the warning would only be noise."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes
    return bitsandbytes

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
QUANT_FILE, WEIGHTS_FILE = "peftkit_quant.json", "model.safetensors"


@dataclass
class QuantConfig:
    """QLoRA's storage recipe; bitsandbytes' own defaults (FP4, no double quant) are never used."""
    blocksize: int = 64  # Dettmers et al. 2023 §3: 64-weight blocks for the first quantization
    double_quant: bool = True  # §3 "Double Quantization": absmax to 8 bit in blocks of 256
    compute_dtype: str = "float32"  # "float32" or "bfloat16"; the dtype matmuls run in
    skip: list[str] = field(default_factory=lambda: ["lm_head", "score", "classifier"])  # kept fp
    # Embeddings and output head are not quantized. "float32" keeps them as loaded; "bfloat16"
    # stores them at 16 bit as the QLoRA recipe does (§4: bf16 for everything not in NF4) and
    # computes in fp32 (the head's weight is upcast per forward, a transient, not model state).
    embed_dtype: str = "float32"

    def validate(self) -> None:
        if self.blocksize not in BLOCKSIZES:
            raise PeftkitError(f"unsupported NF4 blocksize {self.blocksize} "
                               f"(choose one of {', '.join(map(str, BLOCKSIZES))})")
        if self.embed_dtype not in DTYPES:
            raise PeftkitError(f"unsupported embedding dtype {self.embed_dtype!r} "
                               f"(choose {' or '.join(DTYPES)})")
        if self.compute_dtype not in DTYPES:
            raise PeftkitError(f"unsupported compute dtype {self.compute_dtype!r} "
                               f"(choose {' or '.join(DTYPES)})")


@dataclass
class QuantReport:
    modules: int
    quantized_params: int
    bytes_before: int  # every parameter and buffer of the model, before
    bytes_after: int
    bits_per_param: float  # storage of the quantized layers per weight (codes + scales)

    def summary(self) -> str:
        return (f"NF4: {self.modules} linear layers, {self.quantized_params:,d} weights at "
                f"{self.bits_per_param:.3f} bits; model {self.bytes_before / 2**20:.1f} MiB -> "
                f"{self.bytes_after / 2**20:.1f} MiB")


def quantize_tensor(w: torch.Tensor, config: QuantConfig):
    config.validate()
    return bnb().functional.quantize_4bit(w.detach().float().contiguous(), blocksize=config.blocksize,
                                        compress_statistics=config.double_quant, quant_type="nf4")


def quantized_bits(packed: torch.Tensor, state) -> int:
    """Per-weight storage: 4-bit codes, absmax (8-bit with double quant) and the second-level
    absmax. Fixed lookup tables (16 + 256 floats per layer) are left out."""
    bits = packed.numel() * packed.element_size() * 8
    bits += state.absmax.numel() * state.absmax.element_size() * 8
    if state.nested:
        bits += state.state2.absmax.numel() * state.state2.absmax.element_size() * 8
    return bits


def logical_numel(t: torch.Tensor) -> int:
    """Parameters a tensor stands for: a packed 4-bit weight counts its unpacked shape (two
    codes share a byte, so numel() would count each as half a parameter)."""
    qs = getattr(t, "quant_state", None)
    return qs.shape.numel() if qs is not None and hasattr(qs, "shape") else t.numel()


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None:
            total += sum(v.numel() * v.element_size() for v in qs.as_dict(packed=True).values()
                         if isinstance(v, torch.Tensor))
    return total


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> QuantReport:
    """Replace every nn.Linear (except `config.skip` heads) by an NF4 Linear4bit, in place."""
    from peftkit.methods.layers import is_conv1d

    config = config or QuantConfig()
    config.validate()
    before = model_bytes(model)
    done = (UpcastLinear, bnb().nn.Linear4bit)  # Falcon's FalconLinear is an nn.Linear too
    targets = [(n, m) for n, m in model.named_modules()
               if (isinstance(m, nn.Linear) or is_conv1d(m)) and not isinstance(m, done)
               and n.split(".")[-1] not in config.skip]
    if not targets:
        raise PeftkitError(f"{type(model).__name__} has no linear layers to quantize")
    n_params, n_bits = 0, 0
    for name, lin in targets:
        conv1d = is_conv1d(lin)  # GPT-2's Conv1D stores (in, out): quantized as (out, in)
        weight = lin.weight.t().contiguous() if conv1d else lin.weight
        packed, state = quantize_tensor(weight, config)
        model.set_submodule(name, _linear4bit(weight.shape[1], weight.shape[0], lin.bias, packed,
                                              state, config, conv1d))
        n_params += lin.weight.numel()
        n_bits += quantized_bits(packed, state)
    store_embeddings(model, config)
    model.config.peftkit_quantization = asdict(config)
    return QuantReport(len(targets), n_params, before, model_bytes(model), n_bits / n_params)


class UpcastLinear(nn.Linear):
    """A linear layer whose weight is stored at 16 bit and used at the input's precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x, self.weight.to(x.dtype), bias)


def _upcast_output(_module, _args, out):
    return out.float()


def store_embeddings(model: nn.Module, config: QuantConfig) -> None:
    """Store input embeddings and output head in `config.embed_dtype`; compute stays fp32."""
    if config.embed_dtype == "float32" or not hasattr(model, "get_input_embeddings"):
        return
    dtype = DTYPES[config.embed_dtype]
    emb = model.get_input_embeddings()
    emb.weight.data = emb.weight.data.to(dtype)
    emb.register_forward_hook(_upcast_output)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, nn.Linear) and not isinstance(head, UpcastLinear):
        up = UpcastLinear(head.in_features, head.out_features, bias=head.bias is not None,
                          device="meta")
        up.weight = head.weight  # the same Parameter: a tied head stays tied
        up.weight.data = up.weight.data.to(dtype)
        up.bias = head.bias
        model.set_output_embeddings(up)


def _linear4bit(in_f, out_f, bias, packed, state, config: QuantConfig, conv1d: bool = False):
    layer = bnb().nn.Linear4bit(in_f, out_f, bias=bias is not None, compute_dtype=DTYPES[config.compute_dtype],
                       compress_statistics=config.double_quant, quant_type="nf4", device="meta")
    layer.weight = bnb().nn.Params4bit(packed, requires_grad=False, quant_state=state, blocksize=config.blocksize,
                              compress_statistics=config.double_quant, quant_type="nf4",
                              bnb_quantized=True, module=layer)
    layer.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
    # On CPUs with AVX512-BF16, bitsandbytes repacks weight.data in place at the first no-grad
    # eval forward (another layout, bf16 numerics): the same base then answers differently
    # before and after, per machine, and FrozenLinear's matmul_4bit would read the new layout
    # with the old quant state. One layout, everywhere.
    layer.support_avx512bf16_for_cpu = False
    layer.conv1d = conv1d  # a checkpoint stores it (in, out): export transposes it back
    return layer


def dequantized_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights in full precision: NF4 layers dequantized (for merge and export)."""
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(".weight"):
            module = model.get_submodule(name[: -len(".weight")])
            qs = getattr(getattr(module, "weight", None), "quant_state", None)
            if qs is not None:
                w = bnb().functional.dequantize_4bit(module.weight.data, qs).float()
                out[name] = w.t() if getattr(module, "conv1d", False) else w  # Conv1D: (in, out)
                continue
        if "weight." in name and any(name.endswith(s) for s in ("absmax", "quant_map",
                                                                   "bitsandbytes__nf4")):
            continue  # quant-state entries of the NF4 layers
        out[name] = t
    return out


def save_quantized(model: nn.Module, tokenizer, directory: str | Path) -> Path:
    """Write the quantized base: config, tokenizer, packed weights + quant state, one JSON."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    cfg = getattr(model.config, "peftkit_quantization", None)
    if cfg is None:
        raise PeftkitError("model is not quantized; call quantize_model first")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    tensors, layers = {}, {}
    seen = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), t.shape)
        if key in seen:
            continue  # tied weights are stored once
        seen[key] = name
        tensors[name] = t.detach().contiguous()
    for name, m in model.named_modules():
        if isinstance(m, bnb().nn.Linear4bit):
            layers[name] = {"in": m.in_features, "out": m.out_features, "bias": m.bias is not None,
                            "conv1d": getattr(m, "conv1d", False)}
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    (directory / QUANT_FILE).write_text(json.dumps({"config": cfg, "layers": layers}, indent=2))
    return directory


def place(model: nn.Module, device: torch.device) -> None:
    """Move a model, NF4 layers included, to `device`. A bitsandbytes `Params4bit` keeps its
    quant state as an attribute that `Module.to` does not carry, so 4-bit weights are rebuilt
    on the device with their state moved; every other tensor moves as usual."""
    loaded = sys.modules.get("bitsandbytes")
    four_bit = set()
    if loaded is not None:
        for m in model.modules():
            if isinstance(m, loaded.nn.Linear4bit):
                w, state = m.weight, m.weight.quant_state
                state.to(device)  # moves its tensors in place
                m.weight = loaded.nn.Params4bit(
                    w.data.to(device), requires_grad=False, quant_state=state,
                    blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                    quant_type=w.quant_type, bnb_quantized=True, module=m)
                four_bit.add(id(m.weight))
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in four_bit:
                p.data = p.data.to(device)
        for m in model.modules():
            for name, b in m._buffers.items():
                if b is not None:
                    m._buffers[name] = b.to(device)


def is_quantized_dir(path: Path) -> bool:
    return (Path(path) / QUANT_FILE).exists()


def load_quantized(directory: str | Path, model_cls):
    """Rebuild a quantized base without ever materialising its linear layers in fp32."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    directory = Path(directory)
    meta = json.loads((directory / QUANT_FILE).read_text())
    config = QuantConfig(**meta["config"])
    hf_config = AutoConfig.from_pretrained(directory)
    with init_empty_weights(include_buffers=False):
        model = model_cls(hf_config)
    tensors = load_file(directory / WEIGHTS_FILE)
    for name, spec in meta["layers"].items():
        prefix = f"{name}.weight."
        stats = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        packed = tensors.pop(f"{name}.weight")
        for k in list(tensors):
            if k.startswith(prefix):
                del tensors[k]
        state = bnb().functional.QuantState.from_dict(stats, device=torch.device("cpu"))
        bias = tensors.pop(f"{name}.bias") if spec["bias"] else None
        model.set_submodule(name, _linear4bit(spec["in"], spec["out"], bias, packed, state, config,
                                              spec.get("conv1d", False)))
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise PeftkitError(f"{directory / WEIGHTS_FILE}: unexpected tensors {unexpected[:3]}")
    model.tie_weights()
    store_embeddings(model, config)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise PeftkitError(f"{directory / WEIGHTS_FILE}: missing tensors {still_meta[:3]}")
    model.config.peftkit_quantization = meta["config"]
    return model.eval()
