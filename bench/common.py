"""Shared benchmark harness: median timings, machine description, results to docs/."""

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parents[1] / "docs"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads")


def median_time(fn, repeats: int = 5, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def write_results(name: str, title: str, rows: list[tuple[str, str, str]], raw: dict) -> None:
    """rows: (measure, value, goal). Writes docs/bench-<name>.md and .json."""
    DOCS.mkdir(exist_ok=True)
    raw = {"machine": machine(), "date": time.strftime("%Y-%m-%d"), **raw}
    (DOCS / f"bench-{name}.json").write_text(json.dumps(raw, indent=2) + "\n")
    lines = [f"# {title}", "", f"Machine: {raw['machine']}. Date: {raw['date']}.",
             f"Command: `make bench` (or `python -m bench.{name}`).", "",
             "| measure | value | goal |", "| --- | --- | --- |"]
    lines += [f"| {m} | {v} | {g} |" for m, v, g in rows]
    (DOCS / f"bench-{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
