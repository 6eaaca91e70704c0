"""The one run loop: stepping, evaluation, checkpoints, signals and reports, over one tenant
(`trainer.Trainer`: full fine-tuning, probe, every PEFT method, torchrun) or many
(`joint.JointTrainer`: N tenants' adapters in one batched pass). Every flag means the same in
both: a tenant is what a single run is (its data order, optimizer, schedule, clipping, eval
cadence, checkpoints, report); only how a step's forward and backward run differs.

AdamW with warmup + cosine/linear decay, gradient accumulation and clipping; evaluation each
epoch or every N steps; atomic checkpoints every N steps, at the end and on SIGINT/SIGTERM; an
exact `--resume`; report.json / report.md with measured memory, time and quality.
"""

import math
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from peftkit.data import IGNORE
from peftkit.device import autocast
from peftkit.errors import PeftkitError
from peftkit.train.build import Trainee
from peftkit.train.checkpoint import complete, load_checkpoint, recover, save_checkpoint
from peftkit.train.config import METRIC_TASKS, METRICS, TrainConfig, default_lr
from peftkit.train.distributed import World, any_rank, full, shard_like
from peftkit.train.report import Meter, memory_mib, write_report
from peftkit.train.tracking import Tracker, trackers
from peftkit.train.run_dir import resume_changes, save_run, write_config


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


def clip(params: list, max_norm: float, measure: bool = False) -> torch.Tensor | None:
    """Clip the gradients to `max_norm` (0: off); their norm before clipping, when clipped or
    `measure`d (run tracking)."""
    if not max_norm and not measure:
        return None
    return torch.nn.utils.clip_grad_norm_(params, max_norm or math.inf)  # read when tracked


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    """torch's AdamW, or bitsandbytes' 8-bit / paged 8-bit AdamW (imported only then)."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    from peftkit.quant import bnb
    cls = bnb().optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb().optim.AdamW8bit
    return cls(params, lr=lr, weight_decay=weight_decay)


def loss_terms(items) -> int:
    """How many loss terms examples (or a probe's cached features) contribute: labelled next
    tokens for a causal LM, one per row for classification."""
    if isinstance(items[0], tuple):  # probe features: (features, targets)
        return sum(1 if y.dim() == 0 else len(y) for _, y in items)
    if isinstance(items[0].labels, int):
        return len(items)
    return sum(sum(t != IGNORE for t in e.labels[1:]) for e in items)


@dataclass(eq=False)  # a tenant is itself: compared and hashed by identity
class Tenant:
    """One adapter's (or model's) training inside a run: everything a single run has."""
    name: str
    trainee: Trainee  # its model view; `params` are the tensors its optimizer updates
    train_ex: list
    val_ex: list
    val_records: list
    meter: Meter = field(default_factory=Meter)
    data: dict = field(default_factory=dict)  # the report's data facts
    opt: object = None
    peak: float = 0.0
    total: int = 0
    accum: int = 1  # micro-batches per step (a checkpoint's global batch may change it)
    global_batch: int = 0
    eval_every: int = 0
    step: int = 0
    history: list = field(default_factory=list)
    losses: list = field(default_factory=list)
    keep: str = "last"  # the adapter saved: "best" (evaluated) or "last"
    best: dict | None = None  # {"step", "value", "metric"} of the best evaluation so far
    best_params: list | None = None  # its trainable tensors (whole, on the CPU)
    since_best: int = 0  # evaluations since, for --patience
    stopped: str | None = None  # why training ended before its last step (early stopping)
    grad_norm: torch.Tensor | None = None  # the last step's gradient norm (before clipping)
    tracker: Tracker | None = None  # --report-to: its series (rank 0)

    @property
    def cfg(self) -> TrainConfig:
        return self.trainee.config

    @property
    def out(self) -> Path:
        return Path(self.cfg.output)

    def state(self) -> dict:
        return {"step": self.step, "history": self.history, "losses": self.losses,
                "global_batch": self.global_batch, "best": self.best,
                "since_best": self.since_best, "stopped": self.stopped}

    def save(self, write: bool) -> None:
        save_checkpoint(self.out, self.trainee.params, self.opt, self.state(), write,
                        best=self.best_params)


class RunLoop:
    """What every run does around its steps; subclasses say how a step runs (`_step`), how a
    tenant is evaluated (`_metrics`) and which task its examples are (`task`)."""
    world = World()  # one process; a torchrun rank replaces it (Trainer.run)
    task = "causal-lm"
    stop_signal: str | None = None

    def _say(self, text: str) -> None:
        if self.world.main:
            print(f"peftkit: {text}", file=sys.stderr)

    # -- before the first step -----------------------------------------------------------------
    def _start(self, t: Tenant, param_groups: list[dict] | None = None) -> None:
        """Tenant t's optimizer, schedule length and eval cadence; its checkpoint with --resume."""
        cfg = t.cfg
        self._check_selection(t)
        t.peak = cfg.lr or default_lr(cfg.method, self.task)
        t.opt = make_optimizer(cfg.optim, param_groups or [{"params": t.trainee.params}],
                               t.peak, cfg.weight_decay)
        self._resume(t)
        t.global_batch = cfg.batch_size * self.world.size * t.accum
        t.total = t.step if t.stopped else total_steps(cfg, len(t.train_ex), t.global_batch)
        if t.step > t.total:
            raise PeftkitError(f"--resume: the checkpoint in {t.out} is at step {t.step}, past "
                               f"this run's {t.total} steps (were --steps, --epochs or the data "
                               "changed?)")
        t.eval_every = cfg.eval_every or math.ceil(len(t.train_ex) / t.global_batch)
        if self.world.main:
            write_config(t.out, cfg, t.trainee.dtype)
            names = trackers(cfg.report_to)
            if names:
                t.tracker = Tracker(names, t.out, t.name or t.out.name, asdict(cfg))

    def _check_selection(self, t: Tenant) -> None:
        """--patience, --metric and --keep against the run's task and data, before any step."""
        cfg, who = t.cfg, self._who(t)
        t.keep = cfg.keep if cfg.keep != "auto" else ("best" if t.val_ex else "last")
        if not t.val_ex and (cfg.patience or cfg.keep == "best"):
            asked = f"--patience {cfg.patience}" if cfg.patience else "--keep best"
            raise PeftkitError(f"{who}{asked}: needs validation data to compare evaluations "
                               "(--val-data FILE or --val-split > 0)")
        if not (cfg.patience or t.keep == "best"):
            return
        if cfg.metric not in METRIC_TASKS[self.task]:
            raise PeftkitError(f"{who}--metric {cfg.metric}: a {self.task} run reports "
                               f"{', '.join(METRIC_TASKS[self.task])}")
        if cfg.metric == "exact_match" and not cfg.exact_match_max:
            raise PeftkitError(f"{who}--metric exact_match: --exact-match-max is 0, so no "
                               "evaluation scores it")

    def _observe(self, t: Tenant, metrics: dict) -> None:
        """After an evaluation: a better --metric becomes the best (its tensors kept); else one
        more evaluation without improvement, and --patience of them end the tenant's run."""
        cfg = t.cfg
        key, sign = METRICS[cfg.metric]
        value = metrics.get(key)
        if value is None or not math.isfinite(value):
            better = False
        else:
            better = t.best is None or sign * (value - t.best["value"]) > 0
        if better:
            t.best = {"step": t.step, "value": value, "metric": cfg.metric}
            t.since_best = 0
            if t.keep == "best":
                t.best_params = [full(p.detach()).to("cpu", copy=True)
                                 for p in t.trainee.params]
            return
        t.since_best += 1
        if cfg.patience and t.since_best >= cfg.patience and t.step < t.total:
            t.stopped = (f"early stop at step {t.step}: {cfg.metric} did not improve on "
                         f"{t.best['value']:.4g} (step {t.best['step']}) in {cfg.patience} "
                         "evaluations" if t.best else
                         f"early stop at step {t.step}: {cfg.metric} was never finite")
            t.total = t.step  # the tenant leaves the batch; the others go on
            self._say(f"{self._who(t)}{t.stopped}")

    def _resume(self, t: Tenant) -> None:
        cfg, world = t.cfg, self.world
        t.accum = cfg.grad_accum
        if not cfg.resume:
            return
        recovered = recover(t.out) if world.main else None
        if recovered:
            self._say(recovered)
        if world.active:
            torch.distributed.barrier()
        if not complete(t.out / "checkpoint"):  # killed before its first: nothing to lose
            self._say(f"--resume: no complete checkpoint in {t.out}; starting from step 0")
            return
        changes = resume_changes(t.out, cfg)
        meta = load_checkpoint(t.out, t.trainee.params, t.opt)
        self._loaded(t)
        self._say(f"{self._who(t)}resuming from step {meta['step']}" + (
            f" ({', '.join(changes)}: the schedule now spans the new length)" if changes else ""))
        t.step, t.history, t.losses = meta["step"], meta["history"], meta["losses"]
        t.best, t.since_best = meta.get("best"), meta.get("since_best", 0)
        t.best_params, t.stopped = meta.get("best_params"), meta.get("stopped")
        t.accum = self._accum_for(t, meta.get("global_batch"))

    def _loaded(self, t: Tenant) -> None:
        """After a checkpoint was read into t's tensors (joint: copied into its slot)."""

    def _who(self, t: Tenant) -> str:
        return ""

    def _accum_for(self, t: Tenant, global_batch: int | None) -> int:
        """Micro-steps per step that keep a checkpoint's global batch at this world size."""
        cfg, world = t.cfg, self.world
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

    # -- the steps -------------------------------------------------------------------------------
    def _loop(self, tenants: list[Tenant], desc: str) -> float:
        """Step every tenant to its total; returns the loop's seconds. A signal checkpoints
        every tenant, then raises TrainingInterrupted."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        bar = tqdm(total=sum(t.total for t in tenants), initial=sum(t.step for t in tenants),
                   desc=desc, unit="step", dynamic_ncols=True, disable=not self.world.main)
        for t in tenants:
            t.trainee.module.train()
        start = time.perf_counter()
        try:
            while active := [t for t in tenants if t.step < t.total]:
                for t in active:
                    for g in t.opt.param_groups:
                        g["lr"] = lr_at(t.step, t.total, t.cfg, t.peak) * g.get("lr_scale", 1.0)
                losses = self._step(active)
                for t, loss in zip(active, losses):
                    t.step += 1
                    t.losses.append(loss)
                    if t.tracker is not None:  # (reading the norm waits for the device)
                        self._track(t, "train", {
                            "loss": loss, "lr": t.opt.param_groups[0]["lr"],
                            "grad_norm": float(t.grad_norm), **memory_mib(t.trainee.device),
                            "tokens_per_second": t.meter.tokens_per_second()})
                    if t.step % t.eval_every == 0 and t.step < t.total:  # the last after saving
                        t.history.append({"step": t.step, "train_loss": loss,
                                          **self._evaluate(t)})
                        self._observe(t, t.history[-1])
                        self._track(t, "eval", t.history[-1])
                        if self.world.main:
                            bar.write(f"{self._who(t)}step {t.step}: " + ", ".join(
                                f"{k}={v:.4g}" for k, v in t.history[-1].items() if k != "step"))
                bar.update(len(active))
                bar.set_postfix(self._postfix(active))
                self._checkpoint_or_stop(tenants)
        finally:
            seconds = time.perf_counter() - start
            for t in tenants:
                t.meter.loop_seconds = seconds
            bar.close()
            for s, h in old.items():
                signal.signal(s, h)
        return seconds

    def _step(self, active: list[Tenant]) -> list[float]:
        """One optimizer step of every active tenant; each one's batch loss."""
        raise NotImplementedError

    def _postfix(self, active: list[Tenant]) -> dict:
        t = active[0]
        return {"loss": f"{t.losses[-1]:.4f}", "lr": f"{t.opt.param_groups[0]['lr']:.2e}",
                "tok_s": f"{t.meter.tokens_per_second():.0f}"}

    def _on_signal(self, signum, _frame) -> None:
        self.stop_signal = signal.Signals(signum).name

    def _checkpoint_or_stop(self, tenants: list[Tenant]) -> None:
        """Every --save-every steps a checkpoint; after a signal (to any rank) one of every
        tenant, then out."""
        first = tenants[0].trainee
        if any_rank(self.stop_signal is not None, self.world, first.device):
            for t in tenants:
                t.save(self.world.main)
                self._close_tracker(t)
            raise TrainingInterrupted(self._stopped(tenants))
        for t in tenants:
            if t.cfg.save_every and t.step % t.cfg.save_every == 0 and 0 < t.step < t.total:
                t.save(self.world.main)

    def _track(self, t: Tenant, kind: str, values: dict) -> None:
        if t.tracker is not None:
            t.tracker.log(t.step, {f"{kind}/{k}": v for k, v in values.items()
                                   if k not in ("step", "train_loss") and v is not None})

    @staticmethod
    def _close_tracker(t: Tenant) -> None:
        if t.tracker is not None:
            t.tracker.close()
            t.tracker = None

    def _stopped(self, tenants: list[Tenant]) -> str:
        t = tenants[0]
        return (f"stopped by {self.stop_signal or 'a signal to another rank'} at step "
                f"{t.step}/{t.total}; checkpoint in {t.out / 'checkpoint'} "
                "(continue with --resume)")

    # -- evaluation and outputs --------------------------------------------------------------
    def _evaluate(self, t: Tenant) -> dict:
        if not t.val_ex:
            return {}
        module = t.trainee.module
        module.eval()
        try:
            with autocast(t.trainee.device, t.trainee.dtype):
                return self._metrics(t)
        finally:
            module.train()

    def _metrics(self, t: Tenant) -> dict:
        raise NotImplementedError

    def _finish(self, t: Tenant) -> dict | None:
        """Checkpoint, outputs and report (rank 0), then the final evaluation; with --keep best
        the best evaluated tensors replace the last ones in the outputs. The adapter or head,
        and a report, are on disk before that evaluation: a run that evaluation then kills
        (memory, a bad reference) keeps what it trained."""
        main = self.world.main
        t.save(main)
        paths = save_run(t.trainee, t.out, main)
        if t.losses and (not t.history or t.history[-1]["step"] != t.step):
            if main:
                write_report(t.out, t.trainee, t.meter, t.history, t.losses, paths, self._facts(t))
            t.history.append({"step": t.step, "train_loss": t.losses[-1], **self._evaluate(t)})
            if t.val_ex:
                self._observe(t, t.history[-1])
                self._track(t, "eval", t.history[-1])
        self._close_tracker(t)
        if t.keep == "best" and t.best_params is not None and t.best["step"] != t.step:
            with torch.no_grad():
                for p, b in zip(t.trainee.params, t.best_params):
                    p.copy_(shard_like(b.to(p.device), p))
            self._loaded(t)
            paths = save_run(t.trainee, t.out, main)
        if not main:
            return None
        return write_report(t.out, t.trainee, t.meter, t.history, t.losses, paths, self._facts(t))

    def _facts(self, t: Tenant) -> dict:
        """The run's data facts and which evaluation its outputs hold (report.json)."""
        kept = t.best["step"] if t.keep == "best" and t.best else t.step
        metrics = next((h for h in t.history if h["step"] == kept), None)
        return {**t.data, "kept": t.keep, "kept_step": kept, "best": t.best,
                "stopped": t.stopped,
                **({"kept_metrics": {k: v for k, v in metrics.items() if k != "step"}}
                   if metrics else {})}
