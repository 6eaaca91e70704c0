"""(IA)³ as a multi-slot linear layer, with PEFT's semantics: feed-forward modules scale their
input (y = (x ⊙ l[k]) Wᵀ + b), all others their output (y = (x Wᵀ + b) ⊙ l[k])."""

import torch
from torch import nn

from peftkit.methods.layers import FrozenLinear, SlotRouter


class IA3Linear(FrozenLinear):
    def __init__(self, base: nn.Module, router: SlotRouter, slots: int, feedforward: bool):
        super().__init__(base, router, slots)
        self.feedforward = feedforward
        dim = self.in_features if feedforward else self.out_features
        self.ia3_l = nn.Parameter(torch.ones(slots, dim, device=self.weight.device))  # (S, in) or (S, out); ones = identity

    KEYS = ("ia3_l",)  # PEFT's, per module

    @classmethod
    def from_config(cls, base: nn.Module, name: str, config, router: SlotRouter, slots: int,
                    r: int | None = None) -> "IA3Linear":
        ff = any(name == f or name.endswith("." + f) for f in config.feedforward)
        return cls(base, router, slots, feedforward=ff)

    def init_slot(self, k: int, config=None, rank: int | None = None) -> None:
        self.clear_slot(k)

    def clear_slot(self, k: int) -> None:
        with torch.no_grad():
            self.ia3_l[k].fill_(1.0)

    def slot_shapes(self, config) -> dict[str, tuple]:
        # PEFT stores (1, in) for feed-forward modules and (out, 1) otherwise.
        return {"ia3_l": (1, self.in_features) if self.feedforward else (self.out_features, 1)}

    def write_slot(self, k: int, tensors: dict[str, torch.Tensor], config=None) -> None:
        with torch.no_grad():
            self.ia3_l[k] = tensors["ia3_l"].flatten()

    def read_slot(self, k: int, config=None) -> dict[str, torch.Tensor]:
        v = self.ia3_l[k].detach().clone()
        return {"ia3_l": v.view(1, -1) if self.feedforward else v.view(-1, 1)}

    def _scales(self, x: torch.Tensor) -> torch.Tensor:
        idx, keep = self.route()
        if idx is None:
            return self.ia3_l[self.router.pinned]
        l = torch.where(keep.unsqueeze(-1), self.ia3_l[idx], torch.ones_like(self.ia3_l[idx]))
        return l.view(l.shape[0], *[1] * (x.dim() - 2), l.shape[-1])

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active():
            return self.base_forward(x)
        if self.feedforward:  # scales in float32, applied in the base's precision
            return self.base_forward(x * self._scales(x).to(x.dtype))
        y = self.base_forward(x)
        return y * self._scales(x).to(y.dtype)

    def merged_params(self, k: int = 0) -> dict[str, torch.Tensor]:
        l = self.ia3_l[k].detach()
        W = self.dense_weight().detach()
        out = {"weight": W * l if self.feedforward else W * l.unsqueeze(1)}
        if self.bias is not None:
            out["bias"] = self.bias.detach() if self.feedforward else self.bias.detach() * l
        return out

    def merge(self, k: int = 0) -> None:
        if self.merged:
            return
        self._merged_slot = k
        merged = self.merged_params(k)
        self.set_dense_weight(merged["weight"])
        if self.bias is not None:
            self.bias.data.copy_(merged["bias"])
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        l = self.ia3_l[self._merged_slot].detach()
        W = self.dense_weight().detach()
        self.set_dense_weight(W / l if self.feedforward else W / l.unsqueeze(1))
        if self.bias is not None and not self.feedforward:
            self.bias.data.div_(l)
        self.merged = False
