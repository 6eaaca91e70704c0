"""An adapter made ready for a served LoRA stack before any lock is taken: read, checked
against the stack and laid out, so that installing it in a slot is copies only
(`lora.SlotWriter`, under the engine's lock)."""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.formats import WEIGHTS_NAME, by_module, check_module, read_adapter
from peftkit.methods.registry import method_of, spec_of


@dataclass
class PreparedAdapter:
    """One LoRA adapter, per module its A and B already in the slot's dtype and device."""
    name: str
    scale: float
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int  # the adapter's tensor bytes as stored


def prepare_adapter(layers: dict[str, nn.Module], name: str, directory: str | Path,
                    root: Path | None = None) -> PreparedAdapter:
    """Read and check one adapter for the slots of a stack's `layers` (`adapted_layers()`,
    which the caller keeps: walking the model costs more than a small adapter's read); needs
    no lock."""
    directory = Path(directory)
    config, tensors = read_adapter(directory, root)
    where = directory / WEIGHTS_NAME
    if not spec_of(config).mixed_batch:
        method = method_of(config)
        kind = {"dora": "DoRA", "ia3": "IA³"}.get(method, method)
        raise PeftkitError(f"adapter '{name}': {kind} adapters cannot join the shared LoRA "
                           "batch; only LoRA/rsLoRA adapters are served")
    rank = next(iter(layers.values())).r
    if config.r > rank:
        raise PeftkitError(f"adapter '{name}': rank {config.r} exceeds the server's max rank {rank}")
    modules = {}
    for path, local in by_module(tensors, where).items():
        layer = layers.get(path)
        if layer is None:
            raise PeftkitError(f"{where}: module '{path}' is not adapted by this server")
        check_module(layer, local, config, where, path)
        like = layer.lora_A
        modules[path] = tuple(local[key].to(like.device, like.dtype).contiguous()
                              for key in ("lora_A.weight", "lora_B.weight"))
    return PreparedAdapter(name, config.scale, modules,
                           sum(t.numel() * t.element_size() for t in tensors.values()))
