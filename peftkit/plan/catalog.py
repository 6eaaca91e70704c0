"""The models users name, offline: architecture numbers from each family's public config.json
(num_hidden_layers, hidden_size, intermediate_size, attention and key/value heads, head_dim,
vocab_size, tie_word_embeddings; for mixture-of-experts the expert count, experts per token and
expert width), so `plan --model Qwen/Qwen2.5-32B-Instruct` needs no network. Parameter counts
are computed from these numbers (biases and norms included where the family has them), and
agree with the published totals to within about 1%.

A bare size (`32B`, `8x7B`) has no config: `sized` builds a dense (or MoE) Llama-3-style shape
whose hidden width, vocabulary and tying vary continuously with N and whose depth makes the
parts add up to N exactly, so every memory total is monotone in N and no part is negative.
"""

import math
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    layers: int
    hidden: int
    ffn: int  # dense MLP width; for MoE the shared dense width (0 if none)
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = False
    experts: int = 0  # MoE: experts per layer, each a gated MLP of width `expert_ffn`
    active_experts: int = 0
    expert_ffn: int = 0
    family: str = "llama"


# key (lower case, organisation and -Instruct/-hf/-it/-chat/-Base suffixes dropped) -> Arch
CATALOG = {
    # Llama 2 / 3.x (meta-llama)
    "llama-2-7b": Arch(32, 4096, 11008, 32, 32, 32000, False),
    "llama-2-13b": Arch(40, 5120, 13824, 40, 40, 32000, False),
    "llama-2-70b": Arch(80, 8192, 28672, 64, 8, 32000, False),
    "llama-3.2-1b": Arch(16, 2048, 8192, 32, 8, 128256, True),
    "llama-3.2-3b": Arch(28, 3072, 8192, 24, 8, 128256, True),
    "llama-3.1-8b": Arch(32, 4096, 14336, 32, 8, 128256, False),
    "meta-llama-3-8b": Arch(32, 4096, 14336, 32, 8, 128256, False),
    "llama-3.1-70b": Arch(80, 8192, 28672, 64, 8, 128256, False),
    "llama-3.3-70b": Arch(80, 8192, 28672, 64, 8, 128256, False),
    "llama-3.1-405b": Arch(126, 16384, 53248, 128, 8, 128256, False),
    # LLaMA 1 (the QLoRA paper's 33B and 65B)
    "llama-33b": Arch(60, 6656, 17920, 52, 52, 32000, False),
    "llama-30b": Arch(60, 6656, 17920, 52, 52, 32000, False),  # the hub's name for 33B
    "llama-65b": Arch(80, 8192, 22016, 64, 64, 32000, False),
    # Qwen2.5 / Qwen3
    "qwen2.5-0.5b": Arch(24, 896, 4864, 14, 2, 151936, True, qkv_bias=True, family="qwen2"),
    "qwen2.5-1.5b": Arch(28, 1536, 8960, 12, 2, 151936, True, qkv_bias=True, family="qwen2"),
    "qwen2.5-3b": Arch(36, 2048, 11008, 16, 2, 151936, True, qkv_bias=True, family="qwen2"),
    "qwen2.5-7b": Arch(28, 3584, 18944, 28, 4, 152064, False, qkv_bias=True, family="qwen2"),
    "qwen2.5-14b": Arch(48, 5120, 13824, 40, 8, 152064, False, qkv_bias=True, family="qwen2"),
    "qwen2.5-32b": Arch(64, 5120, 27648, 40, 8, 152064, False, qkv_bias=True, family="qwen2"),
    "qwen2.5-72b": Arch(80, 8192, 29568, 64, 8, 152064, False, qkv_bias=True, family="qwen2"),
    "qwen3-0.6b": Arch(28, 1024, 3072, 16, 8, 151936, True, head_dim=128, family="qwen3"),
    "qwen3-1.7b": Arch(28, 2048, 6144, 16, 8, 151936, True, head_dim=128, family="qwen3"),
    "qwen3-4b": Arch(36, 2560, 9728, 32, 8, 151936, True, head_dim=128, family="qwen3"),
    "qwen3-8b": Arch(36, 4096, 12288, 32, 8, 151936, False, head_dim=128, family="qwen3"),
    "qwen3-14b": Arch(40, 5120, 17408, 40, 8, 151936, False, head_dim=128, family="qwen3"),
    "qwen3-32b": Arch(64, 5120, 25600, 64, 8, 151936, False, head_dim=128, family="qwen3"),
    "qwen3-30b-a3b": Arch(48, 2048, 0, 32, 4, 151936, False, head_dim=128, experts=128,
                          active_experts=8, expert_ffn=768, family="qwen3_moe"),
    "qwen3-235b-a22b": Arch(94, 4096, 0, 64, 4, 151936, False, head_dim=128, experts=128,
                            active_experts=8, expert_ffn=1536, family="qwen3_moe"),
    # Gemma 2 / 3 (text)
    "gemma-2-2b": Arch(26, 2304, 9216, 8, 4, 256000, True, head_dim=256, family="gemma2"),
    "gemma-2-9b": Arch(42, 3584, 14336, 16, 8, 256000, True, head_dim=256, family="gemma2"),
    "gemma-2-27b": Arch(46, 4608, 36864, 32, 16, 256000, True, head_dim=128, family="gemma2"),
    "gemma-3-1b": Arch(26, 1152, 6912, 4, 1, 262144, True, head_dim=256, family="gemma3_text"),
    "gemma-3-4b": Arch(34, 2560, 10240, 8, 4, 262208, True, head_dim=256, family="gemma3_text"),
    "gemma-3-12b": Arch(48, 3840, 15360, 16, 8, 262208, True, head_dim=256, family="gemma3_text"),
    "gemma-3-27b": Arch(62, 5376, 21504, 32, 16, 262208, True, head_dim=128, family="gemma3_text"),
    # Mistral / Mixtral
    "mistral-7b": Arch(32, 4096, 14336, 32, 8, 32000, False, family="mistral"),
    "mistral-7b-v0.3": Arch(32, 4096, 14336, 32, 8, 32768, False, family="mistral"),
    "mistral-nemo": Arch(40, 5120, 14336, 32, 8, 131072, False, head_dim=128, family="mistral"),
    "mistral-small-24b": Arch(40, 5120, 32768, 32, 8, 131072, False, head_dim=128,
                              family="mistral"),
    "mixtral-8x7b": Arch(32, 4096, 0, 32, 8, 32000, False, experts=8, active_experts=2,
                         expert_ffn=14336, family="mixtral"),
    "mixtral-8x22b": Arch(56, 6144, 0, 48, 8, 32768, False, experts=8, active_experts=2,
                          expert_ffn=16384, family="mixtral"),
    # Phi
    "phi-3-mini": Arch(32, 3072, 8192, 32, 32, 32064, False, family="phi3"),
    "phi-3-medium": Arch(40, 5120, 17920, 40, 10, 32064, False, family="phi3"),
    "phi-4": Arch(40, 5120, 17920, 40, 10, 100352, False, family="phi3"),
    # SmolLM2
    "smollm2-135m": Arch(30, 576, 1536, 9, 3, 49152, True),
    "smollm2-360m": Arch(32, 960, 2560, 15, 5, 49152, True),
    "smollm2-1.7b": Arch(24, 2048, 8192, 32, 32, 49152, True),
    # DeepSeek-V3: multi-head latent attention (q/kv LoRA ranks 1536/512, head dims 192/128),
    # 3 dense layers then 58 MoE layers of 256 routed experts (8 active) + 1 shared
    "deepseek-v3": Arch(61, 7168, 18432, 128, 128, 129280, False, head_dim=128, experts=256,
                        active_experts=8, expert_ffn=2048, family="deepseek_v3"),
}
ALIAS_SUFFIX = re.compile(r"-(instruct|chat|hf|it|base|v0\.1|2407|2501|2503)$")


def lookup(spec: str) -> tuple[str, Arch] | None:
    """The catalog entry a hub id or name refers to, e.g. Qwen/Qwen2.5-32B-Instruct,
    mistralai/Mistral-7B-Instruct-v0.3, google/gemma-2-9b-it."""
    key = spec.rsplit("/", 1)[-1].lower().replace("_", "-")
    key = key.replace("meta-llama-3.1", "llama-3.1").replace("mistral-nemo-instruct",
                                                             "mistral-nemo")
    key = re.sub(r"-(instruct|it|chat)(-\d+)?", "", key)
    while True:
        if key in CATALOG:
            return key, CATALOG[key]
        shorter = ALIAS_SUFFIX.sub("", key)
        if shorter == key:
            break
        key = shorter
    for name in CATALOG:  # Mistral-Small-24B-Instruct-2501, Mistral-Nemo-Base-2407, ...
        if key.startswith(name):
            return name, CATALOG[name]
    return None


def counts(a: Arch) -> dict:
    """Parameters by part: embeddings (input + untied output), attention and MLP linears per
    layer, experts, norms; total and active (per token) counts."""
    hd = a.head_dim or a.hidden // a.heads
    q, kv = a.heads * hd, a.kv_heads * hd
    attention = a.hidden * q + 2 * a.hidden * kv + q * a.hidden + (q + 2 * kv) * a.qkv_bias
    dense = 3 * a.hidden * a.ffn
    expert = 3 * a.hidden * a.expert_ffn
    if a.family == "deepseek_v3":  # MLA instead of q/k/v; 3 dense layers, shared expert
        attention = a.hidden * 1536 + 1536 * a.heads * 192 + a.hidden * (512 + 64) \
            + 512 * a.heads * (128 + 128) + a.heads * 128 * a.hidden
        moe_layers, dense_layers = a.layers - 3, 3
        experts = moe_layers * ((a.experts + 1) * expert + a.hidden * a.experts)
        active = moe_layers * ((a.active_experts + 1) * expert)
        mlp = dense_layers * dense
    elif a.experts:
        experts = a.layers * (a.experts * expert + a.hidden * a.experts)  # + the router
        active = a.layers * (a.active_experts * expert + a.hidden * a.experts)
        mlp = a.layers * dense
    else:
        experts = active = 0
        mlp = a.layers * dense
    embeddings = a.vocab * a.hidden * (1 if a.tied else 2)
    norms = a.layers * 2 * a.hidden + a.hidden
    linear = a.layers * attention + mlp
    total = embeddings + linear + experts + norms
    return {"embeddings": embeddings, "attention_mlp": linear, "experts": experts,
            "norms": norms, "total": total, "active": total - experts + active}


# Anchors of the bare-size scaling, (N, hidden): SmolLM2-135M/360M, Llama-3.2-1B/3B,
# Llama-3.1-8B/70B/405B. Hidden width is interpolated log-linearly between them (and
# extrapolated with the end slopes); the vocabulary grows from SmolLM2's 49,152 to Llama 3's
# 128,256 between 135M and 1.24B; embeddings are tied up to 3.2B and untied from 8B, in between
# the output head's share grows log-linearly. Heads of 128 dims; 8 key/value heads (1,024
# wide) once wider than that; MLP 3.5x hidden (Llama 3).
ANCHORS = [(135e6, 576), (360e6, 960), (1.24e9, 2048), (3.2e9, 3072), (8.0e9, 4096),
           (70e9, 8192), (405e9, 16384)]
HEAD_DIM, KV_WIDTH, FFN_RATIO = 128, 1024, 3.5
SIZE_RE = re.compile(r"^(?:(\d+)\s*x\s*)?(\d+(?:\.\d+)?)\s*([KMBT])$", re.IGNORECASE)
UNITS = {"K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}
MOE_ACTIVE = 2  # a bare `8x7B` routes each token to two experts, as Mixtral does


def _loglinear(n: float, points: list[tuple[float, float]]) -> float:
    """y at n on the log-log polyline through `points` (extended past both ends)."""
    logs = [(math.log(x), math.log(y)) for x, y in points]
    x = math.log(n)
    i = 0 if x < logs[1][0] else len(logs) - 2
    for j in range(len(logs) - 1):
        if logs[j][0] <= x <= logs[j + 1][0]:
            i = j
            break
    (x0, y0), (x1, y1) = logs[i], logs[i + 1]
    return math.exp(y0 + (y1 - y0) * (x - x0) / (x1 - x0))


def _between(n: float, lo: float, hi: float, a: float, b: float) -> float:
    """a below lo, b above hi, log-linear in n between."""
    if n <= lo:
        return a
    if n >= hi:
        return b
    return a + (b - a) * (math.log(n) - math.log(lo)) / (math.log(hi) - math.log(lo))


def parse_size(text: str) -> tuple[float, int] | None:
    """(parameters per expert or in all, experts) of `70B`, `135M`, `8x7B`; None otherwise."""
    m = SIZE_RE.match(text.strip())
    if not m:
        return None
    return float(m.group(2)) * UNITS[m.group(3).upper()], int(m.group(1) or 0)


def sized(n: float, experts: int = 0) -> dict:
    """A bare size's shape: dense parts that sum to exactly `n` (per expert: an `8x7B` is eight
    7B-wide MLPs per layer beside one attention, Mixtral's layout). Float layer counts keep
    every memory total continuous and monotone in n; the plan shows them rounded."""
    hidden = _loglinear(n, ANCHORS)
    vocab = _between(n, 135e6, 1.24e9, 49152, 128256)
    heads_out = _between(n, 3.2e9, 8e9, 1.0, 2.0)  # 1: tied, 2: an untied output head
    embeddings = vocab * hidden * heads_out
    kv = min(hidden, KV_WIDTH)
    attention = 2 * hidden * hidden + 2 * hidden * kv
    mlp = 3 * hidden * FFN_RATIO * hidden
    per_layer = attention + mlp + 2 * hidden
    layers = max(n - embeddings - hidden, 0.0) / per_layer
    norms = n - embeddings - layers * (attention + mlp)  # the rest: exact, and >= 0
    out = {"hidden": hidden, "vocab": vocab, "layers": layers, "heads": hidden / HEAD_DIM,
           "kv_heads": kv / HEAD_DIM, "ffn": FFN_RATIO * hidden, "embeddings": embeddings,
           "attention": layers * attention, "mlp": layers * mlp, "norms": norms,
           "total": n, "active": n, "experts": 0, "active_experts": 0}
    if experts > 1:  # n is one expert-wide model; the others add their MLPs
        extra = (experts - 1) * layers * mlp
        out.update(experts=experts, active_experts=MOE_ACTIVE, total=n + extra,
                   active=n + (MOE_ACTIVE - 1) * layers * mlp)
    return out
