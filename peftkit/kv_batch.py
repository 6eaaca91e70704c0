"""The engine's batch KV cache: one left-padded cache packed from each row's own keys and values
(rebuilt only when rows join or leave), each surviving row's own KV taken back out of it, and
the padding rules both sides share."""

import torch
from transformers import DynamicCache


def pack(rows, config) -> tuple[DynamicCache, list[int]]:
    """One left-padded cache for the batch from each row's own KV; and each row's padding."""
    width = max(r.kv[0][0].shape[1] for r in rows)
    pad = [width - r.kv[0][0].shape[1] for r in rows]
    cache = DynamicCache(config=config)
    for layer in range(len(rows[0].kv)):
        keys = torch.stack([torch.nn.functional.pad(r.kv[layer][0], (0, 0, p, 0))
                            for r, p in zip(rows, pad)])
        values = torch.stack([torch.nn.functional.pad(r.kv[layer][1], (0, 0, p, 0))
                              for r, p in zip(rows, pad)])
        cache.update(keys, values, layer)
    return cache, pad


def unpack(rows, cache: DynamicCache, pad: list[int]) -> None:
    """Give each surviving row back its own KV (padding stripped) before a repack."""
    for i, req in enumerate(rows):
        if req.finish_reason is None:
            req.kv = [(layer.keys[i, :, pad[i]:], layer.values[i, :, pad[i]:])
                      for layer in cache.layers]
        else:
            req.kv = None


def unpadded(kv: torch.Tensor, virtual: int, pad: int) -> torch.Tensor:
    """A row's (heads, length, dim) keys or values without the `pad` padding positions that
    follow its `virtual` leading ones."""
    if not pad:
        return kv
    if not virtual:
        return kv[:, pad:]
    return torch.cat([kv[:, :virtual], kv[:, virtual + pad:]], dim=1)


def unpadded_mask(pad: torch.Tensor, width: int) -> torch.Tensor:
    """The attention mask of left-padded rows: 0 on each row's `pad` (rows, 1) leading
    positions, 1 on the `width` - pad after them."""
    return (torch.arange(width, device=pad.device) >= pad).long()
