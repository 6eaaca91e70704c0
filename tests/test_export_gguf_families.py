"""`export --for gguf` for phi3 and gemma2 (issue 27.2): written in llama.cpp's layout for each
(phi3's fused qkv and gate_up as attn_qkv / ffn_up; gemma2's norms stored as 1 + w, its extra
norms, soft-caps and sliding window) and read back by transformers' own GGUF loader with the
merged model's greedy tokens; what llama.cpp's format cannot hold is refused by name."""

import pytest
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from peftkit.cli import main
from peftkit.generation import generate_ids
from tests.test_export_merged import PROMPTS, _run


def _gemma2_like_llama_cpp(family_models, tmp_path):
    """The tiny gemma2 with head_dim = query_pre_attn_scalar = 256, as Gemma 2 2B/9B have it:
    llama.cpp's gemma2 scales queries by head_dim, and transformers' GGUF reader leaves the
    scalar at its default, 256."""
    src = family_models["gemma2"]
    config = AutoConfig.from_pretrained(src)
    config.head_dim = config.query_pre_attn_scalar = 256
    model = AutoModelForCausalLM.from_config(config)
    out = tmp_path / "gemma2-like"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(src).save_pretrained(out)
    return out


@pytest.mark.parametrize("family", ["phi3", "gemma2"])
def test_gguf_of_phi3_and_gemma2_reads_back_the_same(family, family_models, write, tmp_path,
                                                     capsys):
    base = family_models["phi3"] if family == "phi3" else \
        _gemma2_like_llama_cpp(family_models, tmp_path)
    run = _run(write, tmp_path, "lora", model=str(base), targets="all-linear")
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model-f16.gguf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = generate_ids(merged, tok, PROMPTS, 6)
    assert generate_ids(back, tok, PROMPTS, 6) == want and sum(map(len, want)) >= 16
    from gguf import GGUFReader
    reader = GGUFReader(str(tmp_path / "g" / "model-f16.gguf"))
    names = {t.name for t in reader.tensors}
    if family == "phi3":
        assert "blk.0.attn_qkv.weight" in names and "blk.0.ffn_up.weight" in names
    else:
        assert {"blk.0.post_attention_norm.weight", "blk.0.post_ffw_norm.weight"} <= names
        fields = {f.name for f in reader.fields.values()}
        assert "gemma2.final_logit_softcapping" in fields


def test_what_llama_cpp_cannot_hold_is_refused_by_name(family_models, write, tmp_path, capsys):
    """Gemma 2's query_pre_attn_scalar other than head_dim (llama.cpp has no field for it) and
    rope scaling (llama.cpp needs its own factor tensors) are refused, never written wrong."""
    run = _run(write, tmp_path, "lora", model=str(family_models["gemma2"]))
    capsys.readouterr()
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 2
    assert "query_pre_attn_scalar 256 != head_dim 16" in capsys.readouterr().err
    scaled = tmp_path / "scaled"
    config = AutoConfig.from_pretrained(family_models["llama"])
    config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    AutoModelForCausalLM.from_config(config).save_pretrained(scaled)
    AutoTokenizer.from_pretrained(family_models["llama"]).save_pretrained(scaled)
    run = _run(write, tmp_path / "scaled-run", "lora", model=str(scaled))
    capsys.readouterr()
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g2")]) == 2
    assert "rope scaling 'linear' is not written here yet" in capsys.readouterr().err
    assert not (tmp_path / "g").exists() and not (tmp_path / "g2").exists()
