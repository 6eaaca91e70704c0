"""Deterministic batching: the order is a pure function of (seed, epoch), so a resumed run sees
exactly the batches the uninterrupted one would have."""

import math

import torch

from peftkit.data import IGNORE, Example


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def drawn(examples: list, rows: int, seed: int) -> list:
    """The examples a run's first `rows` draws take (epoch 0's order), when that is under one
    epoch: a probe extracts features for these alone, not for data no step would reach."""
    if rows >= len(examples):
        return examples
    return [examples[j] for j in epoch_order(len(examples), seed, 0)[:rows]]


def batch_at(examples: list, step: int, rows: int, seed: int) -> list:
    """The `rows` examples of the run's `step`-th batch (a step's global batch; epochs follow
    each other in their own seeded orders)."""
    per_epoch = math.ceil(len(examples) / rows)
    epoch, i = divmod(step, per_epoch)
    order = epoch_order(len(examples), seed, epoch)
    return [examples[j] for j in order[i * rows:(i + 1) * rows]]


def collate(examples: list[Example], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are per-token lists or one class id each.
    Built on the CPU, handed over on `device` (the model's)."""
    width = max(len(e.input_ids) for e in examples)
    cpu = torch.device("cpu")
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long, device=cpu)
    mask = torch.zeros((len(examples), width), dtype=torch.long, device=cpu)
    for row, e in enumerate(examples):
        ids[row, :len(e.input_ids)] = torch.tensor(e.input_ids, device=cpu)
        mask[row, :len(e.input_ids)] = 1
    if isinstance(examples[0].labels, int):
        labels = torch.tensor([e.labels for e in examples], device=cpu)
    else:
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long, device=cpu)
        for row, e in enumerate(examples):
            labels[row, :len(e.labels)] = torch.tensor(e.labels, device=cpu)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return batch if device is None else {k: v.to(device) for k, v in batch.items()}


def pack(examples: list[Example], width: int, pad_id: int, attn: str, dtype=torch.float32,
         device=None) -> dict[str, torch.Tensor]:
    """Examples laid end to end in rows of at most `width` tokens (first fit, in draw order).
    Each keeps its own positions (from 0) and attends only to itself, causally: a block-
    diagonal mask, boolean for sdpa, additive in `dtype` for eager attention, none for flash
    attention (its varlen kernels read the restarting positions). An example's first label is
    IGNORE, as the shift drops it in a row of its own, so the loss is the unpacked rows' loss."""
    rows, used = [], []
    for e in examples:
        fit = next((r for r, n in enumerate(used) if n + len(e.input_ids) <= width), None)
        if fit is None:
            rows.append([])
            used.append(0)
            fit = len(rows) - 1
        rows[fit].append(e)
        used[fit] += len(e.input_ids)
    cpu, length = torch.device("cpu"), max(used)
    ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=cpu)
    labels = torch.full((len(rows), length), IGNORE, dtype=torch.long, device=cpu)
    positions = torch.zeros((len(rows), length), dtype=torch.long, device=cpu)
    segment = torch.full((len(rows), length), -1, dtype=torch.long, device=cpu)
    for r, row in enumerate(rows):
        at = 0
        for k, e in enumerate(row):
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at + 1:at + n] = torch.tensor(e.labels[1:n])
            positions[r, at:at + n] = torch.arange(n)
            segment[r, at:at + n] = k
            at += n
        positions[r, at:] = torch.arange(length - at)  # padding: a run of its own
    batch = {"input_ids": ids, "labels": labels, "position_ids": positions}
    if attn != "flash_attention_2":
        same = segment[:, :, None] == segment[:, None, :]
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        pad = segment < 0
        allowed = (same & causal & ~pad[:, :, None]) | torch.eye(length, dtype=torch.bool)
        mask = allowed[:, None] if attn == "sdpa" else torch.zeros(
            allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)[:, None]
        batch["attention_mask"] = mask
    batch = batch if device is None else {k: v.to(device) for k, v in batch.items()}
    batch["tokens"] = sum(used)
    return batch
