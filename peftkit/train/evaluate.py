"""Validation metrics: loss and perplexity; accuracy and macro-F1 for classification; exact match
of greedy generations for causal LM."""

import math

import torch

from peftkit.data import IGNORE, Record, chat_ids
from peftkit.generation import generate_ids
from peftkit.train.batches import collate


def class_metrics(pred: list[int], gold: list[int], n_classes: int) -> dict:
    """Accuracy and macro-F1 of predicted class ids (every classifier's, the probe's too)."""
    return {"accuracy": sum(p == g for p, g in zip(pred, gold)) / max(len(gold), 1),
            "macro_f1": macro_f1(pred, gold, n_classes)}


def macro_f1(pred: list[int], gold: list[int], n_classes: int) -> float:
    scores = []
    for c in range(n_classes):
        tp = sum(p == c and g == c for p, g in zip(pred, gold))
        fp = sum(p == c and g != c for p, g in zip(pred, gold))
        fn = sum(p != c and g == c for p, g in zip(pred, gold))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / max(len(scores), 1)


@torch.no_grad()
def evaluate_classifier(logits_fn, examples, n_classes: int, batch_size: int,
                        device=None) -> dict:
    """logits_fn(batch) -> (B, C) logits; batches on `device`."""
    preds, gold, loss_sum = [], [], 0.0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id=0, device=device)
        logits = logits_fn(batch).float()
        loss_sum += torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
        preds += logits.argmax(-1).tolist()
        gold += batch["labels"].tolist()
    return {"loss": loss_sum / max(len(gold), 1), **class_metrics(preds, gold, n_classes)}


@torch.no_grad()
def evaluate_lm_loss(loss_fn, examples, pad_id: int, batch_size: int, device=None) -> dict:
    """loss_fn(batch) -> (mean loss over labelled tokens); weighted back to a token mean."""
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = collate(examples[i:i + batch_size], pad_id, device)
        n = int((batch["labels"][:, 1:] != IGNORE).sum())
        if n:
            total += loss_fn(batch).item() * n
            tokens += n
    loss = total / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50))}


def reference(record: Record) -> tuple[list[dict] | str, str] | None:
    """(prompt, expected completion) of a record with a single answer to check, else None (an
    empty prompt asks nothing to answer)."""
    if record.kind == "prompt_completion" and record.prompt:
        return record.prompt, record.completion
    if record.kind == "chat" and len(record.messages) > 1 \
            and record.messages[-1]["role"] == "assistant":
        return record.messages[:-1], record.messages[-1]["content"]
    return None


@torch.no_grad()
def exact_match(model, tokenizer, records: list[Record], limit: int, head=None,
                batch: int = 16) -> float | None:
    """Share of records whose greedy answer equals the reference (whitespace-trimmed); the
    prompts decode `batch` at a time."""
    pairs = [p for p in (reference(r) for r in records) if p is not None][:limit]
    if not pairs:
        return None
    prompts = [chat_ids(p, tokenizer) if isinstance(p, list) else tokenizer(p).input_ids
               for p, _ in pairs]
    longest = max(len(tokenizer(want, add_special_tokens=False).input_ids) for _, want in pairs)
    answers = generate_ids(model, tokenizer, prompts, longest + 4, head, batch=batch)
    hits = sum(tokenizer.decode(new, skip_special_tokens=True).strip() == want.strip()
               for new, (_, want) in zip(answers, pairs))
    return hits / len(pairs)


def evaluate_run(module, task: str, tokenizer, examples, records, *, n_classes: int = 0,
                 batch_size: int = 8, device=None, exact_match_max: int = 64, loss_fn=None,
                 head=None) -> dict:
    """A task's validation metrics, the one place that chooses them (training, `peftkit
    eval`, joint training): classification -> loss, accuracy, macro-F1; causal LM -> loss,
    perplexity and, where records carry a reference answer, exact match. `loss_fn(batch)`
    overrides the causal-LM loss (a probe head on the hidden states)."""
    if task == "classify":
        return evaluate_classifier(lambda b: module(b["input_ids"], b["attention_mask"]),
                                   examples, n_classes, batch_size, device)
    loss_fn = loss_fn or (lambda b: module(input_ids=b["input_ids"],
                                           attention_mask=b["attention_mask"],
                                           labels=b["labels"]).loss)
    metrics = evaluate_lm_loss(loss_fn, examples, tokenizer.pad_token_id, batch_size, device)
    em = exact_match(module, tokenizer, records, exact_match_max, head=head)
    return metrics if em is None else {**metrics, "exact_match": em}

