"""Completions' `suffix` (fill-in-the-middle in the model's own markers, a 400 for a model
without them) and `best_of` (issue 33.2), through the official client."""

import openai
import pytest
from openai import OpenAI

from peftkit.models import load_base
from peftkit.serve.config import ServeConfig
from peftkit.serve.server import Server
from tests.serve_harness import running

QWEN_FIM = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """tiny-llama as it is (no FIM tokens), and with Qwen2.5-Coder's FIM tokens added."""
    fim = tmp_path_factory.mktemp("fim-llama")
    base = load_base("tiny-llama")
    base.tokenizer.add_special_tokens({"additional_special_tokens": QWEN_FIM})
    base.model.resize_token_embeddings(len(base.tokenizer))
    base.model.save_pretrained(fim)
    base.tokenizer.save_pretrained(fim)
    return tmp_path_factory.mktemp("no-adapters"), str(fim)


def test_suffix_is_fill_in_the_middle_in_the_models_markers(bases):
    adapters, fim = bases
    with running(Server(ServeConfig(base=fim, adapters=str(adapters)))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        asked = client.completions.create(model=fim, prompt="def add(a, b):", suffix="\nprint(",
                                          max_tokens=6, temperature=0)
        laid_out = client.completions.create(
            model=fim, prompt="<|fim_prefix|>def add(a, b):<|fim_suffix|>\nprint(<|fim_middle|>",
            max_tokens=6, temperature=0)
        plain = client.completions.create(model=fim, prompt="def add(a, b):", max_tokens=6,
                                          temperature=0)
        assert asked.choices[0].text == laid_out.choices[0].text != plain.choices[0].text
        assert asked.usage.prompt_tokens == laid_out.usage.prompt_tokens
        for kw, says in (({"prompt": [5, 6]}, "needs text prompts"),
                         ({"prompt": "x", "echo": True}, "not supported with echo")):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(model=fim, suffix="y", max_tokens=2, **kw)
            assert e.value.body["param"] == "suffix" and says in e.value.body["message"]


def test_suffix_on_a_model_without_fim_tokens_is_a_400(bases):
    adapters, _ = bases
    with running(Server(ServeConfig(base="tiny-llama", adapters=str(adapters)))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny-llama", prompt="def f(", suffix=")",
                                      max_tokens=2)
        assert e.value.body["param"] == "suffix"
        assert "no fill-in-the-middle tokens" in e.value.body["message"]


def test_best_of_returns_the_likeliest_candidates(bases):
    adapters, _ = bases
    with running(Server(ServeConfig(base="tiny-llama", adapters=str(adapters),
                                    max_batch=8))) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        ask = dict(model="tiny-llama", prompt="say one:", max_tokens=5, temperature=1.0)
        best = client.completions.create(**ask, seed=11, n=2, best_of=4)
        solo = [client.completions.create(**ask, seed=11 + j, logprobs=0).choices[0]
                for j in range(4)]
        mean = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in solo]
        ranked = sorted(range(4), key=mean.__getitem__, reverse=True)
        assert [c.text for c in best.choices] == [solo[k].text for k in ranked[:2]]
        assert [c.index for c in best.choices] == [0, 1]
        assert all(c.logprobs is None for c in best.choices)  # not asked for
        assert best.usage.completion_tokens == sum(len(c.logprobs.tokens) for c in solo)
        for kw, says in (({"n": 3, "best_of": 2}, "must be at least n"),
                         ({"best_of": 3, "stream": True}, "not supported with stream"),
                         ({"best_of": 5, "prompt": ["a", "b"]}, "over this server's "
                                                                 "--max-batch 8")):
            with pytest.raises(openai.BadRequestError) as e:
                client.completions.create(**{**ask, **kw})
            assert e.value.body["param"] == "best_of" and says in e.value.body["message"]
