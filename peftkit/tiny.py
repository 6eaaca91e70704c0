"""Tiny randomly initialised models for tests: built from a config with a fixed seed, no download.

`tiny-llama` mirrors the default causal LM's architecture (Llama, grouped-query attention, tied
embeddings, ChatML template); `tiny-bert` mirrors the default encoder (BERT). Both share a
byte-level tokenizer, so any text tokenizes and no vocabulary file is needed.
"""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, LlamaConfig, PreTrainedTokenizerFast

from peftkit.data.templates import CHATML

SEED = 1234
LLAMA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _byte_level_tokenizer(specials: list[str]) -> Tokenizer:
    # Special tokens take ids 0..k-1, then the 256 byte symbols; no merges, so one token per byte.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {tok: i for i, tok in enumerate(specials)}
    vocab.update({ch: len(specials) + i for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return tok


def tiny_llama_tokenizer() -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(
        tokenizer_object=_byte_level_tokenizer(LLAMA_SPECIALS),
        bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    tok.chat_template = CHATML
    return tok


def tiny_bert_tokenizer() -> PreTrainedTokenizerFast:
    raw = _byte_level_tokenizer(BERT_SPECIALS)
    raw.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(LLAMA_SPECIALS) + 256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
        # pad is not eos: nn.Embedding zeroes the pad row, and a tied head could then never
        # predict end-of-sequence.
        pad_token_id=0, rms_norm_eps=1e-5, architectures=["LlamaForCausalLM"],
    )


def tiny_bert_config() -> BertConfig:
    return BertConfig(
        vocab_size=len(BERT_SPECIALS) + 256, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=512, pad_token_id=0,
    )


def seeded_init(model_cls, config):
    """Build `model_cls(config)` with weights fixed by SEED, without touching the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        return model_cls(config)


TINY = {
    "tiny-llama": (tiny_llama_config, tiny_llama_tokenizer),
    "tiny-bert": (tiny_bert_config, tiny_bert_tokenizer),
}
