"""What peftkit measured for each advisor rule: bench/quality.py (issue 15) writes the findings
of docs/results.md to evidence.json beside this file; `peftkit plan` prints, under the rule that
fired, the lines measured for it. A rule nothing has measured says so."""

import json
from pathlib import Path

PATH = Path(__file__).with_name("evidence.json")

# rule (advisor._rec) -> the findings that test it (bench/quality_report.findings' keys)
RULES = {
    "icl": ["icl-vs-own"],
    "frozen-features": ["probe-vs-full"],
    "large-model-single-gpu": ["qlora-vs-lora", "qlora-vs-full"],
    "large-model": ["qlora-vs-lora", "qlora-vs-full"],
    "per-task-adapters": ["shared-vs-own", "lora-vs-full"],
    "max-quality": ["lora-vs-full", "dora-vs-full"],
    "far-domain-high-rank": ["rank-far-domain", "probe-far-domain"],
    "default-peft": ["lora-vs-full", "dora-vs-full"],
}


def findings() -> dict[str, list[str]]:
    try:
        return json.loads(PATH.read_text())
    except (OSError, ValueError):
        return {}


def for_rule(rule: str) -> list[str]:
    """The measured lines for `rule`, or one line saying it is not measured yet."""
    found = findings()
    lines = [line for key in RULES.get(rule, []) for line in found.get(key, [])]
    return lines or [f"none measured yet (no run of bench/quality.py tests rule '{rule}')"]
