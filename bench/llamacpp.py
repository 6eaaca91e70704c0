"""Issue 27.4: the GGUF exports run by llama.cpp itself (its Python binding, llama-cpp-python,
built from PyPI: minutes of compiling, so not in CI). The demo's acme adapter on SmolLM2-135M,
merged and written as GGUF f16 and q8_0, and as base GGUF + llama.cpp adapter GGUF
(--adapter-only); llama.cpp's greedy answers on 16 of acme's held-out prompts against peftkit's
own greedy answers from base + adapter. Then each family the export writes, as a tiny random
model with a SentencePiece-style tokenizer (Llama 2 / Phi-3 layout, Gemma layout): llama.cpp's
tokenization of 400 texts and its greedy tokens against transformers'.

    pip install llama-cpp-python && python -m bench.llamacpp [RUN]   # RUN: runs/demo/runs/acme
"""

import sys
import tempfile
from pathlib import Path

from bench.common import write_results
from peftkit.data import chat_ids
from peftkit.demo.tasks import TASKS
from peftkit.generation import generate_ids
from peftkit.gguf_adapter import export_adapter_gguf
from peftkit.gguf_export import export_gguf
from peftkit.train.run_dir import load_run, recorded_base

NEW = 24


def llama_cpp_greedy(path: str, prompts: list[list[int]], eos: int,
                     lora: str | None = None, n: int = NEW) -> list[list[int]]:
    from llama_cpp import Llama
    llm = Llama(model_path=path, lora_path=lora, n_ctx=512, n_threads=2, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        tokens = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token == eos or len(tokens) == n:
                break
            tokens.append(token)
        out.append(tokens)
    return out


def main(argv=None) -> None:
    run = (argv or sys.argv[1:] or ["runs/demo/runs/acme"])[0]
    task = next(t for t in TASKS if t.customer == "acme")
    rows = task.examples(16, seed=99)
    loaded = load_run(recorded_base(Path(run)), run)
    tok = loaded.base.tokenizer
    prompts = [chat_ids([m for m in r["messages"] if m["role"] != "assistant"], tok) for r in rows]
    want = generate_ids(loaded.module, tok, prompts, NEW)
    table, raw = [], {"run": run}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("f16", "q8_0"):
            path = export_gguf(run, str(Path(tmp) / kind), kind)["output"]
            got = llama_cpp_greedy(path, prompts, tok.eos_token_id)
            same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
            share = same / max(1, sum(map(len, want)))
            whole = sum(w == g for w, g in zip(want, got))
            right = sum(tok.decode(g).strip() == r["messages"][-1]["content"].strip()
                        for g, r in zip(got, rows))
            texts = [tok.decode(p) for p in prompts] + [
                "Hello world!  It's 2024, isn't it?\n\tTabs   and 123456 numbers.",
                "Order #A-17: ship 3x widgets to Zürich; naïve café."]
            from llama_cpp import Llama
            vocab = Llama(model_path=path, vocab_only=True, verbose=False)
            same_ids = sum(vocab.tokenize(t.encode(), add_bos=False, special=True) ==
                           tok(t, add_special_tokens=False).input_ids for t in texts)
            raw[kind] = {"token_agreement": share, "identical_answers": whole,
                         "correct_answers": right, "tokenization_agreement": same_ids}
            if kind == "f16":
                table.append(("llama.cpp's tokenizer from the GGUF = transformers' on text",
                              f"{same_ids}/{len(texts)} texts", "all"))
            table.append((f"llama.cpp {kind} vs peftkit (base + adapter): greedy tokens equal",
                          f"{share:.1%} ({whole}/16 answers identical)",
                          "100% for f16" if kind == "f16" else "reported"))
            table.append((f"llama.cpp {kind}: answers equal to the reference", f"{right}/16", ""))
        done = export_adapter_gguf(run, str(Path(tmp) / "adapter"), "f16")
        got = llama_cpp_greedy(done["output"], prompts, tok.eos_token_id, done["adapter_output"])
        same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
        share = same / max(1, sum(map(len, want)))
        whole = sum(w == g for w, g in zip(want, got))
        right = sum(tok.decode(g).strip() == r["messages"][-1]["content"].strip()
                    for g, r in zip(got, rows))
        raw["adapter_f16"] = {"token_agreement": share, "identical_answers": whole,
                              "correct_answers": right}
        table.append(("llama.cpp base f16 GGUF + adapter GGUF (--adapter-only) vs peftkit: "
                      "greedy tokens equal", f"{share:.1%} ({whole}/16 answers identical)",
                      "100%"))
        table.append(("llama.cpp base + adapter GGUF: answers equal to the reference",
                      f"{right}/16", ""))
    table += families(raw)
    write_results("llamacpp", "llama.cpp runs the GGUF export (issue 27.4)", table,
                  {**raw, "command": "pip install llama-cpp-python && python -m bench.llamacpp"})


def tie_gap(model, prompt: list[int], want: list[int], got: list[int]) -> float:
    """transformers' gap between its pick and llama.cpp's where the two answers first part."""
    import torch
    k = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    if k >= len(got) or k >= len(want):
        return float("inf")  # one stopped: not a tie
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:k]])).logits[0, -1]
    return float(logits[want[k]] - logits[got[k]])


FAMILIES = [("llama", "llama2"), ("mistral", "llama2"), ("phi3", "llama2"), ("gemma", "gemma"),
            ("gemma2", "gemma")]


def families(raw: dict) -> list[tuple]:
    """llama.cpp on each family's f16 GGUF with a SentencePiece vocabulary: tokenization of
    random letter strings and corpus word salads, greedy tokens of 16 prompts against
    transformers' on the same f16-rounded weights (a random model's logits are near ties, which
    f16 rounding alone flips)."""
    import random

    from llama_cpp import Llama

    from peftkit.gguf_export import write_gguf
    from peftkit.tiny_sentencepiece import CORPUS, spm_model
    rng = random.Random(0)
    letters = sorted(set(CORPUS.lower()) - set(" .;,"))
    words = CORPUS.split() + ["Zürich", "naïve", "café", "日本語", "🙂", "  ", "\n\t"]
    texts = ["".join(rng.choice(letters) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    texts += [" ".join(rng.choice(words) for _ in range(6)) for _ in range(100)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family, style in FAMILIES:
            model, tok = spm_model(family, style)
            path = str(write_gguf(model, tok, Path(tmp) / f"{family}.gguf"))
            vocab = Llama(model_path=path, vocab_only=True, verbose=False)
            same = sum(vocab.tokenize(t.encode(), add_bos=False, special=True) ==
                       tok(t, add_special_tokens=False).input_ids for t in texts)
            prompts = [tok(t).input_ids for t in texts[290:306]]
            for weight in model.parameters():  # the weights as the f16 file holds them
                weight.data = weight.data.half().float()
            want = generate_ids(model, tok, prompts, 8)
            got = llama_cpp_greedy(path, prompts, tok.eos_token_id, n=8)
            gaps = [tie_gap(model, p, w, g) for p, w, g in zip(prompts, want, got) if w != g]
            raw[f"sentencepiece_{family}"] = {"tokenization_agreement": same, "texts": len(texts),
                                              "identical_greedy": 16 - len(gaps),
                                              "logit_gaps_where_they_part": gaps}
            parted = f" (the other{'s' if len(gaps) > 1 else ''} part at a near tie: top-2 " \
                     f"logit gap <= {max(gaps):.0e})" if gaps else ""
            rows.append((f"{family} ({style} SentencePiece vocabulary), f16: llama.cpp = "
                         "transformers", f"tokens {same}/{len(texts)} texts, greedy "
                         f"{16 - len(gaps)}/16{parted}", "all"))
    return rows


if __name__ == "__main__":
    main()
