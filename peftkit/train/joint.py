"""Joint multi-tenant training: N tenants' LoRA adapters trained in one batched pass over one
frozen base (loaded, and quantized for QLoRA, once). Each tenant is a slot of the multi-slot
stack; each step's batch holds every still-training tenant's rows (row -> slot).

The loss is the sum of each tenant's own mean loss, so every slot receives exactly the gradient
its adapter would get training alone on the same rows. Each tenant keeps what a single run has:
its own data order, AdamW (over its own tensors, so its state and update are a single run's),
LR schedule, gradient clipping, step count, checkpoint and outputs; a tenant that finishes
drops out of the batch. With dropout 0 a joint run equals the separate runs (tests: <= 1e-5).

tenants.yaml:
    model: smollm2-135m          # shared: model, method (lora | qlora), device, dtype, seed, ...
    method: lora
    tenants:
      - {name: acme, data: acme.jsonl, output: runs/acme, rank: 8, lr: 2e-4, steps: 100}
      - {name: hooli, data: hooli.jsonl, output: runs/hooli, rank: 16, rslora: true}
"""

import json
import signal
import time
from dataclasses import fields
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from peftkit.data import IGNORE
from peftkit.errors import DataError, PeftkitError
from peftkit.formats import save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.methods.inject import find_targets
from peftkit.models import load_base
from peftkit.plan.memory import sequential_seconds, train_flops
from peftkit.plan.shapes import shape_from_config
from peftkit.train.batches import batch_at, collate
from peftkit.train.build import adapter_config, quant_for
from peftkit.train.checkpoint import complete, load_checkpoint, save_checkpoint
from peftkit.train.config import TrainConfig, default_lr, typed_options
from peftkit.train.evaluate import evaluate_run
from peftkit.train.examples import examples_for
from peftkit.train.loop import TrainingInterrupted, lr_at, make_optimizer, total_steps
from peftkit.train.report import peak_rss_bytes
from peftkit.train.run_dir import ADAPTER, claim, write_config

JOINT_METHODS = ("lora", "qlora", "dora")
def load_tenants(path: str) -> list[tuple[str, TrainConfig]]:
    """(name, config) per tenant: the file's shared options under each tenant's own."""
    return read_tenants(path)[0]


def read_tenants(path: str) -> tuple[list[tuple[str, TrainConfig]], dict[str, str]]:
    """load_tenants, and where each tenant is written ({name: "FILE:LINE"})."""
    p = Path(path)
    try:
        text = p.read_text()
        raw, node = yaml.safe_load(text), yaml.compose(text)
    except (OSError, yaml.YAMLError) as e:
        raise PeftkitError(f"{p}: cannot read tenants ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tenants"), list) or not raw["tenants"]:
        raise PeftkitError(f"{p}: expected shared options and a non-empty list `tenants:`")
    known = {f.name for f in fields(TrainConfig)}
    shared = {k: v for k, v in raw.items() if k != "tenants"}
    out, names = [], set()
    for i, t in enumerate(raw["tenants"]):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise PeftkitError(f"{p}: tenants[{i}] needs a name")
        unknown = sorted(set(t) - known - {"name"}) + sorted(set(shared) - known)
        if unknown:
            raise PeftkitError(f"{p}: tenant '{t['name']}': unknown option '{unknown[0]}'")
        if t["name"] in names:
            raise PeftkitError(f"{p}: tenant '{t['name']}' is listed twice")
        names.add(t["name"])
        where = f"{p}: tenant '{t['name']}'"
        values = {**typed_options(shared, lambda key: f"{p}:{key}"),
                  **typed_options({k: v for k, v in t.items() if k != "name"},
                                  lambda key: f"{where}: {key}")}
        try:
            cfg = TrainConfig(**values).validate()
        except PeftkitError as e:
            raise PeftkitError(f"{where}: {e}") from None
        out.append((t["name"], cfg))
    listed = next(v for k, v in node.value if k.value == "tenants")
    origins = {name: f"{p}:{item.start_mark.line + 1}" for (name, _), item in zip(out, listed.value)}
    return out, origins


def check_outputs(tenants: list[tuple[str, TrainConfig]], origins: dict[str, str]) -> None:
    """Each tenant writes its own directory: two outputs that are one directory (by real path:
    `out/x/../x`, a symlink, both left at the default) or one inside the other would overwrite
    a tenant's adapter silently, so they are refused before anything loads."""
    real = [(name, cfg.output, Path(cfg.output).expanduser().resolve()) for name, cfg in tenants]
    for i, (a, a_out, a_real) in enumerate(real):
        for b, b_out, b_real in real[i + 1:]:
            if a_real == b_real or a_real in b_real.parents or b_real in a_real.parents:
                how = "the same directory" if a_real == b_real else "one inside the other"
                where = [f"{origins[n]}: " if n in origins else "" for n in (a, b)]
                raise PeftkitError(
                    f"{where[0]}tenant '{a}' (output {a_out}) and {where[1]}tenant '{b}' "
                    f"(output {b_out}) write {how}; give each tenant its own `output`")


class JointTrainer:
    def __init__(self, tenants: list[tuple[str, TrainConfig]], origins: dict[str, str] = None):
        check_outputs(tenants, origins or {})
        for name, cfg in tenants:  # each tenant's output has one owner, as a single run's
            claim(Path(cfg.output), cfg, f"tenant '{name}': ")
        self.names = [n for n, _ in tenants]
        self.cfgs = [c for _, c in tenants]
        first = self.cfgs[0]
        for name, cfg in zip(self.names, self.cfgs):
            where = f"tenant '{name}'"
            if cfg.method not in JOINT_METHODS:
                raise PeftkitError(f"{where}: joint training shares one LoRA stack (lora, "
                                   f"qlora, dora); --method {cfg.method} trains alone")
            if (cfg.method == "qlora") != (first.method == "qlora"):
                raise PeftkitError(f"{where}: qlora quantizes the shared base; every tenant "
                                   "must then be qlora")
            for key in ("model", "device", "dtype", "max_length", "attn"):
                if getattr(cfg, key) != getattr(first, key):
                    raise PeftkitError(f"{where}: '{key}' differs from '{self.names[0]}'; "
                                       "tenants share one base")

    def run(self) -> dict:
        start = time.perf_counter()
        datasets = []
        problems = []
        for name, cfg in zip(self.names, self.cfgs):  # every file checked before any work
            try:
                datasets.append(cfg.load_data(cfg.data))
            except PeftkitError as e:
                lines = e.problems if isinstance(e, DataError) else [str(e)]
                problems += [f"tenant '{name}': {line}" for line in lines]
        if problems:
            raise DataError(problems)
        for name, ds in zip(self.names, datasets):
            if ds.kind == "classification":
                raise PeftkitError(f"tenant '{name}': joint training is for causal LM data")
        first = self.cfgs[0]
        device, dtype, attn = first.placement()
        quant = quant_for(first.method, dtype)
        loading = time.perf_counter()
        base = load_base(first.model, task="causal-lm", quantize=quant, device=device,
                         dtype=dtype, attn=attn)
        self.base, self.device, self.dtype = base, device, dtype
        self._stack(base.model)
        self.load_seconds = time.perf_counter() - loading  # what each sequential run repeats
        tok = base.tokenizer
        self.data = [examples_for(cfg, ds, tok, "causal-lm") for cfg, ds in zip(self.cfgs, datasets)]
        return self._train(start)

    # -- the stack ----------------------------------------------------------------------------
    def _stack(self, model) -> None:
        """One LoRA stack: the largest rank, the union of targets; each tenant's slot is
        initialised as its own run would be (same seed, same draws), others stay zero."""
        configs = [adapter_config(c) for c in self.cfgs]
        targets = [find_targets(model, c.targets) for c in configs]
        union = [n for n in find_targets(model, "all-linear") if any(n in t for t in targets)]
        stack = LoraConfig(r=max(c.r for c in configs), targets=union,
                           dropout=max(c.dropout for c in configs),
                           use_dora=any(c.use_dora for c in configs))
        self.adapted = add_adapter(model, stack, slots=len(configs), names=self.names,
                                   init=False)
        self.adapted.slot_configs = configs
        layers = self.adapted.adapted_layers()
        self.targets = targets
        self.params = []  # per tenant: (stack parameter, slice) pairs and their own tensors
        for k, (cfg, config) in enumerate(zip(self.cfgs, configs)):
            torch.manual_seed(cfg.seed)  # as build() seeds before add_adapter
            views = []
            for name in targets[k]:
                layer = layers[name]
                layer.init_slot(k, config, rank=config.r)
                views += [(layer.lora_A, (k, slice(0, config.r))),
                          (layer.lora_B, (k, slice(None), slice(0, config.r)))]
                if config.use_dora:
                    views.append((layer.magnitude, (k,)))
                elif layer.magnitude is not None:
                    layer.set_plain(k)
            for name in set(union) - set(targets[k]):  # the stack's other modules: identity
                layers[name].clear_slot(k)
                if layers[name].magnitude is not None:
                    layers[name].set_plain(k)
            own = [torch.nn.Parameter(p[idx].detach().clone()) for p, idx in views]
            self.params.append((views, own))

    def _sync(self, k: int) -> None:
        """Tenant k's own tensors (what its optimizer updates) back into its slot."""
        views, own = self.params[k]
        with torch.no_grad():
            for (p, idx), mine in zip(views, own):
                p[idx] = mine

    # -- the loop -----------------------------------------------------------------------------
    def _train(self, start: float) -> dict:
        cfgs, n = self.cfgs, len(self.cfgs)
        outs = [Path(c.output) for c in cfgs]
        peaks = [c.lr or default_lr(c.method, "causal-lm") for c in cfgs]
        opts = [make_optimizer(c.optim, own, lr, c.weight_decay)
                for c, (_, own), lr in zip(cfgs, self.params, peaks)]
        totals = [total_steps(c, len(ex), c.batch_size * c.grad_accum)
                  for c, (ex, *_) in zip(cfgs, self.data)]
        steps, losses, self.tokens = [0] * n, [[] for _ in range(n)], [0] * n
        for k, (cfg, out) in enumerate(zip(cfgs, outs)):
            if cfg.resume and complete(out / "checkpoint"):
                meta = load_checkpoint(out, self.params[k][1], opts[k])
                steps[k], losses[k] = meta["step"], meta["losses"]
                self._sync(k)
        for cfg, out in zip(cfgs, outs):
            write_config(out, cfg, self.dtype)
        pad = self.base.tokenizer.pad_token_id
        bar = tqdm(total=sum(totals), initial=sum(steps), desc="joint", unit="step")
        self.adapted.train()
        loop_start = time.perf_counter()
        stop = []
        old = {sig: signal.signal(sig, lambda s, _f: stop.append(signal.Signals(s).name))
               for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            self._loop(steps, totals, losses, opts, peaks, pad, bar, stop)
        finally:
            for sig, handler in old.items():
                signal.signal(sig, handler)
            bar.close()
        loop_seconds = time.perf_counter() - loop_start
        reports = {name: self._finish(k, opts[k], steps[k], losses[k])
                   for k, name in enumerate(self.names)}
        wall = time.perf_counter() - start
        summary = {"tenants": self.names, "wall_seconds": wall,
                   "train_loop_seconds": loop_seconds, "peak_rss_bytes": peak_rss_bytes(),
                   "steps": dict(zip(self.names, steps)),
                   "final_losses": {k: v[-1] for k, v in zip(self.names, losses) if v},
                   "planner": self._sequential_estimate(wall, loop_seconds)}
        for out in outs:
            (out / "joint_summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary, "reports": reports}

    def _sequential_estimate(self, wall: float, loop_seconds: float) -> dict:
        """The planner's time model (FLOPs per trained token x parameters) for the same tenants
        trained one after another, at the FLOP rate this joint loop reached: each run repeats
        the model load; the estimate leaves out what batching tenants together buys on top,
        which bench/joint.py measures."""
        shape = shape_from_config(self.cfgs[0].model, self.base.model.config)
        flops = [train_flops(shape, c.method, t) for c, t in zip(self.cfgs, self.tokens)]
        rate = sum(flops) / max(loop_seconds, 1e-9)
        sequential = sequential_seconds(self.load_seconds, flops, rate) + wall - loop_seconds \
            - self.load_seconds
        return {"model_load_seconds": self.load_seconds, "trained_tokens": self.tokens,
                "flops_per_second": rate, "sequential_seconds": sequential,
                "speedup": sequential / wall}

    def _loop(self, steps, totals, losses, opts, peaks, pad, bar, stop) -> None:
        cfgs, n = self.cfgs, len(self.cfgs)
        while any(s < t for s, t in zip(steps, totals)):
            active = [k for k in range(n) if steps[k] < totals[k]]
            rows, slots = [], []
            for k in active:
                for g in opts[k].param_groups:
                    g["lr"] = lr_at(steps[k], totals[k], cfgs[k], peaks[k])
                items = batch_at(self.data[k][0], steps[k], cfgs[k].batch_size * cfgs[k].grad_accum,
                                 cfgs[k].seed)
                rows += items
                slots += [k] * len(items)
            batch = collate(rows, pad, self.device)
            slot_ids = torch.tensor(slots, device=self.device)
            for k, n_tokens in zip(slots, batch["attention_mask"].sum(1).tolist()):
                self.tokens[k] += n_tokens
            logits = self.adapted(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], slots=slot_ids).logits
            per_row, counts = _row_losses(logits, batch["labels"])
            tenant_loss = {k: per_row[slot_ids == k].sum() / counts[slot_ids == k].sum()
                           for k in active}
            sum(tenant_loss.values()).backward()
            for k in active:
                views, own = self.params[k]
                for (p, idx), mine in zip(views, own):
                    mine.grad = p.grad[idx].clone()
                if cfgs[k].clip:
                    torch.nn.utils.clip_grad_norm_(own, cfgs[k].clip)
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
                self._sync(k)
                steps[k] += 1
                losses[k].append(tenant_loss[k].item())
                if cfgs[k].save_every and steps[k] % cfgs[k].save_every == 0:
                    self._checkpoint(k, opts[k], steps[k], losses[k])
            self.adapted.zero_grad(set_to_none=True)
            bar.update(len(active))
            bar.set_postfix({self.names[k][:8]: f"{tenant_loss[k].item():.3f}" for k in active})
            if stop:  # every tenant checkpointed, then out, as a single run does
                for k in range(n):
                    self._checkpoint(k, opts[k], steps[k], losses[k])
                raise TrainingInterrupted(f"stopped by {stop[0]} at joint steps "
                                          f"{dict(zip(self.names, steps))}; continue with "
                                          "resume: true")

    def _checkpoint(self, k: int, opt, step: int, losses: list[float]) -> None:
        save_checkpoint(Path(self.cfgs[k].output), self.params[k][1], opt,
                        {"step": step, "history": [], "losses": losses})

    def _finish(self, k: int, opt, step: int, losses: list[float]) -> dict:
        """Tenant k's checkpoint, adapter (its own targets and rank, PEFT layout) and report."""
        cfg, name = self.cfgs[k], self.names[k]
        out = Path(cfg.output)
        self._checkpoint(k, opt, step, losses)
        adapter = save_adapter(self.adapted, out / ADAPTER, slot=k, base_name=cfg.model,
                               modules=self.targets[k])
        metrics = {}
        _, val_ex, val_records, _ = self.data[k]
        if val_ex:
            self.adapted.eval()
            with torch.no_grad(), self.adapted.pinned(k):
                metrics = evaluate_run(self.adapted, "causal-lm", self.base.tokenizer, val_ex,
                                       val_records, batch_size=cfg.batch_size,
                                       device=self.device, exact_match_max=cfg.exact_match_max)
        report = {"tenant": name, "method": cfg.method, "model": cfg.model, "data": cfg.data,
                  "joint": True, "steps": step, "train_losses": losses, "metrics": metrics,
                  "trainable_params": sum(p.numel() for p in self.params[k][1]),
                  "paths": {"adapter": str(adapter), "report": str(out / "report.json")}}
        (out / "report.json").write_text(json.dumps(report, indent=2))
        return report


def _row_losses(logits: torch.Tensor, labels: torch.Tensor):
    """Per row: the summed next-token cross-entropy and the number of labelled tokens (the terms
    of transformers' causal-LM loss, kept apart per row)."""
    shift = labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift,
                                              ignore_index=IGNORE, reduction="none")
    return token.sum(1), (shift != IGNORE).sum(1)


def train_joint(path: str) -> dict:
    return JointTrainer(*read_tenants(path)).run()
