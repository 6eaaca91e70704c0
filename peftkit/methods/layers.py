"""The frozen linear that every per-module adapter method builds on, and the slot router.

`FrozenLinear` takes over an `nn.Linear` (or a bitsandbytes 4-bit linear): it registers the same
`weight` and `bias` parameters under the same names, so base checkpoint keys never change (as in
torchtune's LoRALinear). Subclasses add S adapter *slots*; a `SlotRouter` shared by all layers of
a model says which slot each batch row uses (-1 = base only), so one forward serves many tenants.
"""

import functools
import sys
from typing import NamedTuple

import torch
from torch import nn

from peftkit.quant import bnb


class Grid(NamedTuple):
    """Rows laid out by slot for one forward: `blocks` blocks of `block_rows` cells, block b
    holding the rows on slot `block_slots[b]` (on slot b when `block_slots` is None: the whole
    stack, read in place). A full grid (every block full) names the batch row in each cell in
    `row_of_cell` (None: cell i is row i, so the batch itself is the grid); a grid with empty
    cells names each adapter row's cell in `cell_of_row` instead."""
    block_slots: torch.Tensor | None
    blocks: int
    block_rows: int
    row_of_cell: torch.Tensor | None
    cell_of_row: torch.Tensor | None


class Rows:
    """One forward's routing, worked out once for every adapted layer of the model (hundreds
    per step) instead of once per layer: which rows have an adapter, which slots the batch uses,
    where each row's own block is. Each fact is computed on first use."""

    def __init__(self, slots: torch.Tensor):
        self.idx = slots.clamp(min=0)  # slot per row; base rows (-1) read slot 0's index...
        self.keep = slots >= 0  # ...and are masked out with this
        self._grids: dict[int, Grid] = {}

    @functools.cached_property
    def any(self) -> bool:  # one host sync per forward, not per layer
        return bool(self.keep.any())

    @functools.cached_property
    def all(self) -> bool:
        return bool(self.keep.all())

    @functools.cached_property
    def used(self) -> torch.Tensor:
        """Sorted distinct slots of the rows that have an adapter."""
        return torch.unique(self.idx[self.keep])

    @functools.cached_property
    def adapter_rows(self) -> torch.Tensor:
        return self.keep.nonzero().flatten()

    def grid(self, n_slots: int) -> Grid:
        """The grid of a stack of `n_slots` slots (methods/lora.py `_many_slots`)."""
        if n_slots not in self._grids:
            self._grids[n_slots] = self._layout(n_slots)
        return self._grids[n_slots]

    def _layout(self, n_slots: int) -> Grid:
        rows = self.adapter_rows
        slot = self.idx[rows]
        whole = 2 * len(self.used) >= n_slots  # reading a few idle slots beats copying
        block = slot if whole else torch.searchsorted(self.used, slot)
        n = n_slots if whole else len(self.used)
        counts = torch.bincount(block, minlength=n)
        m = int(counts.max())
        order = torch.argsort(block, stable=True)
        first = counts.cumsum(0) - counts  # where each block's rows start in `order`
        nth = torch.empty_like(block)  # a row's rank among the rows of its slot
        nth[order] = torch.arange(len(block), device=block.device) - first[block[order]]
        cells = block * m + nth
        used = None if whole else self.used
        if n * m != len(rows):  # some blocks have fewer rows: the grid has empty cells
            return Grid(used, n, m, None, cells)
        held = torch.empty_like(rows)
        held[cells] = rows  # a full grid is a permutation of the adapter rows
        direct = self.all and bool((held == torch.arange(len(held), device=held.device)).all())
        return Grid(used, n, m, None if direct else held, None)


class SlotRouter:
    """Per-batch routing shared by every adapted layer of one model.

    `slots is None`: every row uses the pinned slot (slot 0 unless `AdaptedModel.pinned` chose
    another; single-adapter training and inference, the fast path).
    Otherwise a LongTensor (B,) of slot indices, -1 meaning "no adapter" for that row; `rows`
    holds what the layers derive from it, once per forward.
    """

    def __init__(self):
        self.enabled = True
        self.pinned = 0  # the slot every row uses when `slots` is None (AdaptedModel.pinned)
        self.slots = None

    @property
    def slots(self) -> torch.Tensor | None:
        return self._slots

    @slots.setter
    def slots(self, slots: torch.Tensor | None) -> None:
        self._slots = slots
        self.rows = None if slots is None else Rows(slots)


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2 and kin): a linear layer whose weight is stored (in, out)."""
    conv = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv is not None and isinstance(module, conv)


def is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_conv1d(module):
        return True
    loaded = sys.modules.get("bitsandbytes")  # no 4-bit layer can exist before it is imported
    return loaded is not None and isinstance(module, loaded.nn.Linear4bit)


class FrozenLinear(nn.Module):
    def __init__(self, base: nn.Module, router: SlotRouter, slots: int):
        super().__init__()
        # `conv1d`: the checkpoint stores this weight (in, out) (PEFT's fan_in_fan_out). A dense
        # Conv1D keeps that layout in memory (`transposed`); an NF4 one was quantized as (out, in).
        self.transposed = is_conv1d(base)
        self.conv1d = self.transposed or getattr(base, "conv1d", False)
        if self.transposed:
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.compute_dtype = getattr(base, "compute_dtype", None) or torch.float32
        self.router = router
        self.n_slots = slots
        self.merged = False

    @property
    def quant_state(self):
        """Set for NF4 bases; read from the weight, so it follows the weight across devices."""
        return getattr(self.weight, "quant_state", None)

    # -- base computation -------------------------------------------------------------------
    def base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_state is None:
            return nn.functional.linear(x, self.dense_weight(), self.bias)
        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        out = bnb().matmul_4bit(x.to(self.compute_dtype), self.weight.t(), bias=bias,
                              quant_state=self.quant_state)
        return out.to(dtype)

    def dense_weight(self) -> torch.Tensor:
        """The base weight in full precision (dequantized for NF4 bases)."""
        if self.quant_state is None:
            return self.weight.t() if self.transposed else self.weight
        return bnb().functional.dequantize_4bit(self.weight.data, self.quant_state).float()

    def set_dense_weight(self, w: torch.Tensor) -> None:
        from peftkit.errors import PeftkitError
        if self.quant_state is not None:
            raise PeftkitError("cannot merge into a 4-bit base in place; export a dense copy with "
                               "merged.export_merged() (`peftkit export --for merged`)")
        self.weight.data.copy_(w.t() if self.transposed else w)

    def stored(self, w: torch.Tensor) -> torch.Tensor:
        """An (out, in) weight in the checkpoint's layout (a merged export)."""
        return w.t() if self.conv1d else w

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters(recurse=False) if n not in ("weight", "bias")]

    def peft_fields(self) -> dict:
        """What PEFT's adapter_config.json records of this layer: GPT-2's Conv1D layout."""
        return {"fan_in_fan_out": True} if self.conv1d else {}

    # -- routing --------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.router.rows
        if rows is not None and x.dim() == 2 and x.shape[0] != len(rows.idx):
            # (batch * tokens, features): OPT flattens its rows before the MLP; the slot of each
            # batch row needs them back as (batch, tokens, features)
            return self.routed_forward(x.view(len(rows.idx), -1, x.shape[-1])).flatten(0, 1)
        return self.routed_forward(x)

    def routed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The method's forward, `x`'s first dimension being the batch's rows."""
        raise NotImplementedError

    def active(self) -> bool:
        return self.router.enabled and not self.merged and self.n_slots > 0

    def route(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(index, keep): slot index per row clamped to >= 0, and a 0/1 row mask for base rows."""
        rows = self.router.rows
        return (None, None) if rows is None else (rows.idx, rows.keep)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slots={self.n_slots}"
