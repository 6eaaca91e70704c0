"""Shared test helpers: tiny inputs and deterministic non-trivial adapter weights."""

import torch

from peftkit.models import load_base


def tiny_llama():
    return load_base("tiny-llama")


def batch(rows: int = 3, length: int = 7, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (rows, length), generator=g)


def randomize(adapted, seed: int = 0) -> None:
    """Give every adapter parameter non-trivial values (an untrained adapter is the identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapted.adapter_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.1
            p.copy_(p + noise if p.abs().sum() > 0 else noise)


@torch.no_grad()
def logits(model, ids, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits


def saved_activation_bytes(loss: torch.Tensor, module: torch.nn.Module) -> int:
    """Bytes of the tensors autograd saved for backward (each storage once), parameters and
    buffers excepted: walks the graph behind `loss`."""
    skip = {t.untyped_storage().data_ptr() for t in [*module.parameters(), *module.buffers()]}
    seen, stack, visited = {}, [loss.grad_fn], set()
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        for name in dir(fn):
            if not name.startswith("_saved_"):
                continue
            value = getattr(fn, name)
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if torch.is_tensor(t) and t.untyped_storage().data_ptr() not in skip:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [f for f, _ in fn.next_functions]
    return sum(seen.values())


def free_port() -> int:
    """An unused TCP port on 127.0.0.1 (loopback only)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def generate_direct(server, model: str, prompt_ids: list[int], sampling):
    """Run one request to completion in the calling thread through a Server (no HTTP)."""
    req = server.submit(model, prompt_ids, sampling)
    server.engine.run_until_idle()  # its ticket releases the slot as it ends
    return req
