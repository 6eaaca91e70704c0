"""Hardening, data files: any bytes in, no traceback, no hang, no silent acceptance.

Property: for every input, `load_dataset` either returns records that each carry their required
field, or raises PeftkitError whose every line is `FILE:LINE: reason` (or a one-line file-level
reason naming the file). The named cases are the defects found by hand (issue 16).
"""

import json
import time

import pytest
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from peftkit.data import load_dataset, tokenize
from peftkit.data.tokenize import _assistant_spans
from peftkit.errors import DataError, PeftkitError
from peftkit.models import load_base

FIELDS = ["text", "label", "prompt", "completion", "messages", "role", "content"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=5), inner, max_size=4),
    max_leaves=12)
line_bytes = st.one_of(
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=60),  # invalid UTF-8, NUL bytes, anything
    st.sampled_from([b"\xef\xbb\xbf{\"text\": \"bom\"}", b"{\"text\": \"x\"}\r", b"\x00",
                     b"{\"text\": \"\\ud800\"}", b"[" * 2000, b"{\"text\": \"a\", \"label\": 1.5}",
                     b"{\"text\": \"a\", \"label\": \"\xc2\xb2\"}", b"\"a\",\"b\"", b"\t\t"]))


@pytest.fixture(scope="module")
def tok():
    return load_base("tiny-llama").tokenizer


def _check(path, tok=None):
    """The contract, for one file."""
    start = time.perf_counter()
    try:
        ds = load_dataset(path)
    except DataError as e:
        assert e.problems and all(p.startswith(f"{path}:") and p.split(":")[1].isdigit()
                                  for p in e.problems), e.problems[:3]
        return None
    except PeftkitError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return None
    finally:
        assert time.perf_counter() - start < 5
    required = {"chat": "messages", "prompt_completion": "completion", "text": "text",
                "classification": "label"}[ds.kind]
    assert all(getattr(r, required) for r in ds.records)
    for r in ds.records:  # every accepted string can be encoded (no surrogates)
        for value in (r.text, r.prompt, r.completion, r.label):
            if value is not None:
                value.encode("utf-8")
    if tok is not None:
        tokenize(ds, tok, max_length=64)  # accepted records also tokenize
    return ds


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(lines=st.lists(line_bytes, max_size=6), suffix=st.sampled_from([".jsonl", ".csv", ".tsv"]),
       crlf=st.booleans())
def test_any_bytes_get_a_clean_answer(tmp_path_factory, tok, lines, suffix, crlf):
    if suffix != ".jsonl":  # give tables a header most of the time, so rows get parsed
        lines = [b"text,label" if suffix == ".csv" else b"text\tlabel"] + lines
    path = tmp_path_factory.mktemp("fuzz") / f"d{suffix}"
    path.write_bytes((b"\r\n" if crlf else b"\n").join(lines))
    _check(path, tok)


CASES = {  # name -> (file name, bytes, a substring the error must hold, or None if valid)
    "nested_1000": ("a.jsonl", b"[" * 1000 + b"\n", "nested too deeply"),
    "invalid_utf8": ("a.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9", "label": "x"}\n',
                     ":2: invalid UTF-8 (byte 0xe9"),
    "lone_surrogate": ("a.jsonl", b'{"text": "\\ud800 hi"}\n', ":1: field 'text': lone surrogate"),
    "superscript_label": ("a.jsonl", '{"text": "a", "label": "²"}\n{"text": "b", "label": "٣"}\n'
                          .encode(), None),
    "huge_label": ("a.jsonl", b'{"text": "a", "label": 99999999999}\n{"text": "b", "label": 1}\n',
                   None),
    "assistant_only_chat": ("a.jsonl", b'{"messages":[{"role":"assistant","content":"hi"}]}\n',
                            None),
    "bom_crlf": ("a.jsonl", b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n', None),
    "empty_file": ("a.jsonl", b"", "no valid records"),
    "nul_line": ("a.jsonl", b"\x00\n", ":1: invalid JSON"),
    "float_label": ("a.jsonl", b'{"text": "a", "label": 1.5}\n', ":1: field 'label' must be"),
    "missing_completion": ("a.jsonl", b'{"prompt": "a"}\n', ":1: missing field 'completion'"),
    "digits_over_limit": ("a.jsonl", b'{"text": "a", "label": ' + b"9" * 5000 + b"}\n",
                          ":1: invalid JSON"),
    "csv_long_field": ("a.csv", b'text,label\n"' + b"x" * 200_000 + b'",1\n', None),
    "csv_bad_utf8": ("a.csv", b"text,label\nok,1\nbad\xff,2\n", ":3: field 'text': invalid UTF-8"),
    "csv_bare_cr": ("a.csv", b"text,label\na\rb,1\n", ":2: expected 2 fields"),
    "tsv_header_only": ("a.tsv", b"text\tlabel\n", "no valid records"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_named_inputs(tmp_path, tok, name):
    file, data, expect = CASES[name]
    path = tmp_path / file
    path.write_bytes(data)
    if expect is None:
        assert _check(path, tok) is not None
        return
    with pytest.raises(PeftkitError, match=None) as err:
        load_dataset(path)
    assert expect in str(err.value)
    _check(path, tok)


def test_labels_that_are_names_or_huge_numbers(write):
    ds = load_dataset(write("l.jsonl", [{"text": "a", "label": "²"}, {"text": "b", "label": "٣"}]))
    assert ds.label_names == ["²", "٣"]
    ds = load_dataset(write("h.jsonl", [{"text": "a", "label": 99999999999},
                                        {"text": "b", "label": 2}]))
    assert ds.label_names == ["2", "99999999999"]  # names in numeric order, not 10^11 classes
    ds = load_dataset(write("z.jsonl", [{"text": "a", "label": "007"}, {"text": "b", "label": 7}]))
    assert [ds.label_id(r) for r in ds.records] == [0, 1]  # "007" is a name, not id 7


def test_an_assistant_only_chat_learns_its_reply(write, tok):
    ds = load_dataset(write("c.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}]))
    ex = tokenize(ds, tok).examples[0]
    learned = tok.decode([t for t in ex.labels if t != -100])
    assert learned.startswith("hi") and "assistant" not in learned


def test_directory_given_as_file(tmp_path):
    (tmp_path / "d.jsonl").mkdir()
    with pytest.raises(PeftkitError, match="is a directory"):
        load_dataset(tmp_path / "d.jsonl")


def test_large_inputs_stay_fast(tmp_path, tok):
    many = tmp_path / "many.jsonl"  # 10^5 short lines, every one bad: reported, bounded
    many.write_bytes(b'{"txt": 1}\n' * 100_000)
    start = time.perf_counter()
    with pytest.raises(DataError) as err:
        load_dataset(many)
    assert len(err.value.problems) == 100_000 and time.perf_counter() - start < 5
    big = tmp_path / "big.jsonl"  # one line over 1 MB
    big.write_text(json.dumps({"text": "word " * 250_000}) + "\n")
    start = time.perf_counter()
    assert load_dataset(big).records[0].text.startswith("word")
    assert time.perf_counter() - start < 5
    turns = [{"role": r, "content": f"{r} turn {i}"} for i in range(2000)
             for r in ("user", "assistant")]
    chat = tmp_path / "chat.jsonl"  # 2,000 turn pairs: linear, not 27 s
    chat.write_text(json.dumps({"messages": turns}) + "\n")
    start = time.perf_counter()
    ex = tokenize(load_dataset(chat), tok, max_length=10**6).examples[0]
    assert time.perf_counter() - start < 10
    assert sum(label != -100 for label in ex.labels) > 2000


def _prefix_spans(messages, tok):
    """The definition: an assistant turn spans from the end of the prompt that asks for it to
    the end of the conversation rendered up to it (quadratic; reference only)."""
    render = lambda m, gen=False: tok.apply_chat_template(  # noqa: E731
        m, tokenize=False, add_generation_prompt=gen)
    return [(len(render(messages[:i], True)), len(render(messages[:i + 1])))
            for i, m in enumerate(messages) if m["role"] == "assistant"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(["system", "user", "assistant"]),
                          st.text(min_size=1, max_size=12)), min_size=1, max_size=8))
def test_linear_chat_spans_match_the_prefix_definition(tok, turns):
    assume(turns[0][0] != "assistant")  # the definition renders the (empty) turns before it
    messages = [{"role": r, "content": c} for r, c in turns]
    render = lambda m: tok.apply_chat_template(m, tokenize=False)  # noqa: E731
    assert _assistant_spans(messages, render, render(messages)) == _prefix_spans(messages, tok)


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_record_past_the_size_limit_is_reported_not_read(tmp_path, suffix):
    """One 200 MB JSONL line took 5.2 GB and aborted `data check`: a record over
    --max-record-mb is now `FILE:LINE` (and skipped in chunks, never held whole)."""
    import resource
    big = "x" * (3 * 2**20)  # 3 MB against a 1 MB limit: the line's size is what matters
    path = tmp_path / f"big{suffix}"
    if suffix == ".jsonl":
        path.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": big}) + "\n"
                        + json.dumps({"text": "also fine"}) + "\n")
    else:
        path.write_text(f"text\nfine\n{big}\nalso fine\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(DataError) as err:
        load_dataset(path, max_record_mb=1)
    line = 2 if suffix == ".jsonl" else 3  # the CSV's header is line 1
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith(f"{path}:{line}: ")
    assert "exceeds --max-record-mb 1" in err.value.problems[0]
    if suffix == ".jsonl":
        assert "record of 3.0 MB exceeds --max-record-mb 1" in err.value.problems[0]
        grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        assert grown_kb < 3 * 1024  # never the whole line in memory
    kept = load_dataset(path, max_record_mb=1, skip_invalid=True)
    assert [r.text for r in kept.records] == ["fine", "also fine"] and kept.skipped == 1
    assert len(load_dataset(path, max_record_mb=4).records) == 3
    with pytest.raises(PeftkitError, match="--max-record-mb: must be > 0"):
        load_dataset(path, max_record_mb=0)
