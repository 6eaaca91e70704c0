"""Validated records -> token ids and labels.

Causal LM: loss only on what the model should learn to write (completion / assistant turns,
with their end-of-turn token) unless `completion_only=False`; every other label is -100.
Classification: token ids and the label id.
"""

import re
from dataclasses import dataclass

import torch
from jinja2 import TemplateError

from peftkit.data.records import Dataset, Record
from peftkit.errors import PeftkitError

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int] | int  # per-token labels (causal LM) or a class id (classification)
    line: int


@dataclass
class Tokenized:
    examples: list[Example]
    truncated: int  # examples cut to max_length
    tokens: int  # total tokens after truncation


def tokenize(dataset: Dataset, tokenizer, max_length: int = 512,
             completion_only: bool = True) -> Tokenized:
    """Tokenize a dataset for its own task: classification records -> class ids, others -> LM."""
    examples, truncated = [], 0
    for rec in dataset.records:
        if dataset.kind == "classification":
            ids = tokenizer(rec.text, add_special_tokens=True).input_ids
            labels = dataset.label_id(rec)
        else:
            ids, labels = lm_example(rec, tokenizer, completion_only)
        if len(ids) > max_length:
            truncated += 1
            ids = ids[:max_length]
            labels = labels[:max_length] if isinstance(labels, list) else labels
        examples.append(Example(ids, labels, rec.line))
    return Tokenized(examples, truncated, sum(len(e.input_ids) for e in examples))


def lm_example(rec: Record, tokenizer, completion_only: bool = True) -> tuple[list[int], list[int]]:
    if rec.kind == "chat":
        try:
            ids, labels = _chat_example(rec.messages, tokenizer)
        except (TemplateError, ValueError, TypeError) as e:  # the template's own raise_exception
            raise PeftkitError(f"line {rec.line}: the chat template refused this record "
                               f"({str(e)[:120]})") from None
    elif rec.kind == "prompt_completion":
        # Prompt and completion tokenized apart, so no token straddles the boundary.
        prompt = tokenizer(rec.prompt).input_ids if rec.prompt else []
        completion = tokenizer(rec.completion, add_special_tokens=False).input_ids
        completion = completion + [tokenizer.eos_token_id]
        ids, labels = prompt + completion, [IGNORE] * len(prompt) + completion
    elif rec.kind == "text":
        ids = tokenizer(rec.text).input_ids + [tokenizer.eos_token_id]
        labels = list(ids)
    else:
        raise PeftkitError(f"line {rec.line}: a {rec.kind} record has no language-model target")
    return ids, (labels if completion_only else list(ids))


def chat_prompt(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> str:
    """The text the model continues from: the chat template with the assistant header (and
    the `tools` a request offers, for a template that renders them)."""
    extra = {"tools": tools} if tools else {}
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         **extra)


def chat_ids(messages: list[dict], tokenizer, tools: list[dict] | None = None) -> list[int]:
    """The token ids the model continues from (the template already holds any BOS): the one
    way chat messages become a prompt, for evaluation, the demo and the server alike."""
    return tokenizer(chat_prompt(messages, tokenizer, tools),
                     add_special_tokens=False).input_ids


def _chat_example(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; label the characters of each assistant turn
    (its content and end-of-turn marker, not its role header) and map them to tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise PeftkitError("tokenizer has no chat template; give --chat-template chatml (or "
                           "zephyr, or a Jinja file), or use prompt/completion records")
    render = lambda msgs: tokenizer.apply_chat_template(msgs, tokenize=False)  # noqa: E731
    full = render(messages)
    spans = _assistant_spans(messages, render, full)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels, k = [], 0
    for tok, (a, _) in zip(enc.input_ids, enc.offset_mapping):  # spans and offsets ascend
        while k < len(spans) and spans[k][1] <= a:
            k += 1
        labels.append(tok if k < len(spans) and spans[k][0] <= a else IGNORE)
    return enc.input_ids, labels


MARK = "\ue000{}\ue001"  # private-use characters: never in a template's own text
MARK_RE = re.compile("\ue000(\\w+)\ue001")


def _assistant_spans(messages: list[dict], render, full: str) -> list[tuple[int, int]]:
    """Character spans (content + end-of-turn) of the assistant turns in `full`, from one extra
    render whatever the number of turns (rendering every prefix is quadratic: 2,000 turn pairs
    took 27 s). Contents are swapped for numbered markers, the markers located, the contents
    put back; the result must rebuild `full` exactly (as is, or trimmed, as Llama 3's template
    does), so a template that rewrites contents some other way is an error, not a guess."""
    marked = render([{**m, "content": MARK.format(i)} for i, m in enumerate(messages)])
    tail = _end_of_turn(render)
    for clean in (lambda c: c, str.strip):
        pieces, starts, ends, pos = MARK_RE.split(marked), {}, {}, 0
        for j, piece in enumerate(pieces):
            if j % 2:
                i = int(piece)
                piece = clean(messages[i]["content"])
                starts[i], ends[i] = pos, pos + len(piece)
                pieces[j] = piece
            pos += len(piece)
        if "".join(pieces) == full:
            break
    else:
        raise PeftkitError("the tokenizer's chat template rewrites message contents; cannot "
                           "find assistant tokens (use prompt/completion records)")
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant" and i in starts:
            end = ends[i] + (len(tail) if full.startswith(tail, ends[i]) else 0)
            spans.append((starts[i], end))
    return spans


def _end_of_turn(render) -> str:
    """What the template writes after an assistant message's content (ChatML: <|im_end|>\\n)."""
    text = render([{"role": "user", "content": MARK.format("u")},
                   {"role": "assistant", "content": MARK.format("a")}])
    return text.rpartition(MARK.format("a"))[2]


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic train/validation split: the same seed gives the same split everywhere."""
    if not 0 <= val_fraction < 1:
        raise PeftkitError(f"--val-split must be in [0, 1), got {val_fraction}")
    if val_fraction == 0:
        return list(items), []
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(items) * val_fraction))
    val_idx = set(order[:n_val])
    return ([x for i, x in enumerate(items) if i not in val_idx],
            [x for i, x in enumerate(items) if i in val_idx])
