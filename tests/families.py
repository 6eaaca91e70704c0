"""Tiny random models of every common architecture family, built by transformers from a config
(no download): the families of issue 24 and one outside its list."""

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from peftkit.tiny import tiny_llama_tokenizer

DECODERS = ["llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
            "phi", "phi3", "gpt2", "gpt_neox", "gptj", "falcon", "mixtral", "olmo2",
            "starcoder2", "opt", "bloom", "gpt_bigcode", "granite"]
ENCODERS = ["bert", "roberta", "xlm-roberta", "distilbert", "deberta-v2", "electra",
            "modernbert"]
OUTSIDE = ["stablelm"]  # not in the list: structure detection has to find its layers
MOE = ("mixtral", "qwen3_moe")
GQA = {"llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
       "phi3", "mixtral", "olmo2", "starcoder2", "granite", "stablelm"}
SIZES = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
             vocab_size=320, max_position_embeddings=256)
OWN_NAMES = {  # families whose configs name the sizes their own way
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256, rotary_dim=8),
    "gpt_bigcode": dict(n_embd=64, n_layer=2, n_head=4, n_positions=256),
    "bloom": dict(n_layer=2, n_head=4), "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "falcon": dict(new_decoder_architecture=False),
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                      head_dim=16),
    "gemma": dict(head_dim=16), "gemma2": dict(head_dim=16), "gemma3_text": dict(head_dim=16),
    "distilbert": dict(dim=64, n_layers=2, n_heads=4, hidden_dim=128),
}


def family_config(family: str):
    tok = tiny_llama_tokenizer()
    kw = {**SIZES, **({"num_key_value_heads": 2} if family in GQA else {}),
          **OWN_NAMES.get(family, {})}
    config = AutoConfig.for_model(family, **kw)
    config.pad_token_id, config.eos_token_id = tok.pad_token_id, tok.eos_token_id
    config.bos_token_id = tok.bos_token_id
    return config


def build_family(family: str, directory: Path) -> Path:
    """A saved random-weight model of `family` with the tiny byte-level tokenizer."""
    auto = AutoModel if family in ENCODERS else AutoModelForCausalLM
    torch.manual_seed(sum(map(ord, family)))  # the same weights whatever ran before
    auto.from_config(family_config(family)).save_pretrained(directory)
    tiny_llama_tokenizer().save_pretrained(directory)
    return directory
