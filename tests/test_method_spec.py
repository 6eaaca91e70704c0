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


NEW_METHOD = '''
import json, sys
import torch
from peftkit.formats import load_adapter
from peftkit.methods.spec import CONFIGS, SPECS
from peftkit.plan.memory import Settings, adapter_params
from peftkit.plan.shapes import shape_for
from peftkit.train import TrainConfig, train
from peftkit.train.config import METHODS
from peftkit.models import load_base
assert "scale" in SPECS and "scale" in METHODS and "SCALE" in CONFIGS
report = train(TrainConfig(model="tiny-llama", data=sys.argv[1], method="scale", output="out",
                           steps=3, batch_size=4, val_split=0.0, lr=1e-2, device="cpu"))
config = json.load(open("out/adapter/adapter_config.json"))
model = load_adapter(load_base("tiny-llama").model, "out/adapter")
ids = torch.tensor([[5, 6, 7, 8]])
print(json.dumps({"peft_type": config["peft_type"], "trainable": report["trainable_params"],
                  "planned": adapter_params(shape_for("tiny-llama"), "scale", Settings()),
                  "changed": any(bool((p != 1).any()) for n, p in model.named_parameters()
                                 if "scale_l" in n)}))
'''


def test_a_new_layer_method_is_two_files(tmp_path, write):
    """A copy of the package plus two files — a layer (IA³'s, renamed) and its spec file — gives
    `--method scale`: trained, saved under its own PEFT type, reloaded, planned."""
    import json
    import shutil
    from pathlib import Path
    src = Path(__file__).resolve().parents[1] / "peftkit"
    shutil.copytree(src, tmp_path / "peftkit", ignore=shutil.ignore_patterns("__pycache__"))
    methods = tmp_path / "peftkit" / "methods"
    layer = (src / "methods" / "ia3.py").read_text().replace("IA3Linear", "ScaleLinear")
    (methods / "scale.py").write_text(layer.replace("ia3_l", "scale_l"))
    spec = (src / "methods" / "ia3_spec.py").read_text()
    for old, new in (("IA3Config", "ScaleConfig"), ("IA3Linear", "ScaleLinear"), ('"IA3"', '"SCALE"'), ('"ia3"', '"scale"'),
                     ("peftkit.methods.ia3:", "peftkit.methods.scale:")):
        spec = spec.replace(old, new)
    (methods / "scale_spec.py").write_text(spec)
    data = write("lm.jsonl", [{"prompt": f"say {i}:", "completion": f" {i}"} for i in range(8)])
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", NEW_METHOD, str(data)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["peft_type"] == "SCALE" and out["changed"]
    assert out["trainable"] == out["planned"] > 0
