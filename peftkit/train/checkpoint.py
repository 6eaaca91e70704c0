"""Checkpoints: trainable tensors, optimizer state and RNG in safetensors, the rest in JSON.

Written into `.checkpoint-tmp`, flushed to disk, then swapped in with two renames (the old one
parked as `.checkpoint-old` between them). A death at any instant leaves one complete checkpoint
under one of the three names, and `recover` puts it back in place. A write that fails (disk
full, read-only directory) removes its partial copy and leaves the previous checkpoint as it was.
"""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError
from peftkit.train.distributed import full, shard_like

NAME = "checkpoint"
TENSORS, META = "state.safetensors", "trainer_state.json"


def save_checkpoint(out: Path, params: list[torch.nn.Parameter], optimizer, state: dict,
                    write: bool = True, best: list[torch.Tensor] | None = None) -> Path:
    """Every rank of a distributed run calls this (FSDP shards are gathered into whole tensors,
    so the checkpoint loads at any world size); only the `write` rank writes. `best`: the best
    evaluated values of `params` so far (whole tensors), kept with the state they belong to."""
    tensors = {f"param.{i}": full(p.detach()).contiguous() for i, p in enumerate(params)}
    tensors.update({f"best.{i}": b.contiguous() for i, b in enumerate(best or [])})
    opt = optimizer.state_dict()
    scalars = {}  # non-tensor state (bitsandbytes' int step) keeps its Python type, in JSON
    for i, st in opt["state"].items():
        for k, v in _flat(st):
            if torch.is_tensor(v):
                tensors[f"optim.{i}.{k}"] = full(v.detach()).contiguous()
            else:
                scalars.setdefault(str(i), {})[k] = v
    final = out / NAME
    if not write:
        return final
    recover(out)
    tmp, old = out / f".{NAME}-tmp", out / f".{NAME}-old"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        tensors["rng.torch"] = torch.get_rng_state()
        if torch.cuda.is_available():  # dropout on a GPU draws from its own generator
            for i in range(torch.cuda.device_count()):
                tensors[f"rng.cuda.{i}"] = torch.cuda.get_rng_state(i)
        save_file(tensors, tmp / TENSORS)
        meta = {**state, "param_groups": opt["param_groups"], "n_params": len(params),
                "optim_scalars": scalars}
        (tmp / META).write_text(json.dumps(meta, indent=2))  # written last: marks it complete
        _sync(tmp / TENSORS, tmp / META, tmp)
    except (OSError, SafetensorError) as e:  # safetensors reports its I/O errors as its own
        shutil.rmtree(tmp, ignore_errors=True)
        kept = f"; the previous checkpoint in {final} is intact" if final.exists() else ""
        why = getattr(e, "strerror", None) or str(e).rpartition("I/O error: ")[2]
        raise PeftkitError(f"{out}: cannot write a checkpoint ({why}){kept}") from None
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    _sync(out)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover(out: Path) -> str | None:
    """Put a complete checkpoint back under its name after a death between the two renames
    (or during a write). Returns what was done, for the resume message."""
    final, tmp, old = out / NAME, out / f".{NAME}-tmp", out / f".{NAME}-old"
    if complete(final):
        return None
    for source in (tmp, old):  # tmp is newer when complete: it was fully written and synced
        if complete(source):
            shutil.rmtree(final, ignore_errors=True)
            os.replace(source, final)
            return f"recovered the checkpoint from {source.name}"
    return None


def complete(ckpt: Path) -> bool:
    try:
        json.loads((ckpt / META).read_text())
        return (ckpt / TENSORS).is_file()
    except (OSError, ValueError):
        return False


def load_checkpoint(out: Path, params: list[torch.nn.Parameter], optimizer) -> dict:
    ckpt = out / NAME
    meta_path, tensor_path = ckpt / META, ckpt / TENSORS
    if not complete(ckpt):
        raise PeftkitError(f"--resume: no checkpoint in {ckpt}")
    meta = check_state(json.loads(meta_path.read_text()), meta_path)
    if meta["n_params"] != len(params):
        raise PeftkitError(f"{ckpt}: holds {meta['n_params']} trainable tensors, this run has "
                           f"{len(params)}; was it written with other options?")
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError) as e:
        raise PeftkitError(f"{tensor_path}: unreadable ({str(e)[:120]})") from None
    absent = [k for k in [f"param.{i}" for i in range(len(params))] + ["rng.torch"]
              if k not in tensors]
    if absent:
        raise PeftkitError(f"{tensor_path}: no tensor '{absent[0]}' (not this run's checkpoint,"
                           " or damaged)")
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i}"]
            if saved.shape != p.shape:
                raise PeftkitError(f"{ckpt}: tensor {i} has shape {tuple(saved.shape)}, "
                                   f"expected {tuple(p.shape)}")
            p.copy_(shard_like(saved, p))
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            p = params[int(i)]  # moments laid out as their parameter (an FSDP shard, a GPU)
            _nest(state.setdefault(int(i), {}), k,
                  shard_like(v, p) if v.shape == p.shape else v)  # load_state_dict places it
    for i, values in meta.pop("optim_scalars", {}).items():
        for k, v in values.items():
            _nest(state.setdefault(int(i), {}), k, v)
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    if f"best.{len(params) - 1}" in tensors:
        meta["best_params"] = [tensors[f"best.{i}"] for i in range(len(params))]
    torch.set_rng_state(tensors["rng.torch"])
    for key, state in tensors.items():
        if key.startswith("rng.cuda.") and torch.cuda.is_available():
            torch.cuda.set_rng_state(state, int(key.rsplit(".", 1)[1]))
    return meta


def check_state(meta, where: Path) -> dict:
    """trainer_state.json against its schema: every field a resume reads, typed, in range, and
    consistent (one loss per step), or a one-line error naming the file and the field."""
    def bad(field: str, want: str, got) -> PeftkitError:
        return PeftkitError(f"{where}: '{field}' must be {want}, got {json.dumps(got)[:60]}")

    def count(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0
    if not isinstance(meta, dict):
        raise PeftkitError(f"{where}: expected a JSON object")
    for field in ("step", "n_params"):
        if not count(meta.get(field)):
            raise bad(field, "a whole number >= 0", meta.get(field))
    batch = meta.get("global_batch")
    if batch is not None and not (count(batch) and batch >= 1):
        raise bad("global_batch", "a whole number >= 1", batch)
    losses = meta.get("losses")
    if not isinstance(losses, list) or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in losses):
        raise bad("losses", "a list of numbers", losses)
    if len(losses) != meta["step"]:
        raise PeftkitError(f"{where}: {len(losses)} losses for step {meta['step']} (one per "
                           "step); the file was edited or damaged")
    if not isinstance(meta.get("history"), list) or not all(
            isinstance(h, dict) for h in meta["history"]):
        raise bad("history", "a list of objects", meta.get("history"))
    best = meta.get("best")
    if best is not None and not (isinstance(best, dict) and count(best.get("step"))
                                 and isinstance(best.get("value"), (int, float))):
        raise bad("best", "null or an object with a step and a value", best)
    if not count(meta.get("since_best", 0)):
        raise bad("since_best", "a whole number >= 0", meta.get("since_best"))
    groups = meta.get("param_groups")
    if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        raise bad("param_groups", "a list of objects", groups)
    return meta


def _flat(state: dict, prefix: str = ""):
    """(key, value) of an optimizer's per-parameter state, nested dicts (bitsandbytes' 8-bit
    quantization state) flattened to `outer/inner` keys."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _flat(v, f"{prefix}{k}/")
        else:
            yield f"{prefix}{k}", v


def _nest(state: dict, key: str, value) -> None:
    *outer, last = key.split("/")
    for k in outer:
        state = state.setdefault(k, {})
    state[last] = value


def _sync(*paths: Path) -> None:
    """fsync files and directories, so a power cut cannot reorder the renames before the data."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
