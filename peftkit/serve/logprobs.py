"""A finished row's token log-probabilities (engine `Request.logprobs`, recorded when its
`Sampling.logprobs` is set) in OpenAI's two shapes: chat's `logprobs.content` and the legacy
completions' `tokens` / `token_logprobs` / `top_logprobs` / `text_offset`. A token's text is
its own decoding (a piece of a multi-byte character decodes to U+FFFD; `bytes` are that
text's UTF-8)."""


def _piece(tok, token: int) -> str:
    return tok.decode([token])


def chat_logprobs(req, tok) -> dict | None:
    if req.sampling.logprobs is None:
        return None

    def entry(token: int, logprob: float) -> dict:
        text = _piece(tok, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}
    return {"content": [{**entry(token, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for token, lp, top in req.logprobs], "refusal": None}


def completion_logprobs(req, tok) -> dict | None:
    if req.sampling.logprobs is None:
        return None
    pieces = [_piece(tok, token) for token, _, _ in req.logprobs]
    offsets, at = [], 0
    for piece in pieces:
        offsets.append(at)
        at += len(piece)
    return {"tokens": pieces, "token_logprobs": [lp for _, lp, _ in req.logprobs],
            "top_logprobs": [{_piece(tok, i): v for i, v in top} for _, _, top in req.logprobs]
            if req.sampling.logprobs else None,
            "text_offset": offsets}
