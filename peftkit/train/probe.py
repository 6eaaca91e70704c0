"""Feature extraction: the frozen backbone runs once per example; every epoch after that trains
only the head on cached features (held in memory).

Classification caches one pooled vector per example. Causal LM caches the final hidden state at
each position whose next token is a target, and trains the output head alone.
"""

import math

import torch

from peftkit.data import IGNORE
from peftkit.train.batches import collate
from peftkit.train.distributed import World, gather_objects
from peftkit.train.evaluate import class_metrics, exact_match


class FeatureCache:
    def __init__(self, trainee, task: str):
        self.trainee, self.task = trainee, task
        self.head = trainee.head
        self.head_forward = trainee.head  # the trainer sets the DDP-wrapped head here
        self.backbone_rows = 0  # examples the backbone has run on (each exactly once)
        self.train_items, self.val_items = [], []
        self.on_batch = lambda rows, length: None  # the trainer's meter sees each backbone pass

    @classmethod
    def build(cls, trainee, train_ex, val_ex, cfg, on_batch=None, world=None) -> "FeatureCache":
        """Each rank of a distributed run extracts every world-th example; all ranks then hold
        all features, in the examples' order."""
        cache = cls(trainee, trainee.task)
        cache.on_batch = on_batch or cache.on_batch
        world = world or World()
        for name, examples in (("train_items", train_ex), ("val_items", val_ex)):
            mine = cache._extract(examples[world.rank::world.size], cfg.batch_size)
            parts = gather_objects([(f.cpu(), y.cpu()) for f, y in mine], world)
            merged = [None] * len(examples)
            for r, part in enumerate(parts):
                merged[r::world.size] = part
            setattr(cache, name, [(f.to(trainee.device), y.to(trainee.device))
                                  for f, y in merged])
        return cache

    @torch.no_grad()
    def _extract(self, examples, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        t = self.trainee
        pad = t.base.tokenizer.pad_token_id or 0
        items = []
        for i in range(0, len(examples), batch_size):
            batch = collate(examples[i:i + batch_size], pad, t.device)
            self.backbone_rows += batch["input_ids"].shape[0]
            self.on_batch(*batch["input_ids"].shape)
            if self.task == "classify":
                feats = t.module.features(batch["input_ids"], batch["attention_mask"]).float()
                items += [(f, y) for f, y in zip(feats, batch["labels"])]
                continue
            hidden = t.base.model.base_model(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).last_hidden_state
            targets = batch["labels"][:, 1:]  # hidden at t predicts token t+1
            for row in range(hidden.shape[0]):
                keep = targets[row] != IGNORE
                items.append((hidden[row, :-1][keep].float(), targets[row][keep].clone()))
        return items

    def collate(self, items) -> dict[str, torch.Tensor]:
        if self.task == "classify":
            return {"features": torch.stack([f for f, _ in items]),
                    "targets": torch.stack([y for _, y in items])}
        return {"features": torch.cat([f for f, _ in items]), "targets": torch.cat([y for _, y in items])}

    def loss(self, batch) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.head_forward(batch["features"]),
                                                 batch["targets"])

    @torch.no_grad()
    def evaluate(self, val_records, cfg) -> dict:
        """Validation metrics, `cfg.batch_size` examples' features through the head at a time:
        a causal-LM head's logits for every validation token at once would be vocabulary x
        tokens floats (19 GB for 756 rows of 128 tokens on SmolLM2)."""
        if not self.val_items:
            return {}
        loss_sum, count, pred, gold = 0.0, 0, [], []
        for i in range(0, len(self.val_items), cfg.batch_size):
            batch = self.collate(self.val_items[i:i + cfg.batch_size])
            logits = self.head(batch["features"])
            loss_sum += torch.nn.functional.cross_entropy(
                logits, batch["targets"], reduction="sum").item()
            count += len(batch["targets"])
            if self.task == "classify":
                pred += logits.argmax(-1).tolist()
                gold += batch["targets"].tolist()
        loss = loss_sum / max(count, 1)
        if self.task == "classify":
            return {"loss": loss, **class_metrics(pred, gold, len(self.trainee.label_names))}
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
        return {**metrics, **exact_match(self.trainee.base.model, self.trainee.base.tokenizer,
                                         val_records, cfg.exact_match_max, head=self.head)}
