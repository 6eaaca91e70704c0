"""What CI checks after `make demo` (and a user may run too): the main job's output holds what
the README promises. `python -m peftkit.demo.check runs/demo` exits 1 naming each shortfall."""

import json
import sys
from pathlib import Path

from peftkit.demo.report import PLOTS

OWN_ADAPTER_MIN = 0.9  # held-out exact match each customer's own adapter must reach


def shortfalls(out: Path) -> list[str]:
    """Every way the demo's output in `out` falls short; empty when it holds."""
    result_file = out / "demo_result.json"
    missing = [f"{out / name}: missing or empty" for name in ("demo_report.md", *PLOTS)
               if not (out / name).is_file() or (out / name).stat().st_size == 0]
    if not result_file.is_file():
        return missing + [f"{result_file}: missing (the demo did not finish)"]
    try:
        result = json.loads(result_file.read_text())
        accuracy, served = result["accuracy"], result["served"]
    except (ValueError, KeyError, TypeError) as e:
        return missing + [f"{result_file}: unreadable ({type(e).__name__}: {e})"]
    if not accuracy:
        missing.append(f"{result_file}: no customer evaluated")
    for customer, acc in accuracy.items():
        if acc.get("adapter", 0.0) < OWN_ADAPTER_MIN:
            missing.append(f"{customer}: own adapter {acc.get('adapter', 0.0):.0%} held-out "
                           f"exact match (needs >= {OWN_ADAPTER_MIN:.0%})")
    if served.get("total", 0) == 0 or served.get("correct") != served.get("total"):
        missing.append(f"served over HTTP: {served.get('correct')}/{served.get('total')} "
                       "answers correct (needs all)")
    if served.get("foreign", 1) != 0:
        missing.append(f"served over HTTP: {served.get('foreign')} answers in another "
                       "customer's format (needs 0)")
    return missing


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "runs/demo")
    problems = shortfalls(out)
    for line in problems:
        print(f"demo check: {line}", file=sys.stderr)
    if not problems:
        print(f"demo check: {out}: report, plots, every own adapter >= {OWN_ADAPTER_MIN:.0%}, "
              "every served answer correct and in its own customer's format")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
