"""Validation metrics: loss and perplexity; accuracy and macro-F1 for classification; exact match
of greedy generations for causal LM."""

import math

import torch

from peftkit.data import IGNORE, Record, chat_ids, load_dataset, tokenize
from peftkit.device import module_device
from peftkit.errors import PeftkitError
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
    if not tokens:  # every answer token cut off (or none given): no score, never a perfect one
        return {"loss": math.nan, "perplexity": math.nan, "scored_tokens": 0}
    loss = total / tokens
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "scored_tokens": tokens}


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
                batch: int = 16) -> dict:
    """{"exact_match": share of records whose greedy answer equals the reference (whitespace-
    trimmed), "exact_match_rows": how many were scored, "exact_match_skipped": how many did
    not fit the model's context with their answer} ({} when no record has a reference); the
    prompts decode `batch` at a time."""
    pairs = [p for p in (reference(r) for r in records) if p is not None][:limit]
    if not pairs:
        return {}
    prompts = [chat_ids(p, tokenizer) if isinstance(p, list) else tokenizer(p).input_ids
               for p, _ in pairs]
    longest = max(len(tokenizer(want, add_special_tokens=False).input_ids) for _, want in pairs)
    inner = getattr(model, "model", model)  # an AdaptedModel wraps the transformers model
    context = getattr(inner.config, "max_position_embeddings", None) or float("inf")
    fits = [i for i, ids in enumerate(prompts) if len(ids) + longest + 4 <= context]
    out = {"exact_match_rows": len(fits), "exact_match_skipped": len(pairs) - len(fits)}
    if not fits:
        return out
    answers = generate_ids(model, tokenizer, [prompts[i] for i in fits], longest + 4, head,
                           batch=batch)
    hits = sum(tokenizer.decode(new, skip_special_tokens=True).strip() == pairs[i][1].strip()
               for new, i in zip(answers, fits))
    return {"exact_match": hits / len(fits), **out}


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
    return {**metrics, **exact_match(module, tokenizer, records, exact_match_max, head=head)}


def evaluate_file(loaded, data, max_length: int = 256, batch_size: int = 8,
                  exact_match_max: int = 64, text_field="text", label_field="label") -> dict:
    """`peftkit eval`: a loaded run (train/run_dir.load_run) on a data file (or a Dataset
    already read)."""
    ds = data if hasattr(data, "records") else load_dataset(data, text_field, label_field)
    data = str(ds.path)
    tok = loaded.base.tokenizer
    context = getattr(loaded.base.model.config, "max_position_embeddings", None)
    if context and max_length > context:
        raise PeftkitError(f"--max-length {max_length}: over the model's {context}-token "
                           "context")
    device = module_device(loaded.base.model)
    if loaded.task == "classify":
        if ds.kind != "classification":
            raise PeftkitError(f"{data}: a classifier needs text+label records, got {ds.kind}")
        unknown = sorted({r.label for r in ds.records} - set(loaded.label_names))
        if unknown:
            raise PeftkitError(f"{data}: labels {unknown} were not in training "
                               f"({', '.join(loaded.label_names)})")
        ds.label_names = loaded.label_names
    ex = tokenize(ds, tok, max_length).examples
    return evaluate_run(loaded.module, loaded.task, tok, ex, ds.records,
                        n_classes=len(loaded.label_names), batch_size=batch_size, device=device,
                        exact_match_max=exact_match_max, head=loaded.head,
                        loss_fn=None if loaded.head is None else _head_loss(loaded))


def _head_loss(loaded):
    """A causal-LM probe's loss: its trained head on the base's final hidden states."""
    def loss(b):
        hidden = loaded.base.model.base_model(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
        logits = loaded.head(hidden[:, :-1].float())
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1),
                                                 b["labels"][:, 1:].flatten())
    return loss
