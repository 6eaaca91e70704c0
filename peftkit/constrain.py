"""Structured outputs (issue 26.1): a request's grammar — a JSON schema, any JSON object, a
regular expression, a fixed list of choices or a context-free grammar (GBNF or Lark, vLLM's
guided_grammar) — constrains its own row of the shared batch at
every step: the row samples only among the tokens its grammar allows next, and ends ("stop")
when the grammar is complete. Other rows never see it.

The grammar engine is llguidance (as vLLM and SGLang use it): it computes a row's allowed tokens
lazily from the grammar's state, with no index built over the vocabulary per schema, so a
schema no request sent before costs about a millisecond, not seconds. bench/grammar.py measured
it beside outlines-core on SmolLM2's 49k vocabulary (docs/bench-grammar.md, docs/design.md).
"""

import json
from dataclasses import dataclass

import torch

from peftkit.errors import PeftkitError

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")
# JSON laid out as json.dumps lays it out, no other whitespace: llguidance's default allows any
# run of whitespace between tokens, and a small model can fill max_tokens with newlines (seen on
# tiny-llama; vLLM added `disable_any_whitespace` for the same reason). A schema's own
# "x-guidance" options still win (llguidance applies them after these defaults).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True)
class Grammar:
    """A request's grammar, checked: llguidance's serialised form."""
    text: str
    kind: str


def grammar_for(kind: str, value, field: str) -> Grammar:
    """`value` as a grammar of `kind` (json_schema: a schema object; json_object: ignored;
    regex: a pattern; choice: a list of strings; grammar: GBNF or Lark text). A grammar llguidance refuses is a
    PeftkitError naming `field`, raised before anything is queued."""
    from llguidance import LLMatcher, grammar_from
    try:
        if kind == "json_schema":
            if not isinstance(value, dict):
                raise ValueError("the schema must be a JSON object")
            text = LLMatcher.grammar_from_json_schema(value, defaults=JSON_LAYOUT)
        elif kind == "json_object":
            text = LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_LAYOUT)
        elif kind == "regex":
            text = LLMatcher.grammar_from_regex(value)
        elif kind == "choice":
            text = grammar_from("choice", json.dumps(value))
        elif kind == "grammar":  # GBNF (llama.cpp's, xgrammar's EBNF) or Lark (outlines')
            text = grammar_from("grammar", value)
        else:
            raise ValueError(f"unknown grammar kind '{kind}' ({', '.join(KINDS)})")
    except (ValueError, TypeError) as e:
        raise PeftkitError(f"{field}: {str(e)[:300]}") from None
    error = LLMatcher.validate_grammar(text)
    if error:
        raise PeftkitError(f"{field}: not a usable grammar: {error[:300]}")
    return Grammar(text, kind)


class Grammars:
    """A tokenizer's side of every grammar: llguidance's view of its vocabulary (built once, on
    the first constrained request: about a second for 49k tokens) and each row's state."""

    def __init__(self, tokenizer, vocab: int):
        self.tokenizer, self.vocab = tokenizer, vocab  # vocab: the model's logits per row
        self._ll = None

    def start(self, grammar: Grammar) -> "RowGrammar":
        from llguidance import LLMatcher
        if self._ll is None:
            import llguidance.hf
            size = max(self.vocab, len(self.tokenizer))  # a padded head, or added tokens
            self._ll = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=size)
        matcher = LLMatcher(self._ll, grammar.text)
        if matcher.is_error():
            raise PeftkitError(f"grammar: {matcher.get_error()[:300]}")
        return RowGrammar(matcher, self.vocab)


class RowGrammar:
    """One row's grammar state: which tokens it may take next, and each token it took."""

    def __init__(self, matcher, vocab: int):
        self.matcher, self.vocab = matcher, vocab

    def allowed(self) -> torch.Tensor:
        """A bool per vocabulary entry (the model's logits' length)."""
        bias = self.matcher.compute_logit_bias()  # a byte per token: 200 allowed, 0 not
        return torch.frombuffer(bytearray(bias), dtype=torch.uint8)[:self.vocab] != 0

    def take(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise PeftkitError(f"grammar: token {token} refused: {self.matcher.get_error()}")

    @property
    def complete(self) -> bool:
        """Nothing but the end may follow: the answer is whole."""
        return self.matcher.is_stopped()
