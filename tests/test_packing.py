"""Packed batches (issue 25.4): several examples per row, each with its own positions and
attending only to itself; the loss is the unpacked rows' loss."""


import pytest
import torch
from safetensors.torch import load_file

from peftkit.cli import main
from peftkit.data.tokenize import Example
from peftkit.train import TrainConfig, train
from peftkit.train.batches import collate, pack
from tests.families import DECODERS, OUTSIDE

LENGTHS = [5, 9, 3, 12, 7, 4]


def _examples():
    g = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(3, 250, (n,), generator=g).tolist()
        out.append(Example(ids, [-100] * (n // 2) + ids[n // 2:], 1))
    return out


def test_a_packed_batch_lays_examples_end_to_end():
    batch = pack(_examples(), 20, 0, "sdpa")
    assert batch["tokens"] == sum(LENGTHS) and batch["input_ids"].shape == (3, 19)
    assert batch["position_ids"][0].tolist()[:14] == list(range(5)) + list(range(9))
    assert batch["labels"][0, 5].item() == -100  # the second example's first label
    mask = batch["attention_mask"][0, 0]
    assert mask[6, 5].item() and not mask[6, 4].item()  # within its example only
    assert not mask[5, 6].item()  # causal
    eager = pack(_examples(), 20, 0, "eager")["attention_mask"]
    assert eager.dtype == torch.float32 and eager[0, 0, 6, 4] < -1e30


@pytest.mark.parametrize("family", [f for f in DECODERS + OUTSIDE if f != "bloom"])
def test_packed_loss_equals_unpacked_loss_for_every_family(family, family_models):
    from peftkit.models import load_base
    model = load_base(str(family_models[family])).model.eval()
    exs = _examples()
    plain = collate(exs, 0)
    packed = pack(exs, 20, 0, model.config._attn_implementation)
    packed.pop("tokens")
    with torch.no_grad():
        want = model(**plain).loss
        got = model(**packed, use_cache=False).loss
    assert abs(float(got - want)) <= 1e-5, family


def test_packed_training_equals_unpacked_training(write, tmp_path):
    rows = [{"prompt": f"Q: {'word ' * (i % 5)}item {i}?", "completion": f"A{i % 3} ok"}
            for i in range(12)]
    data = write("lm.jsonl", rows)
    common = dict(model="tiny-llama", data=str(data), method="lora", steps=6, batch_size=6,
                  val_split=0.0, dropout=0.0, max_length=64, lr=1e-2)
    plain = train(TrainConfig(**common, output=str(tmp_path / "plain")))
    packed = train(TrainConfig(**common, output=str(tmp_path / "packed"), packing=True))
    assert max(abs(a - b) for a, b in zip(plain["train_losses"], packed["train_losses"])) <= 1e-5
    a = load_file(tmp_path / "plain" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "packed" / "adapter" / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert packed["largest_batch"][0] < plain["largest_batch"][0]  # fewer rows a step
    assert packed["tokens_per_second"] > 0


@pytest.mark.parametrize("flags,reason", [
    (["--method", "prompt"], "virtual tokens are prepended per row"),
    (["--method", "probe"], "a probe trains on one feature per example"),
])
def test_packing_refuses_what_it_cannot_pack(flags, reason, write, tmp_path, capsys):
    data = write("lm.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    code = main(["train", "--model", "tiny-llama", "--data", str(data), "--packing",
                 "--output", str(tmp_path / "r"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and reason in err and "drop --packing" in err, err


def test_packing_refuses_bloom_in_one_line(family_models, write, tmp_path, capsys):
    data = write("lm.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    code = main(["train", "--model", str(family_models["bloom"]), "--data", str(data),
                 "--packing", "--output", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "bloom's attention builds its own mask" in err and "\n" not in err
