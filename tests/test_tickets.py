"""Issue 28.5: one owner per request. A request's tenant count and adapter slot are held by its
admission ticket and let go exactly once, however it ends; the engine alone changes the model,
running slot writes and clears between two forward steps (nobody else takes its lock)."""

import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from peftkit.engine import QueueFull, Sampling
from peftkit.errors import PeftkitError
from peftkit.serve.server import ServeConfig, Server
from peftkit.serve.store import AdapterNotFound
from peftkit.serve.tickets import TenantBusy
from tests.serve_harness import adapter_root

GREEDY = Sampling(max_tokens=4, temperature=0.0)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return adapter_root(tmp_path_factory)


@pytest.fixture(scope="module")
def server(root):
    return Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=3, max_rank=12,
                              tenant_max_inflight=5, max_queue=6))


def _free(server) -> None:
    assert not server.admission.inflight, server.admission.inflight
    assert not any(s.users for s in server.store.slots), [s.users for s in server.store.slots]


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["a00", "a01", "tiny-llama", "nope"]),
                          st.integers(1, 7), st.sampled_from(["run", "refuse", "drop"])),
                max_size=8))
def test_every_ticket_lets_go_once_however_its_request_ends(server, jobs):
    """Rows admitted all or none (never past the tenant's limit); a ticket whose request ran,
    was refused by the engine, or was never submitted gives its slot and its tenant place back
    once, even when closed twice."""
    ids = server.prompt_ids(prompt="hi")
    for model, rows, end in jobs:
        before = sum(server.admission.inflight.values())
        try:
            tickets = server.admit(model, "acme", rows)
        except TenantBusy:
            assert rows > 5 and sum(server.admission.inflight.values()) == before
            continue
        assert server.admission.inflight["acme"] == rows
        reqs = []
        try:
            for t in tickets:
                if end == "drop":  # never submitted: the caller closes it
                    t.close()
                elif model == "nope":  # a 404 before the engine: the ticket closed
                    with pytest.raises(AdapterNotFound):
                        server.submit(model, ids, GREEDY, ticket=t)
                elif end == "run":
                    reqs.append(server.submit(model, ids, GREEDY, ticket=t))
                else:  # over the context: the engine refuses it
                    with pytest.raises(PeftkitError, match="max_tokens"):
                        server.submit(model, ids, Sampling(max_tokens=10**6), ticket=t)
        finally:  # closed twice (the running ones after they ended): still let go once
            server.engine.run_until_idle()
            for t in tickets:
                t.close()
        assert all(r.finish_reason in ("stop", "length") for r in reqs)
        _free(server)


def test_a_ticket_closed_while_its_slot_loads_gives_the_slot_back(server):
    """The client went away while its adapter loaded: the load finishes, the slot is free."""
    ticket = server.admit("a02", "acme")[0]
    ticket.close()
    with pytest.raises(PeftkitError, match="ended before its adapter loaded"):
        ticket.take_slot()
    assert "a02" in server.store.entries  # loaded, for the next request
    _free(server)


def test_a_full_queue_closes_the_refused_requests_ticket(server):
    ids = server.prompt_ids(prompt="hi")
    queued = [server.submit("a00", ids, GREEDY) for _ in range(6)]  # --max-queue 6
    with pytest.raises(QueueFull):
        server.submit("a01", ids, GREEDY, ticket=server.admit("a01", "acme")[0])
    assert server.admission.inflight == {None: 6}  # the refused one's place is back
    server.engine.run_until_idle()
    assert all(r.error is None for r in queued)
    _free(server)


def test_slot_changes_run_on_the_engine_thread_between_steps(root):
    """Loads while the engine decodes: every write and clear runs on the engine's thread in
    the order asked (a clear queued without waiting still comes before the next write into
    that slot), a write's error reaches the caller, and the running request is untouched."""
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=2,
                                max_rank=12))
    writer, ops = server.store.writer, []
    real_write, real_clear = writer.write, writer.clear

    def write(slot, *a):
        ops.append(("write", slot, threading.current_thread().name, server.engine._lock.locked()))
        if fail.is_set():
            raise RuntimeError("copy failed")
        real_write(slot, *a)

    def clear(slot):
        ops.append(("clear", slot, threading.current_thread().name, server.engine._lock.locked()))
        real_clear(slot)
    fail = threading.Event()
    writer.write, writer.clear = write, clear
    ids = server.prompt_ids(prompt="a long story about")
    alone = server.submit("", ids, Sampling(max_tokens=40, temperature=0.0))
    server.engine.run_until_idle()
    server.start()
    try:
        running = server.submit("", ids, Sampling(max_tokens=40, temperature=0.0))
        first = server.store.load("a00").slot
        server.store.unload("a00")  # no user: cleared, not waited for
        assert server.store.load("a01").slot == first  # the freed slot, written after the clear
        fail.set()
        with pytest.raises(RuntimeError, match="copy failed"):
            server.store.load("a03")
        fail.clear()
        while running.finish_reason is None:
            threading.Event().wait(0.01)
    finally:
        server.stop()
    assert running.out_ids == alone.out_ids
    assert [op[:2] for op in ops[:3]] == [("write", first), ("clear", first), ("write", first)]
    assert all(name == "peftkit-engine" and locked for _, _, name, locked in ops), ops
    assert [s.state for s in server.store.slots].count("writing") == 0  # the failed one freed
