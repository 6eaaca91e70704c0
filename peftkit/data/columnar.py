"""Rows of the containers users bring besides JSONL/CSV: a JSON array (.json), Parquet,
Arrow (IPC file or stream) and directories written by Hugging Face datasets' `save_to_disk`
(a Dataset, or a DatasetDict whose `train` split is read). Each row comes out as the same kind
of object a JSONL line holds, numbered for `FILE:LINE` (JSON) or `FILE:row N` errors.

Parquet and Arrow are read with pyarrow, imported only for them (`pip install pyarrow`).
"""

import json
from pathlib import Path

from peftkit.errors import PeftkitError

COLUMNAR = (".parquet", ".arrow")


def is_hf_dataset_dir(path: Path) -> bool:
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def json_array_objects(path: Path, text: str, invalid):
    """(line, object or invalid(reason)) per element of a JSON array, each at the line where
    it starts; a syntax error ends the file at its own line (nothing after it can be read)."""
    decoder = json.JSONDecoder()
    i, line, counted = _skip(text, text.index("[") + 1), 1, 0
    while i < len(text) and text[i] != "]":
        line += text.count("\n", counted, i)
        counted = i
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError as e:
            yield line + text.count("\n", i, e.pos), invalid(f"invalid JSON ({e.msg})")
            return
        except (RecursionError, ValueError) as e:
            yield line, invalid(f"invalid JSON ({str(e)[:80] or 'nested too deeply'})")
            return
        yield line, obj
        i = _skip(text, end)
        if i < len(text) and text[i] == ",":
            i = _skip(text, i + 1)
        elif i < len(text) and text[i] != "]":
            yield line + text.count("\n", counted, i), invalid("invalid JSON (expected ',' "
                                                               "or ']' after an element)")
            return


def _skip(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t\r\n":
        i += 1
    return i


def table_objects(path: Path):
    """(row number, dict) per row of a Parquet or Arrow file, or of a save_to_disk directory;
    columns that are null in a row are left out of it (an Alpaca row without `input`)."""
    pa = _pyarrow(path)
    for i, row in enumerate(_rows(pa, path), start=1):
        yield i, {k: v for k, v in row.items() if v is not None}


def _rows(pa, path: Path):
    for source in _arrow_sources(path):
        try:
            if source.suffix.lower() == ".parquet":
                import pyarrow.parquet as pq
                batches = pq.ParquetFile(source).iter_batches()
            else:
                batches = _ipc_batches(pa, source)
            for batch in batches:
                yield from batch.to_pylist()
        except (pa.ArrowException, OSError) as e:
            kind = "Parquet" if source.suffix.lower() == ".parquet" else "Arrow"
            raise PeftkitError(f"{source}: unreadable {kind} file "
                               f"({str(e).splitlines()[0][:120]})") from None


def _ipc_batches(pa, source: Path):
    import pyarrow.ipc as ipc
    try:
        reader = ipc.open_file(source)  # the IPC file format (random access)
    except pa.ArrowInvalid:
        reader = None
    if reader is not None:
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)
        return
    with ipc.open_stream(source) as reader:  # the stream format datasets' save_to_disk writes
        yield from reader


def _arrow_sources(path: Path) -> list[Path]:
    """The files holding a path's rows: itself, or a save_to_disk directory's data files
    (a DatasetDict: its train split)."""
    if not path.is_dir():
        return [path]
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits") or []
        if "train" not in splits:
            raise PeftkitError(f"{path}: a DatasetDict without a 'train' split (splits: "
                               f"{', '.join(map(str, splits)) or 'none'}); give the split's "
                               "directory")
        path = path / "train"
    files = _json(path / "state.json").get("_data_files")
    if not isinstance(files, list) or not files or not all(
            isinstance(f, dict) and isinstance(f.get("filename"), str) for f in files):
        raise PeftkitError(f"{path / 'state.json'}: no '_data_files' list of filenames "
                           "(not a datasets save_to_disk directory?)")
    sources = [path / f["filename"] for f in files]
    for source in sources:
        if source.parent != path or not source.is_file():
            raise PeftkitError(f"{path / 'state.json'}: data file {source.name} is not in "
                               f"{path}")
    return sources


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PeftkitError(f"{path}: unreadable ({str(e)[:80]})") from None
    if not isinstance(value, dict):
        raise PeftkitError(f"{path}: expected a JSON object")
    return value


def _pyarrow(path: Path):
    try:
        import pyarrow
    except ImportError:
        raise PeftkitError(f"{path}: Parquet and Arrow data are read with pyarrow, which is not "
                           "installed (pip install pyarrow)") from None
    return pyarrow
