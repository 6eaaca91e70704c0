"""Early stopping and the best adapter (issue 25.1): `--patience`, `--metric`, `--keep`, alone,
per tenant of a joint run, and across a kill and `--resume`; run tracking (25.2):
`--report-to`, read back from TensorBoard's own event files."""

import json
import os
import signal

import pytest
import yaml
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.train import TrainConfig, Trainer, TrainingInterrupted, train
from peftkit.train.evaluate import evaluate_file
from peftkit.train.joint import train_joint
from peftkit.train.run_dir import load_run

ROWS = [{"prompt": f"Q: item {i}?", "completion": f"A{i % 3}"} for i in range(12)]
OTHER = [{"prompt": f"Q: item {i}?", "completion": f"zz{i % 2}"} for i in range(6)]


@pytest.fixture
def data(write):
    return write("lm.jsonl", ROWS)


@pytest.fixture
def other(write):
    """Validation answers unlike training's: its loss falls, then rises as the run fits
    training's answers (measured: best at step 8 of 12 at lr 1e-2)."""
    return write("other.jsonl", OTHER)


def _cfg(data, out, **kw):
    base = dict(model="tiny-llama", data=str(data), method="lora", output=str(out), steps=12,
                batch_size=4, val_split=0.0, val_data=str(data), warmup=0.0, dropout=0.0,
                schedule="constant", eval_every=2, exact_match_max=0)
    return TrainConfig(**{**base, **kw})


def _weights(run):
    return load_file(run / "adapter" / "adapter_model.safetensors")


def test_patience_stops_the_run_and_says_why(data, tmp_path):
    """exact_match stays 0 on a random model: the first evaluation is the best, and two more
    without a better one end the run at step 6 of 12."""
    report = train(_cfg(data, tmp_path / "r", patience=2, metric="exact_match",
                        exact_match_max=2))
    assert len(report["train_losses"]) == 6 and report["kept_step"] == 2
    assert report["best"] == {"step": 2, "value": 0.0, "metric": "exact_match"}
    assert report["stopped"].startswith("early stop at step 6: exact_match did not improve")
    assert "| stopped | early stop at step 6" in (tmp_path / "r" / "report.md").read_text()


def test_the_saved_adapter_is_the_best_evaluated_one(data, other, tmp_path):
    """Validation loss rises after its best: keep best saves that step's adapter (its loss
    evaluated again equals the best), keep last the end's."""
    best = train(_cfg(data, tmp_path / "best", lr=0.01, keep="best", val_data=str(other)))
    last = train(_cfg(data, tmp_path / "last", lr=0.01, keep="last", val_data=str(other)))
    losses = {h["step"]: h["loss"] for h in best["history"]}
    step = min(losses, key=losses.get)
    assert step < 12 and best["kept_step"] == step and last["kept_step"] == 12
    assert best["best"]["value"] == pytest.approx(losses[step])
    again = evaluate_file(load_run("tiny-llama", tmp_path / "best"), str(other),
                          exact_match_max=0)
    assert again["loss"] == pytest.approx(losses[step], rel=1e-5)
    assert best["metrics"]["loss"] == pytest.approx(losses[step])
    assert _weights(tmp_path / "best").keys() == _weights(tmp_path / "last").keys()
    assert last["metrics"]["loss"] == pytest.approx(losses[12], rel=1e-5)  # the same run's end


def test_best_so_far_survives_a_kill_and_resume(data, other, tmp_path, monkeypatch):
    kw = dict(lr=0.01, keep="best", save_every=2, val_data=str(other))
    whole = train(_cfg(data, tmp_path / "whole", **kw))
    real = Trainer._evaluate
    calls = {"n": 0}

    def kill_at_third(self, tenant):
        metrics = real(self, tenant)
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return metrics
    monkeypatch.setattr(Trainer, "_evaluate", kill_at_third)
    with pytest.raises(TrainingInterrupted):
        train(_cfg(data, tmp_path / "cut", **kw))
    monkeypatch.setattr(Trainer, "_evaluate", real)
    state = json.loads((tmp_path / "cut" / "checkpoint" / "trainer_state.json").read_text())
    assert state["step"] == 6 and state["best"]["step"] == 4  # killed before the best (8)
    resumed = train(_cfg(data, tmp_path / "cut", resume=True, **kw))
    assert whole["best"]["step"] == 8 and resumed["best"]["step"] == 8
    assert resumed["best"]["value"] == pytest.approx(whole["best"]["value"], rel=1e-6)
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_one_tenant_stops_early_and_the_others_go_on(data, write, tmp_path):
    spec = tmp_path / "tenants.yaml"
    spec.write_text(yaml.safe_dump({
        "model": "tiny-llama", "method": "lora", "val_data": str(data), "val_split": 0.0,
        "eval_every": 2, "exact_match_max": 2, "batch_size": 4, "dropout": 0.0, "steps": 12,
        "tenants": [{"name": "quits", "data": str(data), "output": str(tmp_path / "q"),
                     "patience": 1, "metric": "exact_match"},
                    {"name": "stays", "data": str(data), "output": str(tmp_path / "s")}]}))
    reports = train_joint(str(spec))["reports"]
    assert len(reports["quits"]["train_losses"]) == 4 and reports["quits"]["stopped"]
    assert len(reports["stays"]["train_losses"]) == 12 and reports["stays"]["stopped"] is None
    assert reports["stays"]["kept"] == "best"


@pytest.mark.parametrize("flags,reason", [
    (["--patience", "2", "--val-split", "0"], "--patience 2: needs validation data"),
    (["--keep", "best", "--val-split", "0"], "--keep best: needs validation data"),
    (["--patience", "2", "--metric", "accuracy"], "--metric accuracy: a causal-lm run reports"),
    (["--patience", "2", "--metric", "exact_match", "--exact-match-max", "0"],
     "--exact-match-max is 0"),
    (["--patience", "-1"], "--patience: must be >= 0"),
    (["--metric", "bleu"], "invalid choice: 'bleu'"),
])
def test_selection_flags_are_checked_before_training(flags, reason, data, tmp_path, capsys):
    try:
        code = main(["train", "--model", "tiny-llama", "--data", str(data), "--steps", "4",
                     "--output", str(tmp_path / "r"), *flags])
    except SystemExit as e:  # argparse's own refusal of a choice
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and reason in err, err
    assert not (tmp_path / "r" / "checkpoint").exists()


def _events(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_events_hold_each_step_and_evaluation(data, tmp_path):
    report = train(_cfg(data, tmp_path / "r", report_to="tensorboard", eval_every=4))
    events = _events(tmp_path / "r")
    for tag in ("train/loss", "train/lr", "train/grad_norm", "train/tokens_per_second",
                "train/rss_mib", "eval/loss", "eval/perplexity"):
        assert tag in events, sorted(events)
    assert [s for s, _ in events["train/loss"]] == list(range(1, 13))
    assert [v for _, v in events["train/loss"]] == pytest.approx(report["train_losses"])
    assert [s for s, _ in events["eval/loss"]] == [4, 8, 12]
    assert events["eval/loss"][-1][1] == pytest.approx(report["history"][-1]["loss"])


def test_a_joint_run_writes_one_series_per_tenant(data, tmp_path):
    spec = tmp_path / "tenants.yaml"
    spec.write_text(yaml.safe_dump({
        "model": "tiny-llama", "method": "lora", "val_split": 0.0, "report_to": "tensorboard",
        "batch_size": 4, "tenants": [
            {"name": "a", "data": str(data), "output": str(tmp_path / "a"), "steps": 3},
            {"name": "b", "data": str(data), "output": str(tmp_path / "b"), "steps": 5}]}))
    reports = train_joint(str(spec))["reports"]
    for name, steps in (("a", 3), ("b", 5)):
        losses = _events(tmp_path / name)["train/loss"]
        assert [s for s, _ in losses] == list(range(1, steps + 1))
        assert [v for _, v in losses] == pytest.approx(reports[name]["train_losses"])


def test_trackers_are_checked_before_anything_loads(data, tmp_path, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    for value, reason in (("wandb", "the wandb package is not installed (pip install wandb)"),
                          ("tensorboard,comet", "choose none, or a comma-separated list")):
        code = main(["train", "--model", "tiny-llama", "--data", str(data), "--report-to",
                     value, "--output", str(tmp_path / "r")])
        assert code == 2 and reason in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_wandb_and_mlflow_get_the_same_series(data, tmp_path, monkeypatch):
    """Neither package is installed here: stand-ins record what peftkit calls (offline W&B,
    MLflow's client on a file store under the run) and must see the TensorBoard series."""
    import sys
    import types
    calls = []
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kw: calls.append(("init", kw)) or types.SimpleNamespace(
        log=lambda values, step: calls.append(("wandb", step, values)),
        finish=lambda: calls.append(("finish",)))
    client = types.SimpleNamespace(
        get_experiment_by_name=lambda name: None, create_experiment=lambda name: "7",
        create_run=lambda exp, run_name: types.SimpleNamespace(info=types.SimpleNamespace(
            run_id=f"{exp}-{run_name}")),
        log_param=lambda run, k, v: None,
        log_metric=lambda run, k, v, step: calls.append(("mlflow", run, step, k, v)),
        set_terminated=lambda run: calls.append(("ended", run)))
    tracking = types.ModuleType("mlflow.tracking")
    tracking.MlflowClient = lambda tracking_uri: calls.append(("uri", tracking_uri)) or client
    mlflow = types.ModuleType("mlflow")
    mlflow.tracking = tracking
    for name, module in (("wandb", wandb), ("mlflow", mlflow), ("mlflow.tracking", tracking)):
        monkeypatch.setitem(sys.modules, name, module)
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object()
                        if name in ("wandb", "mlflow") else real(name, *a))
    for var in ("WANDB_MODE", "MLFLOW_TRACKING_URI"):  # recorded, so teardown restores it
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    report = train(_cfg(data, tmp_path / "r", report_to="wandb,mlflow", steps=3, eval_every=3))
    init = next(kw for c, *rest in calls if c == "init" for kw in rest)
    assert init["name"] == "r" and init["dir"] == str(tmp_path / "r")
    assert os.environ["WANDB_MODE"] == "offline"
    assert [v["train/loss"] for c, s, v in (x for x in calls if x[0] == "wandb")
            if "train/loss" in v] == pytest.approx(report["train_losses"])
    assert ("uri", (tmp_path / "r" / "mlruns").resolve().as_uri()) in calls
    mine = [(s, v) for c, run, s, k, v in (x for x in calls if x[0] == "mlflow")
            if k == "train/loss"]
    assert [s for s, _ in mine] == [1, 2, 3]
    assert ("finish",) in calls and ("ended", "7-r") in calls
