"""`peftkit export --for gguf`: a merged run as one GGUF file for llama.cpp (and Ollama), written
with the `gguf` package's writer in llama.cpp's own layout: its tensor names (gguf's name map),
Q and K rows permuted for its rotary embedding (convert_hf_to_gguf's `LlamaModel.permute`), its
metadata keys, and the tokenizer (gguf_vocab: byte-level or SentencePiece BPE). Weights as f16,
or q8_0 where a row splits into 32-value blocks; norms stay f32.

Families: llama, mistral (llama.cpp reads both as `llama`), qwen2, phi3 (fused qkv and gate_up
as llama.cpp's attn_qkv / ffn_up; Phi-4-mini's partial rotary), gemma and gemma2 (norms stored
as 1 + w, as llama.cpp's converter does; Gemma 2's logit soft-caps and sliding window
recorded). Other families are refused by name.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from peftkit.errors import PeftkitError
from peftkit.gguf_vocab import write_tokenizer


@dataclass(frozen=True)
class Arch:
    """How llama.cpp holds one transformers family."""
    name: str  # its gguf.MODEL_ARCH member
    # Q/K rows permuted: llama.cpp's `llama` rotates in pairs where transformers rotates halves
    # (convert_hf_to_gguf's LlamaModel.permute); the others rotate halves as transformers does
    permute_qk: bool = False
    norm_plus_one: bool = False  # Gemma's RMSNorm scales by 1 + w; llama.cpp stores 1 + w


ARCHS = {"llama": Arch("LLAMA", permute_qk=True), "mistral": Arch("LLAMA", permute_qk=True),
         "qwen2": Arch("QWEN2"), "phi3": Arch("PHI3"), "gemma": Arch("GEMMA", norm_plus_one=True),
         "gemma2": Arch("GEMMA2", norm_plus_one=True)}
TYPES = ("f16", "q8_0")


def write_gguf(model, tokenizer, path: Path, kind: str = "f16", name: str | None = None) -> Path:
    """`model` (a plain transformers causal LM, merged) and its tokenizer as one GGUF file;
    `name` is general.name (llama.cpp reads Phi-3's token attributes off a name with "phi3" or
    "phi-3" in it, so it keeps the base's)."""
    import gguf

    config = model.config
    if config.model_type not in ARCHS:
        raise PeftkitError(f"--for gguf: {config.model_type} is not written here ("
                           f"{', '.join(ARCHS)}); use --for merged")
    if kind not in TYPES:
        raise PeftkitError(f"--gguf-type {kind}: choose {', '.join(TYPES)}")
    family = ARCHS[config.model_type]
    arch = getattr(gguf.MODEL_ARCH, family.name)
    heads, kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    scaling = _rope_param(config, "rope_type", "default")
    if scaling != "default":  # llama.cpp needs its own rope-scaling fields and factor tensors
        raise PeftkitError(f"--for gguf: rope scaling '{scaling}' is not written here yet; use "
                           "--for merged")
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if scalar is not None and scalar != head_dim:  # llama.cpp scales queries by head_dim
        raise PeftkitError(f"--for gguf: query_pre_attn_scalar {scalar} != head_dim {head_dim}: "
                           "llama.cpp's format has no field for it; use --for merged")
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(name or path.stem)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv)
    writer.add_rope_dimension_count(int(head_dim * _rope_param(config, "partial_rotary_factor",
                                                                1.0)))
    if family.norm_plus_one or family.name == "PHI3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if getattr(config, "sliding_window", None):
        writer.add_sliding_window(int(config.sliding_window))
    for field in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(config, field, None):
            getattr(writer, f"add_{field}")(float(getattr(config, field)))
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if kind == "f16" else
                         gguf.LlamaFileType.MOSTLY_Q8_0)
    write_tokenizer(writer, tokenizer, config.vocab_size)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    state = model.state_dict()
    tied = getattr(config, "tie_word_embeddings", False)
    for key, tensor in state.items():
        if tied and key == "lm_head.weight":
            continue  # llama.cpp reads a tied head from token_embd
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise PeftkitError(f"--for gguf: no llama.cpp name for tensor {key}")
        data = rotary_rows(config, key.removesuffix(".weight"), tensor.detach().float())
        if family.norm_plus_one and name.endswith("norm.weight"):
            data = data + 1
        _add(writer, gguf, name, data.numpy(), kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_name(base: str) -> str:
    """A base's name for general.name: its hub id's or directory's last part."""
    return Path(str(base).rstrip("/")).name.removesuffix(".gguf")


def rotary_rows(config, module: str, w: torch.Tensor) -> torch.Tensor:
    """`w`'s output rows (a weight's, or a LoRA B's) in llama.cpp's order for `module`: Q and
    K rows permuted for its rotary layout where the architecture needs it
    (convert_hf_to_gguf: LlamaModel.permute), anything else as it is."""
    if not ARCHS[config.model_type].permute_qk or not module.endswith(("self_attn.q_proj",
                                                               "self_attn.k_proj")):
        return w
    heads = config.num_key_value_heads or config.num_attention_heads
    if module.endswith("q_proj"):
        heads = config.num_attention_heads
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2) \
        .reshape(w.shape)


def _add(writer, gguf, name: str, data: np.ndarray, kind: str) -> None:
    if data.ndim == 1 or name.endswith("_norm.weight"):
        writer.add_tensor(name, data.astype(np.float32))
    elif kind == "q8_0" and data.shape[-1] % 32 == 0:
        packed = gguf.quants.quantize(data.astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
        writer.add_tensor(name, packed, raw_shape=packed.shape,
                          raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        writer.add_tensor(name, data.astype(np.float16))


def _rope_param(config, key: str, default):
    """A rotary setting, from transformers' `rope_parameters` or the config itself."""
    params = getattr(config, "rope_parameters", None) or {}
    value = params.get(key) or getattr(config, key, None)
    return default if value is None else value


def _rope_theta(config) -> float:
    return _rope_param(config, "rope_theta", 10000.0)


def export_gguf(run: str, out: str, kind: str = "f16", model: str | None = None,
                overwrite: bool = False) -> dict:
    """A run merged into its base (merged.export_run, float32), then written as
    `OUT/model-<kind>.gguf` beside the export report; OUT is written fresh and renamed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peftkit.export import staged
    from peftkit.merged import REPORT, export_run

    if kind not in TYPES:
        raise PeftkitError(f"--gguf-type {kind}: choose {', '.join(TYPES)}")
    target = Path(out)
    with staged(target, overwrite) as (work, fresh):
        merged = export_run(run, str(work / "merged"), "float32", model)
        if merged.get("architecture") not in ARCHS:
            raise PeftkitError(f"--for gguf: {merged.get('architecture')} is not written here "
                               f"({', '.join(ARCHS)}); use --for merged")
        plain = AutoModelForCausalLM.from_pretrained(work / "merged").eval()
        tokenizer = AutoTokenizer.from_pretrained(work / "merged")
        write_gguf(plain, tokenizer, fresh / f"model-{kind}.gguf", kind,
                   f"{gguf_name(merged['base'])}-{Path(run).resolve().name}")
        report = {**json.loads((work / "merged" / REPORT).read_text()), "gguf": kind,
                  "file": f"model-{kind}.gguf"}
        (fresh / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return {**report, "output": str(target / report["file"])}


# Ollama's TEMPLATE is a Go template, not Jinja: the chat markups recognised in a tokenizer's
# template, written the way Ollama's own library writes them; each with its end-of-turn stop.
# Checked in order (Phi-3's markup also has Zephyr's <|assistant|>).
OLLAMA_TEMPLATES = {
    "<|im_start|>": ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n'
                     '{{ end }}<|im_start|>assistant\n', "<|im_end|>"),
    "<|end|>": ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}<|end|>\n{{ end }}'
                '<|assistant|>\n', "<|end|>"),
    "<|assistant|>": ('{{- range .Messages }}<|{{ .Role }}|>\n{{ .Content }}</s>\n{{ end }}'
                      '<|assistant|>\n', "</s>"),
    "<start_of_turn>": ('{{- range .Messages }}<start_of_turn>{{ if eq .Role "assistant" }}model'
                        '{{ else }}{{ .Role }}{{ end }}\n{{ .Content }}<end_of_turn>\n{{ end }}'
                        '<start_of_turn>model\n', "<end_of_turn>"),
    "<|start_header_id|>": ('{{- range .Messages }}<|start_header_id|>{{ .Role }}'
                            '<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
                            '<|start_header_id|>assistant<|end_header_id|>\n\n', "<|eot_id|>"),
}
NAMES = "ChatML, Phi-3, Zephyr, Gemma or Llama 3"


def modelfile(gguf_name: str, chat_template: str | None, adapter: str | None = None) -> str:
    """An Ollama Modelfile for a GGUF (and, `adapter`, a LoRA GGUF on it): FROM, ADAPTER, the
    chat TEMPLATE translated from the tokenizer's Jinja template (NAMES), its stop
    token, greedy decoding."""
    for marker, (template, stop) in OLLAMA_TEMPLATES.items():
        if chat_template and marker in chat_template:
            break
    else:
        raise PeftkitError(f"--for ollama: the chat template is none of {NAMES}, whose Ollama "
                           "TEMPLATE is known; export --for gguf and write the Modelfile's "
                           "TEMPLATE by hand")
    return (f"FROM ./{gguf_name}\n" + (f"ADAPTER ./{adapter}\n" if adapter else "") +
            f'TEMPLATE """{template}"""\n'
            f'PARAMETER stop "{stop}"\n'
            "PARAMETER temperature 0\n")


def export_ollama(run: str, out: str, kind: str = "q8_0", model: str | None = None,
                  overwrite: bool = False, name: str | None = None,
                  adapter_only: bool = False) -> dict:
    """export --for gguf (--adapter-only: the base GGUF and the adapter GGUF), plus a
    Modelfile beside them and the `ollama create` command."""
    from peftkit.gguf_adapter import ADAPTER_FILE, export_adapter_gguf
    src = Path(run)
    template = _recorded_template(src, model)
    text = modelfile(f"{'base' if adapter_only else 'model'}-{kind}.gguf", template,
                     ADAPTER_FILE if adapter_only else None)  # refused before any export work
    done = (export_adapter_gguf if adapter_only else export_gguf)(run, out, kind, model,
                                                                 overwrite)
    (Path(out) / "Modelfile").write_text(text)
    name = name or src.resolve().name
    return {**done, "modelfile": str(Path(out) / "Modelfile"),
            "command": f"ollama create {name} -f {Path(out) / 'Modelfile'}"}


def _recorded_template(src: Path, model: str | None) -> str | None:
    """The chat template a run trained with: its own file, else its base tokenizer's."""
    from peftkit.data.templates import FILE
    from peftkit.models import peek_tokenizer
    from peftkit.train.run_dir import recorded_base
    if (src / FILE).is_file():
        return (src / FILE).read_text()
    return getattr(peek_tokenizer(model or recorded_base(src)), "chat_template", None)
