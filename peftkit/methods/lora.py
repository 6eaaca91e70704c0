"""LoRA, rsLoRA and DoRA as one multi-slot linear layer.

    y = x Wᵀ + b + s[k] · (x A[k]ᵀ) B[k]ᵀ           k = slot of the row (LoRA / rsLoRA)
    y = m[k]/‖W + s[k]·B[k]A[k]‖ ⊙ (x (W + s[k]·B[k]A[k])ᵀ) + b      (DoRA)

Slots share one stack `A: (S, r, in)`, `B: (S, out, r)`; adapters of lower rank are zero-padded.
Rows on different adapters are computed with batched matmuls, never a Python loop over adapters:
every forward on many slots (decode, prefill, joint training) lays its rows out by slot and
multiplies each slot's block against the stack in place (Punica's SGMV idea: every adapter read
once; layers.Grid).
"""

import math

import torch
from torch import nn

from peftkit.methods.layers import FrozenLinear, SlotRouter

class LoraLinear(FrozenLinear):
    def __init__(self, base: nn.Module, router: SlotRouter, slots: int, r: int,
                 dora: bool = False, dropout: float = 0.0):
        super().__init__(base, router, slots)
        self.r = r
        at = self.weight.device  # adapters live beside their base weight, in float32
        self.lora_A = nn.Parameter(torch.zeros(slots, r, self.in_features, device=at))  # (S, r, in)
        self.lora_B = nn.Parameter(torch.zeros(slots, self.out_features, r, device=at))
        self.register_buffer("scale", torch.zeros(slots, device=at))  # (S,), 0 = empty slot
        self.magnitude = None
        if dora:  # an empty DoRA slot is the identity only when m = ‖W‖ row-wise
            norms = self._row_norm(self.dense_weight().detach().float())
            self.magnitude = nn.Parameter(norms.expand(slots, -1).clone())
            # which slots are DoRA: a stack can hold plain LoRA slots too (joint training)
            self.register_buffer("dora_slots", torch.ones(slots, dtype=torch.bool, device=at))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    # -- slots ------------------------------------------------------------------------------
    KEYS = ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")  # PEFT's, per module

    @classmethod
    def from_config(cls, base: nn.Module, name: str, config, router: SlotRouter, slots: int,
                    r: int | None = None) -> "LoraLinear":
        return cls(base, router, slots, r or config.r, dora=config.use_dora,
                   dropout=config.dropout)

    def init_slot(self, k: int, config, rank: int | None = None) -> None:
        """Fresh weights for slot k; `rank` below the stack's: only its rows, the rest zero (as
        a separate adapter of that rank would be initialised, from the same random draws)."""
        with torch.no_grad():
            rank = rank or self.r
            self.lora_A[k].zero_()
            a = self.lora_A[k, :rank]
            if config.init == "gaussian":
                nn.init.normal_(a, std=1 / rank)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            self.lora_B[k].zero_()
            self.scale[k] = config.scale
            if self.magnitude is not None:
                self.magnitude[k] = self._row_norm(self.dense_weight())

    def hold_slots_in(self, dtype: torch.dtype) -> None:
        """Keep A and B in `dtype` (serving, as vLLM's --lora-dtype: a bfloat16 stack beside a
        bfloat16 base halves the slots' memory and what a step reads). Forwards compute in the
        wider of it and the input's dtype, so float16 slots beside a float32 base are widened
        per layer, not the activations narrowed."""
        with torch.no_grad():
            self.lora_A.data = self.lora_A.data.to(dtype)
            self.lora_B.data = self.lora_B.data.to(dtype)

    def is_dora(self, k: int) -> bool:
        return self.magnitude is not None and bool(self.dora_slots[k])

    def set_plain(self, k: int) -> None:
        """Slot k of a DoRA stack computes plain LoRA (its magnitude is left unused)."""
        self.dora_slots[k] = False

    def slot_shapes(self, config) -> dict[str, tuple]:
        """The tensors a slot of `config` needs, and their shapes (checked before writing)."""
        shapes = {"lora_A.weight": (config.r, self.in_features),
                  "lora_B.weight": (self.out_features, config.r)}
        if config.use_dora:
            shapes["lora_magnitude_vector"] = (self.out_features,)
        return shapes

    def write_slot(self, k: int, tensors: dict[str, torch.Tensor], config) -> None:
        A, B = tensors["lora_A.weight"], tensors["lora_B.weight"]
        r = A.shape[0]
        with torch.no_grad():
            self.lora_A[k, :r] = A
            self.lora_B[k, :, :r] = B
            self.lora_A[k, r:].zero_()  # only the zero-padding beyond this adapter's rank
            self.lora_B[k, :, r:].zero_()
            self.scale[k] = config.scale
            if self.magnitude is not None:
                self.magnitude[k] = tensors["lora_magnitude_vector"]

    def clear_slot(self, k: int) -> None:
        """Make slot k the identity again (zero weights, zero scale)."""
        with torch.no_grad():
            self.lora_A[k].zero_()
            self.lora_B[k].zero_()
            self.scale[k] = 0.0

    def read_slot(self, k: int, config) -> dict[str, torch.Tensor]:
        r = config.r
        out = {"lora_A.weight": self.lora_A[k, :r], "lora_B.weight": self.lora_B[k, :, :r]}
        if self.is_dora(k):
            out["lora_magnitude_vector"] = self.magnitude[k]
        return {key: v.detach().clone().contiguous() for key, v in out.items()}

    # -- forward ----------------------------------------------------------------------------
    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_forward(x)
        if not self.active():
            return y
        rows = self.router.rows
        if rows is not None and not rows.any:  # a batch of base-only rows: nothing to add
            return y
        x = x.to(self._compute_dtype(x))
        if rows is None:  # one adapter for all rows (slot 0, or the pinned one)
            return self._one_slot(x, y)
        return self._many_slots(x, y, rows)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        """The wider of the input's and the slots' dtype: float32 masters beside a bfloat16
        base compute in float32, as PEFT does (autocast still applies); float16 slots beside a
        float32 base are widened."""
        return torch.promote_types(x.dtype, self.lora_A.dtype)

    def _one_slot(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Plain matmuls."""
        k = self.router.pinned
        A, B = self.lora_A[k].to(x.dtype), self.lora_B[k].to(x.dtype)
        lora = (self.dropout(x) @ A.t()) @ B.t() * self.scale[k]
        if self.is_dora(k):
            lora = self._dora(x, y, lora, self.magnitude[k:k + 1],
                              self._norms(slice(k, k + 1)), None)
        return y + lora.to(y.dtype)

    def _many_slots(self, x: torch.Tensor, y: torch.Tensor, rows) -> torch.Tensor:
        """y plus each row's own adapter, SGMV-style (Punica): the rows are laid out by slot
        in a grid of blocks (`layers.Grid`; a row's tokens move as one block) multiplied block
        by block against the stacks themselves, so each adapter is read once however many rows
        use it and no per-row copy of A and B is made (per-row gathers copied 600 MB a decode
        step for 32 SmolLM2 adapters and cost more than the base). When most of the stack is
        in use it is read in place; otherwise the used slots are copied out first. Base rows
        never enter the grid, and a slot no row uses is seen only by its own empty block: a NaN
        there reaches no row. Every small op counts (hundreds of layers a step): rows already in
        grid order are the grid, and the adapter's output is added into y by the matmul."""
        g = rows.grid(self.n_slots)
        if g.block_slots is None:
            A, B, scale = self.lora_A, self.lora_B, self.scale
        else:
            (A, B), scale = self._rows_of(g.block_slots), self.scale.index_select(0, g.block_slots)
        A, B = A.to(x.dtype), B.to(x.dtype)
        flat = self.dropout(x).reshape(x.shape[0], -1)  # (rows, tokens * in)
        tokens = flat.shape[1] // self.in_features
        if g.cell_of_row is not None:  # empty cells stay zero
            grid = flat.new_zeros(g.blocks * g.block_rows, flat.shape[1]).index_copy_(
                0, g.cell_of_row, flat if rows.all else flat.index_select(0, rows.adapter_rows))
        else:
            grid = flat if g.row_of_cell is None else flat.index_select(0, g.row_of_cell)
        h = torch.bmm(grid.view(g.blocks, g.block_rows * tokens, -1), A.transpose(1, 2))
        h = h.mul_(scale.view(-1, 1, 1))
        if (g.cell_of_row is None and g.row_of_cell is None and self.magnitude is None
                and y.dtype == h.dtype):
            return torch.baddbmm(y.reshape(g.blocks, g.block_rows * tokens, -1), h,
                                 B.transpose(1, 2)).view_as(y)
        delta = torch.bmm(h, B.transpose(1, 2)).view(g.blocks * g.block_rows, -1)
        if g.cell_of_row is not None:
            delta = delta.index_select(0, g.cell_of_row)  # the adapter rows, in batch order
        at = g.row_of_cell if g.cell_of_row is None else (None if rows.all else rows.adapter_rows)
        if self.magnitude is not None:
            lora = delta if at is None else delta.new_zeros(len(x), delta.shape[1]).index_copy_(
                0, at, delta)
            uniq, inverse = torch.unique(rows.idx, return_inverse=True)
            norms = self._norms(uniq)[inverse]  # (rows, out): one weight norm per distinct slot
            lora = self._dora(x, y, lora.view(y.shape), self.magnitude[rows.idx], norms,
                              rows.keep & self.dora_slots[rows.idx])
            return y + lora.to(y.dtype)
        delta = delta.to(y.dtype).view(-1, *y.shape[1:])
        return y + delta if at is None else y.index_add(0, at, delta)

    def _rows_of(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A and B of each given slot, gathered as rows of the stacks viewed 2-D: whole slot
        blocks copied at memory speed. Advanced indexing (`A[slots]`) or a 3-D index_select
        walk the blocks element-wise, 5-8x slower on CPU; on 32 adapters' stacks (600 MB for
        SmolLM2 r=16 all-linear) that was 90% of a mixed decode step (bench/serve.py)."""
        n = len(slots)
        A = self.lora_A.view(self.n_slots, -1).index_select(0, slots).view(n, *self.lora_A.shape[1:])
        B = self.lora_B.view(self.n_slots, -1).index_select(0, slots).view(n, *self.lora_B.shape[1:])
        return A, B

    def _dora(self, x, y, lora, magnitude, norms, keep):
        # Liu et al. 2024 §4.3: the norm is detached, so it is a constant in backprop.
        ratio = magnitude / norms  # (Bt or 1, out)
        if keep is not None:
            ratio = torch.where(keep.unsqueeze(-1), ratio, torch.ones_like(ratio))
        shape = (ratio.shape[0],) + (1,) * (x.dim() - 2) + (ratio.shape[-1],)
        ratio = ratio.view(shape) if x.dim() > 2 else ratio
        if isinstance(self.dropout, nn.Identity):  # x Wᵀ is already in y
            base = (y if self.bias is None else y - self.bias).to(x.dtype)
        else:
            base = nn.functional.linear(self.dropout(x), self.dense_weight().to(x.dtype))
        return (ratio - 1) * base + ratio * lora

    @torch.no_grad()  # detached anyway: building its graph would hold a weight-sized copy
    def _norms(self, which) -> torch.Tensor:
        W = self.dense_weight().float()
        delta = torch.einsum("s,sor,sri->soi", self.scale[which], self.lora_B[which].float(),
                             self.lora_A[which].float())
        return self._row_norm(W + delta)

    @staticmethod
    def _row_norm(w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(w, dim=-1)

    # -- merge ------------------------------------------------------------------------------
    def merged_weight(self, k: int = 0) -> torch.Tensor:
        Wd = self.dense_weight().detach() + self._delta(k)
        if not self.is_dora(k):
            return Wd
        return (self.magnitude[k].detach() / self._row_norm(Wd)).unsqueeze(1) * Wd

    def merged_params(self, k: int = 0) -> dict[str, torch.Tensor]:
        out = {"weight": self.merged_weight(k)}
        return out if self.bias is None else {**out, "bias": self.bias.detach()}

    def merge(self, k: int = 0) -> None:
        if self.merged:
            return
        merged = self.merged_weight(k)
        # DoRA's unmerge needs the row scale used at merge time; LoRA's is a subtraction.
        self._merged_slot = k
        self._ratio = None if not self.is_dora(k) else (
            self.magnitude[k].detach() / self._row_norm(self.dense_weight().detach()
                                                        + self._delta(k)))
        self.set_dense_weight(merged)
        self.merged = True

    def unmerge(self) -> None:
        if not self.merged:
            return
        W = self.dense_weight().detach()
        if self._ratio is not None:
            W = W / self._ratio.unsqueeze(1)
        self.set_dense_weight(W - self._delta(self._merged_slot))
        self.merged = False

    def _delta(self, k: int) -> torch.Tensor:
        return self.scale[k] * self.lora_B[k].detach().float() @ self.lora_A[k].detach().float()


class SlotWriter:
    """Writes whole adapters into slot k of a served stack's LoRA layers (a load), in batched
    copies rather than ops per layer: an all-linear adapter touches hundreds of layers, and
    per-layer ops cost more than its bytes. The views of each layer's A[k], B[k] and scale[k]
    are made once per slot and kept (making them on every load was a third of a host-tier
    load's 4 ms), so the stacks must stay where they are: a server never moves its model."""

    def __init__(self, layers: dict[str, LoraLinear]):
        self.layers = layers
        self.views: dict[int, dict[str, tuple[torch.Tensor, ...]]] = {}

    @torch.no_grad()
    def write(self, k: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]],
              scale: float) -> None:
        """Slot k holds A and B of `modules` (module path -> (A, B), rank up to the stack's)
        with `scale`; every other layer's slot k becomes the identity."""
        views = self._views(k)
        dst, src, zero, scales = [], [], [], []
        for path, (A, B) in modules.items():
            A_k, B_k, scale_k = views[path]
            r = A.shape[0]
            if r == A_k.shape[0]:
                dst += [A_k, B_k]
            else:  # a lower rank: its rows, the zero padding beyond
                dst += [A_k[:r], B_k[:, :r]]
                zero += [A_k[r:], B_k[:, r:]]
            src += [A, B]
            scales.append(scale_k)
        zero += [t for path, v in views.items() if path not in modules for t in v]
        if dst:
            torch._foreach_copy_(dst, src)
            torch._foreach_copy_(scales, [scales[0].new_full((1,), scale)] * len(scales))
        if zero:
            torch._foreach_zero_(zero)

    def clear(self, k: int) -> None:
        """Slot k of every layer becomes the identity (zero weights, zero scale)."""
        self.write(k, {}, 0.0)

    def _views(self, k: int) -> dict[str, tuple[torch.Tensor, ...]]:
        if k not in self.views:
            self.views[k] = {path: (layer.lora_A[k], layer.lora_B[k], layer.scale[k:k + 1])
                             for path, layer in self.layers.items()}
        return self.views[k]
