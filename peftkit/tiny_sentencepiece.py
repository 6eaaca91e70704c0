"""Tiny SentencePiece-style tokenizers and models for tests and benchmarks of the GGUF export
(no download). The tokenizers are trained here in a second and laid out as the real ones are in
their tokenizer.json: BPE over '▁'-marked words with byte fallback (an unknown
character becomes its UTF-8 bytes as <0xXX> tokens).

- "llama2" (Llama 2, Mistral v0.1, Phi-3): <unk> <s> </s>, the 256 byte tokens, then the pieces;
  a dummy-prefix space before the text (normalizer Prepend + Replace); Phi-3's chat tokens.
- "gemma": <pad> <eos> <bos> <unk>, no dummy prefix, Gemma's turn tokens.
"""

from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = ("The quick brown fox jumps over the lazy dog. Shipping to the warehouse takes three "
          "days; returns are free within thirty days. Your order number is on the receipt. "
          "Please answer briefly and politely, then thank the customer for their patience. "
          "Numbers like 12, 345 and 2024 appear in orders, invoices and tracking codes.")
PHI3_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
GEMMA_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<start_of_turn>"
                  "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}"
                  "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n"
                  "{% endif %}")
STYLES = {
    "llama2": dict(head=["<unk>", "<s>", "</s>"], chat=["<|endoftext|>", "<|user|>", "<|assistant|>", "<|end|>"],
                   template=PHI3_TEMPLATE, prefix=True,
                   names=dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>")),
    "gemma": dict(head=["<pad>", "<eos>", "<bos>", "<unk>"],
                  chat=["<start_of_turn>", "<end_of_turn>"], template=GEMMA_TEMPLATE,
                  prefix=False, names=dict(pad_token="<pad>", eos_token="<eos>",
                                           bos_token="<bos>", unk_token="<unk>")),
}


def spm_tokenizer(style: str = "llama2", pieces: int = 200) -> PreTrainedTokenizerFast:
    """A tokenizer of `style` whose vocabulary is the head tokens, the 256 byte tokens, then
    `pieces` characters and merges learned from CORPUS, then the chat tokens."""
    s = STYLES[style]
    # learn the pieces within words ('▁' starts a word), as SentencePiece splits on whitespace
    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "▁")
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    learner.train_from_iterator([CORPUS] * 4, trainers.BpeTrainer(vocab_size=pieces,
                                                                  show_progress=False))
    learned = sorted(learner.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(s["head"])}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" "))
              for m in _merges(learner)]
    unk = "<unk>"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True,
                               fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if s["prefix"] else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()] +
                                    ([decoders.Strip(" ", 1, 0)] if s["prefix"] else []))
    bos = s["names"]["bos_token"]  # both add BOS to a text, as their tokenizer.json does
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])])
    tok.add_special_tokens(s["chat"])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **s["names"])
    out.chat_template = s["template"]
    return out


def spm_model(family: str, style: str, seed: int = 7):
    """(a tiny random `family` causal LM, its `style` tokenizer); Gemma's head_dim is its
    query_pre_attn_scalar, as in Gemma 2 2B/9B (llama.cpp scales queries by head_dim)."""
    import torch
    tok = spm_tokenizer(style)
    kw = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              intermediate_size=128, vocab_size=len(tok), max_position_embeddings=256)
    if family.startswith("gemma"):
        kw.update(head_dim=256, query_pre_attn_scalar=256)
    config = AutoConfig.for_model(family, **kw)
    config.bos_token_id, config.eos_token_id = tok.bos_token_id, tok.eos_token_id
    config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).eval(), tok


def _merges(learner: Tokenizer) -> list:
    import json
    return json.loads(learner.to_str())["model"]["merges"]
