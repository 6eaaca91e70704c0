"""Any torch device, in the precision users expect there (issue 12), checked on a CPU-only box.

"No tensor left behind": with torch's default device set to `meta` while the model lives on the
CPU, any tensor the package creates without naming the model's device lands on `meta`, and the
first op that mixes it with a real tensor fails. Train steps of every method, generation and a
mixed-batch serving step all run that way.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peftkit.cli import main
from peftkit.data import load_dataset, tokenize
from peftkit.formats import load_adapter
from peftkit.generation import generate_ids
from peftkit.engine import Request, Sampling
from peftkit.serve.server import ServeConfig, Server
from peftkit.train import TrainConfig, Trainer, train
from peftkit.train.batches import collate
from peftkit.train.build import build
from peftkit.train.probe import FeatureCache
from tests.helpers import batch, tiny_llama

ROOT = Path(__file__).resolve().parents[1]

LM_ROWS = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3}"} for i in range(8)]


@pytest.fixture
def lm_data(write):
    return write("lm.jsonl", LM_ROWS)


def _cfg(data, out, method, **kw):
    base = dict(model="tiny-llama", data=str(data), method=method, output=str(out), steps=8,
                batch_size=8, val_split=0.0, lr=1e-2, warmup=0.0, schedule="constant",
                dropout=0.1, num_virtual_tokens=4, bottleneck_size=8, exact_match_max=2,
                device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", ["lora", "dora", "ia3", "prefix", "prompt", "bottleneck",
                                    "full", "probe"])
def test_no_tensor_left_behind_in_a_train_step(lm_data, tmp_path, method):
    cfg = _cfg(lm_data, tmp_path, method)
    t = build(cfg, "causal-lm", [])
    ds = load_dataset(lm_data)
    ex = tokenize(ds, t.base.tokenizer).examples
    with torch.device("meta"):
        if method == "probe":
            cache = FeatureCache.build(t, ex, ex[:2], cfg)
            loss = cache.loss(cache.collate(cache.train_items))
        else:
            b = collate(ex, t.base.tokenizer.pad_token_id, t.device)
            loss = t.module(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                            labels=b["labels"]).loss
        loss.backward()
        # a tensor made without the model's device would have turned these `meta`
        assert loss.device.type == "cpu" and bool(torch.isfinite(loss))
        assert all(p.grad is not None and p.grad.device.type == "cpu" for p in t.params)
        new = generate_ids(t.module, t.base.tokenizer, [ex[0].input_ids[:4]], 3, head=t.head)[0]
    assert all(isinstance(i, int) for i in new)


def test_no_tensor_left_behind_in_a_mixed_serving_step(tmp_path):
    from peftkit.formats import save_adapter
    from peftkit.methods import LoraConfig, add_adapter
    from tests.helpers import randomize
    for i in range(2):
        a = add_adapter(tiny_llama().model, LoraConfig(r=4))
        randomize(a, seed=i)
        save_adapter(a, tmp_path / f"a{i}")
    server = Server(ServeConfig(base="tiny-llama", adapters=str(tmp_path), device="cpu"))
    ids = server.prompt_ids(prompt="hello")
    slots = [server.store.acquire("a0"), server.store.acquire("a1"), -1]
    with torch.device("meta"):
        reqs = [server.engine.submit(Request(ids, s, Sampling(max_tokens=4, temperature=t)))
                for s, t in zip(slots, (0.0, 0.7, 0.0))]
        server.engine.run_until_idle()
    assert all(r.error is None and r.out_ids for r in reqs), [r.error for r in reqs]


def test_bf16_base_trains_lora_and_the_adapter_reloads_on_fp32(lm_data, tmp_path):
    report = train(_cfg(lm_data, tmp_path / "bf16", "lora", dtype="bfloat16", steps=12,
                        dropout=0.0))
    losses = report["train_losses"]
    assert report["dtype"] == "bfloat16" and losses[-1] < losses[0] - 0.5, losses
    saved = tmp_path / "bf16" / "adapter"
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(saved / "adapter_model.safetensors").values()} == \
        {torch.float32}
    ids = batch()
    fp32 = load_adapter(tiny_llama().model, saved)
    bf16_base = tiny_llama().model.to(torch.bfloat16)
    bf16 = load_adapter(bf16_base, saved)
    with torch.no_grad():
        a, b = fp32(input_ids=ids).logits, bf16(input_ids=ids).logits.float()
    # bf16 keeps 8 bits of mantissa; measured 0.08 on logits of magnitude ~3, and ranking
    # agrees: the bound is the rounding of two bf16 layers, not a format difference
    assert (a - b).abs().max() < 0.15, (a - b).abs().max()
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.9


BAD_FLAGS = {
    "--device cuda": (["--device", "cuda"], "--device cuda: not on this machine (available: cpu"),
    "--device cuda:7": (["--device", "cuda:7"], "--device cuda:7: not on this machine"),
    "--device tpu": (["--device", "tpu"], "--device tpu"),
    "--dtype float16": (["--device", "cpu", "--dtype", "float16"],
                        "--dtype float16: not for training on the CPU"),
    "--dtype int8": (["--dtype", "int8"], "--dtype int8: choose auto"),
    "--attn flash": (["--attn", "flash_attention_2"],
                     "--attn flash_attention_2: the flash-attn package is not installed"),
    "--optim paged": (["--device", "cpu", "--optim", "paged_adamw8bit"],
                      "--optim paged_adamw8bit: pages optimizer states between a CUDA device"),
}


@pytest.mark.parametrize("name", sorted(BAD_FLAGS))
def test_bad_placement_flags_are_one_line_errors_and_write_nothing(lm_data, tmp_path, capsys,
                                                                    name):
    flags, message = BAD_FLAGS[name]
    out = tmp_path / "run"
    rc = main(["train", "--model", "tiny-llama", "--data", str(lm_data), "--output", str(out),
               "--steps", "1", *flags])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and "\n" not in err, err
    assert not out.exists()


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"],
                                     ["serve", "--adapters", "."]])
def test_inference_commands_check_the_device_too(command, capsys):
    rc = main([command[0], "--model" if command[0] == "generate" else "--base", "tiny-llama",
               *command[1:], "--device", "cuda:3"])
    assert rc == 2 and "--device cuda:3: not on this machine" in capsys.readouterr().err


def test_commands_that_do_not_quantize_never_import_bitsandbytes(lm_data, tmp_path):
    code = ("import sys; from peftkit.cli import main; "
            f"main(['train', '--model', 'tiny-llama', '--data', {str(lm_data)!r}, '--output', "
            f"{str(tmp_path / 'r')!r}, '--steps', '1', '--device', 'cpu']); "
            "main(['--help']) if False else None; "
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False", out.stderr[-1000:]
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["device"] == "cpu" and report["peak_device_bytes"] is None


def test_probe_on_trainer_runs_under_its_device_and_dtype(lm_data, tmp_path):
    """The probe's one backbone pass and its head steps run at the run's dtype: bfloat16
    here is recorded, and the losses stay finite."""
    report = Trainer(_cfg(lm_data, tmp_path / "p", "probe", steps=2, dtype="bfloat16")).run()
    assert report["device"] == "cpu" and report["dtype"] == "bfloat16"
    assert all(math.isfinite(x) for x in report["train_losses"])


def test_gpu_benchmark_smoke_mode_runs_on_the_cpu(tmp_path):
    """`python -m bench.gpu --device cpu --tiny` (`make bench-gpu`'s command), run as the device session runs it: the GPU
    benchmark's own code at toy shapes, so the one costly GPU run does not fail on a typo."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "bench.gpu", "--device", "cpu", "--tiny", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    raw = json.loads((tmp_path / "bench-gpu.json").read_text())
    assert {r["method"] for r in raw["train"]} >= {"lora", "peft-lora", "full"}
    assert all(r["tokens_per_s"] > 0 and r["predicted"] > 0 and r["peak"] is None
               for r in raw["train"])
    assert len(raw["serve"]) == 2 and all(r["mixed_tokens_per_s"] > 0 for r in raw["serve"])
    assert "| tiny-a | lora |" in (tmp_path / "bench-gpu.md").read_text()
