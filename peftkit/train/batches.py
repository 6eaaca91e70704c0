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
