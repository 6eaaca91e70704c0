"""`peftkit` command line. Each subcommand is a thin layer over the Python API."""

import argparse
import sys

from safetensors import SafetensorError

from peftkit.cli_flags import add_config_flags, add_placement, config_from_args, placement, positive
from peftkit.cli_files import add_data_parser, add_export_parser
from peftkit.cli_train import add_train_parser
from peftkit.errors import DataError, PeftkitError


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
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
    except OSError as e:  # disk full, read-only or vanished paths: say which, no traceback
        where = f"{e.filename}: " if e.filename else ""
        print(f"peftkit: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except SafetensorError as e:  # its write errors (a full disk) are not OSErrors
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
    s.add_argument("--model", help="base model: alias (peftkit models), HF directory or .gguf "
                                   "file (default: the base --adapter records, else "
                                   "smollm2-135m)")
    s.add_argument("--adapter", help="a PEFT adapter or a `peftkit train` output directory")
    s.add_argument("--prompt", required=True,
                   help="the user message (chat template applied unless --raw)")
    s.add_argument("--max-new-tokens", type=positive, default=64, help="most tokens to generate")
    s.add_argument("--raw", action="store_true", help="do not apply the chat template")
    add_placement(s)
    s.set_defaults(func=cmd_generate)

    add_train_parser(sub)

    s = sub.add_parser("eval", help="evaluate a base, adapter or run output on a dataset")
    s.add_argument("--model", help="base model: alias, HF directory or .gguf file (default: "
                                   "the base --adapter records, else smollm2-135m)")
    s.add_argument("--adapter", help="a PEFT adapter or a `peftkit train` output directory")
    s.add_argument("--data", required=True,
                   help="evaluation file (the formats `peftkit train` reads)")
    s.add_argument("--max-length", type=positive, default=256,
                   help="tokens per example; longer ones are truncated")
    s.add_argument("--batch-size", type=positive, default=8, help="rows per evaluation batch")
    s.add_argument("--exact-match-max", type=int, default=64,
                   help="validation examples scored by greedy generation (causal LM)")
    s.add_argument("--text-field", default="text", help="the text column/key")
    s.add_argument("--label-field", default="label", help="the label column/key")
    s.add_argument("--skip-invalid", action="store_true",
                   help="report bad records and score the rest")
    add_placement(s)
    s.set_defaults(func=cmd_eval)

    s = sub.add_parser("compare", help="every method on the same data, side by side")
    s.add_argument("--model", default="smollm2-135m",
                   help="base model: alias, HF directory or .gguf file")
    s.add_argument("--data", required=True, help="training file, the same for every method")
    s.add_argument("--methods", default="full,probe,lora,qlora,ia3,prompt",
                   help="comma-separated methods to run, each in its own process")
    s.add_argument("--output", required=True,
                   help="directory for each method's run, the table and the plot")
    s.add_argument("extra", nargs="*", help="options passed to every `peftkit train` (after --)")
    add_placement(s)
    s.set_defaults(func=cmd_compare)

    from peftkit.train.config import STRATEGIES
    s = sub.add_parser("plan", help="memory, GPUs, time and cost per approach + a recommendation")
    s.add_argument("--model", default="smollm2-135m",
                   help="alias, HF dir, config.json or a size (70B)")
    s.add_argument("--gpu", default="H100",
                   help="GPU model: H100, H100-PCIe, H200, A100-80GB, A100-40GB, A6000, A40, "
                        "L40S, L4, RTX4090, RTX3090, V100, T4, MI300X, ... (or --gpu-memory)")
    s.add_argument("--gpu-memory", type=float,
                   help="GB of memory of a GPU not in the catalog (with --gpu its name)")
    s.add_argument("--gpus", type=int, default=1, help="GPUs available")
    s.add_argument("--seq-len", type=int,
                   help="tokens per training sequence (default: 2048, or the model's context "
                        "where shorter)")
    s.add_argument("--batch", type=int, default=1, help="sequences per GPU per step")
    s.add_argument("--dataset-tokens", type=float, default=10_000 * 2048,
                   help="training tokens in the dataset")
    s.add_argument("--epochs", type=float, default=1.0, help="passes over the dataset")
    s.add_argument("--tenants", type=int, default=1,
                   help="customers/tasks, each with its own adapter")
    s.add_argument("--budget-days", type=float,
                   help="wall-clock budget in days (says whether the plan fits)")
    s.add_argument("--price-per-gpu-hour", type=float,
                   help="price of one GPU hour (default: the catalog's)")
    s.add_argument("--rank", type=int, default=16, help="LoRA rank for the PEFT estimates")
    s.add_argument("--adam-8bit", action="store_true",
                   help="8-bit Adam states (1 byte per moment instead of 4)")
    s.add_argument("--no-grad-checkpointing", action="store_true",
                   help="estimate without activation checkpointing")
    s.add_argument("--task-kind", choices=["generation", "classification", "embedding"],
                   default="generation", help="what the model must do for the task")
    s.add_argument("--quality", choices=["normal", "max"], default="normal",
                   help="max: full fine-tuning when budget and memory allow")
    s.add_argument("--budget", choices=["low", "normal", "high"], default="normal",
                   help="budget for compute")
    s.add_argument("--domain", choices=["near", "far"], default="near",
                   help="far: the data is far from pretraining (a new domain or language)")
    s.add_argument("--new-language", action="store_true",
                   help="the task is a programming language the base never saw")
    s.add_argument("--icl-enough", action="store_true", help="prompting already works")
    s.add_argument("--strategy", default="auto", choices=STRATEGIES,
                   help="how --gpus share the work: fsdp shards parameter state, ddp replicates")
    s.add_argument("--cpu", action="store_true",
                   help="instead: peak RSS of `peftkit train` on this CPU, per method, for "
                        "--batch rows of --seq-len padded tokens (trainer defaults otherwise)")
    s.add_argument("--json", action="store_true", help="print the plan as JSON")
    s.set_defaults(func=cmd_plan)

    from peftkit.serve.config import TASKS, GatewayConfig, ServeConfig
    s = sub.add_parser("serve", help="serve one base and many adapters (OpenAI-compatible API)")
    add_config_flags(s, ServeConfig, {"quantize": ("nf4",), "task": TASKS},
                     skip=("device", "dtype", "attn"))
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    add_placement(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("gateway", help="one endpoint over several servers, routed by adapter")
    add_config_flags(s, GatewayConfig, {})
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8080, help="port to listen on")
    s.set_defaults(func=cmd_gateway)

    s = sub.add_parser("inspect", help="a model's family, layers by role, and each method's "
                                       "default targets or why it is refused")
    s.add_argument("model", help="alias, HF directory, .gguf file or config.json's directory")
    s.add_argument("--json", action="store_true", help="print it as JSON")
    s.set_defaults(func=cmd_inspect)

    add_data_parser(sub)
    add_export_parser(sub)

    s = sub.add_parser("demo", help="the main job: five customers, one base, one server")
    s.add_argument("--model", default="smollm2-135m",
                   help="base model: alias, HF directory or .gguf file")
    s.add_argument("--output", default="runs/demo",
                   help="directory for the data, runs, adapters, report and plots")
    s.add_argument("--quick", action="store_true", help="fewer steps and examples (~3 min)")
    s.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    s.add_argument("--sequential", action="store_true",
                   help="train the five adapters one after another (default: jointly)")
    s.set_defaults(func=cmd_demo)
    return p


def cmd_plan(args) -> None:
    import json

    from peftkit.plan import format_plan, make_plan
    if args.cpu:
        return cmd_plan_cpu(args)
    plan = make_plan(args.model, args.gpu, args.gpus, args.seq_len, args.batch,
                     args.dataset_tokens, args.epochs, args.tenants, args.budget_days,
                     args.price_per_gpu_hour, args.rank, args.adam_8bit,
                     not args.no_grad_checkpointing,
                     profile={"task_kind": args.task_kind, "quality": args.quality,
                              "budget": args.budget, "domain": args.domain,
                              "new_language": args.new_language, "icl_enough": args.icl_enough},
                     strategy=args.strategy, gpu_memory=args.gpu_memory)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))


def cmd_plan_cpu(args) -> None:
    import json

    from peftkit.plan.cpu import cpu_plan, format_cpu_plan
    from peftkit.plan.shapes import shape_for
    from peftkit.train.config import METHODS
    task = "classify" if args.task_kind == "classification" else "causal-lm"
    methods = [m for m in METHODS if task == "causal-lm" or m not in ("prompt", "prefix")]
    plan = cpu_plan(shape_for(args.model), methods, args.batch, args.seq_len or 256, args.rank,
                    task)
    print(json.dumps(plan, indent=2) if args.json else format_cpu_plan(plan, args.model))


def cmd_serve(args) -> None:
    import uvicorn

    from peftkit.serve.app import create_app
    from peftkit.serve.config import ServeConfig
    from peftkit.serve.server import Server
    cfg = config_from_args(ServeConfig, args)
    server = Server(cfg).start()
    what = "classifiers (POST /v1/classify)" if cfg.task == "classify" else "adapters"
    print(f"peftkit: serving {args.base} + {what} from {args.adapters} on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    try:  # SIGTERM: stop accepting, let running requests finish (bounded), then exit
        uvicorn.run(create_app(server), host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=10)
    finally:
        server.stop()


def cmd_gateway(args) -> None:
    import uvicorn

    from peftkit.serve.config import GatewayConfig
    from peftkit.serve.gateway import Gateway, create_gateway_app
    cfg = config_from_args(GatewayConfig, args)
    gateway = Gateway(cfg)
    gateway.preflight(listen=(args.host, args.port))
    app = create_gateway_app(gateway)
    print(f"peftkit: gateway over {len(cfg.backends)} backends on "
          f"http://{args.host}:{args.port}/v1", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                timeout_graceful_shutdown=10)


def cmd_models(args) -> None:
    from peftkit.models import list_models
    for m in list_models():
        state = "cached" if m["cached"] else "fetched on first use"
        print(f"{m['name']:<14} {m['task']:<10} {m['description']} [{state}]")


def cmd_generate(args) -> None:
    from peftkit.generation import generate_text
    from peftkit.train.run_dir import load_run, recorded_base
    device, dtype, attn = placement(args)
    run = load_run(args.model or recorded_base(args.adapter), args.adapter, device, dtype, attn)
    if run.task != "causal-lm":
        from peftkit.errors import PeftkitError
        raise PeftkitError(f"{args.adapter}: a classifier; use `peftkit eval`")
    print(generate_text(run.base, args.prompt, args.max_new_tokens, raw=args.raw,
                        model=run.module, head=run.head))


def cmd_eval(args) -> None:
    import json

    from peftkit.data.records import load_dataset, report_skipped
    from peftkit.train.evaluate import evaluate_file
    from peftkit.train.run_dir import load_run, recorded_base
    ds = load_dataset(args.data, args.text_field, args.label_field, args.skip_invalid)
    report_skipped(ds)
    if ds.kind == "classification" and not args.adapter:  # before any model loads
        raise PeftkitError(f"{args.data}: text+label records need a trained classifier "
                           "(--adapter RUN); a base has no head for these labels")
    run = load_run(args.model or recorded_base(args.adapter), args.adapter, *placement(args))
    metrics = evaluate_file(run, ds, args.max_length, args.batch_size, args.exact_match_max)
    if metrics.get("scored_tokens") == 0:
        raise PeftkitError(f"{args.data}: no answer token left to score at --max-length "
                           f"{args.max_length} (every example cut before its answer); raise it")
    if ds.skipped:
        metrics["skipped_records"] = ds.skipped
    print(json.dumps(metrics, indent=2))


def cmd_compare(args) -> None:
    from peftkit.train.compare import compare
    placement(args)  # a bad flag fails before any run starts
    where = ["--device", args.device, "--dtype", args.dtype, "--attn", args.attn]
    compare(args.model, args.data, args.methods.split(","), args.output,
            extra=where + (args.extra or []))


def cmd_inspect(args) -> None:
    import json

    from peftkit.inspect_model import format_inspection, inspect_model
    report = inspect_model(args.model)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))


def cmd_demo(args) -> None:
    from peftkit.demo import DemoConfig, run_demo
    from peftkit.device import resolve_device
    resolve_device(args.device)  # a bad --device fails before any work
    run_demo(DemoConfig(model=args.model, output=args.output, quick=args.quick,
                        device=args.device, sequential=args.sequential))


if __name__ == "__main__":
    sys.exit(main())
