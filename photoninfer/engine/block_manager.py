"""BlockManager: hands out fixed-size blocks of the paged KV cache to sequences, and remembers full blocks
so that later sequences starting with the same tokens reuse them (prefix caching).

A block holds the K/V of `block_size` consecutive tokens of one sequence. A full block is identified by
its tokens and everything before them: its key is sha256(previous block's key + its token ids), and the
first block's parent is a digest of the cache namespace (the model and anything else that changes the K/V).
A collision-resistant chain matters: with a weak hash, a crafted prompt could make others reuse its K/V.
Two sequences with a common prefix can point at the same blocks; reference counts say how many sequences
hold a block. A block nobody holds goes back to the free list but keeps its contents and identity until it
is handed out again: the free list is ordered least recently freed first, so cached prefixes are evicted
last-used-last.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional

from photoninfer.engine.sequence import Sequence

BlockKey = bytes  # sha256 digest of the previous block's key and this block's token ids


def chain_key(parent: BlockKey, token_ids: list[int]) -> BlockKey:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


def root_key(namespace: bytes) -> BlockKey:
    """The parent of every sequence's first block."""
    return hashlib.sha256(b"photoninfer prefix cache v1\0" + namespace).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 namespace: bytes = b""):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"need positive num_blocks and block_size, got {num_blocks} and {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[BlockKey, int] = {}  # full blocks whose contents are known
        self.block_keys: list[Optional[BlockKey]] = [None] * num_blocks
        self.prefix_hit_tokens = 0  # tokens whose K/V came from the cache instead of being computed
        self._root = root_key(namespace)
        self._seq_keys: dict[int, list[BlockKey]] = {}  # seq_id -> keys of its full blocks computed so far
        self._cache_progress: dict[int, int] = {}  # seq_id -> how many of its blocks were offered to the cache

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """How many more blocks `seq` needs so that its first `num_tokens` tokens have a KV slot."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    # ---- prefix cache ---------------------------------------------------------------------------------

    def _keys(self, seq: Sequence, num_blocks: int) -> list[BlockKey]:
        """Keys of `seq`'s first `num_blocks` (full) blocks. Remembered per sequence: its tokens only grow,
        so each block is hashed once, however often a waiting sequence is looked up. A block holding a
        token not yet read back from the device (a negative placeholder) ends the list: its key is unknown."""
        keys = self._seq_keys.setdefault(seq.seq_id, [])
        parent = keys[-1] if keys else self._root
        size = self.block_size
        for i in range(len(keys), num_blocks):
            block = seq.token_ids[i * size : (i + 1) * size]
            if min(block) < 0:
                break
            parent = chain_key(parent, block)
            keys.append(parent)
        return keys

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks holding the longest prefix of `seq`'s tokens. The block of the last token is never
        reused: its logits must be computed, and a shared block must not be written. A sequence that wants
        prompt logprobs reuses nothing: a cached block has no logits."""
        if not self.enable_prefix_caching or seq.block_table or seq.params.prompt_logprobs is not None:
            return []
        blocks = []
        num_blocks = (seq.num_tokens - 1) // self.block_size
        for key in self._keys(seq, num_blocks)[:num_blocks]:
            block_id = self.cached_blocks.get(key)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks

    def can_allocate(self, seq: Sequence, num_tokens: int, prefix: list[int] = ()) -> bool:
        """Whether `seq` (taking the cached `prefix` blocks first) can cover `num_tokens` tokens."""
        reused_free = sum(1 for b in prefix if self.ref_counts[b] == 0)  # they leave the free list too
        new = max(0, self.num_new_blocks_needed(seq, num_tokens) - len(prefix))
        return reused_free + new <= self.num_free_blocks

    def take_prefix(self, seq: Sequence, prefix: list[int]) -> None:
        """Give `seq` the cached `prefix` blocks; their tokens count as computed."""
        if not prefix:
            return
        for block_id in prefix:
            if self.ref_counts[block_id] == 0:
                del self.free_block_ids[block_id]
            self.ref_counts[block_id] += 1
            seq.block_table.append(block_id)
        seq.num_computed_tokens = len(prefix) * self.block_size
        self.prefix_hit_tokens += seq.num_computed_tokens

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Remember the blocks of `seq` that are now completely computed, for later sequences to reuse."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        done = self._cache_progress.get(seq.seq_id, 0)
        if num_full <= done:
            return
        keys = self._keys(seq, num_full)[:num_full]
        for key, block_id in zip(keys[done:], seq.block_table[done:num_full]):
            if self.block_keys[block_id] is None and key not in self.cached_blocks:  # else: a copy is cached
                self.block_keys[block_id] = key
                self.cached_blocks[key] = block_id
        self._cache_progress[seq.seq_id] = max(done, len(keys))

    # ---- allocation ------------------------------------------------------------------------------------

    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Grow `seq.block_table` to cover `num_tokens` tokens. Call can_allocate first."""
        needed = self.num_new_blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, {self.num_free_blocks} free")
        for _ in range(needed):
            block_id, _ = self.free_block_ids.popitem(last=False)  # least recently freed: evict it
            key = self.block_keys[block_id]
            if key is not None:  # its cached contents are about to be overwritten
                del self.cached_blocks[key]
                self.block_keys[block_id] = None
            self.ref_counts[block_id] = 1
            seq.block_table.append(block_id)

    def free(self, seq: Sequence) -> None:
        """Drop `seq`'s references; blocks nobody else holds go back to the free list, keeping their
        cached contents. Freed in reverse, so a sequence's tail is evicted before its prefix."""
        for block_id in reversed(seq.block_table):
            self.ref_counts[block_id] -= 1
            if self.ref_counts[block_id] < 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            if self.ref_counts[block_id] == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        self._cache_progress.pop(seq.seq_id, None)
        self._seq_keys.pop(seq.seq_id, None)
