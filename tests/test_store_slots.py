"""Issue 28.5: the store keeps one state per slot (free, writing, live, retired) and a count of
the requests using it. Any sequence of acquires, releases, loads, unloads and reloads keeps the
bookkeeping consistent: a slot with users is never free, each live slot is one adapter's, a
retired slot is cleared when its last user ends."""

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from peftkit.serve.server import ServeConfig, Server
from peftkit.serve.store import StoreFull
from tests.serve_harness import adapter_root

ADAPTERS = [f"a{i:02d}" for i in range(5)]
OPS = ("acquire", "acquire", "release", "unload", "reload", "load")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = adapter_root(tmp_path_factory)
    server = Server(ServeConfig(base="tiny-llama", adapters=str(root), max_loaded=3, max_rank=12))
    return server.store


def check(store, held: list[int]) -> None:
    live = [e.slot for e in store.entries.values()]
    assert len(set(live)) == len(live)  # one adapter per live slot
    for k, s in enumerate(store.slots):
        assert s.users == held.count(k)  # every request counted, none twice
        assert s.state != "writing"  # no load in progress between operations
        assert (s.state == "live") == (k in live)
        assert s.state != "retired" or s.users > 0  # cleared as its last user ended
        assert s.state != "free" or s.users == 0


def cleared(store, k: int) -> bool:
    return all(float(layer.scale[k]) == 0 and not layer.lora_B[k].any()
               for layer in store.layers.values())


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, len(ADAPTERS) - 1)),
                max_size=25))
def test_any_sequence_keeps_one_consistent_state_per_slot(store, ops):
    held: list[int] = []
    try:
        for op, i in ops:
            name = ADAPTERS[i]
            try:
                if op == "acquire":
                    held.append(store.acquire(name))
                elif op == "release" and held:
                    k = held.pop(i % len(held))
                    was = store.slots[k].state
                    store.release(k)
                    if was == "retired" and k not in held:  # its last user: zeroed now
                        assert store.slots[k].state == "free" and cleared(store, k)
                elif op == "unload" and name in store.entries:
                    store.unload(name)
                elif op == "reload":
                    store.reload(name)
                elif op == "load":
                    store.load(name)
            except StoreFull:  # the 429 a request gets: no free slot, every adapter in use
                assert not any(s.state == "free" for s in store.slots)
                assert all(store.slots[e.slot].users for e in store.entries.values())
            check(store, held)
            for k in held:  # a held slot is its adapter's (live) or a replaced one (retired)
                assert store.slots[k].state in ("live", "retired")
    finally:
        while held:
            store.release(held.pop())
    check(store, [])
