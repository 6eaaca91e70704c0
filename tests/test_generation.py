"""One decoder for every kind of run: the engine's KV-cached, batched greedy decoding equals
recomputing the whole sequence at every step (the definition of greedy decoding) — for a plain
model, LoRA, prompt and prefix tuning (virtual tokens enter the cache once) and a probe head."""

import pytest
import torch

from peftkit.generation import generate_ids
from peftkit.methods import LoraConfig, PrefixTuningConfig, PromptTuningConfig, add_adapter
from peftkit.train.heads import Head
from tests.helpers import randomize, tiny_llama

PROMPTS = ["hello there", "a", "a longer prompt, so the batch is left-padded", "x y z"]


@torch.no_grad()
def recompute(model, ids: list[int], n: int, eos: int, head=None) -> list[int]:
    x, new = torch.tensor([ids]), []
    for _ in range(n):
        if head is not None:
            logits = head(model.base_model(input_ids=x).last_hidden_state[:, -1].float())
        else:
            logits = model(input_ids=x).logits[:, -1]
        token = int(logits.argmax(-1))
        if token == eos:
            break
        new.append(token)
        x = torch.cat([x, x.new_tensor([[token]])], dim=1)
    return new


def model_for(kind: str, base):
    if kind == "plain":
        return base.model, None
    if kind == "probe":
        torch.manual_seed(0)
        return base.model, Head(base.model.config.hidden_size, base.model.config.vocab_size)
    config = {"lora": LoraConfig(r=4), "prompt": PromptTuningConfig(num_virtual_tokens=5),
              "prefix": PrefixTuningConfig(num_virtual_tokens=3)}[kind]
    adapted = add_adapter(base.model, config)
    randomize(adapted, seed=1)
    return adapted, None


@pytest.mark.parametrize("kind", ["plain", "lora", "prompt", "prefix", "probe"])
def test_cached_batched_decoding_equals_recomputing_each_step(kind):
    base = tiny_llama()
    tok = base.tokenizer
    model, head = model_for(kind, base)
    model.eval()
    prompts = [tok(p).input_ids for p in PROMPTS]
    got = generate_ids(model, tok, prompts, 12, head=head, batch=3)
    want = [recompute(model, ids, 12, tok.eos_token_id, head) for ids in prompts]
    assert got == want
    assert any(len(g) > 3 for g in got)  # the comparison covered real decode steps


def test_a_pinned_slot_decodes_with_its_own_adapter():
    base = tiny_llama()
    adapted = add_adapter(base.model, LoraConfig(r=4), slots=2)
    randomize(adapted, seed=2)
    adapted.eval()
    ids = [base.tokenizer("slot test").input_ids]
    with adapted.pinned(1):
        pinned = generate_ids(adapted, base.tokenizer, ids, 10)
        want = recompute(adapted, ids[0], 10, base.tokenizer.eos_token_id)
    assert pinned[0] == want
    assert pinned != generate_ids(adapted, base.tokenizer, ids, 10)  # slot 0 differs
