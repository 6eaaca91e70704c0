"""SST-2 (GLUE, Socher et al. 2013), the project's real-data check (the quality tests and
bench/quality.py): seeded, label-balanced training slices and the dev set of GLUE's TSV files,
written as JSONL for `peftkit train`. Read from $PEFTKIT_SST2, else ../shared/data/sst2 beside
the checkout; the files stay where they are (the data set is not ours to copy), and callers skip
with this module's message when they are absent."""

import json
import os
import random
from pathlib import Path

SST2 = Path(os.environ.get("PEFTKIT_SST2")
            or Path(__file__).resolve().parents[3] / "shared" / "data" / "sst2")
LABELS = {"0": "negative", "1": "positive"}
MISSING = f"SST-2 not found at {SST2} (only on machines with ../shared/data)"


def available() -> bool:
    return (SST2 / "train.tsv").is_file() and (SST2 / "dev.tsv").is_file()


def _rows(name: str) -> list[tuple[str, str]]:
    lines = (SST2 / name).read_text(encoding="utf-8").splitlines()[1:]
    return [tuple(line.split("\t", 1)) for line in lines]


def write_split(out: Path, n_train: int, seed: int = 0, n_dev: int | None = None) -> tuple[Path, Path]:
    """(train.jsonl, dev.jsonl) under `out`: n_train training rows, half of each label, drawn
    with `seed`; the first n_dev dev rows (all 872 when None). Labels are the words, so a
    classifier's report and a causal LM's answers read the same."""
    rows = _rows("train.tsv")
    rng = random.Random(seed)
    by_label = {lab: [t for l, t in rows if l == lab] for lab in LABELS}
    picked = [(lab, t) for lab in LABELS for t in rng.sample(by_label[lab], n_train // 2)]
    rng.shuffle(picked)
    dev = _rows("dev.tsv")[:n_dev]
    out.mkdir(parents=True, exist_ok=True)
    paths = out / "train.jsonl", out / "dev.jsonl"
    for path, part in zip(paths, (picked, dev)):
        path.write_text("".join(json.dumps({"text": t, "label": LABELS[lab]}) + "\n"
                                for lab, t in part), encoding="utf-8")
    return paths
