"""The one trainer: full fine-tuning, feature extraction (probe) and every PEFT method.

AdamW with warmup + cosine/linear decay, gradient accumulation and clipping; evaluation each
epoch or every N steps; atomic checkpoints every N steps, at the end and on SIGINT/SIGTERM; an
exact `--resume`; report.json / report.md with measured memory, time and quality.
"""

import math
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from peftkit.data import IGNORE, load_dataset, split, tokenize
from peftkit.device import autocast, reset_peak
from peftkit.errors import PeftkitError
from peftkit.train.allocator import trim_between_layers
from peftkit.train.batches import batch_at, collate
from peftkit.train.build import Trainee, build
from peftkit.train.checkpoint import complete, load_checkpoint, recover, save_checkpoint
from peftkit.train.config import DEFAULT_LR, TrainConfig
from peftkit.train.evaluate import (evaluate_classifier, evaluate_lm_loss, exact_match)
from peftkit.train.probe import FeatureCache
from peftkit.train.report import Meter, write_report


class TrainingInterrupted(PeftkitError):
    """A signal stopped training; a checkpoint was written first."""


def lr_at(step: int, total: int, cfg: TrainConfig, peak: float) -> float:
    warm = int(cfg.warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    progress = (step - warm) / max(total - warm, 1)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine"
                   else 1 - progress)


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.output)
        self.stop_signal = None
        self.meter = Meter()

    # -- data ---------------------------------------------------------------------------------
    def _prepare(self):
        cfg = self.cfg
        ds = load_dataset(cfg.data, cfg.text_field, cfg.label_field, cfg.skip_invalid)
        task = cfg.task if cfg.task != "auto" else (
            "classify" if ds.kind == "classification" else "causal-lm")
        if task == "classify" and ds.kind != "classification":
            raise PeftkitError(f"{cfg.data}: --task classify needs text+label records, got {ds.kind}")
        self.dataset = ds
        torch.manual_seed(cfg.seed)
        self.trainee: Trainee = build(cfg, task, ds.label_names)
        tok = self.trainee.base.tokenizer
        pairs = list(zip(tokenize(ds, tok, cfg.max_length).examples, ds.records))
        if cfg.val_data:
            vds = load_dataset(cfg.val_data, cfg.text_field, cfg.label_field, cfg.skip_invalid)
            if task == "classify":
                vds.label_names = ds.label_names
            val = list(zip(tokenize(vds, tok, cfg.max_length).examples, vds.records))
            train = pairs
        else:
            train, val = split(pairs, cfg.val_split, cfg.seed)
        if task == "causal-lm":  # an example truncated down to its prompt teaches nothing
            train = [p for p in train if any(t != IGNORE for t in p[0].labels[1:])]
        if not train:
            raise PeftkitError(f"{cfg.data}: no training examples left after the split")
        self.train_ex = [e for e, _ in train]
        self.val_ex, self.val_records = [e for e, _ in val], [r for _, r in val]
        self.truncated = sum(len(e.input_ids) >= cfg.max_length for e, _ in pairs)
        self.task = task

    # -- loss -----------------------------------------------------------------------------------
    def _loss(self, batch) -> torch.Tensor:
        t = self.trainee
        if self.probe is not None:
            return self.probe.loss(batch)
        if self.task == "classify":
            logits = t.module(batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"])
        return t.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        labels=batch["labels"]).loss

    def _evaluate(self) -> dict:
        t, cfg = self.trainee, self.cfg
        if not self.val_ex:
            return {}
        t.module.eval()
        try:
            with autocast(t.device, t.dtype):
                return self._metrics()
        finally:
            t.module.train()

    def _metrics(self) -> dict:
        t, cfg = self.trainee, self.cfg
        if self.probe is not None:
            return self.probe.evaluate(self.val_records, cfg)
        if self.task == "classify":
            return evaluate_classifier(lambda b: t.module(b["input_ids"], b["attention_mask"]),
                                       self.val_ex, len(self.dataset.label_names),
                                       cfg.batch_size, t.device)
        metrics = evaluate_lm_loss(self._loss, self.val_ex, t.base.tokenizer.pad_token_id,
                                   cfg.batch_size, t.device)
        em = exact_match(t.module, t.base.tokenizer, self.val_records, cfg.exact_match_max)
        return metrics if em is None else {**metrics, "exact_match": em}

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        self.meter.start()
        self._prepare()
        t = self.trainee
        trim_hooks = trim_between_layers(t.base.model)
        start = time.perf_counter()
        self.probe = FeatureCache.build(t, self.train_ex, self.val_ex, cfg, self.meter.see_batch) \
            if cfg.method == "probe" else None
        self.meter.feature_seconds = time.perf_counter() - start
        examples = self.probe.train_items if self.probe else self.train_ex
        per_epoch = math.ceil(len(examples) / cfg.batch_size)
        total = cfg.steps or max(1, math.ceil(cfg.epochs * per_epoch / cfg.grad_accum))
        eval_every = cfg.eval_every or max(1, per_epoch // cfg.grad_accum)
        peak = cfg.lr or DEFAULT_LR[cfg.method]
        opt = make_optimizer(cfg.optim, t.params, peak, cfg.weight_decay)
        reset_peak(t.device)
        step, history, losses = 0, [], []
        if cfg.resume:
            recovered = recover(self.out)
            if recovered:
                print(f"peftkit: {recovered}", file=sys.stderr)
            if complete(self.out / "checkpoint"):
                meta = load_checkpoint(self.out, t.params, opt)
                step, history, losses = meta["step"], meta["history"], meta["losses"]
                print(f"peftkit: resuming from step {step}", file=sys.stderr)
            else:  # killed before its first checkpoint: nothing to lose, start over
                print(f"peftkit: --resume: no complete checkpoint in {self.out}; starting from "
                      "step 0", file=sys.stderr)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.json").write_text(cfg.to_json())
        pad = t.base.tokenizer.pad_token_id
        precision = autocast(t.device, t.dtype)
        old_handlers = self._trap_signals()
        bar = tqdm(total=total, initial=step, desc=f"{cfg.method}", unit="step", dynamic_ncols=True)
        t.module.train()
        loop_start = time.perf_counter()
        try:
            while step < total:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg, peak)
                step_loss, tokens = 0.0, 0
                for micro in range(cfg.grad_accum):
                    items = batch_at(examples, step * cfg.grad_accum + micro, cfg.batch_size, cfg.seed)
                    batch = self.probe.collate(items) if self.probe else \
                        collate(items, pad, t.device)
                    tokens += int(batch["attention_mask"].sum()) if "attention_mask" in batch else 0
                    if "input_ids" in batch:
                        self.meter.see_batch(*batch["input_ids"].shape)
                    with precision:
                        loss = self._loss(batch).float() / cfg.grad_accum
                    loss.backward()
                    step_loss += loss.item()
                if cfg.clip:
                    torch.nn.utils.clip_grad_norm_(t.params, cfg.clip)
                opt.step()
                if step == 0 or not self.meter.state_bytes:
                    self.meter.measure_state(t, opt)
                opt.zero_grad(set_to_none=True)
                step += 1
                losses.append(step_loss)
                self.meter.tokens += tokens
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                                tok_s=f"{self.meter.tokens_per_second():.0f}")
                if step % eval_every == 0 or step == total:
                    history.append({"step": step, "train_loss": step_loss, **self._evaluate()})
                    bar.write(f"step {step}: " + ", ".join(
                        f"{k}={v:.4g}" for k, v in history[-1].items() if k != "step"))
                state = {"step": step, "history": history, "losses": losses}
                if self.stop_signal is not None:
                    save_checkpoint(self.out, t.params, opt, state)
                    raise TrainingInterrupted(
                        f"stopped by {self.stop_signal} at step {step}/{total}; checkpoint in "
                        f"{self.out / 'checkpoint'} (continue with --resume)")
                if cfg.save_every and step % cfg.save_every == 0 and step < total:
                    save_checkpoint(self.out, t.params, opt, state)
        finally:
            for hook in trim_hooks:
                hook.remove()
            self.meter.loop_seconds = time.perf_counter() - loop_start
            bar.close()
            self._restore_signals(old_handlers)
        save_checkpoint(self.out, t.params, opt, {"step": step, "history": history, "losses": losses})
        paths = t.save(self.out)
        return write_report(self, history, losses, paths)

    def _trap_signals(self):
        def handler(signum, _frame):
            self.stop_signal = signal.Signals(signum).name
        return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}

    @staticmethod
    def _restore_signals(old) -> None:
        for s, h in old.items():
            signal.signal(s, h)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    """torch's AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW (imported only then)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from peftkit.quant import bnb
    cls = bnb().optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb().optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()
