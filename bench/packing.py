"""Issue 25.4 benchmark: packed vs padded training throughput on mixed-length chat data.

SmolLM2-135M, LoRA r=16 all-linear, batch 8, --max-length 512, the same steps over the same
examples both ways, in one invocation. The examples are chat turns whose token lengths spread
like real chat data (log-normal, median ~110 tokens, clipped to 20-512). Throughput is real
(unpadded) tokens per second of the training loop; the losses of the two runs must agree
(packing changes the batch layout, not the maths).
"""

import json
import math
import random
import tempfile
from pathlib import Path

from bench.common import write_results
from peftkit.models import load_base
from peftkit.train import TrainConfig, train

MODEL, STEPS, BATCH, WIDTH = "smollm2-135m", 6, 8, 512
WORDS = ("the data model adapter tenant token batch train serve plan memory rank layer "
         "weight query answer customer support ticket invoice order refund shipping").split()


def chat_rows(n: int, tokenizer, seed: int = 0) -> list[dict]:
    """(rows, their token lengths): each row's length drawn first, then filled to it."""
    rng = random.Random(seed)
    rows, lengths = [], []
    per_word = len(tokenizer(" ".join(WORDS)).input_ids) / len(WORDS)
    for _ in range(n):
        target = min(WIDTH, max(20, int(rng.lognormvariate(math.log(110), 0.8))))
        words = [rng.choice(WORDS) for _ in range(max(4, int((target - 12) / per_word)))]
        cut = max(2, len(words) // 3)
        row = {"messages": [{"role": "user", "content": " ".join(words[:cut])},
                            {"role": "assistant", "content": " ".join(words[cut:])}]}
        text = tokenizer.apply_chat_template(row["messages"], tokenize=False)
        rows.append(row)
        lengths.append(min(WIDTH, len(tokenizer(text, add_special_tokens=False).input_ids)))
    return rows, lengths


def main() -> None:
    tok = load_base(MODEL).tokenizer
    rows, lengths = chat_rows(STEPS * BATCH, tok)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chat.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        common = dict(model=MODEL, data=str(data), method="lora", rank=16, alpha=32,
                      steps=STEPS, batch_size=BATCH, max_length=WIDTH, val_split=0.0,
                      dropout=0.0, device="cpu", exact_match_max=0)
        runs = {}
        for packing in (False, True):
            name = "packed" if packing else "padded"
            runs[name] = train(TrainConfig(**common, packing=packing,
                                           output=str(Path(tmp) / name)))
    rate = {k: r["trained_tokens"] / r["train_loop_seconds"] for k, r in runs.items()}
    ratio = rate["packed"] / rate["padded"]
    agree = max(abs(a - b) for a, b in zip(runs["padded"]["train_losses"],
                                          runs["packed"]["train_losses"]))
    rows_seen = {k: r["largest_batch"] for k, r in runs.items()}
    sorted_lengths = sorted(lengths)
    write_results("packing", "Packed vs padded training (issue 25.4)", [
        ("examples: token lengths (min / median / max)",
         f"{sorted_lengths[0]} / {sorted_lengths[len(lengths) // 2]} / {sorted_lengths[-1]}",
         "20-512, spread like chat data"),
        ("padded: tokens/s (largest batch rows x width)",
         f"{rate['padded']:.0f} ({rows_seen['padded'][0]} x {rows_seen['padded'][1]})", ""),
        ("packed: tokens/s (largest batch rows x width)",
         f"{rate['packed']:.0f} ({rows_seen['packed'][0]} x {rows_seen['packed'][1]})", ""),
        ("packed / padded throughput", f"{ratio:.2f}x", ">= 1.5x"),
        ("largest per-step loss difference", f"{agree:.1e}", "float rounding"),
    ], {"model": MODEL, "steps": STEPS, "batch": BATCH, "max_length": WIDTH,
        "lengths": lengths, "tokens_per_second": rate, "ratio": ratio,
        "loss_difference": agree, "losses": {k: r["train_losses"] for k, r in runs.items()},
        "command": "python -m bench.packing"})


if __name__ == "__main__":
    main()
