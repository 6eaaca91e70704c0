"""Admission tickets: one owner for what a request holds on the server, from admission to its
end — a place in its tenant's in-flight count (--tenant-max-inflight) and, once taken, its
adapter's slot. A ticket is closed exactly once: by its request's end (the engine calls the
request's `on_done`), or by the caller when the request is never submitted. Whoever closes it,
in whichever thread, the slot is released and the tenant's count goes down once."""

import threading
from collections import Counter

from peftkit.errors import PeftkitError


class TenantBusy(PeftkitError):
    """This tenant already has its limit of requests queued or running: HTTP 429."""


class Admission:
    """Tickets for a store's slots, counted per tenant."""

    def __init__(self, store, base_name: str, tenant_limit: int = 0):
        self.store, self.base_name, self.limit = store, base_name, tenant_limit
        self.inflight: Counter = Counter()  # tenant -> tickets open
        self._lock = threading.Lock()

    def admit(self, model: str, tenant: str | None = None, rows: int = 1,
              on_base: bool = False) -> list["Ticket"]:
        """`rows` tickets for `model`, or none: TenantBusy when they would take the tenant
        past its limit, so one tenant flooding the queue cannot starve the others. In-process
        work (no tenant) is never limited. `on_base`: the model runs on the bare base (a
        classifier probe's head), so there is no slot to take."""
        with self._lock:
            if self.limit and tenant is not None and self.inflight[tenant] + rows > self.limit:
                raise TenantBusy(f"tenant '{tenant}' has {self.inflight[tenant]} requests in "
                                 f"flight and asks for {rows} more; the limit is {self.limit}. "
                                 "Retry when one ends")
            self.inflight[tenant] += rows
        base = on_base or model in ("", self.base_name)
        return [Ticket(self, model or self.base_name, tenant, base) for _ in range(rows)]

    def _leave(self, tenant: str | None) -> None:
        with self._lock:
            self.inflight[tenant] -= 1
            if self.inflight[tenant] <= 0:
                del self.inflight[tenant]


class Ticket:
    def __init__(self, admission: Admission, model: str, tenant: str | None, base: bool):
        self.admission, self.model, self.tenant = admission, model, tenant
        self.slot: int | None = -1 if base else None  # -1: the base, no slot to hold
        self.closed = False
        self._lock = threading.Lock()

    def take_slot(self) -> int:
        """The adapter's slot, loaded when needed (AdapterNotFound / AdapterInvalid /
        StoreFull); a ticket closed meanwhile (its client went away) lets it go at once."""
        if self.slot is not None:
            return self.slot
        slot = self.admission.store.acquire(self.model)
        with self._lock:
            if not self.closed:
                self.slot = slot
                return slot
        self.admission.store.release(slot)
        raise PeftkitError(f"the request for '{self.model}' ended before its adapter loaded")

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed, slot = True, self.slot
        if slot is not None and slot >= 0:
            self.admission.store.release(slot)
        self.admission._leave(self.tenant)
