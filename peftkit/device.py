"""Where a command runs and in what precision: `--device`, `--dtype`, `--attn`, resolved once,
with the names transformers and accelerate users know and a one-line error for anything this
machine cannot do (the error names the flag and what is available).

Frozen bases run in `dtype` (auto: bfloat16 on a GPU that supports it, float32 on the CPU);
trainable tensors (adapters, heads, full fine-tuning's weights) stay float32 master copies, and
forwards run under autocast in the base's dtype.
"""

import importlib.util
from contextlib import nullcontext

import torch

from peftkit.errors import PeftkitError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2")  # auto: transformers' choice


def available_devices() -> list[str]:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        names.append("mps")
    return names


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto = the first CUDA device when there is one, else the CPU."""
    spec = str(spec or "auto")
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise PeftkitError(f"--device {spec}: not a device name (auto, cpu, cuda, cuda:N, mps)") \
            from None
    have = available_devices()
    if device.type == "cuda" and (not torch.cuda.is_available()
                                  or (device.index or 0) >= torch.cuda.device_count()):
        raise PeftkitError(f"--device {spec}: not on this machine (available: {', '.join(have)})")
    if device.type == "mps" and "mps" not in have:
        raise PeftkitError(f"--device {spec}: not on this machine (available: {', '.join(have)})")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PeftkitError(f"--device {spec}: unsupported (available: {', '.join(have)})")
    return device


def resolve_dtype(spec: str | torch.dtype | None, device: torch.device,
                  training: bool = False, flag: str = "--dtype") -> torch.dtype:
    """The frozen base's precision. float16 training on the CPU is refused: its kernels are
    missing or slower than float32 there, and without loss scaling it underflows."""
    if isinstance(spec, torch.dtype):
        dtype = spec
    elif spec in (None, "auto"):
        gpu_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        dtype = torch.bfloat16 if gpu_bf16 else torch.float32
    elif spec in DTYPES:
        dtype = DTYPES[spec]
    else:
        raise PeftkitError(f"{flag} {spec}: choose auto, {', '.join(DTYPES)}")
    if training and dtype == torch.float16 and device.type == "cpu":
        raise PeftkitError("--dtype float16: not for training on the CPU; use bfloat16 or float32")
    return dtype


def resolve_attn(spec: str | None) -> str | None:
    """The attention implementation to set, or None for the model's own choice (transformers
    picks sdpa where the architecture supports it, else eager)."""
    spec = spec or "auto"
    if spec not in ATTENTION:
        raise PeftkitError(f"--attn {spec}: choose {', '.join(ATTENTION)}")
    if spec == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise PeftkitError("--attn flash_attention_2: the flash-attn package is not installed "
                           "(pip install flash-attn, CUDA only); use sdpa")
    return None if spec == "auto" else spec


def placement(device="auto", dtype="auto", attn=None, training: bool = False):
    """(device, base dtype, attention) from the three flags, or a one-line error naming one."""
    where = resolve_device(device)
    return where, resolve_dtype(dtype, where, training), resolve_attn(attn)


def autocast(device: torch.device, dtype: torch.dtype):
    """Forwards in the base's precision; a no-op for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def module_device(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_device_bytes(device: torch.device) -> dict | None:
    """Max allocated / reserved bytes on a CUDA device since the last reset; None elsewhere."""
    if device.type != "cuda":
        return None
    return {"allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device)}
