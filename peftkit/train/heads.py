"""Classification on any backbone: pool the last hidden states, then a linear or MLP head.

Encoders (MiniLM) pool by the attention-masked mean, as sentence-transformers trained them;
decoders (SmolLM2) by the last real token, the only one that has seen the whole text.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from peftkit.errors import PeftkitError


def pooling_for(config) -> str:
    return "mean" if config.model_type in ("bert", "roberta", "distilbert", "mpnet") else "last"


POOLINGS = ("mean", "last")


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """(B, T, d), (B, T) -> (B, d). Right padding is assumed for "last"."""
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)
    last = mask.sum(1).long() - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def hidden_of(out) -> torch.Tensor:
    """The last hidden states of a backbone's output (an encoder's, or a decoder body's)."""
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.hidden_states[-1]


class Head(nn.Module):
    def __init__(self, d_in: int, d_out: int, kind: str = "linear"):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise PeftkitError(f"unknown head '{kind}' (linear or mlp)")
        self.kind, self.d_in, self.d_out = kind, d_in, d_out
        self.net = nn.Linear(d_in, d_out) if kind == "linear" else nn.Sequential(
            nn.Linear(d_in, d_in), nn.GELU(), nn.Linear(d_in, d_out))

    def forward(self, x):
        return self.net(x)

    def save(self, directory: Path, extra: dict) -> Path:
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  directory / "head.safetensors", metadata={"format": "pt"})
        meta = {"kind": self.kind, "in": self.d_in, "out": self.d_out, **extra}
        (directory / "head.json").write_text(json.dumps(meta, indent=2))
        return directory / "head.safetensors"

    @classmethod
    def load(cls, directory: Path, device="cpu") -> tuple["Head", dict]:
        meta_path = directory / "head.json"
        if not meta_path.exists():
            raise PeftkitError(f"{meta_path}: missing")
        meta = json.loads(meta_path.read_text())
        head = cls(meta["in"], meta["out"], meta["kind"])
        head.load_state_dict(load_file(directory / "head.safetensors"))
        return head.to(device), meta


class SequenceClassifier(nn.Module):
    """backbone (returns last_hidden_state) -> pool -> head."""

    def __init__(self, backbone: nn.Module, head: Head, pooling: str):
        super().__init__()
        self.backbone, self.head, self.pooling = backbone, head, pooling

    def features(self, input_ids, attention_mask) -> torch.Tensor:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask)
        return pool(hidden_of(out), attention_mask, self.pooling)

    def forward(self, input_ids, attention_mask):  # the head keeps float32 beside any base
        return self.head(self.features(input_ids, attention_mask).float())
