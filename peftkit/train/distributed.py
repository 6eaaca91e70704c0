"""Training on more than one process, on torch's own engine: torchrun starts the processes and
sets RANK / WORLD_SIZE / LOCAL_RANK; this module joins its process group (gloo on the CPU, NCCL on
CUDA) and wraps the model: DDP for adapter methods (only trainable tensors are reduced: DDP
never buckets a frozen parameter), FSDP2 (`fully_shard`, one unit per decoder layer, then the
root, as torchtune's distributed recipes do) for full fine-tuning.

The run is defined by its global batch (batch_size x world x grad_accum) and the sequence of
global batches is the single-process one (`batches.batch_at`), split across ranks and micro-steps;
losses are token-weighted over the whole global batch, so N processes compute the same update
as one process with the same global batch, and a checkpoint resumes at another world size.
"""

import datetime
import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from peftkit.errors import PeftkitError
from peftkit.train.config import STRATEGIES
# Full fine-tuning, and LoRA over a base too large for one device (frozen base and adapters
# sharded together, layer by layer). Tested both ways against one process; QLoRA's 4-bit
# weights, virtual tokens and heads are not built for sharding here.
FSDP_METHODS = ("full", "lora")


@dataclass
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1


def join(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """The process group torchrun's environment describes (none outside torchrun), and this
    rank's device: cuda:LOCAL_RANK on CUDA machines. Bounded: a missing peer is an error after
    `timeout_s`, not a hang."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(), device
    world = World(int(os.environ.get("RANK", "0")), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        try:
            dist.init_process_group(backend, rank=world.rank, world_size=size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        except (ValueError, RuntimeError, dist.DistError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise PeftkitError(f"cannot join the process group of {size} (rank {world.rank}): "
                               f"{first[:200]}; start with torchrun or `peftkit train --nproc N`") \
                from None
    return world, device


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def choose_strategy(strategy: str, method: str, world: World) -> str:
    """auto: FSDP where the whole model trains (its parameter state is what outgrows a device,
    as `peftkit plan` counts it), DDP where only adapters do."""
    if strategy not in STRATEGIES:
        raise PeftkitError(f"--strategy {strategy}: choose {', '.join(STRATEGIES)}")
    if strategy == "auto":
        strategy = "fsdp" if method == "full" and world.active else "ddp"
    if strategy == "fsdp" and method not in FSDP_METHODS:
        raise PeftkitError(f"--strategy fsdp: shards {' and '.join(FSDP_METHODS)} runs; for "
                           f"--method {method} use --strategy ddp")
    return strategy


def wrap(module: torch.nn.Module, strategy: str, world: World, device: torch.device):
    """The module the training forward runs through."""
    if not world.active:
        return module
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard
        from peftkit.plan.shapes import BLOCK_LISTS
        blocks = next((m for name, m in module.named_modules()
                       if name.split(".")[-1] in BLOCK_LISTS), None)
        for layer in (blocks or []):
            fully_shard(layer)
        fully_shard(module)
        return module
    from torch.nn.parallel import DistributedDataParallel
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids)


def no_sync(wrapped, last_micro: bool):
    """Skip DDP's all-reduce on every micro-batch but the last of a step."""
    if last_micro or not hasattr(wrapped, "no_sync"):
        return nullcontext()
    return wrapped.no_sync()


def any_rank(flag: bool, world: World, device: torch.device) -> bool:
    """True on every rank when it is true on one (a signal reached any rank)."""
    if not world.active:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def gather_objects(items: list, world: World) -> list[list]:
    """Every rank's list, in rank order, on every rank."""
    if not world.active:
        return [items]
    out = [None] * world.size
    dist.all_gather_object(out, items)
    return out


@contextmanager
def unsharded(module: torch.nn.Module):
    """Inside: an FSDP2-sharded module's parameters are whole again (a collective on entry and
    exit: every rank enters), so code that reads weights (saving an adapter) reads all of them."""
    units = [m for m in module.modules() if hasattr(m, "unshard") and hasattr(m, "reshard")]
    for unit in units:
        unit.unshard()
    try:
        yield module
    finally:
        for unit in units:
            unit.reshard()


def full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP2 shard (a collective: every rank calls it), else itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def shard_like(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` laid out as `like` is: an FSDP2 DTensor shard, or a plain tensor on its device."""
    if hasattr(like, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh,
                                 like.placements)
    return whole.to(like.device)
