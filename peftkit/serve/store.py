"""The adapter store: a directory of PEFT adapters (subdirectory name = adapter id) served from
a fixed pool of slots in one multi-slot LoRA stack. Adapters load on first request into an LRU
cache bounded by count (the pool) and bytes; pinned adapters are never evicted. A reload writes
the new weights into a fresh slot; requests already running finish on the old one. A slot that
no adapter owns any more is zeroed as soon as no request uses it."""

import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, WEIGHTS_NAME, adapter_dir, write_adapter_slot

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class AdapterNotFound(PeftkitError):
    """No such adapter (or not visible to this tenant): HTTP 404."""


class AdapterInvalid(PeftkitError):
    """The adapter exists but cannot be served: HTTP 400."""


class StoreFull(PeftkitError):
    """Every slot is pinned or busy: HTTP 429."""


@dataclass
class Entry:
    slot: int
    nbytes: int
    pinned: bool = False
    loaded_at: float = 0.0


class AdapterStore:
    def __init__(self, root: str | Path, adapted, lock: threading.Lock, max_bytes: float,
                 on_event=lambda kind, **kw: None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise PeftkitError(f"adapters directory not found: {root}")
        self.adapted = adapted
        self.lock = lock  # the engine's model lock: slots are written between forward steps
        self.capacity = adapted.n_slots
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # LRU order, most recent last
        self.busy = [0] * self.capacity  # in-flight requests per slot
        self.retired: set[int] = set()  # slots of reloaded adapters, freed when idle
        self.mutex = threading.RLock()
        self.on_event = on_event  # metrics hook: ("hit"|"miss"|"evict"|"load", seconds=...)
        self.load_seconds: list[float] = []

    # -- ids and listing ----------------------------------------------------------------------
    def path_of(self, adapter_id: str) -> Path:
        if not ID_RE.fullmatch(adapter_id) or ".." in adapter_id:  # before any file system call
            raise AdapterNotFound(f"adapter '{adapter_id}' does not exist")
        path = (self.root / adapter_id).resolve()
        if path.parent != self.root or not path.is_dir():
            raise AdapterNotFound(f"adapter '{adapter_id}' does not exist")
        found = adapter_dir(path)  # a bare PEFT adapter or a `peftkit train` run directory
        if not (found / CONFIG_NAME).exists() and (path / "config.json").is_file():
            raise AdapterInvalid(f"adapter '{adapter_id}' is a peftkit run without an adapter "
                                 "(full fine-tuning or a probe): serve its model as --base")
        return found

    def available(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if ID_RE.fullmatch(p.name) and p.is_dir()
                      and (adapter_dir(p) / CONFIG_NAME).exists())

    # -- acquire / release (one per request) --------------------------------------------------
    def acquire(self, adapter_id: str) -> int:
        """The slot serving `adapter_id`, loading it first when needed; holds it until release."""
        with self.mutex:
            entry = self.entries.get(adapter_id)
            if entry is not None:
                self.entries.move_to_end(adapter_id)
                self.on_event("hit")
            else:
                self.on_event("miss")
                entry = self._load(adapter_id, self.path_of(adapter_id))
            self.busy[entry.slot] += 1
            return entry.slot

    def release(self, slot: int) -> None:
        with self.mutex:
            self.busy[slot] -= 1
            if self.busy[slot] == 0 and slot in self.retired:
                self.retired.discard(slot)
                self._clear(slot)

    # -- admin --------------------------------------------------------------------------------
    def load(self, adapter_id: str, pin: bool = False) -> Entry:
        with self.mutex:
            entry = self.entries.get(adapter_id) or self._load(adapter_id, self.path_of(adapter_id))
            entry.pinned = entry.pinned or pin
            return entry

    def unload(self, adapter_id: str) -> None:
        with self.mutex:
            if adapter_id not in self.entries:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
            entry = self.entries.pop(adapter_id)
            if self.busy[entry.slot]:
                self.retired.add(entry.slot)
            else:
                self._clear(entry.slot)

    def reload(self, adapter_id: str) -> Entry:
        """New weights under the same id; running requests keep the old slot until they end."""
        with self.mutex:
            old = self.entries.pop(adapter_id, None)
            if old is not None and self.busy[old.slot]:
                self.retired.add(old.slot)
            try:
                entry = self._load(adapter_id, self.path_of(adapter_id))
            except PeftkitError:
                if old is not None:  # keep serving the old weights when the new ones are bad
                    self.retired.discard(old.slot)
                    self.entries[adapter_id] = old
                raise
            entry.pinned = bool(old and old.pinned)
            return entry

    def stats(self) -> dict:
        with self.mutex:
            return {"loaded": list(self.entries), "capacity": self.capacity,
                    "bytes": sum(e.nbytes for e in self.entries.values()),
                    "max_bytes": self.max_bytes}

    # -- internals ----------------------------------------------------------------------------
    def _free_slot(self, need_bytes: int) -> int:
        used = {e.slot for e in self.entries.values()} | self.retired
        used |= {s for s, n in enumerate(self.busy) if n}
        total = sum(e.nbytes for e in self.entries.values())
        free = [s for s in range(self.capacity) if s not in used]
        while not free or total + need_bytes > self.max_bytes:
            victim = next((k for k, e in self.entries.items()
                           if not e.pinned and not self.busy[e.slot]), None)
            if victim is None:
                raise StoreFull("all adapter slots are pinned or in use; try again shortly")
            entry = self.entries.pop(victim)
            total -= entry.nbytes
            free.append(entry.slot)
            self.on_event("evict")
        return free[0]

    def _clear(self, slot: int) -> None:
        with self.lock:
            for layer in self.adapted.adapted_layers().values():
                layer.clear_slot(slot)

    def _load(self, adapter_id: str, path: Path) -> Entry:
        try:  # the real checks (regular file, inside the root) come with the read
            size = (path / WEIGHTS_NAME).stat().st_size
        except OSError:
            size = 0
        if size > self.max_bytes:
            raise AdapterInvalid(f"adapter '{adapter_id}' is {size / 2**20:.1f} MB, over the "
                                 f"{self.max_bytes / 2**20:.1f} MB limit")
        slot = self._free_slot(size)
        start = time.perf_counter()
        try:
            with self.lock:
                nbytes = write_adapter_slot(self.adapted, slot, adapter_id, path, self.root)
        except PeftkitError as e:
            self._clear(slot)
            raise AdapterInvalid(str(e)) from None
        seconds = time.perf_counter() - start
        self.load_seconds.append(seconds)
        self.on_event("load", seconds=seconds)
        entry = Entry(slot, nbytes, loaded_at=time.time())
        self.entries[adapter_id] = entry
        return entry
