"""Everything after training, per architecture family (issue 24 item 3): a LoRA adapter saved
and read back is the same adapter; PEFT 0.21 loads it and computes the same outputs; a mixed
two-adapter batch equals each adapter alone; peftkit's batched KV-cache decoding gives the
greedy tokens of transformers' `generate`; `plan --model DIR` counts the parameters exactly."""

import warnings

import peft
import pytest
import torch

from peftkit.formats import load_adapter, load_adapters, save_adapter
from peftkit.merged import export_merged
from peftkit.generation import generate_ids
from peftkit.methods import IA3Config, LoraConfig, add_adapter
from peftkit.models import load_base, peek_config
from peftkit.plan.shapes import shape_from_config
from peftkit.train.build import adapter_config
from peftkit.train.config import TrainConfig
from tests.families import DECODERS, ENCODERS, MOE, OUTSIDE
from tests.helpers import batch, randomize

LORA = LoraConfig(r=4, alpha=8, targets="all-linear")
PROMPTS = [[5, 17, 33, 61, 90, 121], [7, 44, 200]]  # different lengths: left padding, one batch


def _outputs(model, ids, slots=None) -> torch.Tensor:
    kw = {} if slots is None else {"slots": slots}
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    return out.logits if hasattr(out, "logits") and out.logits is not None \
        else out.last_hidden_state


def _trained(directory, config, seed, out):
    """A LoRA adapter with non-trivial weights, saved to `out`; its outputs on `batch()`."""
    adapted = add_adapter(load_base(str(directory)).model, config)
    randomize(adapted, seed=seed)
    save_adapter(adapted, out)
    return adapted, _outputs(adapted, batch())


@pytest.mark.parametrize("family", DECODERS + OUTSIDE + ENCODERS)
def test_an_adapter_survives_save_peft_and_a_mixed_batch(family, family_models, tmp_path):
    directory = family_models[family]
    fresh = lambda: load_base(str(directory)).model  # noqa: E731
    ids = batch()
    with torch.no_grad():
        base = _outputs(fresh(), ids)
    _, want = _trained(directory, LORA, 1, tmp_path / "a")
    assert (want - base).abs().max() > 1e-3  # the adapter changes the outputs
    again = load_adapter(fresh(), tmp_path / "a")
    assert torch.equal(_outputs(again, ids), want)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(fresh(), tmp_path / "a").eval()
    assert not [w for w in said if "missing adapter keys" in str(w.message)]  # the same modules
    assert (_outputs(theirs, ids) - want).abs().max() <= 1e-4
    _, other = _trained(directory, LORA, 2, tmp_path / "b")
    mixed = load_adapters(fresh(), {"a": tmp_path / "a", "b": tmp_path / "b"})
    got = _outputs(mixed, ids, slots=torch.tensor([1, -1, 0]))
    assert (got[0] - other[0]).abs().max() <= 1e-5
    assert (got[1] - base[1]).abs().max() <= 1e-5
    assert (got[2] - want[2]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", DECODERS + OUTSIDE)
def test_a_merged_export_is_a_plain_model_with_the_adapters_outputs(family, family_models,
                                                                     tmp_path):
    """Merge folds the adapter into the base's own layout (GPT-2's Conv1D stays (in, out)) and
    keeps tied embeddings tied: transformers loads the directory as a model of the family."""
    from transformers import AutoModelForCausalLM
    adapted, want = _trained(family_models[family], LORA, 1, tmp_path / "a")
    export_merged(adapted, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert (_outputs(plain, batch()) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("family", [f for f in DECODERS + OUTSIDE if f not in MOE])
def test_ia3_at_its_structural_place_loads_in_peft(family, family_models, tmp_path):
    """IA³ on the placement found from the model's structure, read by PEFT as its own."""
    directory = family_models[family]
    model = load_base(str(directory)).model
    config = adapter_config(TrainConfig(model=str(directory), method="ia3", data="-"), model)
    assert isinstance(config, IA3Config) and config.feedforward
    _, want = _trained(directory, config, 1, tmp_path / "ia3")
    theirs = peft.PeftModel.from_pretrained(load_base(str(directory)).model,
                                            tmp_path / "ia3").eval()
    assert (_outputs(theirs, batch()) - want).abs().max() <= 1e-4


@pytest.mark.parametrize("family", DECODERS + OUTSIDE)
def test_batched_decoding_gives_transformers_greedy_tokens(family, family_models, tmp_path):
    directory = family_models[family]
    ours, _ = _trained(directory, LORA, 1, tmp_path / "a")
    base = load_base(str(directory))
    got = generate_ids(ours, base.tokenizer, PROMPTS, max_new_tokens=6)
    theirs = peft.PeftModel.from_pretrained(base.model, tmp_path / "a").eval()
    for prompt, tokens in zip(PROMPTS, got):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = theirs.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                  max_new_tokens=6, do_sample=False,
                                  pad_token_id=base.tokenizer.pad_token_id)
        want = out[0, len(prompt):].tolist()
        eos = base.tokenizer.eos_token_id
        want = want[:want.index(eos)] if eos in want else want  # peftkit leaves EOS out
        assert tokens == want, (family, tokens, want)
    assert sum(map(len, got)) >= 6, got  # the seeded models do generate


@pytest.mark.parametrize("family", DECODERS + OUTSIDE + ENCODERS)
def test_plan_counts_the_family_exactly(family, family_models):
    directory = family_models[family]
    model = load_base(str(directory)).model
    shape = shape_from_config(str(directory), peek_config(str(directory)))
    assert shape.params == sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if hasattr(m, "weight") and getattr(m.weight, "dim", lambda: 0)() == 2
                 and ".0." in n and type(m).__name__ in ("Linear", "Conv1D", "FalconLinear"))
    assert sum(i * o for _, i, o in shape.linear) == linear, shape.linear
    if family in MOE:
        c = model.config
        experts = getattr(c, "num_local_experts", None) or c.num_experts
        fused = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 3)
        assert shape.other_linear == fused
        assert shape.active == shape.params - fused * (1 - c.num_experts_per_tok / experts)
    else:
        assert shape.active == shape.params
