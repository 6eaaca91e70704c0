"""The one-tenant run (`peftkit train`): full fine-tuning, feature extraction (probe) and every
PEFT method, on one process or a torchrun group (DDP / FSDP2), through the one run loop
(loop.py)."""

import os
import time
from pathlib import Path

import torch

from peftkit.data.templates import use_chat_template
from peftkit.device import autocast, reset_peak
from peftkit.errors import PeftkitError
from peftkit.methods.spec import virtual_at
from peftkit.train.allocator import trim_between_layers
from peftkit.train.batches import batch_at, collate, drawn, pack
from peftkit.train.build import build
from peftkit.train.config import TrainConfig, default_lr
from peftkit.train.distributed import choose_strategy, join, leave, no_sync, wrap
from peftkit.train.evaluate import evaluate_run
from peftkit.train.examples import check_context, check_val_data, examples_for
from peftkit.train.loop import RunLoop, Tenant, clip, loss_terms
from peftkit.train.probe import FeatureCache
from peftkit.train.run_dir import claim


class Trainer(RunLoop):
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.out = Path(cfg.output)
        if int(os.environ.get("RANK", "0")) == 0:  # one owner; under torchrun rank 0 checks
            claim(self.out, cfg)
        self.probe = None

    # -- data and model -----------------------------------------------------------------------
    def _prepare(self, meter) -> Tenant:
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
        if cfg.packing:
            check_packing(cfg, task)
        self.dataset, self.task = ds, task
        torch.manual_seed(cfg.seed)
        trainee = build(cfg, task, ds.label_names, self.device)
        self.attn = trainee.base.model.config._attn_implementation
        use_chat_template(trainee.base.tokenizer, cfg.chat_template,
                          *([self.out] if self.world.main else []))
        train_ex, val_ex, val_records, truncated = examples_for(cfg, ds, trainee.base.tokenizer,
                                                                task)
        check_context(cfg, trainee.base.model.config, train_ex + val_ex)
        t = Tenant("", trainee, train_ex, val_ex, val_records, meter=meter)
        t.data = {"truncated_examples": truncated, "skipped_records": ds.skipped}
        return t

    def _param_groups(self, t: Tenant) -> list[dict]:
        """One group, or two for a classifier trained beyond its head: the new head at its own
        rate (`head_lr`; by default the probe's, when that is the larger), the body at the
        peak. A fresh head at a body's fine-tuning rate barely moves in a short run (measured
        on SST-2: SmolLM2 full FT at 2e-5 stayed at chance; LP-FT, Kumar et al. 2022, trains
        the head first for the same reason). Both follow the same schedule."""
        tr, cfg = t.trainee, self.cfg
        if tr.head is None or cfg.method == "probe" or self.task != "classify":
            return [{"params": tr.params}]
        peak = cfg.lr or default_lr(cfg.method, self.task)
        head_lr = cfg.head_lr or max(peak, default_lr("probe", "classify"))
        mine = {id(p) for p in tr.head.parameters()}
        return [{"params": [p for p in tr.params if id(p) not in mine]},
                {"params": [p for p in tr.params if id(p) in mine], "lr_scale": head_lr / peak}]

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

    def _run(self) -> dict | None:
        from peftkit.train.report import Meter
        meter = Meter()
        meter.start()
        t = self._prepare(meter)
        self.tenant = t
        if t.trainee.not_adapted:
            self._say(t.trainee.not_adapted)
        trim_hooks = trim_between_layers(t.trainee.base.model)  # the probe's feature pass too
        try:
            self.forward, t.train_ex = self._setup(t)
            reset_peak(t.trainee.device)
            self._start(t, self._param_groups(t))
            self._loop([t], desc=self.cfg.method)
        finally:
            for hook in trim_hooks:
                hook.remove()
        t.data = {"train_examples": len(self.train_rows), "val_examples": len(t.val_ex),
                  **t.data}
        if self.probe is not None:
            t.data["backbone_forward_examples"] = self.probe.backbone_rows
        return self._finish(t)

    def _setup(self, t: Tenant):
        """(the forward the steps use, the items they draw from): the distributed wrapping
        and, for a probe, the one backbone pass whose features every epoch reuses."""
        cfg, world, tr = self.cfg, self.world, t.trainee
        if len(t.train_ex) < world.size:
            raise PeftkitError(f"{cfg.data}: {len(t.train_ex)} training examples cannot be "
                               f"split over {world.size} processes")
        strategy = choose_strategy(cfg.strategy, cfg.method, world)
        if world.active:
            why = "the whole model trains" if strategy == "fsdp" else "only adapters train"
            self._say(f"{world.size} processes, strategy {strategy} ({why})")
        start = time.perf_counter()
        if cfg.method == "probe" and cfg.steps:  # --steps short of an epoch: those rows only
            t.train_ex = drawn(t.train_ex, cfg.steps * cfg.batch_size * cfg.grad_accum
                               * world.size, cfg.seed)
        self.train_rows = t.train_ex
        self.probe = FeatureCache.build(tr, t.train_ex, t.val_ex, cfg, t.meter.see_batch,
                                        world) if cfg.method == "probe" else None
        t.meter.feature_seconds = time.perf_counter() - start
        forward = wrap(tr.module if self.probe is None else tr.head, strategy, world, tr.device)
        if self.probe is not None:
            self.probe.head_forward = forward
        if strategy == "fsdp" and world.active:  # sharded: the parameters are DTensors now
            tr.params = [p for p in tr.module.parameters() if p.requires_grad]
        return forward, self.probe.train_items if self.probe else t.train_ex

    # -- one step -------------------------------------------------------------------------------
    def _step(self, active: list[Tenant]) -> list[float]:
        """One optimizer step over the global batch: this rank's micro-batches, each loss
        weighted by its share of the global batch's loss terms; returns the batch loss."""
        t, = active
        cfg, world, tr = self.cfg, self.world, t.trainee
        rows = batch_at(t.train_ex, t.step, t.global_batch, cfg.seed)
        weight = world.size / loss_terms(rows)  # token-weighted over the global batch
        pad = tr.base.tokenizer.pad_token_id
        step_loss = 0.0
        for micro in range(t.accum):
            at = (micro * world.size + world.rank) * cfg.batch_size
            items = rows[at:at + cfg.batch_size]
            scale = weight if items else 0.0  # a short last batch: a zero-weight row
            items = items or rows[:1]  # keeps every rank in every collective
            if self.probe:
                batch = self.probe.collate(items)
            elif cfg.packing:
                batch = pack(items, cfg.max_length, pad, self.attn, tr.dtype, tr.device)
            else:
                batch = collate(items, pad, tr.device)
            if "tokens" in batch:  # packed rows: their real tokens
                t.meter.tokens += batch.pop("tokens")
            elif "attention_mask" in batch:
                t.meter.tokens += int(batch["attention_mask"].sum())
            if "input_ids" in batch:
                t.meter.see_batch(*batch["input_ids"].shape)
            with no_sync(self.forward, micro == t.accum - 1), autocast(tr.device, tr.dtype):
                loss = self._loss(batch, self.forward).float() * (loss_terms(items) * scale)
            loss.backward()
            step_loss += loss.item() / world.size  # this rank's share of the mean
        step_loss = sum_over(step_loss, world, tr.device)
        t.grad_norm = clip(tr.params, cfg.clip, t.tracker is not None)
        t.opt.step()
        if not t.meter.state_bytes:
            t.meter.measure_state(tr, t.opt)
        t.opt.zero_grad(set_to_none=True)
        return [step_loss]

    def _loss(self, batch, module=None) -> torch.Tensor:
        """The mean loss of a batch (`module`: the wrapped one the training forward uses)."""
        module = module or self.tenant.trainee.module
        if self.probe is not None:
            return self.probe.loss(batch)
        if self.task == "classify":
            logits = module(batch["input_ids"], batch["attention_mask"])
            return torch.nn.functional.cross_entropy(logits, batch["labels"])
        packed = {"position_ids": batch["position_ids"], "use_cache": False} \
            if "position_ids" in batch else {}
        return module(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask"),
                      labels=batch["labels"], **packed).loss

    def _metrics(self, t: Tenant) -> dict:
        tr, cfg = t.trainee, self.cfg
        if self.probe is not None:
            return self.probe.evaluate(t.val_records, cfg)
        return evaluate_run(tr.module, self.task, tr.base.tokenizer, t.val_ex, t.val_records,
                            n_classes=len(self.dataset.label_names), batch_size=cfg.batch_size,
                            device=tr.device, exact_match_max=cfg.exact_match_max,
                            loss_fn=None if self.task == "classify" else self._loss)


# Families whose attention builds its own mask from a 2-D one (BLOOM's ALiBi): a packed
# row's block-diagonal mask does not reach it (measured: every other family in
# tests/families.py gives the unpacked loss).
NO_PACKING = ("bloom",)


def check_packing(cfg: TrainConfig, task: str) -> None:
    """--packing's limits, said before the model loads."""
    from peftkit.models import peek_config
    why = ("it packs causal-LM tokens; classification rows stay one example each"
           if task == "classify" else
           "virtual tokens are prepended per row, not per example" if virtual_at(cfg.method)
           else
           "a probe trains on one feature per example" if cfg.method == "probe" else None)
    kind = peek_config(cfg.model).model_type
    if why is None and kind in NO_PACKING:
        why = f"{kind}'s attention builds its own mask, which a packed row cannot reach"
    if why:
        raise PeftkitError(f"--packing with --method {cfg.method}: {why}; drop --packing")


def sum_over(value: float, world, device) -> float:
    """A per-rank number summed over the ranks (shares of the global batch's loss)."""
    if not world.active:
        return value
    t = torch.tensor([value], device=device)
    torch.distributed.all_reduce(t)
    return t.item()


def train(cfg: TrainConfig) -> dict:
    return Trainer(cfg).run()
