"""Dataset files -> validated records, with every bad record reported as `FILE:LINE: reason`.

Formats users already have:
  JSONL  {"messages": [{"role", "content"}, ...]}   OpenAI chat fine-tuning
         {"instruction", "input"?, "output"}          Alpaca (-> a user and an assistant turn)
         {"conversations": [{"from", "value"}, ...]} ShareGPT (-> chat turns)
         {"prompt": ..., "completion": ...}          prompt/completion
         {"text": ...}                               plain text
         {"text": ..., "label": ...}                 classification (label: int or string)
  The same objects as a JSON array (.json), or as the rows of a Parquet or Arrow file or a
  Hugging Face datasets `save_to_disk` directory (data/columnar.py; errors say FILE:row N).
  CSV/TSV with a header row: a text column and, for classification, a label column.
Field names for text and label are configurable. One file holds one kind of record.

Any bytes are read without a traceback or a hang: invalid UTF-8 and lone surrogates are
reported at their line (never replaced), a UTF-8 BOM is skipped, nesting too deep for the JSON
parser, CSV fields of any length and CSV syntax errors each become `FILE:LINE: reason`.
"""

import csv
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from peftkit.data.columnar import COLUMNAR, is_hf_dataset_dir, json_array_objects, table_objects
from peftkit.errors import DataError, PeftkitError

SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".arrow")

ROLES = ("system", "user", "assistant")
# Integer labels are class ids only below this; beyond, they are names (a stray 99999999999
# must not ask for a head of 10^11 classes).
MAX_CLASS_ID = 10_000
# A record (a JSONL line, a CSV field) past this many MB is reported, never read into memory
# whole: one 200 MB line once took 5 GB and aborted `data check`. (The csv module's own default,
# 131,072 characters, would reject ordinary long texts.)
MAX_RECORD_MB = 16.0
# Bytes that are not UTF-8 arrive as U+DC80..U+DCFF under errors="surrogateescape".
_BAD_BYTE = re.compile("[\udc80-\udcff]")
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass
class Record:
    kind: str
    line: int
    messages: list[dict] | None = None
    prompt: str | None = None
    completion: str | None = None
    text: str | None = None
    label: str | None = None


@dataclass
class Dataset:
    path: Path
    kind: str
    records: list[Record]
    container: str = "jsonl"  # jsonl, json, csv, tsv, parquet, arrow, datasets directory
    skipped: int = 0
    label_names: list[str] = field(default_factory=list)  # index = label id
    problems: list[str] = field(default_factory=list)  # `FILE:LINE: reason` of each skipped
    _ids: dict = field(default_factory=dict, repr=False, compare=False)

    def label_id(self, record: Record) -> int:
        names = self.label_names  # a dict, not list.index: K can be 10^5
        if self._ids.get(None) is not names:  # built for this list (it may be reassigned)
            self._ids = {None: names, **{name: i for i, name in enumerate(names)}}
        return self._ids[record.label]


class _Invalid(Exception):
    """A reason why one record is invalid; becomes `FILE:LINE: reason`."""


def load_dataset(path: str | Path, text_field: str = "text", label_field: str = "label",
                 skip_invalid: bool = False, max_errors: int = 20,
                 max_record_mb: float = MAX_RECORD_MB) -> Dataset:
    """Parse and validate a dataset file. Raises DataError listing the bad records unless
    `skip_invalid`, in which case they are dropped and counted in `Dataset.skipped`."""
    if not max_record_mb > 0:
        raise PeftkitError(f"--max-record-mb: must be > 0, got {max_record_mb}")
    limit = int(max_record_mb * 2**20)
    path = Path(path)
    suffix = path.suffix.lower()
    where = str  # how a record's place is written after FILE: a line number, or "row N"
    if path.is_dir():
        if not is_hf_dataset_dir(path):
            raise PeftkitError(f"{path}: is a directory; give a {', '.join(SUFFIXES)} file or "
                               "a datasets save_to_disk directory")
        container = "datasets directory"
    elif not path.is_file():
        raise PeftkitError(f"dataset not found: {path}")
    elif suffix not in SUFFIXES:
        raise PeftkitError(f"{path}: unknown dataset format '{suffix}' (use "
                           f"{', '.join(SUFFIXES)}, or a datasets save_to_disk directory)")
    else:
        container = suffix[1:]
    if path.is_dir() or suffix in COLUMNAR:
        rows = ((n, _catch(_record_from_object, obj, n, text_field, label_field))
                for n, obj in table_objects(path))
        where = "row {}".format
    elif suffix == ".json" and _starts_array(path):
        container = "json array"
        rows = _json_array_rows(path, text_field, label_field, limit)
    elif suffix in (".jsonl", ".json"):
        rows = _jsonl_rows(path, text_field, label_field, limit)
    else:
        rows = _table_rows(path, text_field, label_field, "\t" if suffix == ".tsv" else ",",
                           limit)

    records, problems, kind = [], [], None
    for line, parsed in rows:
        if isinstance(parsed, _Invalid):
            problems.append(f"{path}:{where(line)}: {parsed}")
            continue
        if kind is None:
            kind = parsed.kind
        elif parsed.kind != kind:
            problems.append(f"{path}:{where(line)}: a {parsed.kind} record, but this file's "
                            f"records are {kind} (one kind per file)")
            continue
        records.append(parsed)
    if problems and not skip_invalid:
        raise DataError(problems, limit=max_errors)
    if not records:
        raise PeftkitError(f"{path}: no valid records")
    labels = _label_names(records) if kind == "classification" else []
    return Dataset(path, kind, records, container, skipped=len(problems), label_names=labels,
                   problems=problems)


def report_skipped(ds: Dataset, shown: int = 20, out=None) -> None:
    """--skip-invalid's promise: every dropped record said as FILE:LINE (the first `shown`),
    and how many, on stderr."""
    import sys
    out = out or sys.stderr
    for line in ds.problems[:shown]:
        print(f"skipped {line}", file=out)
    if ds.skipped:
        more = f" ({ds.skipped - shown} more not shown)" if ds.skipped > shown else ""
        print(f"{ds.path}: {ds.skipped} invalid records skipped{more}", file=out)


def _open(path: Path, newline: str):
    """Text with undecodable bytes kept visible (as surrogates) so they are reported, not
    silently replaced; a leading BOM dropped."""
    return open(path, encoding="utf-8-sig", errors="surrogateescape", newline=newline)


def _lines(path: Path, limit: int):
    """(line number, text or _Invalid) per line (ending at \n only, as `wc -l` counts them); a
    line over `limit` bytes is skipped in chunks, never held, and reported with its size."""
    with open(path, "rb") as fh:
        line_no = 0
        while raw := fh.readline(limit + 1):
            line_no += 1
            if len(raw) > limit and not raw.endswith(b"\n"):
                size = len(raw)
                while (chunk := fh.readline(1 << 20)) and not chunk.endswith(b"\n"):
                    size += len(chunk)
                size += len(chunk)
                yield line_no, _Invalid(f"record of {size / 2**20:.1f} MB exceeds "
                                        f"--max-record-mb {limit / 2**20:g}")
                continue
            if line_no == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            yield line_no, raw.decode("utf-8", "surrogateescape")


def _jsonl_rows(path: Path, text_field: str, label_field: str, limit: int):
    for line_no, line in _lines(path, limit):
        if isinstance(line, _Invalid):
            yield line_no, line
            continue
        if not line.strip():
            continue
        bad = _BAD_BYTE.search(line)
        if bad:
            yield line_no, _Invalid(f"invalid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x} at "
                                    f"column {bad.start() + 1})")
            continue
        try:
            obj = json.loads(line.rstrip("\r\n"))
        except json.JSONDecodeError as e:
            yield line_no, _Invalid(f"invalid JSON ({e.msg} at column {e.colno})")
            continue
        except RecursionError:
            yield line_no, _Invalid("invalid JSON (nested too deeply)")
            continue
        except ValueError as e:  # an integer literal past Python's digit limit
            yield line_no, _Invalid(f"invalid JSON ({str(e)[:80]})")
            continue
        yield line_no, _catch(_record_from_object, obj, line_no, text_field, label_field)


def _starts_array(path: Path) -> bool:
    """A .json file holding one JSON array (Alpaca's own files) rather than JSON lines."""
    with open(path, "rb") as fh:
        head = fh.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _json_array_rows(path: Path, text_field: str, label_field: str, limit: int):
    if path.stat().st_size > max(limit, 1) * 64:
        yield 1, _Invalid(f"a JSON array of {path.stat().st_size / 2**20:.0f} MB is read whole; "
                          "over 64 x --max-record-mb (write it as JSON lines)")
        return
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", "surrogateescape")
    for line, obj in json_array_objects(path, text, _Invalid):
        if isinstance(obj, _Invalid):
            yield line, obj
            continue
        yield line, _catch(_record_from_object, obj, line, text_field, label_field)


def _table_rows(path: Path, text_field: str, label_field: str, delimiter: str, limit: int):
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    csv.field_size_limit(limit)  # a longer field is a csv.Error, reported at its line
    with _open(path, "") as fh:  # the csv module reads the line ends itself
        reader = csv.reader(fh, delimiter=delimiter, quoting=quoting)
        try:
            header = next(reader, None)
        except csv.Error as e:
            yield 1, _Invalid(f"unreadable header ({e})")
            return
        if header is None:
            return
        bad = next((h for h in header if _BAD_BYTE.search(h)), None)
        if bad is not None or text_field not in header:
            shown = ", ".join(h.encode("utf-8", "replace").decode()[:40] for h in header[:20])
            why = "invalid UTF-8 in the header" if bad is not None else f"header has no " \
                f"'{text_field}' column"
            yield 1, _Invalid(f"{why} (columns: {shown})")
            return
        ti = header.index(text_field)
        li = header.index(label_field) if label_field in header else None
        start = reader.line_num + 1
        while True:
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:  # the reader resumes at the next line
                line_no, start = start, reader.line_num + 1
                yield line_no, _Invalid(
                    f"a field exceeds --max-record-mb {limit / 2**20:g}" if "field limit" in
                    str(e) else f"CSV syntax: {e}")
                continue
            line_no, start = start, reader.line_num + 1
            if not row:
                continue
            if len(row) != len(header):
                yield line_no, _Invalid(f"expected {len(header)} fields, got {len(row)}")
                continue
            obj = {text_field: row[ti]}
            if li is not None:
                obj[label_field] = row[li] if row[li] != "" else None
            yield line_no, _catch(_record_from_object, obj, line_no, text_field, label_field)


def _catch(fn, *args):
    try:
        return fn(*args)
    except _Invalid as e:
        return e


def _record_from_object(obj, line: int, text_field: str, label_field: str) -> Record:
    if not isinstance(obj, dict):
        raise _Invalid(f"expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Record("chat", line, messages=_messages(obj["messages"]))
    if "conversations" in obj:  # ShareGPT
        return Record("chat", line, messages=_messages(_sharegpt(obj)))
    if "instruction" in obj and "output" in obj:  # Alpaca
        return Record("chat", line, messages=_messages(_alpaca(obj)))
    if "prompt" in obj or "completion" in obj:
        prompt = _string(obj, "prompt", allow_empty=True)
        return Record("prompt_completion", line, prompt=prompt,
                      completion=_string(obj, "completion"))
    if label_field in obj:
        label = obj[label_field]
        if label is None or label == "":
            raise _Invalid(f"label missing (field '{label_field}' is empty)")
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            raise _Invalid(f"field '{label_field}' must be a string or integer, "
                           f"got {type(label).__name__}")
        if isinstance(label, int) and label < 0:
            raise _Invalid(f"field '{label_field}': {label} is negative; class ids start at 0")
        label = str(label) if isinstance(label, int) else _valid_text(label, label_field)
        return Record("classification", line, text=_string(obj, text_field), label=label)
    if text_field in obj:
        return Record("text", line, text=_string(obj, text_field))
    raise _Invalid(f"no known fields (expected 'messages', 'conversations', 'instruction'+"
                   f"'output', 'prompt'+'completion', '{text_field}' or "
                   f"'{text_field}'+'{label_field}'); got {sorted(obj)[:8]}")


def _alpaca(obj: dict) -> list[dict]:
    """Alpaca's instruction (and input, after a blank line) as the user's turn, its output as
    the assistant's (as LLaMA-Factory and axolotl render it); `system` when present."""
    instruction = _string(obj, "instruction")
    extra = _string(obj, "input", allow_empty=True) if obj.get("input") is not None else ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    system = [{"role": "system", "content": _string(obj, "system", allow_empty=True)}] \
        if obj.get("system") else []
    return system + [{"role": "user", "content": user},
                     {"role": "assistant", "content": _string(obj, "output")}]


SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}


def _sharegpt(obj: dict) -> list[dict]:
    turns = obj["conversations"]
    if not isinstance(turns, list) or not turns:
        raise _Invalid("field 'conversations' must be a non-empty list")
    out = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) \
        and obj["system"].strip() else []
    for i, turn in enumerate(turns):
        where = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise _Invalid(f"{where} must be an object, got {type(turn).__name__}")
        role = SHAREGPT_ROLES.get(turn.get("from"))
        if role is None:
            raise _Invalid(f"{where}.from: unknown speaker {turn.get('from')!r} (expected one "
                           f"of {', '.join(SHAREGPT_ROLES)})")
        out.append({"role": role, "content": turn.get("value")})
    return out


def _string(obj: dict, key: str, allow_empty: bool = False) -> str:
    if key not in obj:
        raise _Invalid(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise _Invalid(f"field '{key}' must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise _Invalid(f"field '{key}' is empty")
    return _valid_text(value, key)


def _valid_text(value: str, key: str) -> str:
    """Strings that tokenizers can encode: no undecodable bytes, no lone surrogates."""
    bad = _SURROGATE.search(value)
    if bad is None:
        return value
    code = ord(bad.group())
    if 0xDC80 <= code <= 0xDCFF:
        raise _Invalid(f"field '{key}': invalid UTF-8 (byte 0x{code - 0xDC00:02x})")
    raise _Invalid(f"field '{key}': lone surrogate \\u{code:04x} (not valid Unicode)")


def _messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise _Invalid("field 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _Invalid(f"{where} must be an object, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise _Invalid(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str):
            raise _Invalid(f"{where}.content must be a string, got {type(content).__name__}")
        _valid_text(content, f"{where}.content")
        if role == "assistant" and not content.strip():
            raise _Invalid(f"{where}.content: empty assistant message")
        out.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in out):
        raise _Invalid("no assistant message to learn from")
    return out


def _label_names(records: list[Record]) -> list[str]:
    """Integer labels below MAX_CLASS_ID keep their value as id (ids 0..max, so a class absent
    from a sample keeps its number); any other labels are numbered in sorted order. Only ASCII
    digits count as integers: "²" and "٣" are names."""
    labels = {r.label for r in records}
    numeric = all(lab.isascii() and lab.isdigit() and (lab == "0" or lab[0] != "0")
                  for lab in labels)  # canonical non-negative integers
    if numeric and all(len(lab) < len(str(MAX_CLASS_ID)) for lab in labels):
        return [str(i) for i in range(max(int(lab) for lab in labels) + 1)]
    return sorted(labels, key=lambda lab: (len(lab), lab) if numeric else (0, lab))
