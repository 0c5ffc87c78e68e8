"""Property tests of the radix cache's ownership invariants (hypothesis state machine)."""
from __future__ import annotations

import hypothesis.strategies as st
import torch
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kestrel.cache.kv_pool import KVPool
from kestrel.cache.radix_cache import RadixCache

POOL = 64
keys = st.lists(st.integers(0, 3), min_size=1, max_size=12)  # small alphabet: lots of shared prefixes


class RadixMachine(RuleBasedStateMachine):
    """Requests match a prefix (locking it), own slots for the rest, and on finish insert everything."""

    def __init__(self):
        super().__init__()
        self.pool = KVPool(POOL, 0, 1, 1, torch.float32, torch.device("cpu"))
        self.cache = RadixCache(self.pool)
        self.running: list[dict] = []

    @rule(key=keys)
    def start(self, key):
        prefix, node = self.cache.match_prefix(key)
        assert len(prefix) <= len(key)
        self.cache.lock(node)
        need = len(key) - len(prefix)
        if self.pool.num_free < need:
            self.cache.evict(need - self.pool.num_free)
        if self.pool.num_free < need:
            self.cache.unlock(node)
            return
        own = torch.tensor(self.pool.alloc(need), dtype=torch.int64)
        self.running.append(dict(key=key, node=node, prefix=prefix, slots=torch.cat([prefix, own])))

    @precondition(lambda self: self.running)
    @rule(i=st.integers(0, 100))
    def finish(self, i):
        req = self.running.pop(i % len(self.running))
        already, _ = self.cache.insert(req["key"], req["slots"])
        assert already >= len(req["prefix"])  # a locked prefix cannot have been evicted
        self.pool.free(req["slots"][len(req["prefix"]):already])
        self.cache.unlock(req["node"])

    @rule(n=st.integers(0, POOL))
    def evict(self, n):
        before = self.cache.evictable_size
        freed = self.cache.evict(n)
        assert freed >= min(n, before) or self.cache.evictable_size == 0
        assert self.cache.evictable_size == before - freed

    @rule(key=keys)
    def match_is_consistent(self, key):
        prefix, node = self.cache.match_prefix(key)
        # the matched slots are what the tree stores along the path to `node`
        path, n = [], node
        while n is not self.cache.root:
            path.append(n.value)
            n = n.parent
        expect = torch.cat(path[::-1]) if path else torch.empty(0, dtype=torch.int64)
        assert torch.equal(prefix, expect)

    @invariant()
    def every_slot_has_exactly_one_owner(self):
        free = list(self.pool._free)
        cached = self.cache.cached_slots()
        owned = [s for r in self.running for s in r["slots"][len(r["prefix"]):].tolist()]
        everything = free + cached + owned
        assert sorted(everything) == list(range(1, POOL + 1)), "a slot is lost or has two owners"
        assert self.cache.evictable_size + self.cache.protected_size == len(cached)

    @invariant()
    def locked_prefixes_stay_cached(self):
        cached = set(self.cache.cached_slots())
        for r in self.running:
            assert set(r["prefix"].tolist()) <= cached

    def teardown(self):
        while self.running:
            self.finish(0)
        assert self.pool.num_free + self.cache.evictable_size == POOL
        assert self.cache.protected_size == 0


TestRadixCache = RadixMachine.TestCase
TestRadixCache.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_split_and_match():
    pool = KVPool(16, 0, 1, 1, torch.float32, torch.device("cpu"))
    cache = RadixCache(pool)
    a = torch.tensor(pool.alloc(5))
    assert cache.insert([1, 2, 3, 4, 5], a) == (0, cache.match_prefix([1, 2, 3, 4, 5])[1])
    slots, node = cache.match_prefix([1, 2, 3, 9])
    assert slots.tolist() == a[:3].tolist()
    assert node.key == [1, 2, 3] and len(node.children) == 1  # split at the divergence
    b = torch.tensor(pool.alloc(2))
    already, _ = cache.insert([1, 2, 3, 7, 8], torch.cat([a[:3], b]))
    assert already == 3
    assert cache.evictable_size == 7
    assert cache.evict(1) >= 1  # the least recently used leaf goes first
    assert cache.match_prefix([1, 2, 3, 4, 5])[0].tolist() == a[:3].tolist()
    assert cache.match_prefix([1, 2, 3, 7, 8])[0].tolist() == torch.cat([a[:3], b]).tolist()


def test_disabled_cache_never_matches_but_shares_on_purpose():
    pool = KVPool(16, 0, 1, 1, torch.float32, torch.device("cpu"))
    cache = RadixCache(pool, enabled=False)
    s = torch.tensor(pool.alloc(4))
    _, node = cache.insert([1, 2, 3, 4], s)
    cache.lock(node)
    assert len(cache.match_prefix([1, 2, 3, 4])[0]) == 0
    assert cache.match_prefix([1, 2, 3, 4], shared=True)[0].tolist() == s.tolist()
    cache.unlock(node)  # unlocked nodes are dropped at once when the cache is off
    assert cache.total_size == 0 and pool.num_free == 16
