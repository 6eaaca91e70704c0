"""Issue 27 check: a real adapter (the demo's QLoRA adapter for acme on SmolLM2-135M) merged and
written as GGUF f16 and q8_0, read back by transformers' own GGUF loader: the share of greedy
tokens equal to the merged model's on 16 of acme's held-out prompts.

    python -m bench.gguf [RUN]     # default: runs/demo/runs/acme (`make demo` writes it)
"""

import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from bench.common import write_results
from peftkit.data import chat_ids
from peftkit.demo.tasks import TASKS
from peftkit.generation import generate_ids
from peftkit.gguf_export import export_gguf
from peftkit.merged import export_run


def main(argv=None) -> None:
    run = (argv or sys.argv[1:] or ["runs/demo/runs/acme"])[0]
    task = next(t for t in TASKS if t.customer == "acme")
    rows = task.examples(16, seed=99)
    with tempfile.TemporaryDirectory() as tmp:
        merged = Path(tmp) / "merged"
        export_run(run, str(merged), "float32")
        tok = AutoTokenizer.from_pretrained(merged)
        prompts = [chat_ids([m for m in r["messages"] if m["role"] != "assistant"], tok)
                   for r in rows]
        want = generate_ids(AutoModelForCausalLM.from_pretrained(merged).eval(), tok, prompts, 24)
        rows_out, raw = [], {}
        for kind in ("f16", "q8_0"):
            start = time.perf_counter()
            out = export_gguf(run, str(Path(tmp) / kind), kind)["output"]
            seconds = time.perf_counter() - start
            size = Path(out).stat().st_size / 2 ** 20
            back = AutoModelForCausalLM.from_pretrained(Path(out).parent,
                                                        gguf_file=Path(out).name).eval()
            got = generate_ids(back, tok, prompts, 24)
            same = sum(a == b for w, g in zip(want, got) for a, b in zip(w, g))
            share = same / max(1, sum(map(len, want)))
            whole = sum(w == g for w, g in zip(want, got))
            raw[kind] = {"token_agreement": share, "identical_answers": whole,
                         "size_mib": size, "export_seconds": seconds}
            rows_out.append((f"{kind}: greedy tokens equal to the merged model's",
                             f"{share:.1%} ({whole}/16 answers identical)",
                             "100% for f16" if kind == "f16" else "reported"))
            rows_out.append((f"{kind}: file size, export time", f"{size:.0f} MiB, {seconds:.0f} s",
                             ""))
    write_results("gguf", "GGUF export read back by transformers (issue 27)", rows_out,
                  {"run": run, **raw, "command": "python -m bench.gguf runs/demo/runs/acme"})


if __name__ == "__main__":
    main()
