"""`peftkit export --for gguf|ollama --adapter-only`: a LoRA run as llama.cpp's adapter GGUF
(`general.type = adapter`, `adapter.type = lora`, `adapter.lora.alpha`; per adapted weight
`<name>.lora_a` (r x in) and `<name>.lora_b` (out x r), convert_lora_to_gguf's layout) beside
its base as GGUF, unmodified. llama.cpp adds (alpha / r) B A x when it loads the adapter
(`llama-cli --lora`, llama-cpp-python's `lora_path`, Ollama's ADAPTER), so one base file
serves many adapters. rsLoRA's alpha/sqrt(r) is written as the alpha giving the same scale; a
QLoRA run's base is written from the NF4 weights dequantized, which the adapter trained
against. B's rows of Q and K are permuted as the base's are (llama.cpp's rotary layout).
"""

import json
from pathlib import Path

import numpy as np

from peftkit.errors import PeftkitError
from peftkit.gguf_export import ARCHS, TYPES, gguf_name, rotary_rows, write_gguf

ADAPTER_FILE = "adapter.gguf"


def write_lora_gguf(adapted, config, path: Path) -> Path:
    """Slot 0 of a LoRA `adapted` model on a base with `config` as a llama.cpp adapter GGUF."""
    import gguf

    lora = adapted.slot_configs[0]
    arch = getattr(gguf.MODEL_ARCH, ARCHS[config.model_type].name)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(lora.scale * lora.r))
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for module, layer in adapted.adapted_layers().items():
        weights = layer.read_slot(0, lora)
        a, b = weights["lora_A.weight"].detach().float(), weights["lora_B.weight"].detach().float()
        name = names.get_name(f"{module}.weight", try_suffixes=(".weight",))
        if name is None:
            raise PeftkitError(f"--adapter-only: no llama.cpp name for {module}")
        b = rotary_rows(config, module, b)  # B's rows are the weight's output rows
        writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a.numpy()))
        writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b.numpy()))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_adapter_gguf(run: str, out: str, kind: str = "f16", model: str | None = None,
                        overwrite: bool = False) -> dict:
    """OUT/base-<kind>.gguf and OUT/adapter.gguf (f32) from a LoRA/rsLoRA run or adapter,
    checked before anything loads; OUT is written fresh and renamed into place."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export import staged
    from peftkit.formats import CONFIG_NAME, adapter_dir
    from peftkit.merged import REPORT, export_merged
    from peftkit.models import peek_config
    from peftkit.train.run_dir import load_run, recorded_base

    src, target = Path(run), Path(out)
    if kind not in TYPES:
        raise PeftkitError(f"--gguf-type {kind}: choose {', '.join(TYPES)}")
    if not (adapter_dir(src) / CONFIG_NAME).is_file():
        raise PeftkitError(f"{src}: no LoRA adapter (--adapter-only exports a run's adapter; "
                           "a full fine-tuning run exports whole: drop --adapter-only)")
    peft = json.loads((adapter_dir(src) / CONFIG_NAME).read_text())
    if peft.get("peft_type") != "LORA" or peft.get("use_dora"):
        method = "DoRA" if peft.get("use_dora") else peft.get("peft_type")
        raise PeftkitError(f"{src}: llama.cpp's adapters are LoRA; this {method} adapter exports "
                           "merged into its base (drop --adapter-only)")
    base = model or recorded_base(src)
    family = peek_config(base).model_type
    if family not in ARCHS:
        raise PeftkitError(f"--for gguf: {family} is not written here ({', '.join(ARCHS)}); "
                           "use --for merged")
    with staged(target, overwrite) as (work, fresh):
        loaded = load_run(base, src)
        export_merged(loaded.module, work / "base", loaded.base.tokenizer, fold=False)
        plain = AutoModelForCausalLM.from_pretrained(work / "base").eval()
        tokenizer = AutoTokenizer.from_pretrained(work / "base")
        write_gguf(plain, tokenizer, fresh / f"base-{kind}.gguf", kind, gguf_name(base))
        write_lora_gguf(loaded.module, plain.config, fresh / ADAPTER_FILE)
        quantized = getattr(loaded.module.model.config, "peftkit_quantization", None)
        report = {"source": str(src), "base": base, "architecture": family, "gguf": kind,
                  "file": f"base-{kind}.gguf", "adapter": ADAPTER_FILE,
                  "lora_alpha": loaded.module.slot_configs[0].scale * peft["r"], "r": peft["r"],
                  "base_weights": "the NF4 base dequantized (what the adapter trained against)"
                  if quantized else "the base as loaded, unmodified"}
        (fresh / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "output": str(target / report["file"]),
            "adapter_output": str(target / ADAPTER_FILE)}
