"""`export --for gguf|ollama --adapter-only` (issue 27.2): a LoRA run as llama.cpp's adapter GGUF
beside its base GGUF. llama.cpp computes W + (alpha / r) B A from the two files; that sum must
be the merged export's weight, tensor for tensor, in llama.cpp's own layout (names, rotary
permutation)."""

import json

import numpy as np
import pytest

from peftkit.cli import main
from tests.test_export_merged import _run

pytest.importorskip("gguf")


def _read(path):
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith("tokenizer.ggml.")}
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(t.data.shape)
               for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("method,kw", [("lora", {}), ("lora", {"rslora": True}),
                                       ("qlora", {})])
def test_base_plus_adapter_gguf_is_the_merged_gguf(method, kw, write, tmp_path, capsys):
    run = _run(write, tmp_path, method, **kw)
    assert main(["export", "--for", "gguf", "--adapter-only", str(run), str(tmp_path / "a"),
                 "--gguf-type", "f16"]) == 0
    said = capsys.readouterr().out
    assert "--lora" in said and "adapter.gguf" in said
    assert main(["export", "--for", "gguf", str(run), str(tmp_path / "m")]) == 0
    meta, lora = _read(tmp_path / "a" / "adapter.gguf")
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    r = json.loads((run / "adapter" / "adapter_config.json").read_text())["r"]
    alpha = meta["adapter.lora.alpha"]
    report = json.loads((tmp_path / "a" / "peftkit_export.json").read_text())
    assert alpha == pytest.approx(report["lora_alpha"])
    if kw.get("rslora"):  # llama.cpp divides by r: the alpha that gives alpha/sqrt(r)
        assert alpha == pytest.approx(16.0 * r ** 0.5, rel=1e-6)
    if method == "qlora":
        assert "NF4" in report["base_weights"]
    _, base = _read(tmp_path / "a" / "base-f16.gguf")
    _, merged = _read(tmp_path / "m" / "model-f16.gguf")
    assert set(base) == set(merged)
    pairs = sorted(n.removesuffix(".lora_a") for n in lora if n.endswith(".lora_a"))
    assert len(pairs) == 7 * 2 and all(f"{p}.lora_b" in lora for p in pairs)  # all-linear
    worst = 0.0
    for name in base:
        want = merged[name]
        got = base[name]
        if name in pairs:  # GGUF shapes are reversed; numpy's are (out, in) here
            got = got + alpha / r * lora[f"{name}.lora_b"] @ lora[f"{name}.lora_a"]
        worst = max(worst, float(np.abs(got - want).max() / (np.abs(want).max() + 1e-6)))
    assert worst < 2e-3, worst  # f16 rounding of both files


def test_ollama_adapter_only_modelfile_names_base_and_adapter(write, tmp_path, capsys):
    run = _run(write, tmp_path, "lora")
    assert main(["export", "--for", "ollama", "--adapter-only", str(run),
                 str(tmp_path / "o")]) == 0
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert text.startswith("FROM ./base-q8_0.gguf\nADAPTER ./adapter.gguf\n")
    assert (tmp_path / "o" / "base-q8_0.gguf").is_file()
    assert (tmp_path / "o" / "adapter.gguf").is_file()


@pytest.mark.parametrize("method,engine,reason", [
    ("dora", "gguf", "llama.cpp's adapters are LoRA; this DoRA adapter exports merged"),
    ("ia3", "gguf", "this IA3 adapter exports merged"),
    ("full", "gguf", "no LoRA adapter"),
    ("lora", "merged", "--adapter-only: llama.cpp's adapter GGUF, with --for gguf or ollama")])
def test_what_llama_cpp_cannot_load_as_an_adapter_is_refused_first(method, engine, reason,
                                                                   write, tmp_path, capsys):
    run = _run(write, tmp_path, method)
    assert main(["export", "--for", engine, "--adapter-only", str(run),
                 str(tmp_path / "x")]) == 2
    assert reason in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
