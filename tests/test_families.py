"""Any model a user brings (issue 24): every common architecture family x every method, on tiny
random models that transformers builds from a config (no download). Each run trains, or is
refused in one line naming the family, the method and what to use instead; never a traceback."""

import json
import os

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from peftkit.cli import main
from peftkit.tiny import tiny_llama_tokenizer

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "mixtral", "olmo2",
            "starcoder2", "opt", "bloom", "gpt_bigcode", "granite"]
ENCODERS = ["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "electra",
            "modernbert"]
OUTSIDE = ["stablelm"]  # not in the list: structure detection has to find its layers
METHODS = ["full", "probe", "lora", "dora", "qlora", "ia3", "bottleneck", "prompt", "prefix"]
GQA = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
       "phi3", "mixtral", "olmo2", "starcoder2", "granite", "stablelm"}
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=320, max_position_embeddings=256)
OWN_NAMES = {  # families whose configs name the sizes their own way
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "bloom": dict(n_layer=2, n_head=4), "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "falcon": dict(new_decoder_architecture=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      head_dim=16),
    "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16),
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
}
REFUSED = {  # (family, method) -> what the one-line refusal must say
    **{(f, m): "Conv1D" for f in ("gpt2",) for m in ("lora", "dora", "qlora", "ia3",
                                                     "bottleneck")},
    **{(f, m): "mixture of experts" for f in ("mixtral", "qwen3_moe")
       for m in ("ia3", "bottleneck")},
    **{(f, m): "virtual tokens train a causal LM" for f in ENCODERS for m in ("prompt",
                                                                              "prefix")},
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> a saved random-weight model directory with the tiny byte-level tokenizer."""
    root = tmp_path_factory.mktemp("families")
    tok = tiny_llama_tokenizer()
    out = {}
    for family in DECODERS + ENCODERS + OUTSIDE:
        kw = {**SIZES, **({"num_key_value_heads": 2} if family in GQA else {}),
              **OWN_NAMES.get(family, {})}
        config = AutoConfig.for_model(family, **kw)
        config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
        config.bos_token_id = tok.bos_token_id
        auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
        auto.from_config(config).save_pretrained(root / family)
        tok.save_pretrained(root / family)
        out[family] = root / family
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("family-data")
    (d / "lm.jsonl").write_text("".join(json.dumps({"prompt": f"Q: item {i}?",
                                                    "completion": f"A{i % 3}"}) + "\n"
                                        for i in range(8)))
    (d / "clf.jsonl").write_text("".join(json.dumps({"text": f"{w} movie {i}", "label": lab})
                                         + "\n" for i, (w, lab) in
                                         enumerate([("great", "pos"), ("awful", "neg")] * 4)))
    return d


@pytest.mark.parametrize("family", DECODERS + ENCODERS + OUTSIDE)
def test_every_method_trains_or_is_refused_in_one_line(family, models, data, tmp_path, capsys):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = data / ("clf.jsonl" if family in ENCODERS else "lm.jsonl")
    outcomes = {}
    for method in METHODS:
        args = ["train", "--model", str(models[family]), "--data", str(rows), "--method",
                method, "--steps", "1", "--batch-size", "4", "--val-split", "0",
                "--exact-match-max", "0", "--num-virtual-tokens", "4", "--bottleneck-size", "8",
                "--rank", "4", "--output", str(tmp_path / method)]
        code = main(args)
        err = capsys.readouterr().err
        assert "Traceback" not in err, (family, method, err[-2000:])
        errors = [line for line in err.splitlines() if line.startswith("peftkit: error:")]
        outcomes[method] = "ok" if code == 0 else (errors[-1] if errors else err[-300:])
        if (family, method) in REFUSED:
            assert code == 2 and len(errors) == 1, (family, method, err[-500:])
            assert REFUSED[(family, method)] in errors[0] and family.split("-")[0] in \
                errors[0].lower() + method, errors[0]
        else:
            assert code == 0, (family, method, outcomes[method])
            report = json.loads((tmp_path / method / "report.json").read_text())
            assert report["trainable_params"] > 0 and len(report["train_losses"]) == 1


def test_attention_is_the_models_own_choice_unless_named(models, data, tmp_path, capsys):
    """gemma2 failed every method: peftkit forced sdpa, which it does not support."""
    args = ["train", "--model", str(models["gemma2"]), "--data", str(data / "lm.jsonl"),
            "--method", "lora", "--steps", "1", "--val-split", "0", "--exact-match-max", "0",
            "--output", str(tmp_path / "auto")]
    assert main(args) == 0
    assert main(args[:-1] + [str(tmp_path / "eager"), "--attn", "eager"]) == 0


def test_ia3_and_bottleneck_placed_by_structure():
    """Layer roles found from transformers' own module names, per family."""
    from peftkit.methods.config import roles
    neox = roles(["gpt_neox.layers.0.attention.query_key_value", "gpt_neox.layers.0.attention.dense",
                  "gpt_neox.layers.0.mlp.dense_h_to_4h", "gpt_neox.layers.0.mlp.dense_4h_to_h"])
    assert neox == {"key_value": ["gpt_neox.layers.0.attention.query_key_value"],
                    "attn_out": ["gpt_neox.layers.0.attention.dense"],
                    "mlp_out": ["gpt_neox.layers.0.mlp.dense_4h_to_h"]}
    bert = roles(["encoder.layer.0.attention.self.query", "encoder.layer.0.attention.self.key",
                  "encoder.layer.0.attention.self.value", "encoder.layer.0.attention.output.dense",
                  "encoder.layer.0.intermediate.dense", "encoder.layer.0.output.dense"])
    assert bert["attn_out"] == ["encoder.layer.0.attention.output.dense"]
    assert bert["mlp_out"] == ["encoder.layer.0.output.dense"]
    bigcode = roles(["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj",
                     "transformer.h.0.mlp.c_fc", "transformer.h.0.mlp.c_proj"])
    assert bigcode["attn_out"] == ["transformer.h.0.attn.c_proj"]
    assert bigcode["mlp_out"] == ["transformer.h.0.mlp.c_proj"]


def test_a_seq2seq_model_is_refused_in_one_line(tmp_path, data, capsys):
    config = AutoConfig.for_model("t5", d_model=32, d_ff=64, num_layers=1, num_heads=2,
                                  vocab_size=320, d_kv=16)
    from transformers import AutoModelForSeq2SeqLM
    AutoModelForSeq2SeqLM.from_config(config).save_pretrained(tmp_path / "t5")
    tiny_llama_tokenizer().save_pretrained(tmp_path / "t5")
    code = main(["train", "--model", str(tmp_path / "t5"), "--data", str(data / "lm.jsonl"),
                 "--method", "lora", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "t5 is an encoder-decoder (seq2seq) model" in err and "\n" not in err


def test_inspect_says_what_each_method_would_do(models, capsys):
    assert main(["inspect", str(models["phi3"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["family"] == "phi3" and report["roles"]["key_value"] == ["qkv_proj"]
    assert report["methods"]["ia3"]["targets"] == ["down_proj", "qkv_proj"]
    assert report["vllm_lora"] is False  # fused projections: not among export's names
    assert main(["inspect", str(models["gpt2"])]) == 0
    out = capsys.readouterr().out
    assert "lora        no    --method lora: gpt2 keeps its projections in Conv1D" in out
    assert "prompt      yes   virtual tokens" in out
    assert main(["inspect", "tiny-llama", "--json"]) == 0
    llama = json.loads(capsys.readouterr().out)
    assert llama["vllm_lora"] and all(m["supported"] for m in llama["methods"].values())
