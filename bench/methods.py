"""Issue 3 benchmark: peftkit's LoRA vs Hugging Face PEFT on smollm2-135m, side by side.

LoRA r=16 on all linear layers, batch 8x48 tokens for training; 32 rows on 32 distinct adapters
for the mixed-batch forward. Every figure is a ratio measured in this one process.
"""

import tempfile

import peft
import torch

from bench.common import median_time, write_results
from peftkit.formats import load_adapters, save_adapter
from peftkit.methods import LoraConfig, add_adapter
from peftkit.models import load_base

MODEL, RANK, N_ADAPTERS = "smollm2-135m", 16, 32


def train_step_time(model, params, ids) -> float:
    opt = torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return median_time(step, repeats=5, warmup=2)


def main() -> None:
    torch.manual_seed(0)
    ids = torch.randint(10, 40000, (8, 48))

    ours = add_adapter(load_base(MODEL).model, LoraConfig(r=RANK, alpha=32, targets="all-linear"))
    t_ours = train_step_time(ours.train(), ours.adapter_parameters(), ids)
    theirs = peft.get_peft_model(load_base(MODEL).model,
                                 peft.LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear"))
    t_peft = train_step_time(theirs.train(), [p for p in theirs.parameters() if p.requires_grad], ids)
    del ours, theirs

    # 32 distinct adapters with random weights, saved once, loaded by both libraries.
    with tempfile.TemporaryDirectory() as tmp:
        maker = add_adapter(load_base(MODEL).model, LoraConfig(r=RANK, alpha=32,
                                                                targets="all-linear"))
        dirs = {}
        for i in range(N_ADAPTERS):
            with torch.no_grad():
                for p in maker.adapter_parameters():
                    p.normal_(0, 0.02)
            dirs[f"a{i}"] = save_adapter(maker, f"{tmp}/a{i}")
        del maker
        rows = torch.randint(10, 40000, (N_ADAPTERS, 48))
        slots = torch.arange(N_ADAPTERS)
        multi = load_adapters(load_base(MODEL).model, dirs).eval()
        plain = load_base(MODEL).model.eval()
        with torch.no_grad():
            t_multi = median_time(lambda: multi(input_ids=rows, slots=slots), repeats=3)
            t_base = median_time(lambda: plain(input_ids=rows), repeats=3)
        del multi
        pm = peft.PeftModel.from_pretrained(plain, dirs["a0"], adapter_name="a0")
        for name, d in list(dirs.items())[1:]:
            pm.load_adapter(d, adapter_name=name)
        pm.eval()
        names = [f"a{i}" for i in range(N_ADAPTERS)]
        with torch.no_grad():
            t_pmixed = median_time(lambda: pm(input_ids=rows, adapter_names=names), repeats=3)

    write_results("methods", "Adapter methods: peftkit vs PEFT (smollm2-135m, LoRA r=16 all-linear)", [
        ("train step, 8x48 tokens: peftkit / PEFT", f"{t_ours / t_peft:.2f} ({t_ours:.2f} s vs {t_peft:.2f} s)", "<= 0.8"),
        ("mixed batch forward, 32 rows on 32 adapters: PEFT adapter_names / peftkit",
         f"{t_pmixed / t_multi:.2f}x faster ({t_multi:.2f} s vs {t_pmixed:.2f} s)", ">= 2x"),
        ("mixed batch forward: base-only / peftkit (throughput ratio)",
         f"{t_base / t_multi:.2f} ({t_base:.2f} s base)", ">= 0.8"),
    ], {"train_step_s": {"peftkit": t_ours, "peft": t_peft},
        "mixed_forward_s": {"peftkit": t_multi, "peft_adapter_names": t_pmixed, "base_only": t_base}})


if __name__ == "__main__":
    main()
