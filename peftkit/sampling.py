"""How a row's next token is chosen from its logits: a request's `Sampling` and `sample`.
The engine calls `sample` once per row per step."""

from dataclasses import dataclass, field

import torch

from peftkit.constrain import Grammar

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (vLLM's _SAMPLING_EPS)


@dataclass
class Sampling:
    max_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    grammar: Grammar | None = None  # structured output: the row samples only what it allows
    logprobs: int | None = None  # record each token's log-probability and this many likeliest
    # OpenAI's penalties on the answer so far: a token's logit minus frequency x its count,
    # minus presence once it has appeared (vLLM applies them to output tokens, as here)
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    _bias: tuple | None = field(default=None, init=False, repr=False, compare=False)

    def bias_on(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`logit_bias` as (ids, values) tensors, made once per request, not once per step."""
        if self._bias is None or self._bias[0].device != torch.device(device):
            self._bias = (torch.tensor(list(self.logit_bias), device=device),
                          torch.tensor(list(self.logit_bias.values()), device=device))
        return self._bias


def token_logprobs(logits: torch.Tensor, token: int, top: int) -> tuple:
    """(token, its log-probability, [(id, log-probability)] of the `top` likeliest) under the
    model's own distribution: the raw logits, before temperature, bias or a grammar (as vLLM
    reports them by default)."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    best = lp.topk(top) if top else None
    pairs = [] if best is None else list(zip(best.indices.tolist(), best.values.tolist()))
    return token, float(lp[token]), pairs


def sample(s: Sampling, logits: torch.Tensor, generator: torch.Generator | None,
           allowed: torch.Tensor | None = None, history: list[int] | None = None) -> int:
    """The next token: greedy, or sampled with temperature and top-p on the CPU, where the
    request's seeded generator lives, whatever the model's device; only among `allowed`
    tokens when given (a row's grammar); penalised by what `history` (the answer so far)
    holds."""
    if history and (s.frequency_penalty or s.presence_penalty):  # this row's own copy
        seen = torch.tensor(history, device=logits.device)
        counts = torch.bincount(seen, minlength=logits.shape[-1])[:logits.shape[-1]].float()
        logits = logits.float() - s.frequency_penalty * counts \
            - s.presence_penalty * (counts > 0).float()
    if allowed is not None:  # this row's own copy, as below
        logits = logits.float().masked_fill(~allowed.to(logits.device), float("-inf"))
    if s.logit_bias:  # this row's own copy: the batch's logits are shared
        logits = logits.float().index_add(0, *s.bias_on(logits.device))
    if s.temperature < GREEDY_BELOW:  # as vLLM: a temperature this small is greedy (and
        return int(logits.argmax())  # 5e-324 is 0 in float32: 0/0 would be NaN)
    # Shift before dividing: a temperature of 1e-45 then gives 0 and -inf, never inf - inf.
    logits = logits.float().cpu()
    probs = torch.softmax((logits - logits.max()) / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < s.top_p
        keep[0] = True  # the likeliest token always (a top_p of 1e-300 is 0 in float32)
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=generator))
