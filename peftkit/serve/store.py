"""The adapter store: a directory of PEFT adapters (subdirectory name = adapter id, or a
`peftkit train` run directory) served from a fixed pool of slots in one multi-slot LoRA stack.

Two cache tiers below the disk, as LoRAX and S-LoRA keep them:
  host    adapters read, checked and laid out for a slot (prepared.PreparedAdapter), an LRU bounded
          by bytes (`host_bytes`); a prefetch target of /v1/load_lora_adapter
  device  the stack's slots, an LRU bounded by count (the pool) and bytes; pinned adapters are
          never evicted
A cold load never stalls other tenants: the disk read and the checks run in the requesting
thread with no lock held; concurrent requests for the same adapter wait for that one load;
only the slot copy waits for the engine (it runs between two forward steps). A reload writes the
new weights into a fresh slot; requests already running finish on the old one. A slot that no
adapter owns any more is zeroed as soon as no request uses it."""

import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from peftkit.errors import PeftkitError
from peftkit.formats import CONFIG_NAME, WEIGHTS_NAME, adapter_dir
from peftkit.serve.prepared import PreparedAdapter, prepare_adapter
from peftkit.methods.lora import SlotWriter

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TENSOR_NAME = re.compile(r"base_model\.model\.[\w.]+")  # PEFT's tensor keys
log = logging.getLogger("peftkit.serve")


CLASSIFY, GENERATE = "classify", "generate"  # what a server serves (ServeConfig.task)


def run_task(path: Path) -> str | None:
    """What a directory of the adapters directory serves: `classify` (a --task classify run:
    its head.json says so), `generate` (a causal-LM adapter), or None (neither)."""
    try:
        if json.loads((path / "head.json").read_text()).get("task") == CLASSIFY:  # run_dir.HEAD
            return CLASSIFY
    except (OSError, ValueError, AttributeError):
        pass
    return GENERATE if (adapter_dir(path) / CONFIG_NAME).is_file() else None


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


@dataclass
class Slot:
    """One slot of the stack: what it holds, and the requests using it."""
    state: str = "free"  # free | writing (a load's copies) | live (an entry's) | retired
    users: int = 0  # retired: replaced or unloaded, cleared when its last user ends


class HostTier:
    """Prepared adapters in host memory: an LRU bounded by bytes (0 = off)."""

    def __init__(self, max_bytes: float):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, PreparedAdapter] = OrderedDict()

    def get(self, adapter_id: str) -> PreparedAdapter | None:
        item = self.items.get(adapter_id)
        if item is not None:
            self.items.move_to_end(adapter_id)
        return item

    def put(self, adapter_id: str, item: PreparedAdapter) -> int:
        """Keep `item`, evicting the least recently used; returns how many were evicted."""
        self.items.pop(adapter_id, None)
        if item.nbytes > self.max_bytes:
            return 0
        evicted = 0
        while self.items and self.bytes + item.nbytes > self.max_bytes:
            self.items.popitem(last=False)
            evicted += 1
        self.items[adapter_id] = item
        return evicted

    def drop(self, adapter_id: str) -> None:
        self.items.pop(adapter_id, None)

    @property
    def bytes(self) -> int:
        return sum(i.nbytes for i in self.items.values())


class AdapterStore:
    def __init__(self, root: str | Path, adapted, between_steps, max_bytes: float,
                 on_event=lambda kind, **kw: None, host_bytes: float = 0,
                 task: str = GENERATE):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise PeftkitError(f"adapters directory not found: {root}")
        self.adapted, self.task = adapted, task  # task: the runs it serves (run_task)
        self.layers = adapted.adapted_layers()  # the stack's layers, walked once
        self.writer = SlotWriter(self.layers)
        self.between_steps = between_steps  # Engine.between_steps: slot writes and clears
        self.capacity = adapted.n_slots
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, Entry] = OrderedDict()  # LRU order, most recent last
        self.slots = [Slot() for _ in range(self.capacity)]
        self.loading: dict[str, _Pending] = {}  # adapter id -> its load in flight
        self.host = HostTier(host_bytes)
        self.aliases: dict[str, str] = {}  # lora_path loads: name -> directory under root
        self.mutex = threading.RLock()  # held for bookkeeping only, never across a load
        # metrics hook: device tier "hit" | "miss" | "evict"; host tier "host_hit" |
        # "host_miss" | "host_evict"; "load" with seconds=disk or host -> slot
        self.on_event = on_event
        self.load_seconds: list[float] = []

    # -- ids and listing ----------------------------------------------------------------------
    def run_dir(self, adapter_id: str) -> Path:
        """`adapter_id`'s directory under the root (a bare adapter or a run, or the one an
        admin's lora_path named it for); AdapterNotFound for an id that is not one, checked
        before any file system call."""
        if not ID_RE.fullmatch(adapter_id) or ".." in adapter_id:
            raise AdapterNotFound(f"adapter '{adapter_id}' does not exist")
        with self.mutex:
            target = self.aliases.get(adapter_id, adapter_id)
        path = (self.root / target).resolve()
        if path.parent != self.root or not path.is_dir():
            raise AdapterNotFound(f"adapter '{adapter_id}' does not exist")
        return path

    def path_of(self, adapter_id: str) -> Path:
        """The adapter to load for `adapter_id` (a cold load: requests for a loaded adapter
        never come here)."""
        path = self.run_dir(adapter_id)
        if self.task == GENERATE and run_task(path) == CLASSIFY:
            raise AdapterInvalid(f"'{adapter_id}' is a classifier: serve it with `peftkit "
                                 "serve --task classify` and POST /v1/classify")
        found = adapter_dir(path)  # a bare PEFT adapter or a `peftkit train` run directory
        if not (found / CONFIG_NAME).exists() and (path / "config.json").is_file():
            raise AdapterInvalid(f"adapter '{adapter_id}' is a peftkit run without an adapter "
                                 "(full fine-tuning or a probe): serve its model as --base")
        return found

    def available(self) -> list[str]:
        """The ids a request can be served for: `path_of`'s rule exactly (a link that leads
        out of the adapters directory is not listed, since every request for it is a 404)."""
        return sorted(name for name, p in self.directories()
                      if (adapter_dir(p) / CONFIG_NAME).exists())

    def directories(self) -> list[tuple[str, Path]]:
        """(id, directory) of every id a request may name: the root's subdirectories and the
        names lora_path loads gave (a link out of the root is not one)."""
        with self.mutex:
            named = [(n, self.root / t) for n, t in self.aliases.items()]
        return [(name, p) for name, p in [(p.name, p) for p in self.root.iterdir()] + named
                if ID_RE.fullmatch(name) and p.is_dir() and p.resolve().parent == self.root]

    def name(self, adapter_id: str, lora_path: str) -> None:
        """vLLM's load with a lora_path: `adapter_id` serves the directory at `lora_path`,
        which must lie in the adapters directory (a client's path is trusted no further)."""
        path = Path(lora_path)
        path = (path if path.is_absolute() else self.root / path).resolve()
        if path.parent != self.root or not path.is_dir() or not ID_RE.fullmatch(path.name):
            raise AdapterInvalid(f"lora_path: '{lora_path[:200]}' is not an adapter directory "
                                 "directly inside the server's --adapters directory")
        if not ID_RE.fullmatch(adapter_id):
            raise AdapterInvalid(f"lora_name: '{adapter_id[:64]}' is not a valid adapter id")
        with self.mutex:
            if path.name != adapter_id:
                self.aliases[adapter_id] = path.name
            else:
                self.aliases.pop(adapter_id, None)
            self.host.drop(adapter_id)  # a name given new weights reads them afresh

    # -- acquire / release (one per request) --------------------------------------------------
    def acquire(self, adapter_id: str) -> int:
        """The slot serving `adapter_id`, loading it first when needed; holds it until release."""
        return self._ensure(adapter_id, hold=True).slot

    def _ensure(self, adapter_id: str, hold: bool = False, pin: bool = False) -> Entry:
        """The adapter's device entry: a hit, or the one load of it in flight (joined), or a
        new load run by this thread with no lock held."""
        missed = False
        while True:
            with self.mutex:
                entry = self.entries.get(adapter_id)
                if entry is not None:
                    self.entries.move_to_end(adapter_id)
                    entry.pinned = entry.pinned or pin
                    self.slots[entry.slot].users += hold
                    if not missed:
                        self.on_event("hit")
                    return entry
                if not missed:
                    self.on_event("miss")
                    missed = True
                pending = self.loading.get(adapter_id)
                leader = pending is None
                if leader:
                    pending = self.loading[adapter_id] = _Pending()
            if not leader:  # another request is loading it: wait for that load, not a second
                pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                continue
            try:
                return self._load(adapter_id, hold, pin)
            except PeftkitError as e:
                pending.error = e
                raise
            finally:
                with self.mutex:
                    del self.loading[adapter_id]
                pending.done.set()

    def release(self, slot: int) -> None:
        with self.mutex:
            self.slots[slot].users -= 1
            if self.slots[slot].users == 0 and self.slots[slot].state == "retired":
                self._clear(slot)

    # -- admin --------------------------------------------------------------------------------
    def load(self, adapter_id: str, pin: bool = False, tier: str = "device") -> Entry | None:
        """Prefetch: into a slot (`device`), or only read and prepared in host memory (`host`)."""
        if tier == "host":
            self._prepared(adapter_id, self.path_of(adapter_id))
            return None
        if pin:
            with self.mutex:
                pinned = sum(e.pinned for k, e in self.entries.items() if k != adapter_id)
            if pinned + 1 >= self.capacity:  # a request for any other adapter could never run
                raise PeftkitError(f"pinning '{adapter_id}' would leave no free slot for other "
                                   f"adapters ({pinned} of {self.capacity} slots pinned); "
                                   "unload one or serve with a larger --max-loaded")
        return self._ensure(adapter_id, pin=pin)

    def unload(self, adapter_id: str) -> None:
        with self.mutex:
            self.host.drop(adapter_id)
            self.aliases.pop(adapter_id, None)  # a lora_path name lives until its unload
            if adapter_id not in self.entries:
                raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded")
            self._retire(self.entries.pop(adapter_id).slot)

    def reload(self, adapter_id: str) -> Entry:
        """New weights under the same id, read from disk while the old ones keep serving (and
        keep serving when the new ones are bad); running requests finish on the old slot."""
        with self.mutex:
            self.host.drop(adapter_id)
        prepared = self._prepared(adapter_id, self.path_of(adapter_id))
        return self._install(adapter_id, prepared)

    def stats(self) -> dict:
        with self.mutex:
            return {"loaded": list(self.entries), "capacity": self.capacity,
                    "bytes": sum(e.nbytes for e in self.entries.values()),
                    "max_bytes": self.max_bytes, "loading": sorted(self.loading),
                    "host": {"adapters": list(self.host.items), "bytes": self.host.bytes,
                             "max_bytes": self.host.max_bytes}}

    # -- internals ----------------------------------------------------------------------------
    def _free_slot(self, need_bytes: int) -> int:
        total = sum(e.nbytes for e in self.entries.values())
        free = [k for k, s in enumerate(self.slots) if s.state == "free"]
        while not free or total + need_bytes > self.max_bytes:
            victim = next((k for k, e in self.entries.items()
                           if not e.pinned and not self.slots[e.slot].users), None)
            if victim is None:
                raise StoreFull("all adapter slots are pinned or in use; try again shortly")
            entry = self.entries.pop(victim)
            total -= entry.nbytes
            self.slots[entry.slot].state = "free"  # overwritten by the next load, unrouted
            free.append(entry.slot)
            self.on_event("evict")
        return free[0]

    def _public(self, reason: str, adapter_id: str) -> str:
        """A refusal as a tenant sees it: the adapter's name, never the server's paths or the
        adapter's tensor names."""
        reason = reason.replace(str(self.root) + "/", "").replace(str(self.root), "")
        reason = TENSOR_NAME.sub("a tensor", reason)
        return f"adapter '{adapter_id}' cannot be served: {reason}"

    def _clear(self, slot: int) -> None:
        """Zeroed between steps; not waited for (the engine's thread may be waiting for this
        store's mutex), and a load's write into the slot comes after it in the engine's order."""
        self.between_steps(lambda: self.writer.clear(slot), wait=False)
        self.slots[slot].state = "free"

    def _retire(self, slot: int) -> None:
        """A slot no adapter owns any more: cleared now, or when its last request ends."""
        if self.slots[slot].users:
            self.slots[slot].state = "retired"
        else:
            self._clear(slot)

    def _prepared(self, adapter_id: str, path: Path) -> PreparedAdapter:
        """From the host tier, or read from disk, checked and kept there (no lock held)."""
        with self.mutex:
            prepared = self.host.get(adapter_id)
            self.on_event("host_hit" if prepared is not None else "host_miss")
        if prepared is not None:
            return prepared
        try:  # the real checks (regular file, inside the root) come with the read
            size = (path / WEIGHTS_NAME).stat().st_size
        except OSError:
            size = 0
        if size > self.max_bytes:
            raise AdapterInvalid(f"adapter '{adapter_id}' is {size / 2**20:.1f} MB, over the "
                                 f"{self.max_bytes / 2**20:.1f} MB limit")
        try:
            prepared = prepare_adapter(self.layers, adapter_id, path, self.root)
        except PeftkitError as e:
            log.warning("adapter '%s' refused: %s", adapter_id, e)  # the whole reason, here only
            raise AdapterInvalid(self._public(str(e), adapter_id)) from None
        with self.mutex:
            for _ in range(self.host.put(adapter_id, prepared)):
                self.on_event("host_evict")
        return prepared

    def _load(self, adapter_id: str, hold: bool, pin: bool) -> Entry:
        start = time.perf_counter()
        entry = self._install(adapter_id, self._prepared(adapter_id, self.path_of(adapter_id)),
                              hold, pin)
        seconds = time.perf_counter() - start
        self.load_seconds.append(seconds)
        self.on_event("load", seconds=seconds)
        return entry

    def _install(self, adapter_id: str, prepared: PreparedAdapter, hold: bool = False,
                 pin: bool = False) -> Entry:
        """Write `prepared` into a free slot (copied on the engine's thread between steps), then
        make it the adapter's entry; an entry it replaces keeps its slot until its requests
        end."""
        with self.mutex:
            slot = self._free_slot(prepared.nbytes)
            self.slots[slot].state = "writing"
        try:
            self.between_steps(lambda: self.writer.write(slot, prepared.modules, prepared.scale))
        except BaseException:
            with self.mutex:
                self._clear(slot)
            raise
        with self.mutex:
            old = self.entries.pop(adapter_id, None)
            if old is not None:
                self._retire(old.slot)
            entry = Entry(slot, prepared.nbytes, pinned=pin or bool(old and old.pinned))
            self.entries[adapter_id] = entry
            self.slots[slot].state = "live"
            self.slots[slot].users += hold
            return entry


class _Pending:
    """One adapter's load in flight: requests for the same adapter wait on it."""

    def __init__(self):
        self.done = threading.Event()
        self.error: PeftkitError | None = None
