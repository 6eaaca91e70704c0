"""PEFT's own properties, multi-slot exactness and bad-input errors for every method."""

import json

import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.formats import load_adapter, load_adapters, save_adapter
from peftkit.methods import (BottleneckConfig, IA3Config, LoraConfig, PrefixTuningConfig,
                             PromptTuningConfig, add_adapter, find_targets)
from peftkit.models import load_base
from tests.helpers import batch, logits, randomize, tiny_llama

LAYER_METHODS = {
    "lora": LoraConfig(r=4, targets="all-linear"),
    "rslora": LoraConfig(r=4, targets=["q_proj", "v_proj"], use_rslora=True),
    "dora": LoraConfig(r=4, targets=["q_proj", "gate_proj"], use_dora=True),
    "ia3": IA3Config(),
    "bottleneck": BottleneckConfig(size=8),
}
ALL = {**LAYER_METHODS, "prompt": PromptTuningConfig(num_virtual_tokens=3),
       "prefix": PrefixTuningConfig(num_virtual_tokens=3)}


@pytest.mark.parametrize("method", list(LAYER_METHODS))
def test_identity_at_init(method):
    base = tiny_llama()
    ids = batch()
    want = logits(base.model, ids)
    adapted = add_adapter(base.model, LAYER_METHODS[method])
    assert torch.equal(logits(adapted, ids), want)


@pytest.mark.parametrize("method", list(ALL))
def test_three_steps_change_only_adapter_parameters(method):
    base = tiny_llama()
    adapted = add_adapter(base.model, ALL[method], tokenizer=base.tokenizer)
    before = {n: p.detach().clone() for n, p in adapted.named_parameters()}
    params = [p for p in adapted.parameters() if p.requires_grad]
    assert {id(p) for p in params} == {id(p) for p in adapted.adapter_parameters()}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = batch()
    for _ in range(3):
        adapted(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    adapter_ids = {id(p) for p in adapted.adapter_parameters()}
    for n, p in adapted.named_parameters():
        changed = not torch.equal(before[n], p)
        assert changed == (id(p) in adapter_ids), n


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ia3"])
def test_merge_unmerge(method):
    base = tiny_llama()
    original = {n: p.detach().clone() for n, p in base.model.named_parameters()}
    adapted = add_adapter(base.model, LAYER_METHODS[method])
    randomize(adapted)
    ids = batch()
    unmerged = logits(adapted, ids)
    adapted.merge()
    assert (logits(adapted, ids) - unmerged).abs().max() <= 1e-4
    adapted.unmerge()
    for n, p in base.model.named_parameters():
        if n in original:
            assert (p - original[n]).abs().max() <= 1e-5, n
    assert (logits(adapted, ids) - unmerged).abs().max() <= 1e-5


@pytest.mark.parametrize("method", list(ALL))
def test_disable_adapter_gives_base_outputs(method):
    base = tiny_llama()
    ids = batch()
    want = logits(base.model, ids)
    adapted = add_adapter(base.model, ALL[method], tokenizer=base.tokenizer)
    randomize(adapted)
    assert not torch.allclose(logits(adapted, ids), want)
    with adapted.disable_adapter():
        assert torch.equal(logits(adapted, ids), want)


@pytest.mark.parametrize("method", list(ALL))
def test_save_load_save_is_byte_stable(method, tmp_path):
    base = tiny_llama()
    adapted = add_adapter(base.model, ALL[method], tokenizer=base.tokenizer)
    randomize(adapted)
    save_adapter(adapted, tmp_path / "a")
    save_adapter(load_adapter(tiny_llama().model, tmp_path / "a"), tmp_path / "b")
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def _save_random(cfg, path, seed):
    base = tiny_llama()
    adapted = add_adapter(base.model, cfg, tokenizer=base.tokenizer)
    randomize(adapted, seed)
    save_adapter(adapted, path)
    return path


MIXED = {
    "lora": [LoraConfig(r=2, targets=["q_proj"]), LoraConfig(r=8, targets="all-linear"),
             LoraConfig(r=4, alpha=4, targets=["v_proj", "down_proj"], use_rslora=True)],
    "dora": [LoraConfig(r=2, targets=["q_proj"], use_dora=True),
             LoraConfig(r=6, targets=["q_proj", "o_proj"], use_dora=True)],
    "ia3": [IA3Config(), IA3Config(targets=["q_proj", "down_proj"])],
    "bottleneck": [BottleneckConfig(size=8), BottleneckConfig(size=8, targets=["o_proj"])],
    "prefix": [PrefixTuningConfig(num_virtual_tokens=3)] * 2,
    "prompt": [PromptTuningConfig(num_virtual_tokens=3)] * 2,
}


@pytest.mark.parametrize("length", [6, 1])  # 1: the one-token decode path
@pytest.mark.parametrize("method", list(MIXED))
def test_mixed_batch_rows_equal_single_runs(method, length, tmp_path):
    cfgs = MIXED[method]
    dirs = {f"a{i}": _save_random(c, tmp_path / f"a{i}", seed=i) for i, c in enumerate(cfgs)}
    multi = load_adapters(tiny_llama().model, dirs)
    base_rows = method not in ("prefix", "prompt")  # virtual tokens change the sequence length
    slots = [0, 1, len(cfgs) - 1, 1, 0] + ([-1, -1] if base_rows else [])
    ids = batch(rows=len(slots), length=length, seed=5)
    out = logits(multi, ids, slots=torch.tensor(slots))
    plain = tiny_llama().model
    for row, k in enumerate(slots):
        if k < 0:
            want = logits(plain, ids[row:row + 1])
        else:
            single = load_adapter(tiny_llama().model, dirs[f"a{k}"])
            want = logits(single, ids[row:row + 1])
        assert (out[row:row + 1] - want).abs().max() <= 1e-5, (row, k)


def test_targets_follow_peft_rules():
    model = tiny_llama().model
    assert find_targets(model, ["q_proj"]) == ["model.layers.0.self_attn.q_proj",
                                               "model.layers.1.self_attn.q_proj"]
    assert find_targets(model, r"model\.layers\.1\..*_proj") == [
        n for n in find_targets(model, "all-linear") if n.startswith("model.layers.1.")]
    assert "lm_head" not in find_targets(model, "all-linear")
    clf = load_base("tiny-bert", task="classify").model
    names = find_targets(clf, "all-linear")
    assert names and not any(n.startswith("classifier") for n in names)
    with pytest.raises(PeftkitError, match=r"target module 'q_prj' not found in the base "
                                           r"\(closest: q_proj"):
        find_targets(model, ["q_prj"])
    with pytest.raises(PeftkitError, match="matches no linear module"):
        find_targets(model, r"nothing.*")


def test_trainable_report_format():
    adapted = add_adapter(tiny_llama().model, LoraConfig(r=4, targets=["q_proj"]))
    # q_proj is 64 -> 64 in 2 layers: 2 * 4 * (64 + 64) = 1,024 trainable; the base has 90,624.
    assert adapted.trainable_report() == ("trainable params: 1,024 || all params: 91,648 || "
                                          "trainable%: 1.1173")


def test_bad_adapters_give_one_line_errors(tmp_path):
    good = _save_random(LoraConfig(r=4), tmp_path / "good", seed=0)
    model = tiny_llama().model
    with pytest.raises(PeftkitError, match=r"empty/adapter_config.json: missing"):
        (tmp_path / "empty").mkdir()
        load_adapter(model, tmp_path / "empty")
    nw = tmp_path / "noweights"
    nw.mkdir()
    (nw / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    with pytest.raises(PeftkitError, match="noweights/adapter_model.safetensors: missing adapter"):
        load_adapter(model, nw)
    (nw / "adapter_model.bin").write_bytes(b"\x80\x04 pickle bytes must never be unpickled")
    with pytest.raises(PeftkitError, match=r"adapter_model.bin: pickle adapters are refused"):
        load_adapter(model, nw)

    cfg = json.loads((good / "adapter_config.json").read_text())
    bad = tmp_path / "badtype"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LOHA"}))
    with pytest.raises(PeftkitError, match=r"unknown peft_type 'LOHA'"):
        load_adapter(model, bad)
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    with pytest.raises(PeftkitError, match=r"q_proj.lora_A.weight has rank 4 but "
                                           r"adapter_config.json says r=8"):
        load_adapter(tiny_llama().model, bad)


def test_shape_and_module_mismatch(tmp_path):
    from safetensors.torch import load_file, save_file
    good = _save_random(LoraConfig(r=4), tmp_path / "good", seed=0)
    tensors = load_file(good / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors[key] = torch.zeros(32, 4)
    save_file(tensors, good / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"shape mismatch for model.layers.0.self_attn.q_proj"
                                           r".lora_B.weight: expected \(64, 4\), got \(32, 4\)"):
        load_adapter(tiny_llama().model, good)
    tensors[key] = torch.zeros(64, 4)
    for k in [k for k in tensors if ".layers.0.self_attn.q_proj." in k]:
        tensors[k.replace("layers.0", "layers.7")] = tensors.pop(k)
    save_file(tensors, good / "adapter_model.safetensors")
    with pytest.raises(PeftkitError, match=r"module 'model.layers.7.self_attn.q_proj' is not in "
                                           r"the base"):
        load_adapter(tiny_llama().model, good)


@pytest.mark.parametrize("method", ["lora", "dora", "ia3"])
def test_export_merged_is_a_plain_hf_model(method, tmp_path):
    base = tiny_llama()
    adapted = add_adapter(base.model, LAYER_METHODS[method])
    randomize(adapted)
    ids = batch()
    want = logits(adapted, ids)
    from peftkit.merged import export_merged
    export_merged(adapted, tmp_path, base.tokenizer)
    plain = load_base(str(tmp_path))
    assert type(plain.model).__name__ == "LlamaForCausalLM"
    assert (logits(plain.model, ids) - want).abs().max() <= 1e-4
    assert (logits(adapted, ids) - want).abs().max() <= 1e-5, "export leaves it unmerged"


def assert_each_row_alone(mixed, ids, slots, case):
    """Every row of one mixed forward gets what its adapter alone gives it; base rows, bit for
    bit what the same batch gives without adapters."""
    with torch.no_grad():
        base_only = mixed(input_ids=ids, slots=torch.full((len(slots),), -1)).logits
        got = mixed(input_ids=ids, slots=torch.tensor(slots)).logits
        assert torch.isfinite(got).all(), case
        for row, k in enumerate(slots):
            if k < 0:
                assert torch.equal(got[row], base_only[row]), case
                continue
            with mixed.pinned(k):
                want = mixed(input_ids=ids[row:row + 1]).logits
            assert (got[row] - want[0]).abs().max() < 1e-5, (case, row)


@pytest.mark.parametrize("length", [1, 5])  # a decode step, a prefill
def test_rows_laid_out_by_slot_equal_each_row_alone(length):
    """A forward on many slots lays rows out by slot (the whole stack in place when most slots
    are used, the used slots copied out otherwise; rows already in that order used as they are,
    others gathered or scattered into it): every row gets what its adapter alone gives it, and
    a NaN in a slot no row uses reaches nobody."""
    mixed = add_adapter(tiny_llama().model, LoraConfig(r=4, targets="all-linear"), slots=24)
    randomize(mixed, seed=3)
    with torch.no_grad():
        next(iter(mixed.adapted_layers().values())).lora_A[23].fill_(float("nan"))  # unused
    ids = batch(rows=24, length=length)
    threes = [k for k in range(8) for _ in range(3)]  # 8 slots (copied out), three rows each
    shuffled = [threes[i] for i in torch.randperm(24, generator=torch.Generator().manual_seed(0))]
    cases = {"most slots, base rows, repeats": list(range(16)) + [-1, -1, 2, 5, 1, -1, 8, 8],
             "every row an adapter": list(range(16)) + [2, 5, 7, 2, 0, 0, 1, 9],
             "few slots, many rows each": [3, 9, -1, 3, 3, 9, 0] * 3 + [0, 9, -1],
             "full blocks, rows in slot order": threes,
             "full blocks, rows shuffled": shuffled,
             "full blocks and base rows": [k if k < 6 else -1 for k in shuffled]}
    for case, slots in cases.items():
        assert_each_row_alone(mixed, ids, slots, case)
    with torch.no_grad():  # no NaN left: every slot of the stack used once
        next(iter(mixed.adapted_layers().values())).lora_A[23].normal_(0, 0.1)
    order = list(range(24))
    assert_each_row_alone(mixed, ids, order, "the stack in place, rows in slot order")
    assert_each_row_alone(mixed, ids, order[::-1], "the stack in place, rows reversed")
