"""A Hugging Face fast tokenizer as GGUF metadata, in the two forms llama.cpp tokenizes with:

- byte-level BPE (`tokenizer.ggml.model = gpt2`: SmolLM2, Llama 3, Qwen, Phi-4): tokens, types
  and merges, and the pre-tokenizer's split rule by llama.cpp's name for it;
- SentencePiece BPE with byte fallback (`llama`: Llama 2, Mistral v0.1, Phi-3, Gemma): tokens,
  scores and types (the 256 <0xXX> tokens typed BYTE), and whether a space is put before the
  text (Llama 2's dummy prefix; Gemma has none). llama.cpp merges the adjacent pair whose joined
  piece scores highest, so each piece scores minus the rank of the merge that makes it: the
  order in which Hugging Face's BPE applies the merges (its tokenizer.json keeps no scores).

Anything else (WordPiece, Unigram, tiktoken files) is refused by name.
"""

import json
import re

from peftkit.errors import PeftkitError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # llama.cpp's types
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def write_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    """Write `tokenizer` into `writer`; returns llama.cpp's model name for it."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        kind = "llama"
    elif model.get("type") == "BPE" and _has(spec.get("pre_tokenizer"), "ByteLevel"):
        kind = "gpt2"
    else:
        raise PeftkitError("--for gguf: writes byte-level BPE tokenizers (SmolLM2, Llama 3, "
                           "Qwen) and SentencePiece BPE ones with byte fallback (Llama 2, "
                           f"Mistral, Phi-3, Gemma); this one is {model.get('type')}"
                           f"{' without byte fallback' if model.get('type') == 'BPE' else ''}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [UNUSED] * vocab_size
    added = {i: t.special for i, t in tokenizer.added_tokens_decoder.items()}
    special = set(tokenizer.all_special_ids)
    for token, i in tokenizer.get_vocab().items():
        if i >= vocab_size:
            continue
        tokens[i] = token
        if i in special or added.get(i):
            types[i] = CONTROL
        elif i in added:
            types[i] = USER_DEFINED
        elif kind == "llama" and BYTE_TOKEN.fullmatch(token):
            types[i] = BYTE
        else:
            types[i] = NORMAL
    pairs = [m.split(" ", 1) if isinstance(m, str) else m for m in model.get("merges", [])]
    writer.add_tokenizer_model(kind)
    if kind == "gpt2":
        # GPT-2's split regex (a plain ByteLevel pre-tokenizer, as transformers builds
        # SmolLM2's): llama.cpp's "gpt-2"; its "default" splits text otherwise (measured)
        pre = spec.get("pre_tokenizer") or {}
        writer.add_tokenizer_pre("gpt-2" if pre.get("type") == "ByteLevel" and
                                 pre.get("use_regex") else "default")
        writer.add_token_merges([" ".join(p) for p in pairs])
    else:
        unk = tokenizer.unk_token_id
        if unk is not None and unk < vocab_size:
            types[unk] = UNKNOWN
            writer.add_unk_token_id(unk)
        writer.add_token_scores(piece_scores(tokens, pairs))
        writer.add_add_space_prefix(dummy_prefix(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for name, value in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                        ("pad", tokenizer.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{name}_token_id")(value)
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a").input_ids[:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
    return kind


def piece_scores(tokens: list[str], merges: list) -> list[float]:
    """Minus the rank of the first merge that makes each piece; pieces no merge makes (single
    characters, bytes, control tokens) score below every merged piece, where llama.cpp never
    compares them (it starts from characters and only scores joined pairs)."""
    rank = {}
    for r, (left, right) in enumerate(merges):
        rank.setdefault(left + right, r)
    floor = -float(len(merges))
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def dummy_prefix(spec: dict) -> bool:
    """Whether the tokenizer puts a space before the text: a Prepend('▁') normalizer (Llama 2's
    tokenizer.json) or a Metaspace pre-tokenizer that prepends."""
    if _has(spec.get("normalizer"), "Prepend"):
        return True
    meta = _find(spec.get("pre_tokenizer"), "Metaspace")
    return bool(meta) and meta.get("prepend_scheme", "always" if meta.get("add_prefix_space")
                                   else "never") != "never"


def _find(node, kind: str) -> dict | None:
    """The first step of type `kind` in a tokenizer.json component (or its Sequence)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == kind:
        return node
    for child in node.get("normalizers") or node.get("pretokenizers") or []:
        if (found := _find(child, kind)) is not None:
            return found
    return None


def _has(node, kind: str) -> bool:
    return _find(node, kind) is not None
