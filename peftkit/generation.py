"""Text generation outside the server — evaluation's exact match, `peftkit generate` — through the
one decoder there is: the serving engine (continuous batching, one KV cache, greedy or sampled).

Whatever a run produced decodes the same way: a base or fully fine-tuned model, an adapted model
(LoRA, IA³, bottleneck, and prompt/prefix tuning, whose virtual tokens enter the cache once at
prefill), or a causal-LM probe (the frozen body's hidden states through its trained head).
"""

from types import SimpleNamespace

from peftkit.data import chat_prompt
from peftkit.engine import Engine, Request, Sampling
from peftkit.errors import PeftkitError
from peftkit.models import Base


def prompt_text(tokenizer, prompt: str, raw: bool = False) -> str:
    if raw or not getattr(tokenizer, "chat_template", None):
        return prompt
    return chat_prompt([{"role": "user", "content": prompt}], tokenizer)


class PlainModel:
    """A model without adapter slots (a base, a fully fine-tuned model) as the engine's model."""

    def __init__(self, model):
        self.model = model

    def __call__(self, slots=None, **kw):
        return self.model(**kw)


class ProbeModel:
    """A causal-LM probe: the frozen body's final hidden states (after its last norm) through the
    trained head, in place of the base's LM head."""

    def __init__(self, model, head):
        self.model, self.head = model, head

    def __call__(self, slots=None, logits_to_keep: int = 0, **kw):
        hidden = self.model.base_model(**kw).last_hidden_state[:, -logits_to_keep:]
        return SimpleNamespace(logits=self.head(hidden.float()))


def engine_model(model, head=None):
    """(what the engine runs, the slot each request names) for any model a run yields."""
    if head is not None:
        return ProbeModel(model, head), -1
    router = getattr(model, "router", None)
    if router is None:
        return PlainModel(model), -1
    return model, (router.pinned if router.enabled else -1)  # an AdaptedModel: its pinned slot


def generate_ids(model, tokenizer, prompts: list[list[int]], max_new_tokens: int,
                 head=None, sampling: Sampling | None = None, batch: int = 16) -> list[list[int]]:
    """The new token ids of each prompt (greedy unless `sampling` says otherwise), the prompts
    decoded together `batch` at a time."""
    adapted, slot = engine_model(model, head)
    engine = Engine(adapted, tokenizer, max_batch=batch)
    sampling = sampling or Sampling(max_tokens=max_new_tokens, temperature=0.0)
    requests = engine.run_all([Request(list(ids), slot, sampling) for ids in prompts])
    for r in requests:
        if r.error:
            raise PeftkitError(f"generation failed: {r.error}")
    return [r.out_ids for r in requests]


def generate_text(base: Base, prompt: str, max_new_tokens: int = 64, raw: bool = False,
                  model=None, head=None) -> str:
    """Only the newly generated text. `model` defaults to the base; `raw` skips the template."""
    tok = base.tokenizer
    ids = tok(prompt_text(tok, prompt, raw), add_special_tokens=raw).input_ids
    new = generate_ids(model if model is not None else base.model, tok, [ids], max_new_tokens,
                       head)[0]
    return tok.decode(new, skip_special_tokens=True).strip()
