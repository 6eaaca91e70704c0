"""Greedy (default) text generation from a base, an adapted model, or a probe head."""

import torch

from peftkit.data import chat_prompt
from peftkit.device import module_device
from peftkit.models import Base


def prompt_text(tokenizer, prompt: str, raw: bool = False) -> str:
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    return chat_prompt([{"role": "user", "content": prompt}], tokenizer)


@torch.no_grad()
def greedy_ids(model, ids: list[int], max_new_tokens: int, eos_id: int, head=None) -> list[int]:
    """Greedy continuation of one sequence. HF models (adapters routed inside their layers) use
    `generate` with a KV cache; prompt/prefix-tuned models and probe heads recompute each step."""
    x = torch.tensor([ids], device=module_device(model))
    virtual = getattr(model, "virtual", None) is not None
    if head is None and not virtual:
        hf = getattr(model, "model", model) if hasattr(model, "router") else model
        out = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                          max_new_tokens=max_new_tokens, pad_token_id=eos_id, eos_token_id=eos_id)
        return out[0, len(ids):].tolist()
    new = []
    for _ in range(max_new_tokens):
        if head is not None:
            hidden = model.base_model(input_ids=x).last_hidden_state  # after the final norm
            logits = head(hidden[:, -1].float())
        else:
            logits = model(input_ids=x).logits[:, -1]
        token = int(logits.argmax(-1))
        if token == eos_id:
            break
        new.append(token)
        x = torch.cat([x, x.new_tensor([[token]])], dim=1)
    return new


def generate_text(base: Base, prompt: str, max_new_tokens: int = 64, raw: bool = False,
                  model=None, head=None) -> str:
    """Only the newly generated text. `model` defaults to the base; `raw` skips the template."""
    tok = base.tokenizer
    text = prompt_text(tok, prompt, raw)
    ids = tok(text, add_special_tokens=raw).input_ids
    new = greedy_ids(model if model is not None else base.model, ids, max_new_tokens,
                     tok.eos_token_id, head)
    return tok.decode(new, skip_special_tokens=True).strip()
