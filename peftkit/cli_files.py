"""`peftkit data check` and `peftkit export`: the commands that read and write files users
carry elsewhere (a dataset before training, a run after it)."""

import sys
from collections import Counter

from peftkit.cli_flags import positive
from peftkit.errors import DataError, PeftkitError
from peftkit.train.config import TrainConfig


def add_data_parser(sub) -> None:
    s = sub.add_parser("data", help="dataset tools")
    s.set_defaults(func=lambda _args, help=s.print_help: help() or 2)  # `peftkit data` alone
    dsub = s.add_subparsers(title="data commands", metavar="ACTION")
    c = dsub.add_parser("check", help="validate a dataset file and summarise it")
    c.add_argument("file", help="dataset: .jsonl, .json, .csv, .tsv, .parquet, .arrow or a "
                   "datasets save_to_disk directory")
    c.add_argument("--model", default="smollm2-135m", help="tokenizer used to count tokens")
    c.add_argument("--max-length", type=positive, default=TrainConfig.max_length,
                   help="tokens per example before truncation is reported (train's default)")
    c.add_argument("--text-field", default="text", help="the text column/key")
    c.add_argument("--label-field", default="label", help="the label column/key")
    c.add_argument("--skip-invalid", action="store_true",
                   help="report bad records and keep the rest (exit 0)")
    c.add_argument("--max-record-mb", type=float, default=16.0,
                   help="a record (JSONL line, CSV field) over this many MB is a bad record")
    c.set_defaults(func=cmd_data_check)


def add_export_parser(sub) -> None:
    s = sub.add_parser("export", help="a run for another engine, checked first (vLLM, merged, "
                                      "GGUF for llama.cpp, Ollama)")
    s.add_argument("--for", dest="engine", choices=["vllm", "merged", "gguf", "ollama"],
                   required=True,
                   help="vllm: adapters (LoRA/rsLoRA) and the `vllm serve` command; merged: one "
                        "run folded into its base, a plain Hugging Face model directory; gguf: "
                        "that merged model as one GGUF file for llama.cpp (llama, mistral, qwen2, phi3, gemma2); "
                        "ollama: that GGUF, a Modelfile and the `ollama create` command")
    s.add_argument("--gguf-type", default=None, choices=["f16", "q8_0"],
                   help="gguf/ollama: the weights' type, norms stay f32 (default: f16 for "
                        "gguf, q8_0 for ollama)")
    s.add_argument("sources", nargs="+", metavar="RUN_OR_ADAPTER",
                   help="adapter or `peftkit train` run directories, then OUT")
    s.add_argument("--base", help="the base model (default: the one the run or adapter names)")
    s.add_argument("--adapter-only", action="store_true",
                   help="gguf/ollama: the base as GGUF, unmodified, and the LoRA as llama.cpp's "
                        "adapter GGUF beside it (one base file for many adapters)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="merged: the precision the merged weights are written in")
    s.add_argument("--overwrite", action="store_true",
                   help="replace what OUT already holds under the same name")
    s.set_defaults(func=cmd_export)


def cmd_data_check(args) -> int:
    from peftkit.data import load_dataset, tokenize
    from peftkit.data.records import report_skipped
    from peftkit.models import load_base
    try:
        ds = load_dataset(args.file, args.text_field, args.label_field, args.skip_invalid,
                          max_record_mb=args.max_record_mb)
    except DataError as e:
        print(str(e), file=sys.stderr)
        print(f"{args.file}: invalid ({len(e.problems)} bad records)", file=sys.stderr)
        return 2
    report_skipped(ds)
    tokenizer = load_base(args.model).tokenizer
    tok = tokenize(ds, tokenizer, max_length=args.max_length)
    print(f"file:       {ds.path}")
    print(f"format:     {ds.container}")
    print(f"kind:       {ds.kind}")
    print(f"records:    {len(ds.records)}" + (f" ({ds.skipped} invalid skipped)" if ds.skipped else ""))
    print(f"tokens:     {tok.tokens} ({args.model} tokenizer)")
    print(f"truncated:  {tok.truncated} (max length {args.max_length})")
    if ds.label_names:
        counts = Counter(r.label for r in ds.records)
        print("labels:     " + ", ".join(f"{n}={counts.get(n, 0)}" for n in ds.label_names))
    return 0


def cmd_export(args) -> None:
    from peftkit.export import export_vllm
    if len(args.sources) < 2:
        raise PeftkitError("give at least one adapter or run directory, then OUT")
    *sources, out = args.sources
    if args.adapter_only and args.engine not in ("gguf", "ollama"):
        raise PeftkitError("--adapter-only: llama.cpp's adapter GGUF, with --for gguf or "
                           f"ollama (--for {args.engine} writes "
                           + ("adapters already)" if args.engine == "vllm" else "one model)"))
    if args.engine != "vllm":  # merged, gguf, ollama: one run in, one model out
        if len(sources) != 1:
            raise PeftkitError(f"--for {args.engine}: give one run (or adapter) directory, "
                               "then OUT")
        print(_export_one(args.engine, sources[0], out, args))
        return
    command = export_vllm(sources, out, args.base, args.overwrite)
    print(f"wrote {len(sources)} adapter(s) under {out}; serve them with:\n{command}")


def _export_one(engine: str, source: str, out: str, args) -> str:
    """Export one run for `engine`; what was written and how to use it."""
    if engine == "merged":
        from peftkit.merged import export_run
        done = export_run(source, out, args.dtype, args.base, args.overwrite)
        return (f"wrote {done['output']}: {done['method']} {done['merge']}; load it with "
                f"transformers.AutoModelForCausalLM.from_pretrained({done['output']!r})")
    from peftkit.gguf_adapter import export_adapter_gguf
    from peftkit.gguf_export import export_gguf, export_ollama
    if engine == "gguf" and args.adapter_only:
        done = export_adapter_gguf(source, out, args.gguf_type or "f16", args.base,
                                   args.overwrite)
        return (f"wrote {done['output']} ({done['base_weights']}) and {done['adapter_output']} "
                f"(LoRA r={done['r']}, alpha {done['lora_alpha']:g}); run them with llama.cpp: "
                f"llama-cli -m {done['output']} --lora {done['adapter_output']}")
    if engine == "gguf":
        done = export_gguf(source, out, args.gguf_type or "f16", args.base, args.overwrite)
        return (f"wrote {done['output']}: {done['method']} {done['merge']}, as GGUF "
                f"{done['gguf']}; run it with llama.cpp: llama-cli -m {done['output']}")
    done = export_ollama(source, out, args.gguf_type or "q8_0", args.base, args.overwrite,
                         adapter_only=args.adapter_only)
    return f"wrote {done['output']} and {done['modelfile']}; create the model with:\n" \
           f"{done['command']}"
