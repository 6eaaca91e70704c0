"""Checkpoints: trainable tensors, optimizer state and RNG in safetensors, the rest in JSON.
Written into a temp directory and renamed into place, so a crash never leaves half of one."""

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from peftkit.errors import PeftkitError

NAME = "checkpoint"


def save_checkpoint(out: Path, params: list[torch.nn.Parameter], optimizer, state: dict) -> Path:
    tmp = out / f".{NAME}-tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors = {f"param.{i}": p.detach().contiguous() for i, p in enumerate(params)}
    opt = optimizer.state_dict()
    for i, st in opt["state"].items():
        for k, v in st.items():
            tensors[f"optim.{i}.{k}"] = v.detach().contiguous() if torch.is_tensor(v) else torch.tensor(v)
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, tmp / "state.safetensors")
    meta = {**state, "param_groups": opt["param_groups"], "n_params": len(params)}
    (tmp / "trainer_state.json").write_text(json.dumps(meta, indent=2))
    final, old = out / NAME, out / f".{NAME}-old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(out: Path, params: list[torch.nn.Parameter], optimizer) -> dict:
    ckpt = out / NAME
    meta_path, tensor_path = ckpt / "trainer_state.json", ckpt / "state.safetensors"
    if not meta_path.exists() or not tensor_path.exists():
        raise PeftkitError(f"--resume: no checkpoint in {ckpt}")
    meta = json.loads(meta_path.read_text())
    if meta["n_params"] != len(params):
        raise PeftkitError(f"{ckpt}: holds {meta['n_params']} trainable tensors, this run has "
                           f"{len(params)}; was it written with other options?")
    tensors = load_file(tensor_path)
    with torch.no_grad():
        for i, p in enumerate(params):
            saved = tensors[f"param.{i}"]
            if saved.shape != p.shape:
                raise PeftkitError(f"{ckpt}: tensor {i} has shape {tuple(saved.shape)}, "
                                   f"expected {tuple(p.shape)}")
            p.copy_(saved)
    state = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
