"""Any model a user brings (issue 24): every common architecture family x every method, on tiny
random models that transformers builds from a config (no download). Each run trains, or is
refused in one line naming the family, the method and what to use instead; never a traceback."""

import json
import os

import pytest
from transformers import AutoConfig

from peftkit.cli import main
from peftkit.tiny import tiny_llama_tokenizer
from tests.families import DECODERS, ENCODERS, OUTSIDE

METHODS = ["full", "probe", "lora", "dora", "qlora", "ia3", "bottleneck", "prompt", "prefix"]
REFUSED = {  # (family, method) -> what the one-line refusal must say
    **{(f, m): "mixture of experts" for f in ("mixtral", "qwen3_moe")
       for m in ("ia3", "bottleneck")},
    **{(f, m): "virtual tokens train a causal LM" for f in ENCODERS for m in ("prompt",
                                                                              "prefix")},
}


@pytest.fixture(scope="module")
def models(family_models):
    return family_models


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
    from peftkit.methods.base import roles
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
    assert report["family"] == "phi3" and report["roles"]["key_value"] == ["self_attn.qkv_proj"]
    assert report["methods"]["ia3"]["targets"] == ["mlp.down_proj", "self_attn.qkv_proj"]
    assert report["vllm_lora"] is True  # vLLM's Phi-3 adapts the fused layers themselves
    assert report["vllm_lora_targets"] == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    assert main(["inspect", str(models["gpt2"])]) == 0
    out = capsys.readouterr().out
    # Conv1D: the attention's c_proj and the MLP's are told apart by their block-relative names
    assert "ia3         yes   attn.c_attn, mlp.c_proj\n" in out
    assert "bottleneck  yes   attn.c_proj, mlp.c_proj\n" in out
    assert "export --for vllm: no: vLLM serves no LoRA adapters on gpt2 models" in out
    assert "prompt      yes   virtual tokens" in out
    assert main(["inspect", "tiny-llama", "--json"]) == 0
    llama = json.loads(capsys.readouterr().out)
    assert llama["vllm_lora"] and all(m["supported"] for m in llama["methods"].values())


def test_experts_left_out_are_named(models, data, tmp_path, capsys):
    """Mixtral's experts are fused 3-D weights that no layer adapter wraps: inspect, the run's
    log and its report say so instead of leaving the user to find out."""
    assert main(["inspect", str(models["mixtral"]), "--json"]) == 0
    note = json.loads(capsys.readouterr().out)["not_adapted"]
    assert note.startswith("not adapted: mlp.experts.gate_up_proj, mlp.experts.down_proj (")
    assert main(["train", "--model", str(models["mixtral"]), "--data", str(data / "lm.jsonl"),
                 "--method", "lora", "--steps", "1", "--val-split", "0", "--exact-match-max", "0",
                 "--output", str(tmp_path / "run")]) == 0
    assert note in capsys.readouterr().err
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["not_adapted"] == note
    assert "| not adapted | mlp.experts.gate_up_proj" in (tmp_path / "run" / "report.md").read_text()
    assert main(["train", "--model", str(models["llama"]), "--data", str(data / "lm.jsonl"),
                 "--method", "lora", "--steps", "1", "--val-split", "0", "--exact-match-max", "0",
                 "--output", str(tmp_path / "dense")]) == 0
    assert json.loads((tmp_path / "dense" / "report.json").read_text())["not_adapted"] is None
