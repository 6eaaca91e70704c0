"""`peftkit export --for vllm`: what vLLM's LoRA loader refuses is refused here first, in one
line naming the adapter and the reason; what it accepts is written with the command to serve it."""

import json
import shlex

import pytest
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.formats import save_adapter
from peftkit.methods import IA3Config, LoraConfig, PromptTuningConfig, add_adapter
from tests.helpers import tiny_llama

LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def saved(tmp_path, name, config, edit=None):
    base = tiny_llama()
    directory = save_adapter(add_adapter(base.model, config, tokenizer=base.tokenizer),
                             tmp_path / name, base_name="tiny-llama")
    if edit:
        cfg = json.loads((directory / "adapter_config.json").read_text())
        (directory / "adapter_config.json").write_text(json.dumps({**cfg, **edit}))
    return directory


REFUSED = {
    "dora": (LoraConfig(r=8, targets=LLAMA, use_dora=True), None, "DoRA"),
    "ia3": (IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
            None, "it is IA3; vLLM serves LoRA only"),
    "prompt": (PromptTuningConfig(num_virtual_tokens=4), None, "vLLM serves LoRA only"),
    "save": (LoraConfig(r=8), {"modules_to_save": ["lm_head"]}, "modules_to_save"),
    "bias": (LoraConfig(r=8), {"bias": "lora_only"}, "bias 'lora_only'"),
    "big": (LoraConfig(r=600, targets=["q_proj"]), None, "rank 600 is over vLLM's largest"),
    "head": (LoraConfig(r=8, targets=["lm_head"]), None, "target modules ['lm_head']"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_each_refusal_is_one_line_naming_the_adapter(tmp_path, capsys, case):
    config, edit, reason = REFUSED[case]
    directory = saved(tmp_path, case, config, edit)
    assert main(["export", "--for", "vllm", str(directory), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(directory) in err and reason in err, err
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_full_fine_tuning_run_is_refused(tmp_path, capsys):
    run = tmp_path / "whole"
    (run / "model").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    assert main(["export", "--for", "vllm", str(run), str(tmp_path / "out")]) == 2
    assert "no adapter here" in capsys.readouterr().err


def test_accepted_adapters_are_written_as_vllm_reads_them(tmp_path, capsys):
    a = saved(tmp_path, "acme", LoraConfig(r=12, alpha=24, targets=LLAMA, use_rslora=True))
    run = tmp_path / "runs" / "bolt"  # a `peftkit train` run directory
    saved(run, "adapter", LoraConfig(r=4, targets=["q_proj", "v_proj"]))
    out = tmp_path / "vllm"
    assert main(["export", "--for", "vllm", str(a), str(run), str(out)]) == 0
    for name, r, alpha, targets, rslora in (("acme", 12, 24, LLAMA, True),
                                            ("bolt", 4, 16, ["q_proj", "v_proj"], False)):
        cfg = json.loads((out / name / "adapter_config.json").read_text())
        assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"]) == ("LORA", r, alpha)
        assert sorted(cfg["target_modules"]) == sorted(targets)
        assert cfg["use_rslora"] is rslora and cfg["use_dora"] is False
        assert cfg["bias"] == "none" and cfg["modules_to_save"] is None
        assert load_file(out / name / "adapter_model.safetensors")
    command = shlex.split(capsys.readouterr().out.strip().splitlines()[-1])
    assert command[:4] == ["vllm", "serve", "tiny-llama", "--enable-lora"]
    assert command[command.index("--max-lora-rank") + 1] == "16"  # 12 -> the next allowed
    assert command[command.index("--max-loras") + 1] == "2"
    assert f"acme={(out / 'acme').resolve()}" in command


def test_export_never_writes_through_a_link_nor_over_an_adapter(tmp_path, capsys):
    """`ln -s adapters/a11 out/g7; export g7 out` once replaced a11's weights with g7's."""
    a11 = saved(tmp_path / "adapters", "a11", LoraConfig(r=4, targets=["q_proj"]))
    g7 = saved(tmp_path, "g7", LoraConfig(r=8, targets=["v_proj"]))
    before = (a11 / "adapter_model.safetensors").read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    (out / "g7").symlink_to(a11)
    assert main(["export", "--for", "vllm", str(g7), str(out)]) == 2
    assert "out/g7: exists" in capsys.readouterr().err
    assert main(["export", "--for", "vllm", "--overwrite", str(g7), str(out)]) == 0
    assert (a11 / "adapter_model.safetensors").read_bytes() == before  # the link's target intact
    assert not (out / "g7").is_symlink() and json.loads(
        (out / "g7" / "adapter_config.json").read_text())["target_modules"] == ["v_proj"]
    assert sorted(p.name for p in out.iterdir()) == ["g7"]  # no temporary left behind
    # OUT = the source's own parent: refused by name, not "PosixPath(...) are the same file"
    assert main(["export", "--for", "vllm", "--overwrite", str(g7), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is the source adapter itself" in err and "PosixPath" not in err


def test_a_weight_file_linked_to_another_adapter_is_refused(tmp_path, capsys):
    """serve refuses a weight file that points outside its adapter; export now does too."""
    other = saved(tmp_path / "adapters", "other", LoraConfig(r=4, targets=["q_proj"]))
    fake = saved(tmp_path, "fake", LoraConfig(r=4, targets=["q_proj"]))
    (fake / "adapter_model.safetensors").unlink()
    (fake / "adapter_model.safetensors").symlink_to(other / "adapter_model.safetensors")
    assert main(["export", "--for", "vllm", str(fake), str(tmp_path / "out")]) == 2
    assert "points outside" in capsys.readouterr().err and not (tmp_path / "out").exists()


@pytest.mark.parametrize("family,targets,ok", [
    ("phi3", ["qkv_proj", "gate_up_proj"], True),  # fused in the checkpoint: vLLM adapts them
    ("phi", ["q_proj", "dense", "fc2"], True),  # packed by vLLM from q/k/v_proj
    ("gpt_bigcode", ["c_attn", "c_fc"], True),
    ("gpt2", ["c_attn"], "vLLM serves no LoRA adapters on gpt2 models"),
    ("gpt_neox", ["query_key_value"], "vLLM serves no LoRA adapters on gpt_neox models"),
    ("qwen2", ["q_proj", "v_proj"], True),
])
def test_vllm_rules_follow_the_base_family(family, targets, ok, family_models, tmp_path, capsys):
    """Export reads the base's family from its config and applies that vLLM model class's
    module names (packed modules included), not Llama's everywhere."""
    from peftkit.models import load_base
    base = str(family_models[family])
    adapter = save_adapter(add_adapter(load_base(base).model, LoraConfig(r=8, targets=targets)),
                           tmp_path / family, base_name=base)
    code = main(["export", "--for", "vllm", str(adapter), str(tmp_path / "out")])
    out, err = capsys.readouterr()
    if ok is True:
        assert code == 0, err
        written = json.loads((tmp_path / "out" / family / "adapter_config.json").read_text())
        assert written["target_modules"] == sorted(targets)
        assert shlex.split(out.strip().splitlines()[-1])[2] == base
    else:
        assert code == 2 and ok in err and len(err.strip().splitlines()) == 1, err
