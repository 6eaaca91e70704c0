import pytest

from peftkit.data import IGNORE, load_dataset, split, tokenize
from peftkit.errors import DataError, PeftkitError
from peftkit.models import load_base


@pytest.fixture(scope="module")
def tok():
    return load_base("tiny-llama").tokenizer


def test_each_jsonl_format_parses(write):
    chat = write("chat.jsonl", [{"messages": [{"role": "system", "content": "be brief"},
                                              {"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "hello"}]}])
    assert load_dataset(chat).kind == "chat"
    pc = write("pc.jsonl", [{"prompt": "2+2=", "completion": "4"}])
    assert load_dataset(pc).records[0].completion == "4"
    text = write("text.jsonl", [{"text": "once upon a time"}])
    assert load_dataset(text).kind == "text"
    clf = write("clf.jsonl", [{"text": "a", "label": "spam"}, {"text": "b", "label": "ham"}])
    ds = load_dataset(clf)
    assert ds.kind == "classification" and ds.label_names == ["ham", "spam"]
    assert [ds.label_id(r) for r in ds.records] == [1, 0]


def test_csv_tsv_with_custom_columns(write):
    csv_path = write("d.csv", 'review,stars\n"good, really",5\n"multi\nline",1\n')
    ds = load_dataset(csv_path, text_field="review", label_field="stars")
    assert [r.text for r in ds.records] == ["good, really", "multi\nline"]
    assert ds.label_names == [str(i) for i in range(6)]  # integer labels keep their value
    tsv = write("d.tsv", 'label\tsentence\n1\ta "quoted" film\n0\tdull\n')
    ds = load_dataset(tsv, text_field="sentence")
    assert ds.records[0].text == 'a "quoted" film' and ds.label_names == ["0", "1"]
    plain = write("t.tsv", "text\nhello\n")
    assert load_dataset(plain).kind == "text"


MALFORMED = [
    ('{"prompt": "a", "completion": "b"\n', "invalid JSON (Expecting ',' delimiter at column 34)"),
    ('[1, 2]\n', "expected a JSON object, got list"),
    ('{"prompt": "a"}\n', "missing field 'completion'"),
    ('{"prompt": "a", "completion": 3}\n', "field 'completion' must be a string, got int"),
    ('{"prompt": "a", "completion": "  "}\n', "field 'completion' is empty"),
    ('{"messages": []}\n', "field 'messages' must be a non-empty list"),
    ('{"messages": [{"role": "bot", "content": "x"}]}\n',
     "messages[0].role: unknown role 'bot' (expected one of system, user, assistant)"),
    ('{"messages": [{"role": "user", "content": 5}]}\n',
     "messages[0].content must be a string, got int"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "no assistant message to learn from"),
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}\n',
     "messages[1].content: empty assistant message"),
    ('{"text": "a", "label": null}\n', "label missing (field 'label' is empty)"),
    ('{"text": "a", "label": [1]}\n', "field 'label' must be a string or integer, got list"),
    ('{"label": "pos"}\n', "missing field 'text'"),
    ('{"foo": 1}\n', "no known fields (expected 'messages', 'conversations', 'instruction'+"
                     "'output', 'prompt'+'completion', 'text' or 'text'+'label'); got ['foo']"),
]


@pytest.mark.parametrize("line,reason", MALFORMED)
def test_malformed_jsonl_reports_file_line_reason(write, line, reason):
    good = '{"prompt": "p", "completion": "c"}\n' if "prompt" in line else \
        '{"text": "t", "label": "x"}\n' if "label" in line else \
        '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n'
    path = write("bad.jsonl", good + "\n" + line)  # blank line 2 is skipped; the bad one is line 3
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert err.value.problems == [f"{path}:3: {reason}"]


def test_table_errors(write):
    path = write("bad.tsv", "label\tsentence\n1\tfine\n\tno label\n1\ttoo\tmany\n")
    with pytest.raises(DataError) as err:
        load_dataset(path, text_field="sentence")
    assert err.value.problems == [f"{path}:3: label missing (field 'label' is empty)",
                                  f"{path}:4: expected 2 fields, got 3"]
    nohdr = write("nohdr.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"nohdr.csv:1: header has no 'text' column \(columns: a, b\)"):
        load_dataset(nohdr)


def test_mixed_kinds_and_limits_and_skip(write):
    rows = '{"text": "a"}\n{"prompt": "p", "completion": "c"}\n' + "{bad\n" * 30
    path = write("mixed.jsonl", rows)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert err.value.problems[0] == f"{path}:2: a prompt_completion record, but this file's " \
                                    f"records are text (one kind per file)"
    msg = str(err.value)
    assert msg.count("\n") == 20 and msg.endswith("... and 11 more")  # 20 listed + summary line
    ds = load_dataset(path, skip_invalid=True)
    assert len(ds.records) == 1 and ds.skipped == 31
    with pytest.raises(PeftkitError, match="unknown dataset format '.txt'"):
        load_dataset(write("x.txt", "hi"))
    with pytest.raises(PeftkitError, match="no valid records"):
        load_dataset(write("empty.jsonl", "\n"))


def test_chat_masking_is_exact_token_by_token(write, tok):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok!"}]
    ex = tokenize(load_dataset(write("c.jsonl", [{"messages": msgs}])), tok).examples[0]
    enc = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    parts = [("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n"
              "<|im_start|>assistant\n", False), ("yo<|im_end|>\n", True),
             ("<|im_start|>user\nagain<|im_end|>\n<|im_start|>assistant\n", False),
             ("ok!<|im_end|>\n", True)]
    want_ids = [i for text, _ in parts for i in enc(text)]
    want_labels = [i if learn else IGNORE for text, learn in parts for i in enc(text)]
    assert ex.input_ids == want_ids
    assert ex.labels == want_labels


def test_prompt_completion_and_text_labels(write, tok):
    ds = load_dataset(write("pc.jsonl", [{"prompt": "ab", "completion": "cd"}]))
    ex = tokenize(ds, tok).examples[0]
    p, c = tok("ab").input_ids, tok("cd", add_special_tokens=False).input_ids
    assert ex.input_ids == p + c + [tok.eos_token_id]
    assert ex.labels == [IGNORE] * len(p) + c + [tok.eos_token_id]
    full = tokenize(ds, tok, completion_only=False).examples[0]
    assert full.labels == full.input_ids
    t = tokenize(load_dataset(write("t.jsonl", [{"text": "xyz"}])), tok).examples[0]
    assert t.labels == t.input_ids and t.input_ids[-1] == tok.eos_token_id


def test_truncation_is_counted(write, tok):
    ds = load_dataset(write("pc.jsonl", [{"prompt": "a" * 30, "completion": "b" * 30},
                                         {"prompt": "a", "completion": "b"}]))
    out = tokenize(ds, tok, max_length=16)
    assert out.truncated == 1 and len(out.examples[0].input_ids) == 16
    assert out.tokens == 16 + 3


def test_split_is_deterministic_and_disjoint():
    items = list(range(100))
    tr, va = split(items, 0.2, seed=7)
    assert (tr, va) == split(items, 0.2, seed=7)
    assert len(va) == 20 and sorted(tr + va) == items
    assert split(items, 0.2, seed=8)[1] != va
    with pytest.raises(PeftkitError, match="--val-split"):
        split(items, 1.5, seed=0)


def test_real_sst2_loads(sst2_dir):
    ds = load_dataset(sst2_dir / "dev.tsv", text_field="sentence")
    assert len(ds.records) == 872 and ds.label_names == ["0", "1"]
    assert sum(r.label == "1" for r in ds.records) == 444
