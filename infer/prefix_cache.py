"""The prefix cache's index: which block of the device's prefix store holds which token prefix.

    index = PrefixIndex(blocks=store_blocks, block=16)
    ids = index.lookup(prompt)          # store ids of the prompt's longest cached prefix, in order
    new = index.claim(prompt, len(ids))  # (block index, store id) for its other full blocks, LRU evicted
    index.counts()                      # for /health

A block is `block` consecutive prompt positions; its key is a digest chained over every token
from position 0 to its end, so a block matches only after the same whole prefix (a system
prompt, the earlier turns of a chat, a request's other choices). The store itself is an array
on the device (`llama_jax.decoding.staged`); this index lives on the host, in the batcher's
worker thread, and decides ids: lookups touch their blocks (least recently used evicted first,
a prefix's first block last, so a chain loses its tail before its head), claims take free ids
or evict.

A lookup never covers a prompt's last token: at least one position is computed, whose logits
pick the first token. So a prompt of n tokens reuses at most (n - 1) // block blocks.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np


class PrefixIndex:
    """Token-prefix blocks -> ids of a store of `blocks` blocks of `block` positions (module docstring)."""

    def __init__(self, blocks: int, block: int):
        if blocks < 1:
            raise ValueError(f"the prefix cache holds no block of {block} positions; give it more memory")
        self.blocks, self.block = blocks, block
        self._ids: OrderedDict[bytes, int] = OrderedDict()  # least recently used first
        self._free = list(range(blocks - 1, -1, -1))
        self.lookups = 0  # prompt tokens looked up
        self.hits = 0  # of them, found in the cache (prefill tokens saved)
        self.evicted = 0

    def keys(self, prompt: list[int], count: int) -> list[bytes]:
        """The keys of the prompt's first `count` blocks."""
        keys, digest = [], b""
        tokens = np.asarray(prompt, np.int64)
        for j in range(count):
            digest = hashlib.blake2b(digest + tokens[j * self.block:(j + 1) * self.block].tobytes(),
                                     digest_size=16).digest()
            keys.append(digest)
        return keys

    def first_key(self, prompt: list[int]) -> bytes | None:
        """The key of the prompt's first reusable block (None if it has none)."""
        return self.keys(prompt, 1)[0] if (len(prompt) - 1) // self.block else None

    def cached(self, key: bytes) -> bool:
        return key in self._ids

    def lookup(self, prompt: list[int]) -> list[int]:
        """Store ids of the prompt's longest cached prefix of whole blocks, at most
        (len(prompt) - 1) // block of them; counts the prompt's tokens and those found."""
        ids = []
        for key in self.keys(prompt, (len(prompt) - 1) // self.block):
            if key not in self._ids:
                break
            ids.append(self._ids[key])
        self._touch(self.keys(prompt, len(ids)))
        self.lookups += len(prompt)
        self.hits += len(ids) * self.block
        return ids

    def claim(self, prompt: list[int], cached: int) -> list[tuple[int, int]]:
        """Store ids for the prompt's full blocks after its first `cached` (which a lookup found):
        (block index, id) pairs, in order, each block's key now naming its id. Ids come from free
        blocks, then from the least recently used; blocks already indexed (a group's other row
        claimed them) are skipped; claiming stops where only the prompt's own blocks are left to evict."""
        keys = self.keys(prompt, len(prompt) // self.block)
        chain, claimed = set(keys), []
        for j in range(cached, len(keys)):
            if keys[j] in self._ids:
                continue
            if not self._free:
                # Never a block of this prompt's own chain: a block is only found after all before it.
                victim = next((key for key in self._ids if key not in chain), None)
                if victim is None:
                    break
                self._free.append(self._ids.pop(victim))
                self.evicted += 1
            self._ids[keys[j]] = self._free.pop()
            claimed.append((j, self._ids[keys[j]]))
        self._touch(keys)
        return claimed

    def _touch(self, keys: list[bytes]) -> None:
        for key in reversed(keys):  # the first block most recent: evicted last
            if key in self._ids:
                self._ids.move_to_end(key)

    def counts(self) -> dict:
        """For /health: blocks, blocks in use, the hit rate (prompt tokens found over prompt tokens
        looked up) and prefill tokens saved."""
        return {"blocks": self.blocks, "block_tokens": self.block, "blocks_used": len(self._ids),
                "evicted": self.evicted, "hit_rate": self.hits / self.lookups if self.lookups else 0.0,
                "prefill_tokens_saved": self.hits}
