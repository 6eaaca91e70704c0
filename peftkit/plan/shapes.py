"""Model shapes for planning: exact parameter and linear-layer counts from a config, built on
the meta device (no weights), or documented defaults for a bare size such as `70B`.

A size string means N = exactly that many parameters (so 70B is 70e9, as in the seed's
arithmetic); layers, hidden size, heads and vocabulary come from the nearest documented
architecture below, and only activations, embeddings and adapter sizes use them.
"""

import re
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError

# name: (params, layers, hidden, ffn, heads, kv_heads, vocab, tied) — public configs
SIZE_DEFAULTS = {
    "135M": (135e6, 30, 576, 1536, 9, 3, 49152, True),        # SmolLM2-135M
    "1B": (1.24e9, 16, 2048, 8192, 32, 8, 128256, True),       # Llama-3.2-1B
    "3B": (3.21e9, 28, 3072, 8192, 24, 8, 128256, True),       # Llama-3.2-3B
    "7B": (6.74e9, 32, 4096, 11008, 32, 32, 32000, False),     # Llama-2-7B
    "8B": (8.03e9, 32, 4096, 14336, 32, 8, 128256, False),     # Llama-3-8B
    "13B": (13.0e9, 40, 5120, 13824, 40, 40, 32000, False),    # Llama-2-13B
    "70B": (69.0e9, 80, 8192, 28672, 64, 8, 32000, False),     # Llama-2-70B
    "405B": (405e9, 126, 16384, 53248, 128, 8, 128256, False),  # Llama-3.1-405B
}
SIZE_RE = re.compile(r"^(\d+(?:\.\d+)?)\s*([KMBT])$", re.IGNORECASE)
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
BLOCK_LISTS = ("layers", "layer", "h", "blocks")  # a model's list of blocks: Llama, BERT, GPT-2
FIRST_BLOCK = re.compile(rf"(^|\.)({'|'.join(BLOCK_LISTS)})\.0\.")


@dataclass
class Shape:
    name: str
    params: float  # N
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    embedding_params: float  # input embeddings (+ an untied output head)
    linear: list[tuple[str, int, int]]  # (leaf name, in, out) of the linear layers of ONE block
    model_type: str = "llama"

    @property
    def quantizable_params(self) -> float:
        """Parameters in linear layers of the blocks (what NF4 quantizes)."""
        return self.layers * sum(i * o for _, i, o in self.linear)

    def targeted(self, targets="all-linear") -> list[tuple[str, int, int]]:
        """The block's linear layers an adapter with these targets wraps."""
        return [(n, i, o) for n, i, o in self.linear if targets == "all-linear" or n in targets]

    def adapter_params(self, method: str, rank: int = 16, targets="all-linear",
                       virtual_tokens: int = 20, bottleneck: int = 64) -> int:
        chosen = self.targeted(targets)
        if method in ("lora", "qlora"):
            return self.layers * sum(rank * (i + o) for _, i, o in chosen)
        if method == "dora":
            return self.layers * sum(rank * (i + o) + o for _, i, o in chosen)
        if method == "ia3":
            return self.layers * (2 * self.kv_heads * self.hidden // self.heads
                                  + dict((n, i) for n, i, _ in self.linear).get("down_proj", 0))
        if method == "prompt":
            return virtual_tokens * self.hidden
        if method == "prefix":
            return virtual_tokens * self.layers * 2 * self.kv_heads * (self.hidden // self.heads)
        if method == "bottleneck":
            return self.layers * 2 * (2 * bottleneck * self.hidden + bottleneck + self.hidden)
        raise PeftkitError(f"no adapter size rule for method '{method}'")


def parse_size(text: str) -> float | None:
    m = SIZE_RE.match(text.strip())
    return float(m.group(1)) * UNITS[m.group(2).upper()] if m else None


def shape_for(spec: str) -> Shape:
    """An alias, HF directory, config.json, or a size such as 70B / 7B / 135M."""
    n = parse_size(spec)
    if n is not None:
        return _from_size(spec.upper(), n)
    if re.match(r"^\d", spec) and not Path(spec).exists():
        raise PeftkitError(f"malformed model size '{spec}' (use e.g. 70B, 7B, 135M)")
    from transformers import AutoConfig

    from peftkit.models import TINY, resolve_model_dir
    if spec in TINY:
        config = TINY[spec][0]()
    else:
        path = Path(spec)
        path = path.parent if path.name == "config.json" else resolve_model_dir(spec)
        config = AutoConfig.from_pretrained(path)
    return shape_from_config(spec, config)


def _from_size(name: str, n: float) -> Shape:
    key = min(SIZE_DEFAULTS, key=lambda k: abs(SIZE_DEFAULTS[k][0] - n) / SIZE_DEFAULTS[k][0])
    _, layers, d, ffn, heads, kv, vocab, tied = SIZE_DEFAULTS[key]
    hd = d // heads
    linear = [("q_proj", d, heads * hd), ("k_proj", d, kv * hd), ("v_proj", d, kv * hd),
              ("o_proj", heads * hd, d), ("gate_proj", d, ffn), ("up_proj", d, ffn),
              ("down_proj", ffn, d)]
    return Shape(name, n, layers, d, heads, kv, vocab, vocab * d * (1 if tied else 2), linear)


def shape_from_config(name: str, config) -> Shape:
    """Count exactly on a meta-device model: any architecture transformers knows."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    auto = AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel
    with init_empty_weights():
        model = auto.from_config(config)
    model.tie_weights()
    params = sum(p.numel() for p in model.parameters())
    emb = model.get_input_embeddings().weight.numel()
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is not model.get_input_embeddings().weight:
        emb += out.weight.numel()
    layers = config.num_hidden_layers
    block = {}
    for n, m in model.named_modules():
        first = FIRST_BLOCK.search(n)  # a bare backbone's names have no "model." prefix
        if isinstance(m, nn.Linear) and first:
            block[n[first.end():]] = (m.in_features, m.out_features)
    linear = [(k.split(".")[-1], i, o) for k, (i, o) in block.items()]
    heads = config.num_attention_heads
    return Shape(name, float(params), layers, config.hidden_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads,
                 config.vocab_size, float(emb), linear, config.model_type)
