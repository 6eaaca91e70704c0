"""Bottleneck adapters (Houlsby et al. 2019) as a multi-slot layer on a sublayer's output:
h = x Wᵀ + b;  y = h + U[k] f(D[k] h + d[k]) + u[k]. The output projection U starts at zero, so a
new adapter is the identity. Placed on the attention output and feed-forward output projections,
i.e. before the residual add, as in Houlsby et al. Fig. 2."""

import torch
from torch import nn

from peftkit.errors import PeftkitError
from peftkit.methods.layers import FrozenLinear, SlotRouter

ACTIVATIONS = {"gelu": nn.functional.gelu, "relu": nn.functional.relu, "silu": nn.functional.silu,
               "tanh": torch.tanh}


class BottleneckLinear(FrozenLinear):
    def __init__(self, base: nn.Module, router: SlotRouter, slots: int, size: int,
                 non_linearity: str = "gelu"):
        super().__init__(base, router, slots)
        if non_linearity not in ACTIVATIONS:
            raise PeftkitError(f"unknown non_linearity {non_linearity!r} "
                               f"(choose from {', '.join(ACTIVATIONS)})")
        self.act = ACTIVATIONS[non_linearity]
        d = self.out_features
        at = self.weight.device  # beside the base weight, in float32
        self.down = nn.Parameter(torch.zeros(slots, size, d, device=at))  # (S, m, d)
        self.down_bias = nn.Parameter(torch.zeros(slots, size, device=at))
        self.up = nn.Parameter(torch.zeros(slots, d, size, device=at))  # (S, d, m)
        self.up_bias = nn.Parameter(torch.zeros(slots, d, device=at))

    KEYS = ("adapter_down.weight", "adapter_down.bias", "adapter_up.weight", "adapter_up.bias")

    @classmethod
    def from_config(cls, base: nn.Module, name: str, config, router: SlotRouter, slots: int,
                    r: int | None = None) -> "BottleneckLinear":
        return cls(base, router, slots, config.size, config.non_linearity)

    def init_slot(self, k: int, config=None, rank: int | None = None) -> None:
        with torch.no_grad():
            # Houlsby et al. §3.6: near-identity init; small normal down-projection, zero up.
            self.clear_slot(k)
            nn.init.normal_(self.down[k], std=1e-2)

    def clear_slot(self, k: int) -> None:
        with torch.no_grad():
            for p in (self.down, self.down_bias, self.up, self.up_bias):
                p[k].zero_()

    def slot_shapes(self, config=None) -> dict[str, tuple]:
        return {key: tuple(p.shape[1:]) for key, p in zip(self.KEYS, self._slot_params())}

    def write_slot(self, k: int, tensors: dict[str, torch.Tensor], config=None) -> None:
        with torch.no_grad():
            for key, p in zip(self.KEYS, self._slot_params()):
                p[k] = tensors[key]

    def read_slot(self, k: int, config=None) -> dict[str, torch.Tensor]:
        return {key: p[k] for key, p in zip(self.KEYS, self._slot_params())}

    def _slot_params(self):
        return self.down, self.down_bias, self.up, self.up_bias

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if not self.active():
            return y
        h = y.to(self.down.dtype)  # the adapter runs in its own (float32) precision
        idx, keep = self.route()
        if idx is None:
            k = self.router.pinned
            z = self.act(h @ self.down[k].t() + self.down_bias[k])
            return y + (z @ self.up[k].t() + self.up_bias[k]).to(y.dtype)
        shape = (-1,) + (1,) * (h.dim() - 1)
        hs = h if h.dim() > 2 else h.unsqueeze(1)
        z = self.act(torch.bmm(hs, self.down[idx].transpose(1, 2)) + self.down_bias[idx][:, None])
        out = torch.bmm(z, self.up[idx].transpose(1, 2)) + self.up_bias[idx][:, None]
        out = out if h.dim() > 2 else out.squeeze(1)
        return y + torch.where(keep.view(shape), out, 0.0).to(y.dtype)

    def merged_params(self, k: int = 0) -> dict[str, torch.Tensor]:
        raise PeftkitError("bottleneck adapters are nonlinear and cannot be merged into the base")

    def merge(self, k: int = 0) -> None:
        raise PeftkitError("bottleneck adapters are nonlinear and cannot be merged into the base")

    def unmerge(self) -> None:
        pass
