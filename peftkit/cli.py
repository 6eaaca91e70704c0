"""`peftkit` command line. Each subcommand is a thin layer over the Python API."""

import argparse
import sys
from collections import Counter

from peftkit.errors import DataError, PeftkitError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args) or 0
    except DataError as e:
        print(str(e), file=sys.stderr)
        return 2
    except PeftkitError as e:
        print(f"peftkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("peftkit: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="peftkit", description=__doc__)
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser("models", help="list the built-in model aliases")
    s.set_defaults(func=cmd_models)

    s = sub.add_parser("generate", help="generate text from a model (greedy)")
    s.add_argument("--model", default="smollm2-135m")
    s.add_argument("--prompt", required=True)
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--raw", action="store_true", help="do not apply the chat template")
    s.set_defaults(func=cmd_generate)

    s = sub.add_parser("data", help="dataset tools")
    dsub = s.add_subparsers(title="data commands", metavar="ACTION")
    c = dsub.add_parser("check", help="validate a dataset file and summarise it")
    c.add_argument("file")
    c.add_argument("--model", default="smollm2-135m", help="tokenizer used to count tokens")
    c.add_argument("--max-length", type=int, default=512)
    c.add_argument("--text-field", default="text")
    c.add_argument("--label-field", default="label")
    c.add_argument("--skip-invalid", action="store_true")
    c.set_defaults(func=cmd_data_check)

    s = sub.add_parser("demo", help="run the main job")
    s.add_argument("--model", default="smollm2-135m")
    s.set_defaults(func=cmd_demo)
    return p


def cmd_models(args) -> None:
    from peftkit.models import list_models
    for m in list_models():
        state = "cached" if m["cached"] else "fetched on first use"
        print(f"{m['name']:<14} {m['task']:<10} {m['description']} [{state}]")


def cmd_generate(args) -> None:
    from peftkit.generation import generate_text
    from peftkit.models import load_base
    base = load_base(args.model, task="causal-lm")
    print(generate_text(base, args.prompt, args.max_new_tokens, raw=args.raw))


def cmd_data_check(args) -> int:
    from peftkit.data import load_dataset, tokenize
    from peftkit.models import load_base
    try:
        ds = load_dataset(args.file, args.text_field, args.label_field, args.skip_invalid)
    except DataError as e:
        print(str(e), file=sys.stderr)
        print(f"{args.file}: invalid ({len(e.problems)} bad records)", file=sys.stderr)
        return 2
    tokenizer = load_base(args.model).tokenizer
    tok = tokenize(ds, tokenizer, max_length=args.max_length)
    print(f"file:       {ds.path}")
    print(f"kind:       {ds.kind}")
    print(f"records:    {len(ds.records)}" + (f" ({ds.skipped} invalid skipped)" if ds.skipped else ""))
    print(f"tokens:     {tok.tokens} ({args.model} tokenizer)")
    print(f"truncated:  {tok.truncated} (max length {args.max_length})")
    if ds.label_names:
        counts = Counter(r.label for r in ds.records)
        print("labels:     " + ", ".join(f"{n}={counts.get(n, 0)}" for n in ds.label_names))
    return 0


def cmd_demo(args) -> None:
    # The full five-customer scenario lands with the demo issue; until then: the chat check.
    from peftkit.generation import generate_text
    from peftkit.models import load_base
    question = "What is the capital of France?"
    base = load_base(args.model, task="causal-lm")
    print(f"user:      {question}")
    print(f"assistant: {generate_text(base, question, max_new_tokens=32)}")


if __name__ == "__main__":
    sys.exit(main())
