"""Training quality on real data (issue 15): a seeded, small version of bench/quality.py's SST-2
runs on MiniLM-L6, asserting the ordering that holds robustly, so a regression in training
quality (defaults, pooling, label handling, schedules) fails CI."""

import pytest

from peftkit.data import sst2
from peftkit.train import TrainConfig, train

N_TRAIN = 512
# the default learning rates (train/config.py default_lr, the bench's), fewer examples; the
# probe's epochs cost only its head (features are cached), so it takes more of them
RUNS = {"full": (dict(epochs=3), 0.75), "lora": (dict(epochs=3), 0.75),
        "probe": (dict(epochs=30), 0.70)}


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    if not sst2.available():
        pytest.skip(sst2.MISSING)
    return sst2.write_split(tmp_path_factory.mktemp("sst2"), N_TRAIN, seed=0)


@pytest.mark.parametrize("method", list(RUNS))
def test_minilm_learns_sst2(split, tmp_path, method):
    settings, floor = RUNS[method]
    train_path, dev_path = split
    report = train(TrainConfig(model="minilm-l6", data=str(train_path), val_data=str(dev_path),
                               method=method, task="classify", output=str(tmp_path / method),
                               batch_size=32, max_length=64, dropout=0.0, seed=0, **settings))
    m = report["metrics"]
    assert m["accuracy"] >= floor, m
    assert m["macro_f1"] >= floor - 0.05, m  # not one class for everything
