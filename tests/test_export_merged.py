"""`peftkit export --for merged` (issue 27.1): a run folded into its base, loaded by plain
transformers, answering as base + adapter did."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from peftkit.cli import main
from peftkit.generation import generate_ids
from peftkit.train import TrainConfig, train
from peftkit.train.run_dir import load_run

ROWS = [{"messages": [{"role": "user", "content": f"Tag order {i}."},
                      {"role": "assistant", "content": f"TAG-{i % 3}"}]} for i in range(12)]
PROMPTS = [[5 + i, 17 + 3 * i, 33, 61 + i][: 2 + i % 3] for i in range(16)]
LR = {"ia3": 5e-2, "full": 3e-3}
BOUND = {"float32": 1e-4, "bfloat16": 0.1}  # logits; bf16 keeps 8 bits of mantissa


def _run(write, tmp_path, method, model="tiny-llama", **kw):
    data = write("chat.jsonl", ROWS)
    out = tmp_path / method
    train(TrainConfig(model=model, data=str(data), method=method, output=str(out), steps=4,
                      batch_size=4, val_split=0.0, lr=LR.get(method, 2e-2), dropout=0.0,
                      bottleneck_size=8, num_virtual_tokens=4, **kw))
    return out


@pytest.mark.parametrize("method,dtype", [("lora", "float32"), ("dora", "float32"),
                                          ("qlora", "float32"), ("ia3", "float32"),
                                          ("lora", "bfloat16"), ("full", "float32")])
def test_the_merged_model_answers_as_base_plus_adapter(method, dtype, write, tmp_path,
                                                        capsys):
    run = _run(write, tmp_path, method)
    out = tmp_path / "merged"
    assert main(["export", "--for", "merged", str(run), str(out), "--dtype", dtype]) == 0
    said = capsys.readouterr().out
    report = json.loads((out / "peftkit_export.json").read_text())
    assert report["dtype"] == dtype and report["method"] == method
    if method == "qlora":
        assert "NF4 base's dequantized weights" in report["merge"] and "NF4" in said
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert merged.dtype == (torch.bfloat16 if dtype == "bfloat16" else torch.float32)
    loaded = load_run("tiny-llama", run)
    ids = torch.tensor([[5, 17, 33, 61, 90, 121, 7]])
    with torch.no_grad():
        want = loaded.module(input_ids=ids).logits
        got = merged(input_ids=ids).logits.float()
    assert (want - got).abs().max() <= BOUND[dtype]
    if dtype == "float32":  # greedy tokens on 16 prompts, batched, as peftkit decodes them
        tok = AutoTokenizer.from_pretrained(out)
        assert tok.chat_template == loaded.base.tokenizer.chat_template
        assert generate_ids(merged, tok, PROMPTS, 6) == \
            generate_ids(loaded.module, loaded.base.tokenizer, PROMPTS, 6)


def test_a_conv1d_family_merges_in_its_own_layout(family_models, write, tmp_path, capsys):
    run = _run(write, tmp_path, "lora", model=str(family_models["gpt2"]))
    out = tmp_path / "merged"
    assert main(["export", "--for", "merged", str(run), str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded = load_run(str(family_models["gpt2"]), run)
    ids = torch.tensor([[5, 17, 33, 61]])
    with torch.no_grad():
        assert (loaded.module(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() \
            <= 1e-4


@pytest.mark.parametrize("method,reason", [
    ("prompt", "adds virtual tokens at every request"),
    ("bottleneck", "nonlinear"),
    ("probe", "a probe's new head"),
])
def test_what_cannot_be_folded_is_refused_in_one_line(method, reason, write, tmp_path, capsys):
    run = _run(write, tmp_path, method)
    capsys.readouterr()
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert reason in err and "\n" not in err and not (tmp_path / "out").exists()


def test_an_existing_output_is_kept_unless_overwrite(write, tmp_path, capsys):
    run = _run(write, tmp_path, "lora")
    out = tmp_path / "merged"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["export", "--for", "merged", str(run), str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "mine.txt").exists()
    assert main(["export", "--for", "merged", str(run), str(out), "--overwrite"]) == 0
    assert not (out / "mine.txt").exists() and (out / "config.json").exists()
    assert main(["export", "--for", "merged", str(run), str(run / "inside")]) == 2
    assert "inside the run" in capsys.readouterr().err


@pytest.mark.parametrize("kind,agree", [("f16", 1.0), ("q8_0", 0.9)])
def test_gguf_reads_back_in_transformers_with_the_same_greedy_tokens(kind, agree, write,
                                                                     tmp_path, capsys):
    """export --for gguf (issue 27.2): llama.cpp's layout (names, rotary permutation, metadata,
    tokenizer), read back by transformers' own GGUF loader; f16 keeps every greedy token of
    the merged model, q8_0 nearly all (the share is asserted, and printed)."""
    run = _run(write, tmp_path, "lora")
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g"), "--gguf-type",
                 kind]) == 0
    assert f"model-{kind}.gguf" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g",
                                                gguf_file=f"model-{kind}.gguf").eval()
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    want = generate_ids(merged, tok, PROMPTS, 6)
    got = generate_ids(back, tok, PROMPTS, 6)
    same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
    share = same / max(1, sum(map(len, want)))
    print(f"{kind}: {share:.1%} of greedy tokens equal the merged model's")
    assert share >= agree and sum(map(len, want)) >= 16
    from transformers.integrations.gguf.gguf_tokenizer_mapping import get_gguf_tokenizer
    _, tokenizer_dict, config_dict = get_gguf_tokenizer(str(tmp_path / "g" / f"model-{kind}.gguf"))
    assert tokenizer_dict["tokenizer_type"] == "gpt2"
    assert config_dict["chat_template"] == tok.chat_template


def test_gguf_refuses_other_architectures_by_name(family_models, write, tmp_path, capsys):
    run = _run(write, tmp_path, "lora", model=str(family_models["gpt2"]))
    capsys.readouterr()
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err
    assert "gpt2 is not written here (llama, mistral, qwen2, phi3, gemma, gemma2); use --for merged" in err
    assert not (tmp_path / "g").exists() and not list(tmp_path.glob(".g.*"))


def test_ollama_gets_a_modelfile_with_the_chat_markup_and_its_stop(write, tmp_path, capsys):
    run = _run(write, tmp_path, "lora")
    assert main(["export", "--for", "ollama", str(run), str(tmp_path / "o")]) == 0
    said = capsys.readouterr().out
    assert f"ollama create lora -f {tmp_path / 'o' / 'Modelfile'}" in said
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert text.startswith("FROM ./model-q8_0.gguf\n") and (tmp_path / "o" / "model-q8_0.gguf").is_file()
    assert "<|im_start|>{{ .Role }}" in text and 'PARAMETER stop "<|im_end|>"' in text


def test_ollama_refuses_a_template_it_cannot_translate(write, tmp_path, capsys):
    template = write("mine.jinja", "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}"
                                   "{% endfor %}")
    run = _run(write, tmp_path, "lora", chat_template=str(template))
    capsys.readouterr()
    assert main(["export", "--for", "ollama", str(run), str(tmp_path / "o")]) == 2
    assert "none of ChatML, Phi-3, Zephyr, Gemma or Llama 3" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_gguf_of_other_families_reads_back_the_same(family, family_models, write, tmp_path):
    """Mistral is written as llama.cpp's `llama` (rotary rows permuted), Qwen2 as `qwen2`
    (halves rotated, q/k/v biases kept): both read back by transformers give the merged
    model's greedy tokens."""
    run = _run(write, tmp_path, "lora", model=str(family_models[family]))
    assert main(["export", "--for", "merged", str(run), str(tmp_path / "merged")]) == 0
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "g")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "g", gguf_file="model-f16.gguf")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert generate_ids(back.eval(), tok, PROMPTS, 6) == generate_ids(merged, tok, PROMPTS, 6)
