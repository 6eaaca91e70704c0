import shutil
import time

import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.generation import generate_text
from peftkit.models import cache_dir, load_base, resolve_model_dir


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_tiny_models_are_bit_identical_across_builds(name):
    torch.manual_seed(0)
    a = load_base(name)
    torch.manual_seed(99)  # the global RNG must not matter
    b = load_base(name)
    assert _same_weights(a.model, b.model)
    assert a.tokenizer("same text").input_ids == b.tokenizer("same text").input_ids


def test_tiny_tasks():
    assert type(load_base("tiny-llama").model).__name__ == "LlamaForCausalLM"
    assert type(load_base("tiny-bert").model).__name__ == "BertModel"
    clf = load_base("tiny-bert", task="classify", num_labels=3).model
    assert clf.config.num_labels == 3
    assert type(load_base("tiny-llama", task="classify").model).__name__ == \
        "LlamaForSequenceClassification"


def test_hf_directory_round_trip(tmp_path):
    base = load_base("tiny-llama")
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    again = load_base(str(tmp_path))
    assert again.task == "causal-lm" and again.path == tmp_path
    assert _same_weights(base.model, again.model)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        assert torch.equal(base.model(ids).logits, again.model(ids).logits)


def test_errors_are_one_line_and_name_the_problem(tmp_path):
    with pytest.raises(PeftkitError, match=r"unknown model 'nope'.*smollm2-135m, minilm-l6"):
        load_base("nope")
    with pytest.raises(PeftkitError, match="model path not found: /no/such/dir"):
        load_base("/no/such/dir")
    with pytest.raises(PeftkitError, match="no config.json"):
        load_base(str(tmp_path))
    with pytest.raises(PeftkitError, match="unknown task"):
        load_base("tiny-llama", task="translate")


def test_truncated_weights_and_pickles_refused(tmp_path):
    base = load_base("tiny-llama")
    base.model.save_pretrained(tmp_path)
    base.tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(PeftkitError, match=r"model.safetensors: truncated or corrupt"):
        load_base(str(tmp_path))
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(PeftkitError, match=r"model.safetensors: corrupt safetensors"):
        load_base(str(tmp_path))
    weights.unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PeftkitError, match=r"no .safetensors weights.*pytorch_model.bin.*never"):
        load_base(str(tmp_path))


def test_corrupt_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 100)
    with pytest.raises(PeftkitError, match="broken.gguf: not a readable GGUF model"):
        load_base(str(bad))
    assert not list((tmp_path / "cache" / "gguf").glob("broken*")), "no half-written cache entry"


def test_smollm2_from_clean_cache_answers_paris(tmp_path, monkeypatch):
    """The real default model end to end: PyPI wheel -> GGUF -> safetensors cache -> chat."""
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    base = load_base("smollm2-135m")
    cached = cache_dir() / "smollm2-135m" / "model.safetensors"
    assert cached.exists() and base.path == cached.parent
    answer = generate_text(base, "What is the capital of France?", max_new_tokens=24)
    assert "Paris" in answer
    stamp = cached.stat().st_mtime_ns
    start = time.perf_counter()
    again = load_base("smollm2-135m")
    print(f"second load of smollm2-135m: {time.perf_counter() - start:.2f} s")
    assert cached.stat().st_mtime_ns == stamp, "second load must read the cache, not reconvert"
    assert _same_weights(base.model, again.model)


def test_minilm_encoder_embeds_meaningfully(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    base = load_base("minilm-l6")
    assert base.task == "encoder" and base.model.config.hidden_size == 384
    texts = ["A great, moving film.", "A wonderful and touching movie.", "The tax form is due."]
    enc = base.tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = base.model(**enc).last_hidden_state
    mask = enc.attention_mask.unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > emb[0] @ emb[2] + 0.2


@pytest.mark.slow
def test_local_gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path))
    resolve_model_dir("smollm2-135m")
    gguf = next((tmp_path / "downloads").rglob("*.gguf"))
    local = tmp_path / "model.gguf"
    shutil.copy(gguf, local)
    base = load_base(str(local))
    assert "Paris" in generate_text(base, "What is the capital of France?", max_new_tokens=24)
