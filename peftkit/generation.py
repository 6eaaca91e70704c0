"""Greedy (default) or sampled text generation from a loaded base, chat template applied."""

import torch

from peftkit.data import chat_prompt
from peftkit.models import Base


@torch.no_grad()
def generate_text(base: Base, prompt: str, max_new_tokens: int = 64, raw: bool = False) -> str:
    """Return only the newly generated text. `raw` skips the chat template."""
    tok = base.tokenizer
    text = prompt if raw or not getattr(tok, "chat_template", None) else chat_prompt(
        [{"role": "user", "content": prompt}], tok)
    enc = tok(text, return_tensors="pt", add_special_tokens=raw)
    out = base.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1]:], skip_special_tokens=True).strip()
