"""The main job, quick mode, on the real default model: each adapter must beat the base on its
own customer's task by a wide margin, and served answers must show their own customer's format."""

import pytest

from peftkit.demo import DemoConfig, run_demo
from peftkit.demo.tasks import TASKS


@pytest.mark.slow  # 4.6 min; CI runs the full demo after `make test` and checks its output
def test_demo_quick_end_to_end(tmp_path):
    result = run_demo(DemoConfig(output=str(tmp_path), quick=True))
    gaps = {c: acc["adapter"] - acc["base"] for c, acc in result["accuracy"].items()}
    assert all(gap >= 0.3 for gap in gaps.values()), gaps  # quick mode: 10 steps of batch 4
    assert sum(gaps.values()) / len(gaps) >= 0.6, gaps
    served = result["served"]
    assert served["total"] == 3 * len(TASKS)
    assert served["foreign"] == 0
    assert served["own_format"] == served["total"]
    assert result["memory"]["shared_bytes"] < 0.5 * result["memory"]["separate_models_bytes"]
    for name in ("demo_report.md", "demo_accuracy.png", "demo_memory.png", "demo_load.png"):
        assert (tmp_path / name).stat().st_size > 0


def _demo_output(tmp_path, accuracy: float = 1.0, correct: int = 15, foreign: int = 0):
    import json
    from peftkit.demo.report import PLOTS
    tmp_path.mkdir()
    for name in ("demo_report.md", *PLOTS):
        (tmp_path / name).write_bytes(b"x")
    acc = {t.customer: {"base": 0.0, "adapter": 1.0} for t in TASKS}
    acc["acme"]["adapter"] = accuracy
    (tmp_path / "demo_result.json").write_text(json.dumps(
        {"accuracy": acc, "served": {"total": 15, "correct": correct, "foreign": foreign}}))
    return tmp_path


def test_ci_demo_check_names_each_shortfall(tmp_path):
    """CI's check of `make demo`'s output (peftkit/demo/check.py) passes a good run and names
    every way a bad one falls short."""
    from peftkit.demo.check import main, shortfalls
    good = _demo_output(tmp_path / "good")
    assert shortfalls(good) == [] and main([str(good)]) == 0
    weak = shortfalls(_demo_output(tmp_path / "weak", accuracy=0.875))
    assert len(weak) == 1 and "acme: own adapter 88%" in weak[0]
    wrong = shortfalls(_demo_output(tmp_path / "wrong", correct=14, foreign=1))
    assert any("14/15" in p for p in wrong) and any("1 answers in another" in p for p in wrong)
    bare = tmp_path / "bare"
    bare.mkdir()
    lost = shortfalls(bare)
    assert any("demo_result.json: missing" in p for p in lost)
    assert any("demo_accuracy.png" in p for p in lost) and main([str(bare)]) == 1
