"""Hugging Face PEFT 0.21 as the oracle: adapters move both ways with identical outputs."""

import peft
import pytest
import torch

from peftkit.formats import load_adapter, save_adapter
from peftkit.methods import (IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig,
                             add_adapter)
from tests.helpers import batch, logits, randomize, tiny_llama

N_VIRTUAL = 4
CASES = {
    "lora": (LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"]),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                     init_lora_weights=False)),
    "rslora": (LoraConfig(r=8, alpha=4, targets="all-linear", use_rslora=True),
               lambda: peft.LoraConfig(r=8, lora_alpha=4, target_modules="all-linear",
                                       use_rslora=True, init_lora_weights=False)),
    "dora": (LoraConfig(r=4, alpha=8, targets=["q_proj", "up_proj"], use_dora=True),
             lambda: peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"],
                                     use_dora=True, init_lora_weights=False)),
    "ia3": (IA3Config(targets=["k_proj", "v_proj", "down_proj"], feedforward=["down_proj"]),
            lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                   feedforward_modules=["down_proj"], init_ia3_weights=False)),
    "prompt": (PromptTuningConfig(num_virtual_tokens=N_VIRTUAL),
               lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)),
    "prefix": (PrefixTuningConfig(num_virtual_tokens=N_VIRTUAL),
               lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N_VIRTUAL)),
}


def _peft_logits(model, ids, method):
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    return out[:, N_VIRTUAL:] if method == "prompt" else out


@pytest.mark.parametrize("method", list(CASES))
def test_peftkit_adapter_loads_in_peft(method, tmp_path):
    ours_cfg, _ = CASES[method]
    base = tiny_llama()
    adapted = add_adapter(base.model, ours_cfg, tokenizer=base.tokenizer)
    randomize(adapted, seed=1)
    ids = batch()
    want = logits(adapted, ids)
    save_adapter(adapted, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_llama().model, tmp_path).eval()
    assert (_peft_logits(theirs, ids, method) - want).abs().max() <= 1e-5


@pytest.mark.parametrize("method", list(CASES))
def test_peft_adapter_loads_in_peftkit(method, tmp_path):
    _, peft_cfg = CASES[method]
    torch.manual_seed(3)
    theirs = peft.get_peft_model(tiny_llama().model, peft_cfg()).eval()
    if method == "dora":  # make the magnitude differ from the weight norm it starts at
        with torch.no_grad():
            for n, p in theirs.named_parameters():
                if "magnitude" in n:
                    p.mul_(1.5)
    ids = batch()
    want = _peft_logits(theirs, ids, method)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(tiny_llama().model, tmp_path)
    assert (logits(ours, ids) - want).abs().max() <= 1e-5
