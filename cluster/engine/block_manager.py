"""Paged KV blocks: a free list, reference counts, and a prefix cache keyed by a hash chain of block tokens.

A full block whose KV has been computed is registered under sha256(parent hash, its tokens). A later sequence whose
tokens start the same way reuses those blocks (ref count + 1) instead of recomputing them. Freed blocks keep their
hash and stay findable until the free list hands them out again (least recently freed first).

The cache is shared by every request, so its keys are a cryptographic hash chain: with Python's `hash()` one user
could craft tokens whose block collides with another's prefix and be served (or poison) that user's KV. Two more
guards keep requests apart whatever the hash:
- The chain starts from a root: empty for unsalted requests, sha256 of the request's `cache_salt` otherwise, so
  requests with different salts get different keys for the same tokens and never share a block.
- A key is only an index. A cached block also remembers what it holds: its tokens and its parent (the entry of the
  block before it, or the root for a first block). A hit must agree on both, so a match walks the path a token trie
  would; a key found holding anything else is a collision, counted, and a miss.
"""

from __future__ import annotations

import hashlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import numpy as np

from cluster.engine.sequence import Sequence

HashFn = Callable[[bytes, list[int]], bytes]  # (parent key, block tokens) -> key


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: bytes | None = None  # its key while it is registered (full, computed); None once handed out again
    # What a registered block holds; equal contents get the same `entry`, a number never reused, so a child that
    # names its parent's entry can only match after that very content.
    entry: int = -1
    parent: int | bytes = b""  # the entry of the block before it, or the chain's root for a first block
    tokens: bytes = b""  # its token ids, packed as for the hash

    def holds(self, parent: int | bytes, tokens: bytes) -> bool:
        return self.parent == parent and self.tokens == tokens


def pack(tokens: list[int]) -> bytes:
    """Token ids as little-endian int32: what a key hashes and what a cached block is compared by."""
    return np.asarray(tokens, dtype="<i4").tobytes()


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """sha256 of the parent block's hash and this block's token ids (little-endian int32): the chain's next link."""
    return hashlib.sha256(parent + pack(tokens)).digest()


def chain_root(cache_salt: str | None) -> bytes:
    """The parent of a sequence's first block: empty without a salt, else a digest of the salt (fixed length, so
    root + tokens parse one way only; the label keeps it apart from any hash of tokens)."""
    if not cache_salt:
        return b""
    return hashlib.sha256(b"cache_salt:" + cache_salt.encode("utf-8", "surrogatepass")).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = block_hash):
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # FIFO with O(1) removal
        self.cached: dict[bytes, int] = {}  # key -> block id
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn  # tests inject a colliding one
        self._entries = itertools.count()
        # Prompt tokens looked up / served from the prefix cache, counted once a lookup's blocks are allocated
        # (`count_lookup`): a sequence looked up again while it waits for room counts once.
        self.prefix_hit_tokens = 0
        self.prefix_query_tokens = 0
        self.prefix_collisions = 0  # lookups that found the key holding other contents (each a miss)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, seq: Sequence, num_full_blocks: int) -> list[bytes]:
        """The first `num_full_blocks` keys of the chain, extending the sequence's memo as needed."""
        bs, chain = self.block_size, seq.block_hashes
        if len(chain) < num_full_blocks:
            tokens = seq.tokens
            parent = chain[-1] if chain else chain_root(seq.params.cache_salt)
            for i in range(len(chain), num_full_blocks):
                parent = self.hash_fn(parent, tokens[i * bs:(i + 1) * bs])
                chain.append(parent)
        return chain[:num_full_blocks]

    def _tokens(self, seq: Sequence, i: int) -> bytes:
        return pack(seq.token_slice(i * self.block_size, (i + 1) * self.block_size))

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that start this sequence (which holds no blocks); return the tokens they cover.

        At least one token is always left to compute: its logits are needed to sample.
        """
        assert not seq.block_table and seq.num_computed == 0
        if not self.enable_prefix_caching:
            return 0
        parent: int | bytes = chain_root(seq.params.cache_salt)
        for i, h in enumerate(self._hashes(seq, (seq.num_tokens - 1) // self.block_size)):
            block_id = self.cached.get(h)
            if block_id is None:
                break
            block = self.blocks[block_id]
            if not block.holds(parent, self._tokens(seq, i)):
                self.prefix_collisions += 1
                break
            self._ref(block_id)
            seq.block_table.append(block_id)
            parent = block.entry
        return len(seq.block_table) * self.block_size

    def count_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        """Count a `match_prefix` whose sequence was then allocated: its prompt and the prompt tokens it found."""
        if self.enable_prefix_caching:
            self.prefix_query_tokens += prompt_tokens
            self.prefix_hit_tokens += hit_tokens

    def _ref(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free[block_id]
        block.ref_count += 1

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._needed(seq, num_new_tokens) <= len(self.free)

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Give `seq` room for `num_new_tokens` more tokens of KV (check with `can_allocate` first)."""
        for _ in range(self._needed(seq, num_new_tokens)):
            block_id, _ = self.free.popitem(last=False)
            block = self.blocks[block_id]
            if block.hash is not None:  # its prefix-cache entry goes with its contents
                if self.cached.get(block.hash) == block_id:
                    del self.cached[block.hash]
                block.hash = None
            block.ref_count = 1
            seq.block_table.append(block_id)

    def _needed(self, seq: Sequence, num_new_tokens: int) -> int:
        return max(0, self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table))

    def register_full_blocks(self, seq: Sequence) -> None:
        """After a step: make the sequence's newly full, computed blocks findable by later sequences.

        A block whose key is already taken by the same contents (another sequence computed it at the same time)
        takes that entry, so what follows it here stays findable after the other's block.
        """
        if not self.enable_prefix_caching:
            return
        n_full = min(seq.num_computed, seq.num_known) // self.block_size  # a pending token is no key yet
        table = seq.block_table
        for i, h in enumerate(self._hashes(seq, n_full)):
            block = self.blocks[table[i]]
            if block.hash is not None:
                continue
            parent = self.blocks[table[i - 1]].entry if i else chain_root(seq.params.cache_salt)
            block.hash, block.parent, block.tokens = h, parent, self._tokens(seq, i)
            twin = self.blocks[self.cached.setdefault(h, block.block_id)]
            same = twin is not block and twin.holds(parent, block.tokens)
            block.entry = twin.entry if same else next(self._entries)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use keep their contents, registered afresh as their holders go on)."""
        self.cached.clear()
        for block in self.blocks:
            block.hash = None

    def free_sequence(self, seq: Sequence) -> None:
        """Drop the sequence's references; blocks nobody holds go back to the free list (hash kept)."""
        for block_id in reversed(seq.block_table):  # tail blocks first: the least likely to be shared again
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
        seq.block_table = []
        seq.num_computed = 0
