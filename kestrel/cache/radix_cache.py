"""RadixAttention's prefix cache: a radix tree over token ids whose nodes own KV-pool slots.

Ownership (SGLang's model): every pool slot is either free, owned by the tree (cached), or owned by one
running request — never two. A running request locks the tree node that ends its matched prefix;
locking protects the whole root path from eviction. Eviction frees unlocked leaves, least recently
used first. With the cache disabled the tree only carries prefixes shared on purpose (the prompt of
an n > 1 request) and drops every node as soon as it is unlocked.

Keys live in namespaces, one tree each: K/V computed under a LoRA adapter differs from the base model's
for the same tokens, so namespace 0 is the base model and every adapter has its own (its id).

Pins are locks held by paused conversations (a request waiting on a tool, see kestrel/engine/pauses.py) rather
than by running requests: `pinned_size` counts the tokens held only by pins, which the pause policy can release
whenever the scheduler needs memory.
"""
from __future__ import annotations

import heapq
import itertools
from typing import Optional

import torch

from kestrel.cache.kv_pool import KVPool

_tick = itertools.count()


class TreeNode:
    __slots__ = ("children", "parent", "key", "value", "lock_ref", "pin_ref", "last_access")

    def __init__(self, parent: Optional["TreeNode"] = None):
        self.children: dict[int, TreeNode] = {}
        self.parent = parent
        self.key: list[int] = []
        self.value: torch.Tensor = torch.empty(0, dtype=torch.int64)  # pool slots, one per key token
        self.lock_ref = 0
        self.pin_ref = 0  # the locks that are pins (paused conversations)
        self.last_access = next(_tick)

    @property
    def pinned_only(self) -> bool:
        return self.lock_ref > 0 and self.lock_ref == self.pin_ref

    def __lt__(self, other: "TreeNode") -> bool:  # heap order for LRU eviction
        return self.last_access < other.last_access


def _common_prefix_len(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    def __init__(self, pool: KVPool, enabled: bool = True):
        self.pool = pool
        self.enabled = enabled
        self.root = TreeNode()  # namespace 0's root (the base model)
        self.root.lock_ref = 1  # roots are never evicted
        self.roots: dict[int, TreeNode] = {0: self.root}
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in locked nodes
        self.pinned_size = 0  # tokens in nodes locked only by pins (releasable by the pause policy)

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    # ---- lookup -------------------------------------------------------------------------
    def _root(self, namespace: int) -> TreeNode:
        root = self.roots.get(namespace)
        if root is None:
            root = self.roots[namespace] = TreeNode()
            root.lock_ref = 1
        return root

    def match_prefix(self, key: list[int], shared: bool = False, namespace: int = 0) -> tuple[torch.Tensor, TreeNode]:
        """Slots of the longest cached prefix of `key` in `namespace` and the node where it ends.

        A partial match inside a node splits it, so the returned node always ends exactly at the match.
        With the cache disabled only `shared=True` lookups (n > 1 siblings) may hit.
        """
        if not self.enabled and not shared:
            return torch.empty(0, dtype=torch.int64), self._root(namespace)
        node, values, pos = self._root(namespace), [], 0
        now = next(_tick)
        node.last_access = now
        while pos < len(key) and key[pos] in node.children:
            child = node.children[key[pos]]
            n = _common_prefix_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            values.append(child.value)
            pos += n
            node = child
        value = torch.cat(values) if values else torch.empty(0, dtype=torch.int64)
        return value, node

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split `child` after its first n tokens; returns the new upper node."""
        upper = TreeNode(child.parent)
        upper.key, upper.value = child.key[:n], child.value[:n]
        upper.lock_ref, upper.pin_ref = child.lock_ref, child.pin_ref
        upper.last_access = child.last_access
        upper.children = {child.key[n]: child}
        child.parent.children[child.key[0]] = upper
        child.parent = upper
        child.key, child.value = child.key[n:], child.value[n:]
        return upper

    # ---- insertion ----------------------------------------------------------------------
    def insert(self, key: list[int], value: torch.Tensor, namespace: int = 0) -> tuple[int, TreeNode]:
        """Insert key -> slots in `namespace`. Returns (length already cached, node ending the key).

        The tree takes ownership of value[already_cached:]; the caller still owns value[:already_cached]
        (slots duplicating cached ones) and must free those it does not share with the tree.
        """
        node, pos = self._root(namespace), 0
        now = next(_tick)
        while pos < len(key):
            child = node.children.get(key[pos])
            if child is None:
                new = TreeNode(node)
                new.key, new.value = list(key[pos:]), value[pos:].clone()
                new.last_access = now
                node.children[key[pos]] = new
                self.evictable_size += len(new.key)
                return pos, new
            n = _common_prefix_len(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pos += n
            node = child
        return pos, node

    # ---- locking ------------------------------------------------------------------------
    def lock(self, node: TreeNode, pin: bool = False) -> None:
        """Protect the root path of `node` from eviction; `pin`: the lock of a paused conversation."""
        while node.parent is not None:
            was_pinned = node.pinned_only
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node.pin_ref += pin
            self.pinned_size += len(node.key) * (node.pinned_only - was_pinned)
            node = node.parent

    def unlock(self, node: TreeNode, pin: bool = False) -> None:
        while node.parent is not None:
            was_pinned = node.pinned_only
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            node.pin_ref -= pin
            assert node.lock_ref >= node.pin_ref >= 0, "unlock without lock"
            self.pinned_size += len(node.key) * (node.pinned_only - was_pinned)
            node = node.parent
        if not self.enabled:
            self.evict(self.evictable_size)

    # ---- eviction -----------------------------------------------------------------------
    def evict(self, num_tokens: int, namespace: Optional[int] = None) -> int:
        """Free at least `num_tokens` slots from unlocked leaves (LRU first; of one namespace if given) if
        possible; returns freed."""
        if num_tokens <= 0:
            return 0
        roots = self.roots.values() if namespace is None else [self.roots.get(namespace, TreeNode())]
        leaves = [n for n in self._nodes(roots) if not n.children and n.lock_ref == 0 and n.parent is not None]
        heapq.heapify(leaves)
        freed = 0
        while freed < num_tokens and leaves:
            leaf = heapq.heappop(leaves)
            self.pool.free(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            del parent.children[leaf.key[0]]
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(leaves, parent)
        return freed

    def drop_namespace(self, namespace: int) -> None:
        """Free what a namespace caches (its adapter is gone); nothing in it may be locked."""
        if namespace in self.roots and namespace != 0:
            self.evict(self.evictable_size, namespace)
            if not self.roots[namespace].children:
                del self.roots[namespace]

    def _nodes(self, roots=None):
        stack = list(self.roots.values() if roots is None else roots)
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def cached_slots(self) -> list[int]:
        """Every slot the tree owns (for invariant checks)."""
        out: list[int] = []
        for node in self._nodes():
            out.extend(node.value.tolist())
        return out
