"""The one trainer: every method learns, probe caches, resume is exact, signals checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from peftkit.errors import PeftkitError
from peftkit.train import METHODS, TrainConfig, Trainer, TrainingInterrupted, load_config, train
from peftkit.train.evaluate import evaluate_file
from peftkit.train.run_dir import load_run

LM_ROWS = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3}"} for i in range(8)]
CLF_ROWS = [{"text": f"{w} movie {i}", "label": lab} for i, (w, lab) in
            enumerate([("great", "pos"), ("awful", "neg")] * 6)]
LR = {"full": 3e-3, "probe": 3e-2, "prompt": 0.1, "prefix": 3e-2, "ia3": 5e-2}


@pytest.fixture
def lm_data(write):
    return write("lm.jsonl", LM_ROWS)


@pytest.fixture
def clf_data(write):
    return write("clf.jsonl", CLF_ROWS)


def _cfg(data, out, method, model="tiny-llama", **kw):
    # Full batch, no split: each step sees the same examples, so losses are comparable.
    base = dict(model=model, data=str(data), method=method, output=str(out), steps=8,
                batch_size=16, val_split=0.0, val_data=str(data), lr=LR.get(method, 1e-2),
                warmup=0.0, schedule="constant", dropout=0.0, num_virtual_tokens=4,
                bottleneck_size=8, exact_match_max=2)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", METHODS)
def test_each_method_lowers_lm_loss_and_reloads(method, lm_data, tmp_path):
    report = train(_cfg(lm_data, tmp_path, method))
    losses = report["train_losses"]
    assert losses[-1] < losses[0] - 0.05, losses
    metrics = evaluate_file(load_run("tiny-llama", tmp_path), str(lm_data), exact_match_max=2)
    assert metrics["loss"] == pytest.approx(report["metrics"]["loss"], rel=1e-4)


@pytest.mark.parametrize("method", ["full", "probe", "lora", "qlora", "dora", "ia3", "bottleneck"])
def test_each_method_learns_classification_and_reloads(method, clf_data, tmp_path):
    cfg = _cfg(clf_data, tmp_path, method, model="tiny-bert", steps=12)
    report = train(cfg)
    assert report["task"] == "classify"
    assert report["train_losses"][-1] < report["train_losses"][0]
    loaded = load_run("tiny-bert", tmp_path)
    assert loaded.label_names == ["neg", "pos"]
    metrics = evaluate_file(loaded, str(clf_data))
    assert metrics["accuracy"] == pytest.approx(report["metrics"]["accuracy"])


def test_probe_runs_the_backbone_once_per_example(clf_data, tmp_path, monkeypatch):
    import peftkit.train.trainer as trainer
    rows = {"n": 0}
    real_build = trainer.build

    def counting_build(*a, **kw):
        trainee = real_build(*a, **kw)
        trainee.module.backbone.register_forward_pre_hook(
            lambda _m, args, kwargs: rows.__setitem__("n", rows["n"] + kwargs["input_ids"].shape[0]),
            with_kwargs=True)
        return trainee
    monkeypatch.setattr(trainer, "build", counting_build)
    cfg = _cfg(clf_data, tmp_path, "probe", model="tiny-bert", steps=0, epochs=3, batch_size=4,
               val_data="", val_split=0.25)
    report = train(cfg)
    assert report["train_examples"] == 9 and report["val_examples"] == 3
    assert len(report["train_losses"]) == 9  # 3 epochs x 3 batches, all on cached features
    assert rows["n"] == 12  # every example through the backbone exactly once

    # --steps short of an epoch: features only for the rows those steps draw (+ validation)
    rows["n"] = 0
    report = train(_cfg(clf_data, tmp_path / "short", "probe", model="tiny-bert", steps=2,
                        batch_size=2, val_data="", val_split=0.25))
    assert report["train_examples"] == 4 and len(report["train_losses"]) == 2
    assert rows["n"] == 4 + 3


def _whole_and_resumed(data, tmp_path, monkeypatch, stop_at: str, **kw):
    """(losses of an uninterrupted run, losses of the same run stopped by a real SIGTERM at
    its first evaluation and resumed)."""
    whole = train(_cfg(data, tmp_path / "whole", "lora", **kw))["train_losses"]
    real_eval = Trainer._evaluate

    def eval_then_signal(self, tenant):
        metrics = real_eval(self, tenant)
        os.kill(os.getpid(), signal.SIGTERM)  # a real signal: the handler must checkpoint
        return metrics
    monkeypatch.setattr(Trainer, "_evaluate", eval_then_signal)
    with pytest.raises(TrainingInterrupted, match=f"stopped by SIGTERM at step {stop_at}"):
        train(_cfg(data, tmp_path / "cut", "lora", **kw))
    monkeypatch.setattr(Trainer, "_evaluate", real_eval)
    return whole, train(_cfg(data, tmp_path / "cut", "lora", resume=True, **kw))["train_losses"]


def test_resume_reproduces_the_uninterrupted_loss_sequence(lm_data, tmp_path, monkeypatch):
    whole, resumed = _whole_and_resumed(lm_data, tmp_path, monkeypatch, "4/8", steps=8,
                                        batch_size=3, dropout=0.1, eval_every=4,
                                        schedule="cosine", warmup=0.25, exact_match_max=0)
    assert len(resumed) == 8
    assert max(abs(a - b) for a, b in zip(whole, resumed)) <= 1e-6


def test_sigterm_mid_run_leaves_a_loadable_checkpoint(lm_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "peftkit.cli", "train", "--model", "tiny-llama", "--data",
           str(lm_data), "--method", "lora", "--steps", "100000", "--batch-size", "2",
           "--output", str(out), "--val-split", "0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "config.json").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "checkpoint in" in err and "Traceback" not in err
    state = json.loads((out / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] >= 1
    cfg = load_config(None, {"model": "tiny-llama", "data": str(lm_data), "method": "lora",
                             "output": str(out), "resume": True, "steps": state["step"] + 1,
                             "batch_size": 2, "val_split": 0.0})
    report = train(cfg)
    assert len(report["train_losses"]) == state["step"] + 1


def test_report_has_every_field(lm_data, tmp_path):
    r = train(_cfg(lm_data, tmp_path, "lora", steps=2))
    for key in ("method", "task", "trainable_params", "total_params", "trainable_percent",
                "peak_rss_bytes", "model_state_bytes", "wall_seconds", "tokens_per_second",
                "metrics", "history", "paths"):
        assert key in r, key
    assert 0 < r["trainable_params"] < r["total_params"]
    assert r["trainable_percent"] == pytest.approx(100 * r["trainable_params"] / r["total_params"])
    assert 50 * 2**20 < r["peak_rss_bytes"] < 8 * 2**30
    state = r["model_state_breakdown"]
    # LoRA: weights are the frozen base + adapter; grads and two Adam moments cover the adapter.
    assert state["gradients"] == r["trainable_params"] * 4
    assert state["optimizer"] >= 2 * state["gradients"]
    assert r["wall_seconds"] > 0 and r["tokens_per_second"] > 0
    assert {"loss", "perplexity"} <= set(r["metrics"])
    assert json.loads((tmp_path / "report.json").read_text())["method"] == "lora"
    assert (tmp_path / "report.md").read_text().startswith("# lora on tiny-llama")


def test_config_file_and_overrides(tmp_path, lm_data):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny-llama\ndata: {lm_data}\nmethod: ia3\nsteps: 3\nlr: 0.5\n")
    cfg = load_config(str(path), {"lr": 0.01, "steps": None})
    assert (cfg.method, cfg.steps, cfg.lr) == ("ia3", 3, 0.01)
    toml = tmp_path / "run.toml"
    toml.write_text(f'data = "{lm_data}"\nmethod = "prompt"\n')
    assert load_config(str(toml), {}).method == "prompt"
    path.write_text("methd: lora\n")
    with pytest.raises(PeftkitError, match="run.yaml: unknown option\\(s\\) methd"):
        load_config(str(path), {})
    with pytest.raises(PeftkitError, match="--method: 'lorra' is not one of full"):
        load_config(None, {"data": str(lm_data), "method": "lorra"})


def test_compare_writes_table_and_plot(clf_data, tmp_path):
    from peftkit.train.compare import compare
    rows = compare("tiny-bert", str(clf_data), ["probe", "lora"], str(tmp_path),
                   ["--steps", "6", "--batch-size", "4", "--eval-every", "1", "--patience",
                    "1", "--val-split", "0.25", "--val-data", ""])
    assert [r["method"] for r in rows] == ["probe", "lora"]
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "compare.md").read_text()
    assert "| lora | accuracy" in table and "| saved adapter | stopped |" in table
    for r in rows:  # each method's best evaluated adapter, and where it stopped
        report = json.loads((tmp_path / r["method"] / "report.json").read_text())
        assert r["kept"] == "best" and r["kept_step"] == report["best"]["step"]
        assert f"| best: step {r['kept_step']} |" in table
        assert (r["stopped"] is None) == (r["steps"] == 6)


def test_a_qlora_run_loads_back_on_the_base_it_trained_on(tmp_path, lm_data):
    """The run's resolved precision travels in its config.json: a QLoRA run trained in bf16 is
    evaluated on an NF4 base computing in bf16, whatever precision the evaluation asks for."""
    train(TrainConfig(model="tiny-llama", data=str(lm_data), method="qlora", output=str(tmp_path),
                      steps=1, batch_size=2, val_split=0.0, dtype="bfloat16"))
    assert json.loads((tmp_path / "config.json").read_text())["dtype"] == "bfloat16"
    import torch
    loaded = load_run("tiny-llama", tmp_path, dtype=torch.float32)
    layers = [m for m in loaded.module.modules() if hasattr(m, "quant_state") and m.quant_state]
    assert layers and {m.compute_dtype for m in layers} == {torch.bfloat16}


def test_a_causal_lm_probe_evaluates_in_batches_and_saves_before_it(write, tmp_path,
                                                                     monkeypatch):
    """A SmolLM2 probe with 756 validation rows was killed at 24 GB evaluating every token's
    vocabulary logits at once, and lost its head: the head now sees one batch of examples at a
    time (metrics unchanged), and the head and a report are on disk before evaluation runs."""
    import dataclasses
    from peftkit.train.probe import FeatureCache
    rows = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3} and more words {i}"}
            for i in range(48)]
    data = write("many.jsonl", rows)
    seen, whole = [], {}
    real_eval = FeatureCache.evaluate

    def watched(self, records, cfg):
        whole.update(real_eval(self, records, dataclasses.replace(cfg, batch_size=10**6)))
        self.head.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[0]))
        return real_eval(self, records, cfg)
    monkeypatch.setattr(FeatureCache, "evaluate", watched)
    report = train(_cfg(data, tmp_path / "p", "probe", steps=2, batch_size=4, exact_match_max=0))
    assert len(seen) == 12 and max(seen) * 6 < sum(seen)  # 48 rows, 4 at a time, never all
    assert report["metrics"]["loss"] == pytest.approx(whole["loss"], rel=1e-5)

    def dies(self, records, cfg):
        raise MemoryError("evaluation ran out of memory")
    monkeypatch.setattr(FeatureCache, "evaluate", dies)
    with pytest.raises(MemoryError):
        train(_cfg(data, tmp_path / "q", "probe", steps=2, batch_size=4, exact_match_max=0))
    saved = json.loads((tmp_path / "q" / "report.json").read_text())
    assert saved["train_losses"] and saved["paths"]
    assert all(os.path.exists(p) for k, p in saved["paths"].items() if k != "report")


YAML_VALUES = {  # a config file's value -> what the run gets, or the error naming FILE:KEY
    "lr: 1e-3": ("lr", 1e-3),  # YAML 1.1 reads this as the string "1e-3"
    "steps: '3'": ("steps", 3),
    "rank: '8'": ("rank", 8),
    "targets: [q_proj, v_proj]": ("targets", "q_proj,v_proj"),
    "warmup: 2": ("warmup", 2.0),  # a whole number: steps of warmup
    "rank: [8]": "run.yaml:rank: expected int",
    "rank: 0": "run.yaml:rank: must be >= 1",
    "lr: -1": "run.yaml:lr: must be >= 0",
    "dropout: -0.5": "run.yaml:dropout: must be in [0, 1)",
    "warmup: 2.5": "run.yaml:warmup: must be a fraction",
    "num_virtual_tokens: 0": "run.yaml:num_virtual_tokens: must be >= 1",
    "bottleneck_size: 0": "run.yaml:bottleneck_size: must be >= 1",
    "steps: 2.5": "run.yaml:steps: expected int",
    "rslora: 'yes'": "run.yaml:rslora: expected bool",
    "schedule: cosin": "run.yaml:schedule: 'cosin' is not one of",
}


@pytest.mark.parametrize("line", list(YAML_VALUES))
def test_config_values_are_typed_and_ranged_naming_file_and_key(tmp_path, lm_data, line):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: tiny-llama\ndata: {lm_data}\n{line}\n")
    want = YAML_VALUES[line]
    if isinstance(want, tuple):
        assert getattr(load_config(str(path), {}), want[0]) == want[1]
    else:
        with pytest.raises(PeftkitError) as err:
            load_config(str(path), {})
        assert want in str(err.value)


@pytest.mark.parametrize("flag,value,reason", [
    ("--rank", "0", "--rank: must be >= 1"), ("--lr", "-1", "--lr: must be >= 0"),
    ("--warmup", "2.5", "--warmup: must be a fraction"), ("--dropout", "1", "--dropout: must"),
    ("--num-virtual-tokens", "0", "--num-virtual-tokens: must be >= 1"),
    ("--bottleneck-size", "0", "--bottleneck-size: must be >= 1"),
    ("--max-length", "0", "--max-length: must be >= 1"), ("--rank", "x", "invalid int")])
def test_bad_flag_values_are_one_line_before_anything_loads(lm_data, capsys, flag, value,
                                                            reason):
    from peftkit.cli import main
    try:
        code = main(["train", "--model", "tiny-llama", "--data", str(lm_data), flag, value])
    except SystemExit as e:  # argparse's own type errors: usage, then the error line
        code = e.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and reason in err.splitlines()[-1] and "Traceback" not in err, err


def test_warmup_as_a_step_count(lm_data, tmp_path):
    from peftkit.train.loop import lr_at
    cfg = _cfg(lm_data, tmp_path, "lora", warmup=2, schedule="constant")
    assert [lr_at(s, 10, cfg, 1.0) for s in range(4)] == [0.5, 1.0, 1.0, 1.0]


def test_a_run_directory_has_one_owner(lm_data, clf_data, tmp_path, capsys):
    """`train --method probe --output runs/st` then `--method lora` into the same directory
    once left the probe's head beside the LoRA adapter, and `eval` scored the stale head."""
    from peftkit.cli import main
    out = tmp_path / "st"
    base = ["train", "--model", "tiny-llama", "--data", str(lm_data), "--steps", "2",
            "--batch-size", "4", "--val-split", "0", "--output", str(out)]
    assert main(base + ["--method", "probe"]) == 0 and (out / "head.json").exists()
    capsys.readouterr()
    assert main(base + ["--method", "lora"]) == 2
    err = capsys.readouterr().err
    assert "holds a probe run already; give --overwrite" in err and "Traceback" not in err
    assert main(base + ["--method", "lora", "--overwrite"]) == 0
    assert not (out / "head.json").exists() and (out / "adapter").is_dir()
    # --resume continues the same run only
    assert main(base + ["--method", "lora", "--resume", "--rank", "4"]) == 2
    assert "whose rank is 8, not 4" in capsys.readouterr().err
    assert main(base + ["--method", "lora", "--resume", "--steps", "3"]) == 0
    assert "--steps 2 -> 3" in capsys.readouterr().err
    # only a run's own outputs are ever cleared: other files in the directory stay
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    assert main(base[:-1] + [str(other), "--method", "probe"]) == 0
    assert main(base[:-1] + [str(other), "--method", "lora", "--overwrite"]) == 0
    assert (other / "cat.jpg").exists() and not (other / "head.json").exists()


def test_8bit_adam_saves_and_resumes_exactly(lm_data, tmp_path, monkeypatch):
    """--optim adamw8bit ran every step, then died saving its checkpoint (bitsandbytes keeps
    its quantization state as a nested dict)."""
    whole, resumed = _whole_and_resumed(lm_data, tmp_path, monkeypatch, "3/6", steps=6,
                                        batch_size=3, dropout=0.0, eval_every=3,
                                        exact_match_max=0, optim="adamw8bit")
    assert len(resumed) == 6 and max(abs(a - b) for a, b in zip(whole, resumed)) <= 1e-6


def test_compare_checks_every_method_before_training_any(clf_data, tmp_path):
    from peftkit.train.compare import check_methods, compare
    assert check_methods(["ia3", " prompt", "ia3"], "x", "causal-lm") == ["ia3", "prompt"]
    with pytest.raises(PeftkitError, match="unknown method 'lorra'"):
        compare("tiny-bert", str(clf_data), ["lora", "lorra"], str(tmp_path / "c"), [])
    with pytest.raises(PeftkitError, match="prompt train a causal LM"):
        compare("tiny-bert", str(clf_data), ["lora", "prompt"], str(tmp_path / "c"), [])
    assert not (tmp_path / "c").exists()  # nothing trained, nothing written


def test_a_causal_lm_probe_refuses_an_mlp_head(lm_data, tmp_path):
    with pytest.raises(PeftkitError, match="--probe-head mlp: a causal-LM probe"):
        train(_cfg(lm_data, tmp_path, "probe", probe_head="mlp"))


def test_qlora_counts_parameters_by_their_logical_shape(lm_data, tmp_path):
    """QLoRA's share read 23.4% where LoRA's read 15.3% for the same adapter: packed 4-bit
    weights were counted as half a parameter each. The report's last-batch loss is labelled
    as what it is, not as a validation figure."""
    lora = train(_cfg(lm_data, tmp_path / "l", "lora", steps=1))
    qlora = train(_cfg(lm_data, tmp_path / "q", "qlora", steps=1))
    assert qlora["total_params"] == lora["total_params"]
    assert qlora["trainable_params"] == lora["trainable_params"]
    assert qlora["trainable_percent"] == pytest.approx(lora["trainable_percent"])
    md = (tmp_path / "q" / "report.md").read_text()
    assert "last training batch's loss" in md and "val train_loss" not in md
