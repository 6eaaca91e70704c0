import subprocess
import sys

import pytest

from peftkit.cli import main


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "peftkit.cli", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for cmd in ("models", "generate", "data", "demo"):
        assert cmd in out


def test_models_lists_aliases(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("smollm2-135m", "minilm-l6", "tiny-llama", "tiny-bert"))


def test_data_check_malformed_exits_2_with_line_numbers(write, capsys):
    path = write("bad.jsonl", '{"prompt": "a", "completion": "b"}\n{oops\n{"prompt": "a"}\n')
    assert main(["data", "check", str(path), "--model", "tiny-llama"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: invalid JSON" in err
    assert f"{path}:3: missing field 'completion'" in err
    assert "Traceback" not in err


def test_data_check_valid_summarises(write, capsys):
    rows = [{"text": "good film", "label": "pos"}, {"text": "bad film", "label": "neg"},
            {"text": "x" * 100, "label": "pos"}]
    path = write("clf.jsonl", rows)
    assert main(["data", "check", str(path), "--model", "tiny-llama", "--max-length", "50"]) == 0
    out = capsys.readouterr().out
    assert "records:    3" in out and "classification" in out
    assert "truncated:  1" in out and "labels:     neg=1, pos=2" in out


def test_generate_prints_only_new_text(capsys):
    assert main(["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>" not in out and "user" not in out


def test_unknown_model_is_one_line_error(capsys):
    assert main(["generate", "--model", "nope", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peftkit: error: unknown model 'nope'")


def test_every_flag_explains_itself():
    """Every option of every command has a help line; enumerations list their choices."""
    import argparse

    from peftkit.cli import build_parser

    def walk(name, parser):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, p in action.choices.items():
                    yield from walk(f"{name} {sub}", p)
            elif action.dest != "help":
                yield name, action
    missing = [f"{n}: {a.option_strings or a.dest}" for n, a in walk("peftkit", build_parser())
               if not a.help]
    assert missing == []
    train = build_parser().parse_args(["train", "--method", "lora"])
    assert train.method == "lora"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--method", "lorax"])  # choices are enforced


def test_help_and_plan_start_without_torch():
    """`peftkit --help` and `peftkit plan` import neither torch, transformers nor bitsandbytes."""
    code = ("import sys, contextlib, io\n"
            "from peftkit.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    main(['plan', '--model', '70B'])\n"
            "    try:\n"
            "        main(['--help'])\n"
            "    except SystemExit:\n"
            "        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'bitsandbytes') if m in sys.modules]\n"
            "print(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_quantizing_prints_no_third_party_warning():
    """bitsandbytes' notice about an optional kernel package is not shown to users."""
    code = ("from peftkit.models import load_base\n"
            "from peftkit.quant import QuantConfig\n"
            "load_base('tiny-llama', quantize=QuantConfig())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "kernels" not in out.stderr and "Failed" not in out.stderr, out.stderr


LM = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3}"} for i in range(8)]
CLF = [{"text": f"{w} movie {i}", "label": lab}
       for i, (w, lab) in enumerate([("great", "pos"), ("awful", "neg")] * 6)]


def _fails(argv, capsys, reason):
    """One `peftkit` command that must end in one error line naming `reason`, no traceback."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert reason in err.splitlines()[-1], err


def test_ordinary_mistakes_are_one_line_each(write, tmp_path, capsys):
    """The walkthrough's tracebacks (issue 34, item 4) and silently accepted values (item 11)."""
    lm, clf = write("lm.jsonl", LM), write("clf.jsonl", CLF)
    chat = write("chat.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                              {"role": "assistant", "content": "yo"}]}] * 4)
    unseen = write("unseen.jsonl", [{"text": "meh movie", "label": "mixed"}] * 2)
    train = ["train", "--model", "tiny-llama", "--steps", "1", "--val-split", "0"]
    _fails(train + ["--data", str(lm), "--val-data", str(chat)], capsys,
           "chat records, but the training data's are prompt_completion")
    _fails(train[:2] + ["tiny-bert"] + train[3:] + ["--data", str(clf), "--val-data",
                                                     str(unseen)], capsys,
           "labels ['mixed'] never occur in")
    _fails(train + ["--data", str(clf), "--task", "causal-lm"], capsys,
           "--task causal-lm, but its records are text+label")
    _fails(train[:2] + ["tiny-bert"] + train[3:] + ["--data", str(lm)], capsys,
           "tiny-bert is an encoder (bert)")
    long = write("long.jsonl", [{"prompt": "word " * 300, "completion": "yes"}] * 4)
    _fails(train + ["--data", str(long), "--max-length", "4096"], capsys,
           "over tiny-llama's 512-token context")
    _fails(["eval", "--model", "tiny-bert", "--data", str(clf)], capsys,
           "need a trained classifier (--adapter RUN)")
    _fails(["eval", "--model", "tiny-llama", "--data", str(lm), "--batch-size", "0"], capsys,
           "must be >= 1")
    _fails(["eval", "--model", "tiny-llama", "--data", str(lm), "--max-length", "2"], capsys,
           "no answer token left to score at --max-length 2")
    _fails(["generate", "--model", "tiny-llama", "--prompt", "hi", "--max-new-tokens", "0"],
           capsys, "must be >= 1")
    _fails(["generate", "--model", "tiny-bert", "--prompt", "hi"], capsys, "is an encoder")


def test_eval_and_generate_read_the_base_the_run_records(write, tmp_path, capsys):
    clf = write("clf.jsonl", CLF + [{"text": "bad row"}])
    out = tmp_path / "clf"
    assert main(["train", "--model", "tiny-bert", "--data", str(clf), "--method", "lora",
                 "--steps", "2", "--val-split", "0", "--skip-invalid", "--output",
                 str(out)]) == 0
    err = capsys.readouterr().err
    assert f"skipped {clf}:13: " in err and "1 invalid records skipped" in err
    import json
    assert json.loads((out / "report.json").read_text())["skipped_records"] == 1
    for adapter in (out, out / "adapter"):  # the run, or its adapter/ directory
        assert main(["eval", "--adapter", str(adapter), "--data", str(clf),
                     "--skip-invalid"]) == 0  # no --model: tiny-bert, as recorded
        metrics = json.loads(capsys.readouterr().out)
        assert "accuracy" in metrics and metrics["skipped_records"] == 1


def test_data_alone_prints_its_own_help(capsys):
    assert main(["data"]) == 2
    out = capsys.readouterr().out
    assert "check" in out and "data commands" in out


@pytest.mark.parametrize("argv, error", [
    (["serve", "--max-loaded", "0"], "--max-loaded: must be >= 1, got 0"),
    (["serve", "--max-queue", "0"], "--max-queue: must be >= 1, got 0"),
    (["serve", "--slot-wait", "-1"], "--slot-wait: must be >= 0, got -1.0"),
    (["serve", "--request-timeout", "0"], "--request-timeout: must be > 0, got 0.0"),
    (["gateway", "--backends", ",", "--insecure-open"], "--backends: give at least one"),
    (["gateway", "--backends", "http://a", "--timeout", "0"], "--timeout: must be > 0, got 0.0"),
    (["gateway", "--backends", "http://a", "--max-affinity", "0"],
     "--max-affinity: must be >= 1, got 0"),
    (["gateway", "--backends", "http://a", "--down-for", "-1"], "--down-for: must be >= 0")])
def test_serving_limits_are_checked_at_their_edge_before_anything_loads(argv, error, capsys):
    """Issue 28.7: `serve --max-loaded 0` started a server with no slot; the gateway's flags
    were hand-written, so --connect-timeout, --down-for and --max-affinity could not be set.
    Both commands' flags are now their config's fields, each bounded."""
    assert main(argv) == 2
    assert error in capsys.readouterr().err


def test_every_gateway_setting_is_a_flag():
    from peftkit.cli import build_parser
    from peftkit.serve.config import GatewayConfig
    args = build_parser().parse_args(
        ["gateway", "--backends", "http://a:1,http://b:2", "--base", "tiny", "--timeout", "3",
         "--connect-timeout", "1.5", "--down-for", "2", "--max-affinity", "9",
         "--max-body-mb", "0.5", "--insecure-open"])
    from peftkit.cli_flags import config_from_args
    cfg = config_from_args(GatewayConfig, args)
    assert cfg.backends == ("http://a:1", "http://b:2") and cfg.base == ("tiny",)
    assert (cfg.timeout_s, cfg.connect_timeout_s, cfg.down_for_s, cfg.max_affinity,
            cfg.max_body_mb, cfg.insecure_open) == (3.0, 1.5, 2.0, 9, 0.5, True)
