"""Completions' `suffix`: fill-in-the-middle, in the prefix-suffix-middle order the code models
that have it were trained on, with their own marker tokens; a model without them is a 400
(its answer to a suffix it cannot see would be a plain continuation, silently)."""

from peftkit.errors import PeftkitError

MARKERS = (("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
           ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder(2), SantaCoder
           ("<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"))  # DeepSeek-Coder


def fill_in_middle(tok, prefix: str, suffix: str) -> str:
    """The prompt whose continuation is the text between `prefix` and `suffix`."""
    markers = getattr(tok, "_peftkit_fim", False)
    if markers is False:
        vocab = tok.get_vocab()
        markers = tok._peftkit_fim = next(
            (m for m in MARKERS if all(t in vocab for t in m)), None)
    if markers is None:
        raise PeftkitError("suffix: this model has no fill-in-the-middle tokens (Qwen2.5-"
                           "Coder's, StarCoder's or DeepSeek-Coder's), so it cannot see a suffix")
    begin, hole, end = markers
    return f"{begin}{prefix}{hole}{suffix}{end}"
