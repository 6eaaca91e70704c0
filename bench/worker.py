"""One measurement in a fresh process, so its peak RSS is its own. Prints one JSON line.

python -m bench.worker step --method lora|qlora|full|dora|ia3|probe [--base DIR]
"""

import argparse
import json
import time

import torch

from bench.common import median_time
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base
from peftkit.train.report import peak_rss_bytes, state_bytes

MODEL = "smollm2-135m"


def step_run(method: str, base_dir: str | None, steps: int, rank: int) -> dict:
    t0 = time.perf_counter()
    base = load_base(base_dir or MODEL, task="causal-lm")
    load_s = time.perf_counter() - t0
    model = base.model
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        module, params = model, list(model.parameters())
    else:
        module = add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, targets="all-linear",
                                               use_dora=method == "dora"))
        params = module.adapter_parameters()
    torch.manual_seed(0)
    ids = torch.randint(10, 40000, (8, 48))
    opt = torch.optim.AdamW(params, lr=1e-5)
    measured = {}

    def step():
        module(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        if not measured:
            measured.update(state_bytes([module], params, opt))
        opt.zero_grad(set_to_none=True)
    step_s = median_time(step, repeats=steps, warmup=1)
    return {"method": method, "load_s": load_s, "step_s": step_s, "state_bytes": measured,
            "trainable_params": sum(p.numel() for p in params), "peak_rss_bytes": peak_rss_bytes()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=["step"])
    p.add_argument("--method", required=True)
    p.add_argument("--base")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    a = p.parse_args()
    print(json.dumps(step_run(a.method, a.base, a.steps, a.rank)))


if __name__ == "__main__":
    main()
