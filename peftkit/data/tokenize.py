"""Validated records -> token ids and labels.

Causal LM: loss only on what the model should learn to write (completion / assistant turns,
with their end-of-turn token) unless `completion_only=False`; every other label is -100.
Classification: token ids and the label id.
"""

from dataclasses import dataclass

import torch

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
        ids, labels = _chat_example(rec.messages, tokenizer)
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


def chat_prompt(messages: list[dict], tokenizer) -> str:
    """The text the model continues from: the chat template with the assistant header."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_example(messages: list[dict], tokenizer) -> tuple[list[int], list[int]]:
    """Render with the tokenizer's chat template; label the characters of each assistant turn
    (its content and end-of-turn marker, not its role header) and map them to tokens."""
    if not getattr(tokenizer, "chat_template", None):
        raise PeftkitError("tokenizer has no chat template; use prompt/completion records")
    render = lambda msgs, gen=False: tokenizer.apply_chat_template(  # noqa: E731
        msgs, tokenize=False, add_generation_prompt=gen)
    full = render(messages)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text, end_text = render(messages[:i], True), render(messages[: i + 1])
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise PeftkitError("the tokenizer's chat template does not render turns as prefixes; "
                               "cannot find assistant tokens")
        spans.append((len(start_text), len(end_text)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc.input_ids
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _) in zip(ids, enc.offset_mapping)]
    return ids, labels


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
