"""`export --for gguf` with SentencePiece-style tokenizers (Llama 2, Mistral v0.1, Phi-3, Gemma;
issue 27.2): the vocabulary as llama.cpp's `llama` tokenizer (pieces scored in merge order,
byte tokens typed BYTE, the dummy-prefix space recorded), read back by transformers with the
merged model's greedy tokens; Gemma 1 written as llama.cpp's `gemma`; Ollama's TEMPLATE for
Phi-3's and Gemma's markups. llama.cpp's own tokenization of these files: bench/llamacpp.py."""

import numpy as np
import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.generation import generate_ids
from peftkit.gguf_export import write_gguf
from peftkit.tiny_sentencepiece import spm_model, spm_tokenizer
from tests.test_export_merged import _run

TEXTS = ["The quick brown fox jumps over the lazy dog.", "thank the customer for their patience",
         "Order #A-17: ship 3x widgets to Zürich; naïve café.", "日本語 emoji 🙂 and 12345"]


def saved_spm_model(family: str, style: str, root) -> str:
    out = root / f"{family}-{style}"
    model, tok = spm_model(family, style)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def _read(path):
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    return reader, {f.name: f for f in reader.fields.values()}


def _field(fields, name):
    field = fields[name]
    return [field.contents(i) for i in range(len(field.data))] if len(field.data) > 1 else \
        field.contents()


@pytest.mark.parametrize("family,style", [("llama", "llama2"), ("phi3", "llama2"),
                                          ("gemma2", "gemma")])
def test_sentencepiece_vocabularies_read_back_the_same(family, style, write, tmp_path):
    run = _run(write, tmp_path, "lora", model=saved_spm_model(family, style, tmp_path),
               targets="all-linear")
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 0
    path = tmp_path / "g" / "model-f16.gguf"
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file=path.name).eval()
    prompts = [tok(t).input_ids for t in TEXTS] + [[tok.bos_token_id, 300 + i] for i in range(8)]
    want = generate_ids(merged, tok, prompts, 6)
    assert generate_ids(back, tok, prompts, 6) == want and sum(map(len, want)) >= 16
    # transformers rebuilds the tokenizer from the GGUF alone: the same ids for every text
    # (not for a text opening with a space: its GGUF reader drops that space, llama.cpp keeps it)
    reread = AutoTokenizer.from_pretrained(tmp_path / "g", gguf_file=path.name)
    for text in TEXTS:
        assert reread(text).input_ids == tok(text).input_ids, text
    _, fields = _read(path)
    assert _field(fields, "tokenizer.ggml.model") == "llama"
    assert _field(fields, "general.name") == f"{family}-{style}-lora"  # the base's, not a path
    assert _field(fields, "tokenizer.ggml.add_space_prefix") is (style == "llama2")
    assert _field(fields, "tokenizer.ggml.unknown_token_id") == tok.unk_token_id
    types = _field(fields, "tokenizer.ggml.token_type")
    assert [types[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] for b in (0, 65, 255)] == [6] * 3
    assert types[tok.unk_token_id] == 2 and types[tok.bos_token_id] == 3


def test_pieces_score_in_merge_order(tmp_path):
    """llama.cpp joins the adjacent pair whose piece scores highest: scores falling with the
    merge's rank reproduce Hugging Face's BPE (equal scores would join leftmost first; in
    bench/llamacpp.py that mis-tokenizes 3 of 400 texts)."""
    tok = spm_tokenizer("llama2")
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=128,
                                  vocab_size=len(tok))
    path = write_gguf(AutoModelForCausalLM.from_config(config), tok, tmp_path / "m.gguf")
    _, fields = _read(path)
    scores = np.array(_field(fields, "tokenizer.ggml.scores"))
    import json
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    made = [tok.convert_tokens_to_ids("".join(m)) for m in merges]
    assert len(merges) > 100 and np.all(np.diff(scores[made]) < 0)
    others = np.setdiff1d(np.arange(len(tok)), made)
    assert scores[others].max() < scores[made].min()


def test_gemma_1_is_written_as_llama_cpp_gemma(write, tmp_path):
    """transformers has no GGUF reader for Gemma 1, so the file is checked field by field: the
    `gemma` architecture, norms stored as 1 + w, a tied head left to token_embd."""
    model = saved_spm_model("gemma", "gemma", tmp_path)
    run = _run(write, tmp_path, "lora", model=model)
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 0
    reader, fields = _read(tmp_path / "g" / "model-f16.gguf")
    assert _field(fields, "general.architecture") == "gemma"
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors and "blk.1.ffn_gate.weight" in tensors
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    norm = merged.model.layers[0].input_layernorm.weight.detach().numpy()
    assert np.allclose(np.asarray(tensors["blk.0.attn_norm.weight"].data), norm + 1)


@pytest.mark.parametrize("style,markup,stop", [("llama2", "<|{{ .Role }}|>", "<|end|>"),
                                               ("gemma", "<start_of_turn>model", "<end_of_turn>")])
def test_ollama_templates_for_phi3_and_gemma(style, markup, stop, write, tmp_path, capsys):
    family = "phi3" if style == "llama2" else "gemma2"
    run = _run(write, tmp_path, "lora", model=saved_spm_model(family, style, tmp_path))
    assert main(["export", "--for", "ollama", str(run), str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert markup in text and f'PARAMETER stop "{stop}"' in text and "</s>" not in text


def test_other_tokenizer_models_are_refused_by_name(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    raw = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")
    config = AutoConfig.for_model("llama", hidden_size=64, num_hidden_layers=1,
                                  num_attention_heads=4, intermediate_size=128, vocab_size=8)
    with pytest.raises(PeftkitError, match="this one is WordLevel"):
        write_gguf(AutoModelForCausalLM.from_config(config), tok, tmp_path / "m.gguf")
