"""Prompt tuning and prefix tuning: model-level adapters on a causal LM.

Prompt tuning prepends S-slot virtual-token embeddings `(S, n, d)` to the input embeddings.
Prefix tuning stores per-layer key/value prefixes `(S, n, L·2·kv_heads·head_dim)` (PEFT's layout:
layer-major, key before value) and hands them to the model as its KV cache, so grouped-query
attention gets prefixes of its own kv-head count.
"""

import torch
from torch import nn
from transformers import DynamicCache

from peftkit.data import IGNORE
from peftkit.errors import PeftkitError


def kv_geometry(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a decoder config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if config.model_type == "falcon":  # multi-query unless the new architecture's kv heads
        kv_heads = config.num_kv_heads if (config.new_decoder_architecture
                                           or not config.multi_query) else 1
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, kv_heads, head_dim


class VirtualTokens(nn.Module):
    """Slots of prompt embeddings (prompt tuning) or KV prefixes (prefix tuning), behind the
    same slot interface as the adapter layers (`KEYS`, `from_config`, `init_slot`,
    `slot_shapes`, `write_slot`, `read_slot`, `clear_slot`, `peft_fields`); its one tensor is
    model-level in PEFT's files (no module path)."""

    KEYS = ("prompt_embeddings",)

    def __init__(self, model, kind: str, n: int, slots: int, tokenizer=None):
        super().__init__()
        from peftkit.models import ENCODERS
        if model.config.model_type in ENCODERS:
            raise PeftkitError(f"{kind} tuning needs a causal LM; {model.config.model_type} is an "
                               "encoder")
        self.kind, self.n = kind, n
        self.geometry = kv_geometry(model.config) if kind == "prefix" else None
        if kind == "prompt":
            width = model.get_input_embeddings().embedding_dim
        else:
            layers, kv_heads, head_dim = self.geometry
            width = layers * 2 * kv_heads * head_dim
        # for init_text (a bound method and a tokenizer: not modules, so not registered here)
        self._embeddings, self._tokenizer = model.get_input_embeddings, tokenizer
        at = model.get_input_embeddings().weight.device
        self.prompt_embeddings = nn.Parameter(torch.zeros(slots, n, width, device=at))

    @classmethod
    def from_config(cls, model, config, slots: int, tokenizer=None) -> "VirtualTokens":
        kind = "prefix" if config.peft_type == "PREFIX_TUNING" else "prompt"
        context = getattr(model.config, "max_position_embeddings", None)
        if context and config.num_virtual_tokens >= context:
            raise PeftkitError(f"{config.num_virtual_tokens} virtual tokens leave no room in the "
                               f"model's {context}-token context")
        return cls(model, kind, config.num_virtual_tokens, slots, tokenizer)

    def init_slot(self, k: int, config=None, rank: int | None = None) -> None:
        init_text = getattr(config, "init_text", None)
        with torch.no_grad():
            if init_text:  # Lester et al. §3: initialise from real token embeddings
                if self._tokenizer is None:
                    raise PeftkitError("prompt tuning init_text needs the tokenizer")
                ids = self._tokenizer(init_text, add_special_tokens=False).input_ids
                ids = (ids * (self.n // max(len(ids), 1) + 1))[: self.n]
                table = self._embeddings().weight
                self.prompt_embeddings[k] = table[torch.tensor(ids, device=table.device)]
            else:  # PEFT's default: an nn.Embedding's N(0, 1)
                nn.init.normal_(self.prompt_embeddings[k])

    def slot_shapes(self, config=None) -> dict[str, tuple]:
        return {"prompt_embeddings": tuple(self.prompt_embeddings.shape[1:])}

    def write_slot(self, k: int, tensors: dict[str, torch.Tensor], config=None) -> None:
        with torch.no_grad():
            self.prompt_embeddings[k] = tensors["prompt_embeddings"]

    def read_slot(self, k: int, config=None) -> dict[str, torch.Tensor]:
        return {"prompt_embeddings": self.prompt_embeddings[k]}

    def clear_slot(self, k: int) -> None:
        with torch.no_grad():
            self.prompt_embeddings[k].zero_()

    def peft_fields(self) -> dict:
        """What PEFT's adapter_config.json records of the model: prefix tuning's geometry."""
        if self.geometry is None:
            return {}
        layers, kv_heads, head_dim = self.geometry
        return {"num_layers": layers, "num_attention_heads": kv_heads,
                "token_dim": kv_heads * head_dim}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [self.prompt_embeddings]

    def rows(self, batch: int, slots: torch.Tensor | None) -> torch.Tensor:
        if slots is None:
            return self.prompt_embeddings[0].expand(batch, -1, -1)
        if bool((slots < 0).any()):
            raise PeftkitError(f"{self.kind} tuning cannot mix base-only rows into a batch")
        return self.prompt_embeddings[slots]

    def forward(self, model, input_ids, attention_mask, labels, slots, **kw):
        cache = kw.pop("past_key_values", None)
        if cache is not None and cache.get_seq_length() > 0:
            # a decode step: the virtual tokens (or prefixes) are in the cache already, and the
            # caller's mask and positions count them
            return model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                         past_key_values=cache, **kw)
        b = input_ids.shape[0]
        ones = torch.ones(b, self.n, dtype=attention_mask.dtype, device=input_ids.device)
        mask = torch.cat([ones, attention_mask], dim=1)
        virtual = self.rows(b, slots)
        positions = kw.pop("position_ids", None)
        if positions is not None:  # the caller's tokens come after the n virtual positions
            positions = positions + self.n
            if self.kind == "prompt":  # the virtual tokens are inputs too: 0 .. n-1
                first = torch.arange(self.n, device=positions.device).expand(b, -1)
                positions = torch.cat([first, positions], dim=1)
            kw["position_ids"] = positions
        if self.kind == "prompt":
            embeds = model.get_input_embeddings()(input_ids)
            embeds = torch.cat([virtual.to(embeds.dtype), embeds], dim=1)
            if labels is not None:
                pad = torch.full((b, self.n), IGNORE, dtype=labels.dtype, device=labels.device)
                labels = torch.cat([pad, labels], dim=1)
            out = model(inputs_embeds=embeds, attention_mask=mask, labels=labels,
                        past_key_values=cache, **kw)
            if not kw.get("logits_to_keep"):  # align logits with the caller's input_ids
                out.logits = out.logits[:, self.n:]
            return out
        cache = self.prefix_cache(model, virtual.to(hidden_dtype(model)), cache)
        return model(input_ids=input_ids, attention_mask=mask, labels=labels,
                     past_key_values=cache, **kw)

    def prefix_cache(self, model, virtual: torch.Tensor,
                     cache: DynamicCache | None = None) -> DynamicCache:
        """The prefixes as the first `n` positions of `cache` (a new one when None)."""
        layers, kv_heads, head_dim = kv_geometry(model.config)
        b = virtual.shape[0]
        kv = virtual.view(b, self.n, layers * 2, kv_heads, head_dim).permute(2, 0, 3, 1, 4)
        cache = cache if cache is not None else DynamicCache(config=model.config)
        for layer in range(layers):  # (B, kv_heads, n, head_dim) each
            cache.update(kv[2 * layer], kv[2 * layer + 1], layer)
        return cache


def hidden_dtype(model) -> torch.dtype:
    """The precision the layers compute keys and values in: a norm's weight dtype (norms are
    never quantized nor stored at 16 bit apart from the whole base)."""
    for module in model.modules():
        if type(module).__name__.endswith("Norm") and getattr(module, "weight", None) is not None:
            return module.weight.dtype
    return torch.float32
