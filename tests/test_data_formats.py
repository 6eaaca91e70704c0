"""The data formats users already have (issue 25.3): Alpaca, ShareGPT, JSON arrays, Parquet,
Arrow and datasets' save_to_disk directories, each detected from its content or extension and
validated with the same FILE:LINE (FILE:row N) errors; `data check` names the container."""

import json

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from peftkit.cli import main
from peftkit.data import load_dataset
from peftkit.errors import DataError, PeftkitError
from peftkit.train import TrainConfig, train

ALPACA = [{"instruction": "Name a colour.", "input": "", "output": "Blue."},
          {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
          {"instruction": "Greet.", "output": "Hello!", "system": "Be brief."}]
SHAREGPT = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hey"},
                               {"from": "human", "value": "Bye"},
                               {"from": "gpt", "value": "Bye!"}]},
            {"system": "Be kind.", "conversations": [{"from": "user", "value": "2+2?"},
                                                     {"from": "assistant", "value": "4"}]}]


def test_alpaca_rows_become_a_user_and_an_assistant_turn(write):
    ds = load_dataset(write("alpaca.jsonl", ALPACA))
    assert ds.kind == "chat" and ds.container == "jsonl"
    assert ds.records[0].messages == [{"role": "user", "content": "Name a colour."},
                                      {"role": "assistant", "content": "Blue."}]
    assert ds.records[1].messages[0]["content"] == "Add the numbers.\n\n2 and 3"
    assert ds.records[2].messages[0] == {"role": "system", "content": "Be brief."}


def test_sharegpt_speakers_map_to_chat_roles(write):
    ds = load_dataset(write("share.jsonl", SHAREGPT))
    assert [m["role"] for m in ds.records[0].messages] == ["user", "assistant"] * 2
    assert ds.records[1].messages[0] == {"role": "system", "content": "Be kind."}
    bad = write("bad.jsonl", [SHAREGPT[0], {"conversations": [
        {"from": "human", "value": "x"}, {"from": "robot", "value": "y"}]}])
    with pytest.raises(DataError) as err:
        load_dataset(bad)
    assert f"{bad}:2: conversations[1].from: unknown speaker 'robot'" in str(err.value)


def test_a_json_array_is_read_with_the_line_of_each_element(tmp_path):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps(ALPACA, indent=2))
    ds = load_dataset(path)
    assert ds.container == "json array" and len(ds.records) == 3
    assert [r.line for r in ds.records] == [2, 7, 12]  # where each element starts
    broken = ALPACA[:1] + [{"instruction": "No answer."}] + ALPACA[2:]
    path.write_text(json.dumps(broken, indent=2))
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:7: no known fields" in str(err.value)
    path.write_text(json.dumps(ALPACA, indent=2)[:-40])  # cut off mid-element
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:1" in str(err.value) and "invalid JSON" in str(err.value)


def _parquet(tmp_path, rows, name="data.parquet"):
    path = tmp_path / name
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_parquet_rows_and_their_errors(tmp_path):
    rows = [{"prompt": "Q1", "completion": "A1"}, {"prompt": "Q2", "completion": ""},
            {"prompt": "Q3", "completion": "A3"}]
    path = _parquet(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert f"{path}:row 2: field 'completion' is empty" in str(err.value)
    ds = load_dataset(path, skip_invalid=True)
    assert ds.container == "parquet" and ds.kind == "prompt_completion" and ds.skipped == 1
    alpaca = load_dataset(_parquet(tmp_path, ALPACA, "alpaca.parquet"))  # input null in row 3
    assert alpaca.kind == "chat" and len(alpaca.records) == 3


def test_a_classifier_reads_int_or_string_labels_from_parquet(tmp_path):
    ints = load_dataset(_parquet(tmp_path, [{"text": "good", "label": 1},
                                            {"text": "bad", "label": 0}], "ints.parquet"))
    assert ints.kind == "classification" and ints.label_names == ["0", "1"]
    names = load_dataset(_parquet(tmp_path, [{"text": "good", "label": "pos"},
                                             {"text": "bad", "label": "neg"}], "names.parquet"))
    assert names.label_names == ["neg", "pos"]


def _save_to_disk(directory, rows):
    """The layout datasets' `Dataset.save_to_disk` writes: Arrow stream files named in
    state.json, beside dataset_info.json."""
    directory.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    with ipc.new_stream(directory / "data-00000-of-00001.arrow", table.schema) as w:
        w.write_table(table)
    (directory / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}))
    (directory / "dataset_info.json").write_text("{}")


def test_arrow_files_and_save_to_disk_directories(tmp_path):
    table = pa.Table.from_pylist(SHAREGPT)
    with ipc.new_file(tmp_path / "file.arrow", table.schema) as w:  # the IPC file format
        w.write_table(table)
    assert load_dataset(tmp_path / "file.arrow").container == "arrow"
    _save_to_disk(tmp_path / "one", ALPACA)
    ds = load_dataset(tmp_path / "one")
    assert ds.container == "datasets directory" and len(ds.records) == 3
    _save_to_disk(tmp_path / "dict" / "train", ALPACA[:2])
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    assert len(load_dataset(tmp_path / "dict").records) == 2
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["test"]}))
    with pytest.raises(PeftkitError, match="without a 'train' split \\(splits: test\\)"):
        load_dataset(tmp_path / "dict")
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(PeftkitError, match="junk.parquet: unreadable Parquet file"):
        load_dataset(tmp_path / "junk.parquet")
    (tmp_path / "plain").mkdir()
    with pytest.raises(PeftkitError, match="is a directory; give a .jsonl"):
        load_dataset(tmp_path / "plain")


def test_data_check_names_the_container_and_training_reads_it(tmp_path, capsys):
    path = _parquet(tmp_path, ALPACA * 4, "alpaca.parquet")
    assert main(["data", "check", str(path), "--model", "tiny-llama"]) == 0
    out = capsys.readouterr().out
    assert "format:     parquet" in out and "kind:       chat" in out
    report = train(TrainConfig(model="tiny-llama", data=str(path), method="lora", steps=2,
                               batch_size=4, val_split=0.0, output=str(tmp_path / "run")))
    assert len(report["train_losses"]) == 2


@pytest.fixture
def bare_base(family_models, tmp_path):
    """A Llama directory whose tokenizer has no chat template (a base model's)."""
    import shutil
    bare = tmp_path / "bare"
    shutil.copytree(family_models["llama"], bare)
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    return bare


def test_a_base_without_a_chat_template_takes_one(bare_base, write, tmp_path, capsys):
    data = write("chat.jsonl", ALPACA * 3)
    args = ["train", "--model", str(bare_base), "--data", str(data), "--steps", "1",
            "--val-split", "0", "--batch-size", "3"]
    assert main(args + ["--output", str(tmp_path / "none")]) == 2
    assert "give --chat-template chatml" in capsys.readouterr().err
    bad = write("broken.jinja", "{% for m in messages %}{{ m['content'] }")
    assert main(args + ["--output", str(tmp_path / "bad"), "--chat-template", str(bad)]) == 2
    assert "not a usable Jinja chat template" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before anything was written
    assert main(args + ["--output", str(tmp_path / "run"), "--chat-template", "chatml"]) == 0
    from peftkit.data.templates import CHATML
    assert (tmp_path / "run" / "chat_template.jinja").read_text() == CHATML
    from peftkit.train.run_dir import load_run
    loaded = load_run(str(bare_base), tmp_path / "run")  # eval and generate render as trained
    assert loaded.base.tokenizer.chat_template == CHATML


def test_serve_takes_the_template_its_adapters_trained_with(bare_base, tmp_path):
    from peftkit.data.templates import ZEPHYR
    from peftkit.serve.config import ServeConfig
    from peftkit.serve.server import Server
    (tmp_path / "adapters").mkdir()
    server = Server(ServeConfig(base=str(bare_base), chat_template="zephyr", max_loaded=1,
                                max_rank=4, device="cpu", adapters=str(tmp_path / "adapters")))
    assert server.base.tokenizer.chat_template == ZEPHYR
