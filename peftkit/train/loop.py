"""The one trainer: full fine-tuning, feature extraction (probe) and every PEFT method.

AdamW with warmup + cosine/linear decay, gradient accumulation and clipping; evaluation each
epoch or every N steps; atomic checkpoints every N steps, at the end and on SIGINT/SIGTERM; an
exact `--resume`; report.json / report.md with measured memory, time and quality.
"""

import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from peftkit.data import IGNORE
from peftkit.device import autocast, reset_peak
from peftkit.errors import PeftkitError
from peftkit.train.allocator import trim_between_layers
from peftkit.train.batches import batch_at, collate, drawn
from peftkit.train.build import Trainee, build
from peftkit.train.checkpoint import complete, load_checkpoint, recover, save_checkpoint
from peftkit.train.config import TrainConfig, default_lr
from peftkit.train.distributed import any_rank, choose_strategy, join, leave, no_sync, wrap
from peftkit.train.evaluate import evaluate_run
from peftkit.train.examples import check_context, check_val_data, examples_for
from peftkit.train.probe import FeatureCache
from peftkit.train.report import Meter, write_report
from peftkit.train.run_dir import claim, resume_changes, save_run, write_config


class TrainingInterrupted(PeftkitError):
    """A signal stopped training; a checkpoint was written first."""


def lr_at(step: int, total: int, cfg: TrainConfig, peak: float) -> float:
    warm = int(cfg.warmup) if cfg.warmup >= 1 else int(cfg.warmup * total)  # steps or share
    if step < warm:
        return peak * (step + 1) / warm
    if cfg.schedule == "constant":
        return peak
    progress = (step - warm) / max(total - warm, 1)
    return peak * (0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine"
                   else 1 - progress)


def total_steps(cfg: TrainConfig, examples: int, global_batch: int) -> int:
    """--steps, or --epochs over the examples in global batches."""
    return cfg.steps or max(1, math.ceil(cfg.epochs * math.ceil(examples / global_batch)))


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.output)
        if int(os.environ.get("RANK", "0")) == 0:  # one owner; under torchrun rank 0 checks
            claim(self.out, cfg)
        self.stop_signal = None
        self.meter = Meter()

    # -- data ---------------------------------------------------------------------------------
    def _prepare(self):
        cfg = self.cfg
        ds = cfg.load_data(cfg.data)
        task = cfg.task if cfg.task != "auto" else (
            "classify" if ds.kind == "classification" else "causal-lm")
        if task == "classify" and ds.kind != "classification":
            raise PeftkitError(f"{cfg.data}: --task classify needs text+label records, got {ds.kind}")
        if task == "causal-lm" and ds.kind == "classification":
            raise PeftkitError(f"{cfg.data}: --task causal-lm, but its records are text+label "
                               "(classification); drop --task, or give causal-LM records")
        if cfg.val_data:  # the validation file is checked before any model loads
            check_val_data(cfg, ds)
        self.dataset = ds
        torch.manual_seed(cfg.seed)
        self.trainee: Trainee = build(cfg, task, ds.label_names, self.device)
        self.train_ex, self.val_ex, self.val_records, self.truncated = examples_for(
            cfg, ds, self.trainee.base.tokenizer, task)
        check_context(cfg, self.trainee.base.model.config, self.train_ex + self.val_ex)
        self.task = task

    def _param_groups(self, peak: float) -> list[dict]:
        """One group, or two for a classifier trained beyond its head: the new head at its own
        rate (`head_lr`; by default the probe's, when that is the larger), the body at `peak`.
        A fresh head at a body's fine-tuning rate barely moves in a short run (measured on
        SST-2: SmolLM2 full FT at 2e-5 stayed at chance; LP-FT, Kumar et al. 2022, trains the
        head first for the same reason). Both follow the same schedule."""
        t, cfg = self.trainee, self.cfg
        if t.head is None or cfg.method == "probe" or self.task != "classify":
            return [{"params": t.params}]
        head_lr = cfg.head_lr or max(peak, default_lr("probe", "classify"))
        mine = {id(p) for p in t.head.parameters()}
        return [{"params": [p for p in t.params if id(p) not in mine]},
                {"params": [p for p in t.params if id(p) in mine], "lr_scale": head_lr / peak}]

    # -- loss -----------------------------------------------------------------------------------
    def _loss(self, batch, module=None) -> torch.Tensor:
        """The mean loss of a batch (`module`: the wrapped one the training forward uses)."""
        module = module or self.trainee.module
        if self.probe is not None:
            return self.probe.loss(batch)
        if self.task == "classify":
            logits = module(batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"])
        return module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=batch["labels"]).loss

    @staticmethod
    def _terms(items) -> int:
        """How many loss terms examples (or cached features) contribute: labelled next tokens
        for a causal LM, one per row for classification."""
        if isinstance(items[0], tuple):  # probe features: (features, targets)
            return sum(1 if y.dim() == 0 else len(y) for _, y in items)
        if isinstance(items[0].labels, int):
            return len(items)
        return sum(sum(t != IGNORE for t in e.labels[1:]) for e in items)

    def _evaluate(self) -> dict:
        t = self.trainee
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
        return evaluate_run(t.module, self.task, t.base.tokenizer, self.val_ex, self.val_records,
                            n_classes=len(self.dataset.label_names), batch_size=cfg.batch_size,
                            device=t.device, exact_match_max=cfg.exact_match_max,
                            loss_fn=None if self.task == "classify" else self._loss)

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> dict | None:
        """Train; the report on rank 0 (None on the other ranks of a distributed run)."""
        device, _, _ = self.cfg.placement()
        self.world, self.device = join(device, self.cfg.dist_timeout)
        try:
            report = self._run()
            if self.world.active:  # rank 0 is still writing: nobody leaves the group before it
                torch.distributed.barrier()
            return report
        finally:
            leave()

    def _say(self, text: str) -> None:
        if self.world.main:
            print(f"peftkit: {text}", file=sys.stderr)

    def _run(self) -> dict | None:
        """Setup, the step loop, then checkpoint, outputs and report (rank 0)."""
        cfg, world = self.cfg, self.world
        self.meter.start()
        self._prepare()
        t = self.trainee
        trim_hooks = trim_between_layers(t.base.model)  # the probe's feature pass too
        forward, examples = self._setup()
        if t.not_adapted:
            self._say(t.not_adapted)
        peak = cfg.lr or default_lr(cfg.method, self.task)
        opt = make_optimizer(cfg.optim, self._param_groups(peak), peak, cfg.weight_decay)
        reset_peak(t.device)
        step, history, losses, accum = self._resume(opt)
        global_batch = cfg.batch_size * world.size * accum
        total = total_steps(cfg, len(examples), global_batch)
        if step > total:
            raise PeftkitError(f"--resume: the checkpoint in {self.out} is at step {step}, past "
                               f"this run's {total} steps (were --steps, --epochs or the data "
                               "changed?)")
        eval_every = cfg.eval_every or math.ceil(len(examples) / global_batch)
        if world.main:
            write_config(self.out, cfg, t.dtype)
        old_handlers = self._trap_signals()
        bar = tqdm(total=total, initial=step, desc=f"{cfg.method}", unit="step",
                   dynamic_ncols=True, disable=not world.main)
        t.module.train()
        loop_start = time.perf_counter()
        try:
            while step < total:
                for g in opt.param_groups:
                    g["lr"] = lr_at(step, total, cfg, peak) * g.get("lr_scale", 1.0)
                rows = batch_at(examples, step, global_batch, cfg.seed)
                step_loss = self._step(opt, forward, rows, accum)
                step += 1
                losses.append(step_loss)
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}",
                                tok_s=f"{self.meter.tokens_per_second():.0f}")
                if step % eval_every == 0 and step != total:  # the last one after saving
                    history.append({"step": step, "train_loss": step_loss, **self._evaluate()})
                    if world.main:
                        bar.write(f"step {step}: " + ", ".join(
                            f"{k}={v:.4g}" for k, v in history[-1].items() if k != "step"))
                state = {"step": step, "history": history, "losses": losses,
                         "global_batch": global_batch}
                self._checkpoint_or_stop(opt, state, total)
        finally:
            for hook in trim_hooks:
                hook.remove()
            self.meter.loop_seconds = time.perf_counter() - loop_start
            bar.close()
            self._restore_signals(old_handlers)
        save_checkpoint(self.out, t.params, opt, {"step": step, "history": history,
                                                  "losses": losses, "global_batch": global_batch},
                        world.main)
        # the adapter or head, and a report, are on disk before the final evaluation: a run
        # that evaluation then kills (memory, a bad reference) keeps what it trained
        paths = save_run(t, self.out, world.main)
        data = {"train_examples": len(self.train_ex), "val_examples": len(self.val_ex),
                "truncated_examples": self.truncated, "skipped_records": self.dataset.skipped}
        if self.probe is not None:
            data["backbone_forward_examples"] = self.probe.backbone_rows
        if losses and (not history or history[-1]["step"] != step):
            if world.main:
                write_report(self.out, t, self.meter, history, losses, paths, data)
            history.append({"step": step, "train_loss": losses[-1], **self._evaluate()})
        if not world.main:
            return None
        return write_report(self.out, t, self.meter, history, losses, paths, data)

    def _setup(self):
        """(the forward the steps use, the items they draw from): the distributed wrapping
        and, for a probe, the one backbone pass whose features every epoch reuses."""
        cfg, world, t = self.cfg, self.world, self.trainee
        if len(self.train_ex) < world.size:
            raise PeftkitError(f"{cfg.data}: {len(self.train_ex)} training examples cannot be "
                               f"split over {world.size} processes")
        strategy = choose_strategy(cfg.strategy, cfg.method, world)
        if world.active:
            why = "the whole model trains" if strategy == "fsdp" else "only adapters train"
            self._say(f"{world.size} processes, strategy {strategy} ({why})")
        start = time.perf_counter()
        if cfg.method == "probe" and cfg.steps:  # --steps short of an epoch: those rows only
            self.train_ex = drawn(self.train_ex, cfg.steps * cfg.batch_size * cfg.grad_accum
                                  * world.size, cfg.seed)
        self.probe = FeatureCache.build(t, self.train_ex, self.val_ex, cfg, self.meter.see_batch,
                                        world) if cfg.method == "probe" else None
        self.meter.feature_seconds = time.perf_counter() - start
        forward = wrap(t.module if self.probe is None else t.head, strategy, world, t.device)
        if self.probe is not None:
            self.probe.head_forward = forward
        if strategy == "fsdp" and world.active:  # sharded: the parameters are DTensors now
            t.params = [p for p in t.module.parameters() if p.requires_grad]
        return forward, self.probe.train_items if self.probe else self.train_ex

    def _resume(self, opt) -> tuple[int, list, list, int]:
        """(step, history, losses, micro-steps per step): a checkpoint's, with --resume."""
        cfg, world, t = self.cfg, self.world, self.trainee
        if not cfg.resume:
            return 0, [], [], cfg.grad_accum
        recovered = recover(self.out) if world.main else None
        if recovered:
            self._say(recovered)
        if world.active:
            torch.distributed.barrier()
        if not complete(self.out / "checkpoint"):  # killed before its first: nothing to lose
            self._say(f"--resume: no complete checkpoint in {self.out}; starting from step 0")
            return 0, [], [], cfg.grad_accum
        changes = resume_changes(self.out, cfg)
        meta = load_checkpoint(self.out, t.params, opt)
        self._say(f"resuming from step {meta['step']}" + (
            f" ({', '.join(changes)}: the schedule now spans the new length)" if changes else ""))
        return (meta["step"], meta["history"], meta["losses"],
                self._accum_for(meta.get("global_batch")))

    def _step(self, opt, forward, rows, accum: int) -> float:
        """One optimizer step over the global batch `rows`: this rank's micro-batches, each
        loss weighted by its share of the global batch's loss terms; returns the batch loss."""
        cfg, world, t = self.cfg, self.world, self.trainee
        weight = world.size / self._terms(rows)  # token-weighted over the global batch
        pad = t.base.tokenizer.pad_token_id
        step_loss = 0.0
        for micro in range(accum):
            at = (micro * world.size + world.rank) * cfg.batch_size
            items = rows[at:at + cfg.batch_size]
            scale = weight if items else 0.0  # a short last batch: a zero-weight row
            items = items or rows[:1]  # keeps every rank in every collective
            batch = self.probe.collate(items) if self.probe else collate(items, pad, t.device)
            if "attention_mask" in batch:
                self.meter.tokens += int(batch["attention_mask"].sum())
            if "input_ids" in batch:
                self.meter.see_batch(*batch["input_ids"].shape)
            with no_sync(forward, micro == accum - 1), autocast(t.device, t.dtype):
                loss = self._loss(batch, forward).float() * (self._terms(items) * scale)
            loss.backward()
            step_loss += loss.item() / world.size  # this rank's share of the mean
        step_loss = sum_over(step_loss, world, t.device)
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(t.params, cfg.clip)
        opt.step()
        if not self.meter.state_bytes:
            self.meter.measure_state(t, opt)
        opt.zero_grad(set_to_none=True)
        return step_loss

    def _checkpoint_or_stop(self, opt, state: dict, total: int) -> None:
        """Every --save-every steps a checkpoint; after a signal (to any rank) one, then out."""
        cfg, world, t = self.cfg, self.world, self.trainee
        if any_rank(self.stop_signal is not None, world, t.device):
            save_checkpoint(self.out, t.params, opt, state, world.main)
            raise TrainingInterrupted(
                f"stopped by {self.stop_signal or 'a signal to another rank'} at step "
                f"{state['step']}/{total}; checkpoint in {self.out / 'checkpoint'} "
                "(continue with --resume)")
        if cfg.save_every and state["step"] % cfg.save_every == 0 and state["step"] < total:
            save_checkpoint(self.out, t.params, opt, state, world.main)

    def _accum_for(self, global_batch: int | None) -> int:
        """Micro-steps per step that keep a checkpoint's global batch at this world size."""
        cfg, world = self.cfg, self.world
        if global_batch is None or global_batch == cfg.batch_size * world.size * cfg.grad_accum:
            return cfg.grad_accum
        per_pass = cfg.batch_size * world.size
        if global_batch % per_pass:
            raise PeftkitError(f"--resume: the checkpoint's global batch is {global_batch}, not a "
                               f"multiple of --batch-size {cfg.batch_size} x {world.size} "
                               "processes; pick a batch size that divides it")
        self._say(f"keeping the checkpoint's global batch of {global_batch}: "
                  f"{global_batch // per_pass} micro-steps of {cfg.batch_size} per process")
        return global_batch // per_pass

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


def sum_over(value: float, world, device) -> float:
    """A per-rank number summed over the ranks (shares of the global batch's loss)."""
    if not world.active:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()
