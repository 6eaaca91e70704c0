"""Issue 28.4: one torch-free spec per adapter method, from which every table derives."""

import subprocess
import sys

import pytest

from peftkit.methods.spec import SPECS, VARIANTS, MethodSpec, spec_for
from peftkit.plan.memory import Settings, adapter_params, parameter_state
from peftkit.plan.shapes import shape_for
from peftkit.train.config import CHOICES, METHODS, default_lr

SLOT_INTERFACE = ("KEYS", "from_config", "init_slot", "slot_shapes", "write_slot", "read_slot",
                  "clear_slot")


def test_a_spec_missing_a_fact_fails_where_it_is_written():
    """An incomplete spec is a TypeError at import of methods/spec.py, not a planner error after
    training ("no adapter size rule", the old failure when plan/shapes.py was forgotten)."""
    with pytest.raises(TypeError, match="params"):
        MethodSpec(SPECS["lora"].config, None, lr=1e-3, classify_lr=1e-3, mixed_batch=False,
                   joint=False, saved=lambda *a: 0)


@pytest.mark.parametrize("method", [*SPECS, *VARIANTS])
def test_every_table_reads_the_spec(method):
    spec = spec_for(method)
    assert method in METHODS and method in CHOICES["method"]
    assert default_lr(method, "causal-lm") == spec.lr
    assert default_lr(method, "classify") == spec.classify_lr
    shape = shape_for("tiny-llama")
    small, large = Settings(rank=4, virtual_tokens=4, bottleneck=4), \
        Settings(rank=8, virtual_tokens=8, bottleneck=8)
    assert 0 < adapter_params(shape, method, small) <= adapter_params(shape, method, large)
    state = parameter_state(shape, method, small)
    assert state["grads"] == 4 * adapter_params(shape, method, small)


@pytest.mark.parametrize("method", list(SPECS))
def test_every_layer_method_has_the_slot_interface(method):
    spec = SPECS[method]
    if spec.layer is None:
        assert spec.virtual in ("input", "kv") and spec.not_mergeable
        return
    layer = spec.layer_class()
    assert all(hasattr(layer, name) for name in SLOT_INTERFACE)


def test_the_specs_import_without_torch():
    code = ("import sys, peftkit.methods.spec, peftkit.train.config, peftkit.plan.memory; "
            "print([m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
