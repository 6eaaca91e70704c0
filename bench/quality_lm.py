"""bench/quality.py part (b): a causal LM far from its pretraining data, and (c) its rank sweep.

Corpus: the Coq standard library (Debian package libcoq-stdlib, 8.16.1: 583 `.v` files of Gallina
and Ltac, 6.7 MB), a proof language SmolLM2's code data barely covers. Split by file (a file's
SHA-1 decides: 1 in 10 held out), so no held-out proof was seen in training. The choice is
justified by measurement: the base's held-out perplexity on it against its perplexity on
ordinary English of similar length (paragraphs of Python's reference documentation), both in
docs/results.md.

Metrics: held-out perplexity (every token of 64 held-out chunks) and exact next-line accuracy
(the base or adapter shown six lines of a held-out file, greedy, must produce the seventh).
"""

import hashlib
import json
import subprocess
import sys
from pathlib import Path


PACKAGE, VERSION = "libcoq-stdlib", "8.16.1+dfsg-1+b2"
CORPUS_BYTES = 1_500_000  # training text offered (of ~6 MB); the step budget uses a part of it
CHUNK_LINES, CONTEXT_LINES = 10, 6
HELD_OUT_CHUNKS, NEXT_LINE_EXAMPLES = 64, 40

# (name, method, flags): (b)'s methods; (c) adds the other ranks. A short budget (40 steps of
# 4 x 128 tokens on this CPU), so each method's learning rate is at the high end of its usual
# range: full FT 1e-4, LoRA 1e-3 (about 10x full FT's, Hu et al. 2021 / Biderman et al. 2024).
LM_RUNS = [
    ("full", "full", "--lr 1e-4"),
    ("lora-r8", "lora", "--rank 8 --alpha 16 --lr 1e-3"),
    ("lora-r32", "lora", "--rank 32 --alpha 64 --lr 1e-3"),
    ("lora-r64", "lora", "--rank 64 --alpha 128 --lr 1e-3"),
    ("qlora-r32", "qlora", "--rank 32 --alpha 64 --lr 1e-3"),
    ("prompt", "prompt", "--lr 3e-1 --num-virtual-tokens 20"),
    ("probe", "probe", "--lr 1e-3"),
]
# (c) on (b): every rank of the sweep, alpha = 2r (r = 8/32/64 are (b)'s own rows)
COQ_SWEEP_RANKS = (1, 2, 4, 8, 16, 32, 64)
COMMON = "--batch-size 4 --max-length 128 --steps 40 --seed 0 --dropout 0.0"


def corpus(root: Path) -> Path:
    """The package's .v files, downloaded once with apt (Debian's registry)."""
    src = root / "coq"
    if not src.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        subprocess.run(["apt-get", "download", f"{PACKAGE}={VERSION}"], cwd=root, check=True)
        deb = next(root.glob(f"{PACKAGE}_*.deb"))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(src)], check=True)
    return src


def held_out(path: Path) -> bool:
    return hashlib.sha1(path.name.encode()).digest()[0] % 10 == 0


def write_data(root: Path) -> dict[str, Path]:
    """train.jsonl (text chunks up to CORPUS_BYTES), heldout.jsonl (text chunks), nextline.jsonl
    (prompt: six lines, completion: the next non-blank line), english.jsonl (reference prose)."""
    files = sorted(corpus(root).rglob("*.v"))
    chunks = {"train": [], "heldout": []}
    nextline, used = [], 0
    for f in files:
        lines = _without_banner(f.read_text(encoding="utf-8", errors="replace").splitlines())
        part = "heldout" if held_out(f) else "train"
        for i in range(0, len(lines), CHUNK_LINES):
            text = "\n".join(lines[i:i + CHUNK_LINES]).strip()
            if text and (part == "heldout" or used < CORPUS_BYTES):
                chunks[part].append(text)
                used += len(text) if part == "train" else 0
        if part == "heldout":
            for i in range(CONTEXT_LINES, len(lines), 37):  # spread over the file
                want = lines[i].strip()
                if len(want) > 8:
                    nextline.append({"prompt": "\n".join(lines[i - CONTEXT_LINES:i]) + "\n",
                                     "completion": want})
    paths = {name: root / f"{name}.jsonl" for name in ("train", "heldout", "nextline", "english")}
    _jsonl(paths["train"], [{"text": t} for t in chunks["train"]])
    _jsonl(paths["heldout"], [{"text": t} for t in _spread(chunks["heldout"], HELD_OUT_CHUNKS)])
    _jsonl(paths["nextline"], _spread(nextline, NEXT_LINE_EXAMPLES))
    _jsonl(paths["english"], [{"text": t} for t in _spread(english(), HELD_OUT_CHUNKS)])
    return paths


def english() -> list[str]:
    """Ordinary (technical) English prose of a length like the Coq chunks: the paragraphs of
    Python's own reference documentation (pydoc_data, in every Python), without its code
    samples and grammar rules."""
    import pydoc_data.topics
    out = []
    for text in pydoc_data.topics.topics.values():
        for para in text.split("\n\n"):
            lines = para.splitlines()
            if (len(para) >= 200 and not any(line[:1].isspace() for line in lines)
                    and "::=" not in para and "***" not in para and "===" not in para):
                out.append(" ".join(lines))
    return out


def _without_banner(lines: list[str]) -> list[str]:
    """Every file opens with the same licence box of one-line comments: identical text in
    training and held-out files would measure memory, not Coq."""
    i = 0
    while i < len(lines) and (not lines[i].strip() or
                              lines[i].startswith("(*") and lines[i].rstrip().endswith("*)")):
        i += 1
    return lines[i:]


def _spread(items: list, n: int) -> list:
    """n items evenly over the list (over every held-out file, not the first few)."""
    return items[::max(1, len(items) // n)][:n]


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def evaluate(model: str, adapter: Path | None, data: Path) -> dict:
    cmd = [sys.executable, "-m", "peftkit", "eval", "--model", model, "--data", str(data),
           "--max-length", "128", "--exact-match-max", str(NEXT_LINE_EXAMPLES)]
    if adapter is not None:
        cmd += ["--adapter", str(adapter)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])
