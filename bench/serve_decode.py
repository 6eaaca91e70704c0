"""bench/serve.py's decode-step analysis (issue 17.3): where a mixed batch's time goes.

A decode step of 32 rows on 32 distinct adapters against the same rows on the base alone, and
the floor below which no implementation can go: reading each adapter's A and B once (timed
here as a read-only pass over the used slots). On SmolLM2-135M with r=16 all-linear adapters,
32 adapters hold more bytes than the base's linear layers, so that floor, not the maths, bounds
the ratio; a random-weight model of Llama-7B's proportions (per-layer width 4096, fewer
layers: what fits this machine) shows the ratio when adapters are as small next to the base as
Punica's are.
"""

import random
import statistics
import time

import torch

from peftkit.engine import Engine, Request, Sampling
from peftkit.methods import LoraConfig, add_adapter

ROWS, STEPS = 32, 8


def decode_steps_seconds(engine_for, batches: list[list[int]], prompt_ids: list[int]) -> list[float]:
    """Median time of one decode step for each batch of slots (one row per slot), the batches'
    steps interleaved on one model so that a slower moment of the machine falls on all alike.
    `engine_for()` makes an engine on the model under test."""
    greedy = Sampling(max_tokens=STEPS * 8, temperature=0.0)
    engines, reqs = [], []
    for slots in batches:
        engine = engine_for()
        reqs += [engine.submit(Request(prompt_ids, s, greedy)) for s in slots]
        engine.step()  # prefill every row, first decode step
        engine._decode()  # warm-up
        engines.append(engine)
    times = [[] for _ in batches]
    for _ in range(STEPS):
        for engine, spent in zip(engines, times):
            start = time.perf_counter()
            engine._decode()
            spent.append(time.perf_counter() - start)
    for r in reqs:
        r.cancel()
    for engine in engines:
        engine.step()  # the cancelled rows leave
    return [statistics.median(t) for t in times]


@torch.no_grad()
def read_once_seconds(adapted, slots: list[int]) -> tuple[float, int]:
    """(seconds, bytes) of one read-only pass over the A and B of the given slots in every
    layer: what a decode step must at least spend on its adapters."""
    used = torch.tensor(sorted(set(s for s in slots if s >= 0)))
    stacks = [(layer.lora_A, layer.lora_B) for layer in adapted.adapted_layers().values()]
    whole = len(used) == stacks[0][0].shape[0]
    parts = [t if whole else t[used] for pair in stacks for t in pair]
    size = sum(t.numel() * t.element_size() for t in parts)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for t in parts:
            t.sum()
        best = min(best, time.perf_counter() - start)
    return best, size


def analyse(adapted, tokenizer, prompt: str, label: str, goal: str = ">= 0.90") -> dict:
    """Base-only and 32-adapter decode steps on `adapted` (32 slots, filled), the adapters'
    rows in slot order and shuffled, and the floor."""
    ids = tokenizer(prompt).input_ids
    in_order = list(range(ROWS))
    shuffled = random.Random(0).sample(in_order, ROWS)
    # two rounds, the better of each: the first mixed steps of a process run up to 2x slower
    # (allocator warm-up) and would otherwise be charged to the mixed batch
    rounds = [decode_steps_seconds(lambda: Engine(adapted, tokenizer, max_batch=ROWS),
                                   [[-1] * ROWS, in_order, shuffled], ids) for _ in range(2)]
    base, mixed, mixed_shuffled = (min(r[i] for r in rounds) for i in range(3))
    read, size = read_once_seconds(adapted, in_order)
    linear = sum(layer.weight.numel() * layer.weight.element_size()
                 for layer in adapted.adapted_layers().values())
    return {"label": label, "goal": goal, "base_step_s": base, "mixed_step_s": mixed,
            "mixed_shuffled_step_s": mixed_shuffled,
            "adapter_read_s": read, "adapter_bytes": size, "base_linear_bytes": linear,
            "ratio": base / mixed, "ratio_shuffled": base / mixed_shuffled,
            "floor_ratio": base / (base + read)}


def random_wide_model(tokenizer):
    """Llama-7B's per-layer shapes (hidden 4096, MLP 11008, 32 heads), 2 layers, random
    weights, the tokenizer's vocabulary: 32 r=16 adapters are ~2% of a layer each, as in
    Punica's Llama-7B measurement."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=4096, intermediate_size=11008,
                         num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                         max_position_embeddings=2048, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def filled(model, rank: int = 16):
    """`model` with 32 slots of random r=`rank` all-linear adapters."""
    adapted = add_adapter(model, LoraConfig(r=rank, alpha=2 * rank, targets="all-linear"),
                          slots=ROWS)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in adapted.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    return adapted.eval()


def rows(results: list[dict]) -> list[tuple[str, str, str]]:
    mib = 2 ** 20
    out = []
    for r in results:
        out.append((f"decode step, 32 rows, {r['label']}: 32 adapters / base-only",
                    f"{r['ratio']:.2f} ({r['mixed_step_s'] * 1000:.0f} vs "
                    f"{r['base_step_s'] * 1000:.0f} ms)", r["goal"]))
        out.append(("  the same 32 rows in shuffled slot order (gathered into slot order)",
                    f"{r['ratio_shuffled']:.2f} ({r['mixed_shuffled_step_s'] * 1000:.0f} ms)",
                    "report"))
        out.append((f"  floor: reading the 32 adapters once ({r['adapter_bytes'] / mib:.0f} MiB; "
                    f"base linear layers {r['base_linear_bytes'] / mib:.0f} MiB)",
                    f"{r['adapter_read_s'] * 1000:.0f} ms: best possible ratio "
                    f"{r['floor_ratio']:.2f}", "report"))
    return out
