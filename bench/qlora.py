"""Issue 4 benchmark: QLoRA vs fp32 LoRA on smollm2-135m, each in a fresh process that loads its
base from disk (the 4-bit base from the saved quantized directory: no fp32 copy is resident)."""

import json
import subprocess
import sys

from bench.common import write_results
from peftkit.models import load_base
from peftkit.quant import QuantConfig

MIB = 2 ** 20


def run_worker(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.worker", "step", *args], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    # Quantize once (in this process) and save; the workers then load the 4-bit directories.
    dirs, report = {}, None
    for embed in ("float32", "bfloat16"):
        nf4 = load_base("smollm2-135m", task="causal-lm", quantize=QuantConfig(embed_dtype=embed))
        report = report or nf4.quant_report
        dirs[embed] = str(nf4.path)
        del nf4
    lora = run_worker("--method", "lora")
    qlora = run_worker("--method", "lora", "--base", dirs["float32"])
    qlora16 = run_worker("--method", "lora", "--base", dirs["bfloat16"])
    s_l, s_q, s_16 = (r["state_bytes"]["total"] for r in (lora, qlora, qlora16))
    rows = [
        ("model state: QLoRA with bf16 embeddings/head (QLoRA recipe) / fp32 LoRA",
         f"{s_16 / s_l:.3f} ({s_16 / MIB:.0f} MiB vs {s_l / MIB:.0f} MiB)", "<= 0.3"),
        ("peak RSS: QLoRA bf16 embeddings / fp32 LoRA",
         f"{qlora16['peak_rss_bytes'] / lora['peak_rss_bytes']:.3f}", "report"),
        ("train step: QLoRA bf16 embeddings / fp32 LoRA",
         f"{qlora16['step_s'] / lora['step_s']:.2f}", "report"),
        ("model state: QLoRA with fp32 embeddings/head (default) / fp32 LoRA",
         f"{s_q / s_l:.3f} ({s_q / MIB:.0f} MiB vs {s_l / MIB:.0f} MiB)", "<= 0.3"),
        ("peak RSS: QLoRA / fp32 LoRA",
         f"{qlora['peak_rss_bytes'] / lora['peak_rss_bytes']:.3f} "
         f"({qlora['peak_rss_bytes'] / MIB:.0f} MiB vs {lora['peak_rss_bytes'] / MIB:.0f} MiB)", "report"),
        ("train step 8x48: QLoRA / fp32 LoRA",
         f"{qlora['step_s'] / lora['step_s']:.2f} ({qlora['step_s']:.2f} s vs {lora['step_s']:.2f} s)",
         "report"),
    ]
    if report is not None:  # of the default (fp32 embeddings) quantization
        rows.append(("NF4 bits per quantized weight", f"{report.bits_per_param:.4f}", "≈ 4.127"))
        rows.append(("model size fp32 -> NF4 (embeddings/head fp32)",
                     f"{report.bytes_before / MIB:.0f} MiB -> {report.bytes_after / MIB:.0f} MiB", "report"))
    write_results("qlora", "QLoRA vs fp32 LoRA (smollm2-135m, r=16 all-linear, batch 8x48)", rows,
                  {"lora": lora, "qlora": qlora, "qlora_bf16_embeddings": qlora16})


if __name__ == "__main__":
    main()
