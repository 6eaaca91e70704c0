"""Model shapes for planning: exact parameter and linear-layer counts from a config, built on
the meta device (no weights); from the offline catalog for the models users name (hub ids such
as Qwen/Qwen2.5-32B-Instruct); or, for a bare size such as `70B` or `8x7B`, a shape scaled
continuously from real architectures whose parts sum to exactly that size (catalog.py).
"""

import re
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.plan.catalog import Arch, counts, lookup, parse_size as parse_spec, sized

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
    active_params: float | None = None  # mixture-of-experts: parameters a token uses
    other_linear: float = 0.0  # linear weights outside `linear` (MoE experts): quantized, frozen
    assumed: str = ""  # what a bare size or a catalog name was taken to be
    context: int | None = None  # max positions, where the config says

    @property
    def active(self) -> float:
        return self.params if self.active_params is None else self.active_params

    @property
    def quantizable_params(self) -> float:
        """Parameters in linear layers of the blocks (what NF4 quantizes)."""
        return self.layers * sum(i * o for _, i, o in self.linear) + self.other_linear

    def targeted(self, targets="all-linear") -> list[tuple[str, int, int]]:
        """The block's linear layers an adapter with these targets wraps."""
        return [(n, i, o) for n, i, o in self.linear if targets == "all-linear" or n in targets]


def parse_size(text: str) -> float | None:
    """The parameter count a bare size names (`70B`; `8x7B` per expert), else None."""
    spec = parse_spec(text)
    return spec[0] if spec else None


def shape_for(spec: str) -> Shape:
    """A size (70B, 135M, 8x7B), a catalog name or hub id, a tiny alias, an HF directory or a
    config.json; a hub id not in the catalog is read from the hub (a clear error offline)."""
    size = parse_spec(spec)
    if size is not None:
        return _from_size(spec.strip(), *size)
    if re.match(r"^\d", spec) and not Path(spec).exists():
        raise PeftkitError(f"malformed model size '{spec}' (use e.g. 70B, 7B, 135M, 8x7B)")
    from peftkit.models import ALIASES, TINY, resolve_model_dir
    found = lookup(spec) if spec not in TINY and not Path(spec).exists() else None
    if found is not None and (spec not in ALIASES or ALIASES[spec].wheel is None
                              or not _cached(spec)):
        return _from_arch(spec, *found)
    from transformers import AutoConfig
    if spec in TINY:
        config = TINY[spec][0]()
    elif spec in ALIASES or Path(spec).exists():
        path = Path(spec)
        path = path.parent if path.name == "config.json" else resolve_model_dir(spec)
        config = AutoConfig.from_pretrained(path)
    elif "/" in spec:  # a hub id outside the catalog: its config.json, when there is a network
        try:
            config = AutoConfig.from_pretrained(spec)
        except (OSError, ValueError) as e:
            raise PeftkitError(f"--model {spec}: not in the offline catalog, and its config.json "
                               f"could not be read from the hub ({str(e).splitlines()[0][:120]}); "
                               "give a local directory or config.json, or a size such as 8B") \
                from None
    else:
        raise PeftkitError(f"--model {spec}: not a size (70B, 8x7B), a catalog name or hub id, "
                           "an alias (peftkit models), a directory nor a config.json")
    return shape_from_config(spec, config)


def _cached(alias: str) -> bool:
    from peftkit.models import cache_dir
    return (cache_dir() / alias / "config.json").exists()


def _from_size(name: str, n: float, experts: int) -> Shape:
    """A bare size: catalog.sized's continuous dense (or Mixtral-style MoE) shape."""
    d = sized(n, experts)
    h, kv, f = d["hidden"], d["kv_heads"] * 128, d["ffn"]
    linear = [("q_proj", h, h), ("k_proj", h, kv), ("v_proj", h, kv), ("o_proj", h, h)]
    moe = experts > 1
    if not moe:
        linear += [("gate_proj", h, f), ("up_proj", h, f), ("down_proj", f, h)]
    what = (f"{experts} experts of a {n / 1e9:.3g}B-wide dense shape, 2 active per token"
            if moe else "a Llama-3-style dense shape")
    assumed = (f"{name}: {what}, scaled to {d['total'] / 1e9:.4g}B parameters "
               f"({d['layers']:.1f} layers x {h:,.0f} wide, {d['vocab']:,.0f} vocabulary)")
    return Shape(name, d["total"], d["layers"], h, d["heads"], d["kv_heads"],
                 d["vocab"], d["embeddings"], linear, "mixtral" if moe else "llama",
                 active_params=d["active"], other_linear=d["mlp"] * experts if moe else 0.0,
                 assumed=assumed)


def _from_arch(spec: str, key: str, a: Arch) -> Shape:
    """A catalog entry: its attention (and dense MLP) linears per block; experts and any other
    linear weights counted apart (quantized by QLoRA, not adapted by default)."""
    c = counts(a)
    hd = a.head_dim or a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    linear = [("q_proj", a.hidden, q), ("k_proj", a.hidden, kv), ("v_proj", a.hidden, kv),
              ("o_proj", q, a.hidden)]
    if not a.experts:
        linear += [("gate_proj", a.hidden, a.ffn), ("up_proj", a.hidden, a.ffn),
                   ("down_proj", a.ffn, a.hidden)]
    listed = a.layers * sum(i * o for _, i, o in linear)
    other = c["attention_mlp"] + c["experts"] - listed
    moe = f", {a.experts} experts ({a.active_experts} active)" if a.experts else ""
    return Shape(spec, float(c["total"]), a.layers, a.hidden, a.heads, a.kv_heads, a.vocab,
                 float(c["embeddings"]), linear, a.family,
                 active_params=float(c["active"]), other_linear=float(max(other, 0)),
                 assumed=f"{spec}: {key} from the offline catalog ({c['total'] / 1e9:.3g}B "
                         f"parameters{moe})")


def shape_from_config(name: str, config) -> Shape:
    """Count exactly on a meta-device model: any architecture transformers knows."""
    from accelerate import init_empty_weights
    from torch import nn
    from transformers import AutoModel, AutoModelForCausalLM

    from peftkit.methods.layers import is_conv1d
    from peftkit.models import default_task

    auto = AutoModelForCausalLM if default_task(config) == "causal-lm" else AutoModel
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
        if first and isinstance(m, nn.Linear):
            block[n[first.end():]] = (m.in_features, m.out_features)
        elif first and is_conv1d(m):  # GPT-2's Conv1D: weight (in, out)
            block[n[first.end():]] = tuple(m.weight.shape)
    linear = [(k.split(".")[-1], i, o) for k, (i, o) in block.items()]
    fused = sum(p.numel() for _, p in model.named_parameters() if p.dim() >= 3)  # MoE experts
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", 0)
    per_token = getattr(config, "num_experts_per_tok", None)
    active = params - fused * (1 - per_token / experts) if fused and per_token else None
    heads = config.num_attention_heads
    return Shape(name, float(params), layers, config.hidden_size, heads,
                 getattr(config, "num_key_value_heads", None) or heads,
                 config.vocab_size, float(emb), linear, config.model_type,
                 active_params=active, other_linear=float(fused),
                 context=getattr(config, "max_position_embeddings", None))
