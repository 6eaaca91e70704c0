"""Joint multi-tenant training: N tenants' LoRA adapters trained in one batched pass over one
frozen base (loaded, and quantized for QLoRA, once). Each tenant is a slot of the multi-slot
stack; each step's batch holds every still-training tenant's rows (row -> slot).

The loss is the sum of each tenant's own mean loss, so every slot receives exactly the gradient
its adapter would get training alone on the same rows. Each tenant keeps what a single run has:
its own data order, AdamW (over its own tensors, so its state and update are a single run's),
LR schedule, gradient clipping, step count, checkpoint and outputs; a tenant that finishes
drops out of the batch. With dropout 0 a joint run equals the separate runs (tests: <= 1e-5).
The loop around the steps (schedule, evaluation, checkpoints, signals, resume, reports) is the
single run's own (loop.RunLoop); this file says how one step of all tenants runs.

tenants.yaml:
    model: smollm2-135m          # shared: model, method (lora | qlora), device, dtype, seed, ...
    method: lora
    tenants:
      - {name: acme, data: acme.jsonl, output: runs/acme, rank: 8, lr: 2e-4, steps: 100}
      - {name: hooli, data: hooli.jsonl, output: runs/hooli, rank: 16, rslora: true}
"""

import json
import time
from dataclasses import fields
from pathlib import Path

import torch
import yaml

from peftkit.data import IGNORE
from peftkit.data.templates import use_chat_template
from peftkit.device import autocast
from peftkit.errors import DataError, PeftkitError
from peftkit.methods import LoraConfig, add_adapter
from peftkit.methods.inject import find_targets, not_adapted_note
from peftkit.methods.spec import spec_for, training_names
from peftkit.models import load_base
from peftkit.plan.memory import sequential_seconds, train_flops
from peftkit.plan.shapes import shape_from_config
from peftkit.train.batches import batch_at, collate
from peftkit.train.build import Trainee, adapter_config, quant_for
from peftkit.train.config import TrainConfig, typed_options
from peftkit.train.evaluate import evaluate_run
from peftkit.train.examples import check_context, examples_for
from peftkit.train.loop import RunLoop, Tenant, clip, loss_terms
from peftkit.train.report import Meter, peak_rss_bytes
from peftkit.train.run_dir import claim

JOINT_METHODS = tuple(n for n in training_names() if spec_for(n).joint)
SHARED = ("model", "device", "dtype", "max_length", "attn", "grad_checkpointing",
          "chat_template")  # one base, one tokenizer


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


class JointTrainer(RunLoop):
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
            if cfg.packing:
                raise PeftkitError(f"{where}: packing: true packs one run's rows; joint rows "
                                   "are each a tenant's own (drop packing)")
            if (cfg.method == "qlora") != (first.method == "qlora"):
                raise PeftkitError(f"{where}: qlora quantizes the shared base; every tenant "
                                   "must then be qlora")
            for key in SHARED:
                if getattr(cfg, key) != getattr(first, key):
                    raise PeftkitError(f"{where}: '{key}' differs from '{self.names[0]}'; "
                                       "tenants share one base")

    def run(self) -> dict:
        start = time.perf_counter()
        datasets, problems = [], []
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
        meters = [Meter() for _ in self.cfgs]
        for m in meters:
            m.start()
        first = self.cfgs[0]
        device, dtype, attn = first.placement()
        loading = time.perf_counter()
        base = load_base(first.model, task="causal-lm", quantize=quant_for(first.method, dtype),
                         device=device, dtype=dtype, attn=attn)
        self.base, self.device = base, device
        use_chat_template(base.tokenizer, first.chat_template,  # one tokenizer: one template
                          *[Path(cfg.output) for cfg in self.cfgs])
        if first.grad_checkpointing:  # shared: the base is one model
            base.model.gradient_checkpointing_enable()
            base.model.enable_input_require_grads()
        trainees = self._stack(base, dtype)
        self.load_seconds = time.perf_counter() - loading  # what each sequential run repeats
        tenants = []
        for name, cfg, ds, trainee, meter in zip(self.names, self.cfgs, datasets, trainees, meters):
            train_ex, val_ex, val_records, truncated = examples_for(cfg, ds, base.tokenizer,
                                                                    "causal-lm")
            try:
                check_context(cfg, base.model.config, train_ex + val_ex)
            except PeftkitError as e:
                raise PeftkitError(f"tenant '{name}': {e}") from None
            t = Tenant(name, trainee, train_ex, val_ex, val_records, meter=meter)
            t.data = {"tenant": name, "joint": True,
                      "train_examples": len(train_ex), "val_examples": len(val_ex),
                      "truncated_examples": truncated, "skipped_records": ds.skipped}
            tenants.append(t)
        if trainees[0].not_adapted:
            self._say(trainees[0].not_adapted)
        for t in tenants:
            self._start(t)
        loop_seconds = self._loop(tenants, desc="joint")
        reports = {t.name: self._finish(t) for t in tenants}
        wall = time.perf_counter() - start
        summary = {"tenants": self.names, "wall_seconds": wall,
                   "train_loop_seconds": loop_seconds, "peak_rss_bytes": peak_rss_bytes(),
                   "steps": {t.name: t.step for t in tenants},
                   "final_losses": {t.name: t.losses[-1] for t in tenants if t.losses},
                   "planner": self._sequential_estimate(tenants, wall, loop_seconds)}
        for t in tenants:
            (t.out / "joint_summary.json").write_text(json.dumps(summary, indent=2))
        return {"summary": summary, "reports": reports}

    # -- the stack ----------------------------------------------------------------------------
    def _stack(self, base, dtype) -> list[Trainee]:
        """One LoRA stack: the largest rank, the union of targets; each tenant's slot is
        initialised as its own run would be (same seed, same draws), others stay zero. Each
        tenant trains its own copy of its slot's tensors (`views` maps them back)."""
        model = base.model
        configs = [adapter_config(c, model) for c in self.cfgs]
        targets = [find_targets(model, c.targets) for c in configs]
        union = [n for n in find_targets(model, "all-linear") if any(n in t for t in targets)]
        stack = LoraConfig(r=max(c.r for c in configs), targets=union,
                           dropout=max(c.dropout for c in configs),
                           use_dora=any(c.use_dora for c in configs))
        self.adapted = add_adapter(model, stack, slots=len(configs), names=self.names,
                                   init=False)
        self.adapted.slot_configs = configs
        layers = self.adapted.adapted_layers()
        self.views, trainees = [], []
        note = not_adapted_note(model)
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
            self.views.append(views)
            trainees.append(Trainee(cfg, "causal-lm", base, self.adapted, own,
                                    adapted=self.adapted, device=self.device, dtype=dtype,
                                    not_adapted=note, slot=k, modules=targets[k]))
        return trainees

    def _loaded(self, t: Tenant) -> None:
        """Tenant t's own tensors (what its optimizer updates) back into its slot."""
        with torch.no_grad():
            for (p, idx), mine in zip(self.views[t.trainee.slot], t.trainee.params):
                p[idx] = mine

    # -- one step of every active tenant ---------------------------------------------------------
    def _step(self, active: list[Tenant]) -> list[float]:
        """Micro-batch m holds every tenant's m-th micro-batch (its --batch-size rows), one
        forward for all; a tenant's loss is its rows' summed token losses over its whole
        step's labelled tokens, so its slot gets exactly the gradient of its own run."""
        pad = self.base.tokenizer.pad_token_id
        rows = {t: batch_at(t.train_ex, t.step, t.global_batch, t.cfg.seed) for t in active}
        terms = {t: loss_terms(rows[t]) for t in active}
        losses = {t: 0.0 for t in active}
        for micro in range(max(t.accum for t in active)):
            items, owners = [], []
            for t in active:
                size = t.cfg.batch_size
                part = rows[t][micro * size:(micro + 1) * size] if micro < t.accum else []
                items += part
                owners += [t] * len(part)
            if not items:
                continue
            batch = collate(items, pad, self.device)
            slots = torch.tensor([t.trainee.slot for t in owners], device=self.device)
            for t, n_tokens in zip(owners, batch["attention_mask"].sum(1).tolist()):
                t.meter.tokens += n_tokens
            for t in active:
                t.meter.see_batch(*batch["input_ids"].shape)
            with autocast(self.device, active[0].trainee.dtype):
                logits = self.adapted(input_ids=batch["input_ids"],
                                      attention_mask=batch["attention_mask"], slots=slots).logits
            per_row, _ = _row_losses(logits, batch["labels"])
            mine = {t: per_row[slots == t.trainee.slot].sum() / terms[t]
                    for t in active if t in owners}
            sum(mine.values()).backward()
            for t, loss in mine.items():
                losses[t] += loss.item()
        for t in active:
            own = t.trainee.params
            for (p, idx), param in zip(self.views[t.trainee.slot], own):
                param.grad = p.grad[idx].clone()
            t.grad_norm = clip(own, t.cfg.clip, t.tracker is not None)
            t.opt.step()
            if not t.meter.state_bytes:
                t.meter.measure_state(t.trainee, t.opt)
            t.opt.zero_grad(set_to_none=True)
            self._loaded(t)
        self.adapted.zero_grad(set_to_none=True)
        return [losses[t] for t in active]

    def _metrics(self, t: Tenant) -> dict:
        with torch.no_grad(), self.adapted.pinned(t.trainee.slot):
            return evaluate_run(self.adapted, "causal-lm", self.base.tokenizer, t.val_ex,
                                t.val_records, batch_size=t.cfg.batch_size, device=self.device,
                                exact_match_max=t.cfg.exact_match_max)

    def _who(self, t: Tenant) -> str:
        return f"tenant '{t.name}': "

    def _postfix(self, active: list[Tenant]) -> dict:
        return {t.name[:8]: f"{t.losses[-1]:.3f}" for t in active}

    def _stopped(self, tenants: list[Tenant]) -> str:
        return (f"stopped by {self.stop_signal} at joint steps "
                f"{ {t.name: t.step for t in tenants} }; continue with resume: true")

    def _sequential_estimate(self, tenants: list[Tenant], wall: float,
                             loop_seconds: float) -> dict:
        """The planner's time model (FLOPs per trained token x parameters) for the same tenants
        trained one after another, at the FLOP rate this joint loop reached: each run repeats
        the model load; the estimate leaves out what batching tenants together buys on top,
        which bench/joint.py measures."""
        shape = shape_from_config(self.cfgs[0].model, self.base.model.config)
        tokens = [t.meter.tokens for t in tenants]
        flops = [train_flops(shape, t.cfg.method, n) for t, n in zip(tenants, tokens)]
        rate = sum(flops) / max(loop_seconds, 1e-9)
        sequential = sequential_seconds(self.load_seconds, flops, rate) + wall - loop_seconds \
            - self.load_seconds
        return {"model_load_seconds": self.load_seconds, "trained_tokens": tokens,
                "flops_per_second": rate, "sequential_seconds": sequential,
                "speedup": sequential / wall}


def _row_losses(logits: torch.Tensor, labels: torch.Tensor):
    """Per row: the summed next-token cross-entropy and the number of labelled tokens (the terms
    of transformers' causal-LM loss, kept apart per row)."""
    shift = labels[:, 1:]
    token = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), shift,
                                              ignore_index=IGNORE, reduction="none")
    return token.sum(1), (shift != IGNORE).sum(1)


def train_joint(path: str) -> dict:
    return JointTrainer(*read_tenants(path)).run()
