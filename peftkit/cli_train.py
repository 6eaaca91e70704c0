"""`peftkit train`: its flags (every TrainConfig field), the run, and the torchrun launcher
that `--nproc N` hands it to."""

import sys

from peftkit.cli_flags import add_config_flags
from peftkit.errors import PeftkitError


def add_train_parser(sub) -> None:
    """`peftkit train`: every TrainConfig field as an option (default None = config/dataclass)."""
    from peftkit.train.config import CHOICES, CLASSIFY_LR, DEFAULT_LR, METHODS, TrainConfig
    s = sub.add_parser("train", help="train with any method: " + ", ".join(METHODS))
    s.add_argument("--config", help="YAML or TOML file of options; flags given here override it")
    s.add_argument("--tenants", help="YAML: shared options + a list of tenants, each with its "
                                     "own data and output; their LoRA adapters train jointly "
                                     "in one batched pass over one base (peftkit.train.joint)")
    add_config_flags(s, TrainConfig, CHOICES, config_defaults=False, help_for={
        "lr": "peak learning rate; 0 = the method's default for the task: " + ", ".join(
            f"{m} {DEFAULT_LR[m]:g}" for m in METHODS) + "; classification: " + ", ".join(
            f"{m} {v:g}" for m, v in CLASSIFY_LR.items() if v != DEFAULT_LR[m])})
    s.set_defaults(func=cmd_train)


def cmd_train(args) -> int:
    import os

    from peftkit.train import TrainingInterrupted, load_config, train
    if args.tenants:
        from peftkit.train.joint import train_joint
        try:
            result = train_joint(args.tenants)
        except TrainingInterrupted as e:
            print(f"peftkit: {e}", file=sys.stderr)
            return 130
        for name, r in result["reports"].items():
            print(f"{name}: {len(r['train_losses'])} steps, loss {r['train_losses'][0]:.4g} -> "
                  f"{r['train_losses'][-1]:.4g}; {r['paths']['adapter']}")
        summary = result["summary"]
        print(f"joint: {summary['wall_seconds']:.1f} s for {len(result['reports'])} tenants; "
              f"the planner puts them one after another at "
              f"{summary['planner']['sequential_seconds']:.1f} s "
              f"(x{summary['planner']['speedup']:.2f})")
        return 0
    overrides = {k: v for k, v in vars(args).items()
                 if k not in ("func", "config", "argv", "tenants")}
    cfg = load_config(args.config, overrides)
    if cfg.nproc > 1 and "LOCAL_RANK" not in os.environ:
        check_world(cfg)
        return launch(cfg.nproc, args.argv)
    try:
        report = train(cfg)
    except TrainingInterrupted as e:
        print(f"peftkit: {e}", file=sys.stderr)
        return 130
    if report is None:  # a distributed run's other ranks: rank 0 reports
        return 0
    metrics = ", ".join(f"{k}={v:.4g}" for k, v in report["metrics"].items()
                        if isinstance(v, float))
    print(f"{cfg.method}: {report['trainable_params']:,d} trainable params "
          f"({report['trainable_percent']:.3f}%), {report['wall_seconds']:.1f} s; {metrics}")
    if report.get("best") and report.get("kept") == "best":
        b = report["best"]
        print(f"saved the best evaluation: step {b['step']} ({b['metric']} {b['value']:.4g})"
              + (f"; {report['stopped']}" if report.get("stopped") else ""))
    print(f"outputs: {', '.join(report['paths'].values())}")
    return 0


def check_world(cfg) -> None:
    """What would fail on every rank at once is said once, before any process starts."""
    n = len(cfg.load_data(cfg.data).records)
    held_out = 0 if cfg.val_data or not cfg.val_split else max(1, round(n * cfg.val_split))
    if n - held_out < cfg.nproc:
        raise PeftkitError(f"{cfg.data}: {n - held_out} training examples cannot be split over "
                           f"--nproc {cfg.nproc} processes")


def launch(nproc: int, argv: list[str]) -> int:
    """`peftkit train --nproc N ...` is exactly this torchrun command (printed first)."""
    import shlex
    import subprocess

    for i, a in enumerate(argv):  # drop --nproc N / --nproc=N: the ranks are the N
        if a == "--nproc":
            argv = argv[:i] + argv[i + 2:]
            break
        if a.startswith("--nproc="):
            argv = argv[:i] + argv[i + 1:]
            break
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "peftkit", *argv]
    print("peftkit: running " + shlex.join(["torchrun", *cmd[3:]]), file=sys.stderr)
    return subprocess.run(cmd).returncode
