"""NF4 (QLoRA) bases: reconstruction, storage, adapters on top, save/load, merge."""

import peft
import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.formats import load_adapter, load_adapters, save_adapter
from peftkit.merged import export_merged
from peftkit.methods import IA3Config, LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.quant import QuantConfig, quantize_model, quantize_tensor, save_quantized
from tests.helpers import batch, logits, randomize, tiny_llama

import bitsandbytes as bnb


def _rel_error(w, config):
    packed, state = quantize_tensor(w, config)
    return ((bnb.functional.dequantize_4bit(packed, state) - w).norm() / w.norm()).item()


def test_nf4_reconstruction_and_bits_per_param():
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    plain = _rel_error(w, QuantConfig(double_quant=False))
    double = _rel_error(w, QuantConfig(double_quant=True))
    assert plain < 0.10 and double < 0.10
    assert double - plain < 0.001
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.Linear(1024, 512))
    model.config = type("C", (), {})()
    report = quantize_model(model, QuantConfig())
    assert abs(report.bits_per_param - 4.127) < 0.01
    assert report.bytes_after < 0.3 * report.bytes_before
    assert all(isinstance(m, bnb.nn.Linear4bit) for m in model)
    assert model[0].weight.quant_state.quant_type == "nf4" and model[0].weight.quant_state.nested


def test_bad_quant_configs():
    with pytest.raises(PeftkitError, match="unsupported NF4 blocksize 100"):
        quantize_model(tiny_llama().model, QuantConfig(blocksize=100))
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4))
    with pytest.raises(PeftkitError, match="Sequential has no linear layers to quantize"):
        quantize_model(model, QuantConfig())


# Measured on tiny-llama (random init, 64-wide layers, logits up to |1.22|):
# max |logit_nf4 - logit_fp32| = 0.074. The bound leaves 2x headroom.
NF4_LOGIT_BOUND = 0.15


def test_quantized_tiny_llama_stays_close_to_fp32():
    ids = batch()
    want = logits(tiny_llama().model, ids)
    base = load_base("tiny-llama", quantize=QuantConfig())
    assert base.quant_report.modules == 14  # 7 projections x 2 layers; the head stays fp
    got = logits(base.model, ids)
    assert (got - want).abs().max() < NF4_LOGIT_BOUND
    assert not torch.equal(got, want)


@pytest.mark.parametrize("cfg", [LoraConfig(r=4, targets="all-linear"),
                                 LoraConfig(r=4, use_rslora=True, use_dora=True), IA3Config()])
def test_adapters_on_nf4_multi_slot(cfg, tmp_path):
    dirs = {}
    for i in range(2):
        a = add_adapter(tiny_llama().model, cfg)
        randomize(a, seed=i)
        dirs[f"a{i}"] = save_adapter(a, tmp_path / f"a{i}")
    multi = load_adapters(load_base("tiny-llama", quantize=QuantConfig()).model, dirs)
    slots = torch.tensor([1, 0, -1])
    ids = batch(rows=3)
    out = logits(multi, ids, slots=slots)
    for row, k in enumerate(slots.tolist()):
        model = load_base("tiny-llama", quantize=QuantConfig()).model
        single = load_adapter(model, dirs[f"a{k}"]) if k >= 0 else model
        assert (out[row] - logits(single, ids[row:row + 1])[0]).abs().max() <= 1e-5


def test_qlora_training_lowers_loss_and_loads_in_peft(tmp_path):
    torch.manual_seed(0)
    base = load_base("tiny-llama", quantize=QuantConfig())
    adapted = add_adapter(base.model, LoraConfig(r=8, alpha=16, targets="all-linear"))
    opt = torch.optim.AdamW(adapted.adapter_parameters(), lr=1e-2)
    ids = batch(rows=4, length=12)
    losses = []
    for _ in range(20):
        loss = adapted(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5  # measured: 5.57 -> 4.41..4.45 over seeds
    save_adapter(adapted, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().model, tmp_path).eval()
    with torch.no_grad():
        peft_logits = theirs(input_ids=ids).logits
    # PEFT runs the adapter on the fp32 base: the gap is the NF4 error, not a format error.
    assert (peft_logits - logits(adapted, ids)).abs().max() < NF4_LOGIT_BOUND


def test_quantized_base_saves_and_loads_identically(tmp_path):
    base = load_base("tiny-llama", quantize=QuantConfig())
    save_quantized(base.model, base.tokenizer, tmp_path)
    again = load_base(str(tmp_path))
    ids = batch()
    assert isinstance(again.model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert torch.equal(logits(again.model, ids), logits(base.model, ids))


def test_merge_onto_nf4_writes_full_precision_model(tmp_path):
    base = load_base("tiny-llama", quantize=QuantConfig())
    adapted = add_adapter(base.model, LoraConfig(r=4, targets="all-linear"))
    randomize(adapted)
    ids = batch()
    export_merged(adapted, tmp_path, base.tokenizer)
    merged = load_base(str(tmp_path))
    assert merged.model.model.layers[0].self_attn.q_proj.weight.dtype == torch.float32
    diff = (logits(merged.model, ids) - logits(adapted, ids)).abs().max()
    assert diff < 1e-4, f"merged vs unmerged max abs logit diff {diff:.2e}"


def test_bf16_embeddings_shrink_state_and_round_trip(tmp_path):
    ids = batch()
    want = logits(tiny_llama().model, ids)
    fp = load_base("tiny-llama", quantize=QuantConfig())
    half = load_base("tiny-llama", quantize=QuantConfig(embed_dtype="bfloat16"))
    assert half.quant_report.bytes_after < fp.quant_report.bytes_after
    emb = half.model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and half.model.lm_head.weight is emb  # still tied
    got = logits(half.model, ids)
    assert got.dtype == torch.float32 and (got - want).abs().max() < NF4_LOGIT_BOUND
    save_quantized(half.model, half.tokenizer, tmp_path)
    assert torch.equal(logits(load_base(str(tmp_path)).model, ids), got)
    with pytest.raises(PeftkitError, match="unsupported embedding dtype 'int8'"):
        QuantConfig(embed_dtype="int8").validate()
