"""The gateway's routing state: which backend holds which adapter (a bounded affinity table),
what is in flight where, and the pick: affinity first, then load (gateway.py)."""

from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from peftkit.errors import PeftkitError
from peftkit.serve.api import ApiError


class Affinity:
    """The adapters a backend holds as far as the gateway knows: bounded, least recently routed
    forgotten first, so a stream of distinct names cannot grow the gateway's memory."""

    def __init__(self, limit: int = 4096):
        self.limit, self.names = limit, OrderedDict()

    def add(self, name: str) -> None:
        self.names[name] = None
        self.names.move_to_end(name)
        while len(self.names) > self.limit:
            self.names.popitem(last=False)

    def discard(self, name: str) -> None:
        self.names.pop(name, None)

    def replace(self, names) -> None:
        self.names = OrderedDict.fromkeys(list(names)[-self.limit:])

    def clear(self) -> None:
        self.names.clear()

    def __contains__(self, name: str) -> bool:
        return name in self.names

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self):
        return iter(self.names)


@dataclass
class Backend:
    url: str
    up: bool = True
    inflight: int = 0
    down_until: float = 0.0  # time.monotonic() before which /health cannot bring it back
    adapters: Affinity = field(default_factory=Affinity)  # what it holds, as far as we know
    routed: Counter = field(default_factory=Counter)  # adapter -> requests in flight (> 0 only)


class Router:
    """Which backend serves a model: affinity first, then load."""

    def __init__(self, urls: list[str], spill: int, max_affinity: int = 4096):
        if not urls:
            raise PeftkitError("--backends: give at least one backend URL")
        self.backends = [Backend(u.rstrip("/"), adapters=Affinity(max_affinity)) for u in urls]
        self.spill = spill

    def pick(self, model: str, exclude: set[str]) -> tuple[Backend, bool]:
        """(backend, whether it already holds `model`); 503 when none is up."""
        live = [b for b in self.backends if b.up and b.url not in exclude]
        if not live:
            raise ApiError(503, "no backend is available", "server_error")
        least = min(live, key=lambda b: b.inflight)
        if not model:
            return least, True
        holders = [b for b in live if model in b.adapters]
        if holders:
            best = min(holders, key=lambda b: b.inflight)
            if best.inflight - least.inflight < self.spill:
                return best, True
        return least, False

    def down(self, backend: Backend) -> None:
        backend.up = False
        backend.adapters.clear()
