"""Issue 12 benchmark: training and serving on a GPU, random weights at real shapes.

`python -m bench.gpu` (`make bench-gpu`) on a CUDA machine builds Llama models from configs (no
download) at the shapes of SmolLM2-135M, Llama-3.2-1B and Llama-3.1-8B, bf16 bases, and
measures on the same batches: train tokens/s and peak GPU memory for LoRA r=16 all-linear
(peftkit and HF PEFT), full fine-tuning (1B only) and QLoRA (when bitsandbytes is installed);
the planner's predicted peak beside each measured one; a mixed decode batch of 32 requests on
32 adapters vs base-only; adapter cold load and cached switch. Writes docs/bench-gpu.md/.json.

`python -m bench.gpu --device cpu --tiny` runs the same code at toy shapes in seconds (CI runs
it, so the script cannot rot) and writes nowhere unless `--out` is given.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.common import DOCS, machine
from peftkit.device import peak_device_bytes, reset_peak, resolve_device
from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.plan.memory import Settings, device_bytes
from peftkit.plan.shapes import shape_from_config
from peftkit.engine import Sampling
from peftkit.serve.server import ServeConfig, Server
from peftkit.tiny import tiny_llama_tokenizer

SHAPES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3.1-8b": (4096, 14336, 32, 32, 8, 128256),
}
TINY = {"tiny-a": (64, 128, 2, 4, 2, 259), "tiny-b": (96, 192, 2, 4, 2, 259)}
RANK, STEPS = 16, 5


def config(dims) -> LlamaConfig:
    h, i, n, heads, kv, vocab = dims
    return LlamaConfig(hidden_size=h, intermediate_size=i, num_hidden_layers=n,
                       num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                       max_position_embeddings=4096, tie_word_embeddings=True,
                       architectures=["LlamaForCausalLM"])


def build(dims, device, dtype) -> LlamaForCausalLM:
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM(config(dims)).to(dtype)
    return model


def timed_steps(model, params, ids, device, dtype) -> dict:
    """STEPS AdamW steps after one warm-up; tokens/s and the device's peak bytes."""
    opt = torch.optim.AdamW(params, lr=1e-4)
    reset_peak(device)
    times = []
    for step in range(STEPS + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    return {"tokens_per_s": ids.numel() * len(times) / sum(times),
            "peak": peak_device_bytes(device), "loss": loss.item()}


def train_row(name, dims, method, device, dtype, batch, seq) -> dict:
    shape = shape_from_config(name, config(dims))
    ids = torch.randint(3, dims[-1], (batch, seq), device=device)
    base_dtype = torch.float32 if method == "full" else dtype
    model = build(dims, device, base_dtype)
    if method == "full":
        params = list(model.parameters())
    elif method == "peft-lora":
        import peft
        model = peft.get_peft_model(model, peft.LoraConfig(r=RANK, lora_alpha=2 * RANK,
                                                           target_modules="all-linear"))
        params = [p for p in model.parameters() if p.requires_grad]
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "qlora":
            from peftkit.quant import QuantConfig, quantize_model
            quantize_model(model, QuantConfig(compute_dtype="bfloat16"
                                              if dtype == torch.bfloat16 else "float32"))
        adapted = add_adapter(model, LoraConfig(r=RANK, alpha=2 * RANK, targets="all-linear"))
        model, params = adapted, adapted.adapter_parameters()
    if method == "full":  # 16 bytes a parameter already; activations checkpointed
        model.gradient_checkpointing_enable()
    out = timed_steps(model, params, ids, device, dtype)
    planned = device_bytes(shape, "lora" if method in ("peft-lora", "lora") else method,
                           Settings(seq_len=seq, batch=batch, rank=RANK,
                                    grad_checkpointing=method == "full"),
                           base_bytes=base_dtype.itemsize)
    del model, params
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"shape": name, "method": method, **out, "predicted": planned["total"]}


def serve_rows(name, dims, device, dtype, tmp: Path) -> dict:
    """Mixed batch of 32 adapters vs base-only decode throughput; cold load and switch."""
    model_dir = tmp / name
    cpu_model = build(dims, torch.device("cpu"), dtype)
    cpu_model.save_pretrained(model_dir)
    tiny_llama_tokenizer().save_pretrained(model_dir)  # ids < 259: fine for random weights
    adapters = tmp / f"{name}-adapters"
    maker = add_adapter(cpu_model, LoraConfig(r=RANK, targets="all-linear"))
    for k in range(32):
        with torch.no_grad():
            for p in maker.adapter_parameters():
                p.normal_(0, 0.01)
        save_adapter(maker, adapters / f"a{k:02d}")
    server = Server(ServeConfig(base=str(model_dir), adapters=str(adapters), max_loaded=32,
                                max_rank=RANK, max_batch=32, device=str(device),
                                dtype=str(dtype).removeprefix("torch.")))
    ids = list(range(10, 42))
    greedy = Sampling(max_tokens=32, temperature=0.0)

    def run(models):
        start = time.perf_counter()
        reqs = server.engine.run_all([server.request(m, ids, greedy) for m in models])
        return sum(len(r.out_ids) for r in reqs) / (time.perf_counter() - start)
    mixed_models = [f"a{k:02d}" for k in range(32)]
    cold = []
    for m in mixed_models[:8]:
        start = time.perf_counter()
        server.store.release(server.store.acquire(m))
        cold.append(time.perf_counter() - start)
    run([""] * 32)  # warm-up
    base = run([""] * 32)
    mixed = run(mixed_models)
    start = time.perf_counter()
    for _ in range(100):
        server.store.release(server.store.acquire("a00"))
    switch = (time.perf_counter() - start) / 100
    return {"shape": name, "base_tokens_per_s": base, "mixed_tokens_per_s": mixed,
            "mixed_over_base": mixed / base, "cold_load_s": sorted(cold)[len(cold) // 2],
            "cached_switch_s": switch}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="toy shapes: a smoke test on any device")
    ap.add_argument("--out", help="directory for bench-gpu.md/.json (default: docs/ unless --tiny)")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = TINY if args.tiny else SHAPES
    batch, seq = (2, 16) if args.tiny else (4, 512)
    rows, serving = [], []
    try:
        import bitsandbytes  # noqa: F401
        methods = ["lora", "peft-lora", "qlora"]
    except ImportError:
        methods = ["lora", "peft-lora"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, dims) in enumerate(shapes.items()):
            for method in methods + (["full"] if i == 1 else []):
                rows.append(train_row(name, dims, method, device, dtype, batch, seq))
                print(json.dumps(rows[-1]), flush=True)
            if i < 2:
                serving.append(serve_rows(name, dims, device, dtype, Path(tmp)))
                print(json.dumps(serving[-1]), flush=True)
    out = Path(args.out) if args.out else (None if args.tiny else DOCS)
    if out is not None:
        write(out, {"machine": machine(), "device": str(device), "dtype": str(dtype),
                    "date": time.strftime("%Y-%m-%d"), "train": rows, "serve": serving})


def write(out: Path, raw: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-gpu.json").write_text(json.dumps(raw, indent=2) + "\n")
    mib = 2 ** 20
    lines = ["# GPU benchmark (issue 12)", "", f"Machine: {raw['machine']}, {raw['device']}, "
             f"{raw['dtype']}. Date: {raw['date']}. Command: `make bench-gpu`.", "",
             "| shape | method | tokens/s | peak allocated | planner predicted |",
             "| --- | --- | --- | --- | --- |"]
    for r in raw["train"]:
        peak = f"{r['peak']['allocated'] / mib:.0f} MiB" if r["peak"] else "n/a (not CUDA)"
        lines.append(f"| {r['shape']} | {r['method']} | {r['tokens_per_s']:.0f} | {peak} | "
                     f"{r['predicted'] / mib:.0f} MiB |")
    lines += ["", "| shape | base-only tok/s | 32 adapters tok/s | ratio | cold load | switch |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in raw["serve"]:
        lines.append(f"| {r['shape']} | {r['base_tokens_per_s']:.0f} | "
                     f"{r['mixed_tokens_per_s']:.0f} | {r['mixed_over_base']:.2f} | "
                     f"{r['cold_load_s'] * 1e3:.1f} ms | {r['cached_switch_s'] * 1e6:.0f} µs |")
    (out / "bench-gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
