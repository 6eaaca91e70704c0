"""Every adapter method, found by its spec file: all that the rest of peftkit knows of a method
outside its layer, torch-free (the CLI's --help and the planner import it without torch).

A method is two files: its layer (methods/<name>.py, torch) and its spec file
(methods/<name>_spec.py, torch-free): its config class (PEFT's adapter_config.json, the run's
flags) and a `SPECS` dict of `base.MethodSpec`s — its layer, default learning rates,
mixed-batch and joint capability, virtual tokens, why it cannot merge, and the planner's rules.
This module finds the spec files; the registry (layers), the trainer (--method's choices,
learning rates), the planner, PEFT I/O (`config_from_peft`) and export read what they hold, and
none keeps a table of methods of its own. Every MethodSpec field without a default is required,
so a spec left incomplete fails at import, not after a run has trained.
"""

import importlib
import pkgutil
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.methods.base import AdapterConfig, MethodSpec


def _discover() -> dict[str, MethodSpec]:
    found: dict[str, MethodSpec] = {}
    for info in sorted(pkgutil.iter_modules([str(Path(__file__).parent)]), key=lambda m: m.name):
        if info.name.endswith("_spec"):
            module = importlib.import_module(f"peftkit.methods.{info.name}")
            clash = found.keys() & module.SPECS.keys()
            if clash:
                raise PeftkitError(f"methods/{info.name}.py: method {sorted(clash)[0]!r} is "
                                   "already defined by another spec file")
            found.update(module.SPECS)
    return found


SPECS = _discover()  # method name -> its spec, spec files in name order
CONFIGS: dict[str, type[AdapterConfig]] = {s.config.peft_type: s.config for s in SPECS.values()}
VARIANTS = {"qlora": "lora"}  # training names for a method on an NF4-quantized base (QLoRA)


def find_spec(method: str) -> MethodSpec | None:
    """The spec of an adapter method or of a variant's method (qlora: lora); None for the
    rest (full fine-tuning, the probe)."""
    return SPECS.get(VARIANTS.get(method, method))


def spec_for(method: str) -> MethodSpec:
    """`find_spec`, for a method that must be an adapter method."""
    spec = find_spec(method)
    if spec is None:
        raise PeftkitError(f"'{method}' is not an adapter method ({', '.join(SPECS)})")
    return spec


def training_names() -> tuple[str, ...]:
    """Every adapter method's name as `--method` takes it, each variant after its method."""
    return tuple(n for m in SPECS for n in (m, *[v for v, of in VARIANTS.items() if of == m]))


def virtual_at(method: str) -> str | None:
    """Where a training method adds virtual tokens ("input", "kv"); None for the rest, full
    fine-tuning and the probe included."""
    spec = find_spec(method)
    return spec.virtual if spec else None


def config_from_peft(cfg: dict, where: str) -> AdapterConfig:
    kind = cfg.get("peft_type")
    if not isinstance(kind, str) or kind not in CONFIGS:
        shown = repr(kind)[:60]
        raise PeftkitError(f"{where}: unknown peft_type {shown} (supported: {', '.join(CONFIGS)})")
    try:
        return CONFIGS[kind].from_peft(cfg)
    except KeyError as e:
        raise PeftkitError(f"{where}: {kind} config lacks field {e}") from None
    except (TypeError, ValueError, PeftkitError) as e:
        raise PeftkitError(f"{where}: {str(e)[:200]}") from None
