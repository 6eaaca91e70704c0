"""A finished row's token log-probabilities (engine `Request.logprobs`, recorded when its
`Sampling.logprobs` is set) in OpenAI's two shapes: chat's `logprobs.content` and the legacy
completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`. A token's `bytes` are
its own bytes (a piece of a multi-byte character is a piece: the answer's bytes are the tokens'
bytes joined, as OpenAI's); its text is those bytes decoded (a piece shows as U+FFFD). A stream
gives each chunk the tokens chosen since the last one."""

import functools
import json
import re

BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback


@functools.cache
def byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, undone: the character a vocabulary shows -> its byte."""
    keep = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def _byte_level(tok) -> bool:
    cached = getattr(tok, "_peftkit_byte_level", None)
    if cached is None:
        try:
            decoder = json.loads(tok.backend_tokenizer.to_str()).get("decoder") or {}
        except AttributeError:  # a slow tokenizer: no byte-level vocabulary to undo
            decoder = {}
        kinds = {decoder.get("type")} | {d.get("type") for d in decoder.get("decoders", [])}
        cached = tok._peftkit_byte_level = "ByteLevel" in kinds
    return cached


def token_bytes(tok, token: int) -> bytes:
    piece = tok.convert_ids_to_tokens(token)
    if _byte_level(tok):
        table = byte_decoder()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    byte = BYTE_TOKEN.fullmatch(piece)
    if byte:
        return bytes([int(byte.group(1), 16)])
    return tok.decode([token]).encode("utf-8")


def _entry(tok, token: int, logprob: float) -> dict:
    raw = token_bytes(tok, token)
    return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob,
            "bytes": list(raw)}


def chat_logprobs(req, tok, entries: list | None = None) -> dict | None:
    """Chat's `logprobs` of the row's tokens (or of `entries`, a stream chunk's share)."""
    if req.sampling.logprobs is None:
        return None
    entries = req.logprobs if entries is None else entries
    return {"content": [{**_entry(tok, token, lp),
                         "top_logprobs": [_entry(tok, i, v) for i, v in top]}
                        for token, lp, top in entries], "refusal": None}


def completion_logprobs(req, tok, entries: list | None = None, offset: int = 0) -> dict | None:
    """The legacy completions' `logprobs` of the row's tokens (or of `entries`, a stream
    chunk's share, whose text starts at character `offset` of the answer)."""
    if req.sampling.logprobs is None:
        return None
    entries = req.logprobs if entries is None else entries
    pieces = [_entry(tok, token, 0.0)["token"] for token, _, _ in entries]
    offsets, at = [], offset
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in entries],
            "top_logprobs": [None if lp is None else {_entry(tok, i, 0.0)["token"]: v
                                                      for i, v in top}
                             for _, lp, top in entries] if req.sampling.logprobs else None,
            "text_offset": offsets}
