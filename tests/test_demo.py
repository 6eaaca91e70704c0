"""The main job, quick mode, on the real default model: each adapter must beat the base on its
own customer's task by a wide margin, and served answers must show their own customer's format."""

from peftkit.demo import DemoConfig, run_demo
from peftkit.demo.tasks import TASKS


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
