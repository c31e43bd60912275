"""The paged KV cache: per-layer block pools, a block manager for sequences, and pinned anchor sets.

Two pools of fixed-size blocks (the block size is also DQP's digest block):

- sequence blocks [L, N, block_size, H_kv, D] in the model's dtype, handed out by `BlockManager`
  (a free list; block 0 is kept back as the write target of a captured batch's padding slots; a
  session's finished turn may leave its blocks kept for its next turn, reclaimed when space runs out);
- anchor blocks [L, M, block_size, H_kv, D] in the cache dtype or int8 DQP codes (with V's per-row
  exponents [L, M, block_size, H_kv] beside them), handed out by
  `AnchorPool` to compiled anchor sets. A set is pinned while any running sequence reads it
  (reference count) and leaves by least-recent use only once nobody does; a full pool raises
  EngineError and never touches a pinned set.

Sizing: on CUDA a fraction of the free device memory (as vLLM's gpu_memory_utilization); on the
CPU a token budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fieldprint.engine.attention import KVCache
from fieldprint.engine.model import ModelArgs
from fieldprint.errors import EngineError


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def allocate_cache(args: ModelArgs, *, block_size: int, num_blocks: int, num_anchor_blocks: int,
                   dtype: torch.dtype, anchor_dtype: torch.dtype, device: torch.device, tp_size: int = 1) -> KVCache:
    """Zeroed pools for every layer; int8 anchors get K's per-channel scales and V's per-row exponents too."""
    if block_size < 1 or block_size & (block_size - 1):
        raise EngineError(f"block_size must be a power of two, got {block_size}")
    h, d, n_layers = args.num_kv_heads // tp_size, args.head_dim, args.num_layers
    shape = (n_layers, num_blocks, block_size, h, d)
    ashape = (n_layers, max(num_anchor_blocks, 1), block_size, h, d)
    int8 = anchor_dtype == torch.int8
    return KVCache(
        torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device),
        torch.zeros(ashape, dtype=anchor_dtype, device=device), torch.zeros(ashape, dtype=anchor_dtype, device=device),
        torch.ones((n_layers, h, d), dtype=torch.float32, device=device) if int8 else None,
        torch.zeros(ashape[:4], dtype=torch.int8, device=device) if int8 else None,
    )


def blocks_for_memory(args: ModelArgs, block_size: int, dtype: torch.dtype, fraction: float,
                      device: torch.device, tp_size: int = 1) -> int:
    """How many sequence blocks fit in `fraction` of the device's free memory (CUDA only)."""
    free, _ = torch.cuda.mem_get_info(device)
    per_block = 2 * args.num_layers * block_size * (args.num_kv_heads // tp_size) * args.head_dim * torch.finfo(dtype).bits // 8
    return max(2, int(free * fraction) // per_block)


class BlockManager:
    """Hands out sequence blocks from a free list; a sequence owns its blocks until freed.

    Blocks may also be kept under a key with their contents (a session's last turn, for its next turn
    to take back: `keep`, `take`): they count as free, and when the free list runs out the entry kept
    longest ago is dropped and its blocks handed out (least recently kept first).
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 2:
            raise EngineError(f"the sequence pool needs at least 2 blocks, got {num_blocks}")
        self.block_size = block_size
        self.free: list[int] = list(range(num_blocks - 1, 0, -1))  # block 0 is the padding target
        self.num_blocks = num_blocks
        # Tables only grow at their end between releases: a reader that saw this count unchanged
        # (the runner's block-table rows) needs to look only at each table's new entries.
        self.releases = 0
        self.kept: OrderedDict[object, tuple[list[int], object]] = OrderedDict()  # key -> (blocks, what they hold)
        self._num_kept = 0

    @property
    def num_free(self) -> int:
        """Blocks a table can gain: the free list and every kept block."""
        return len(self.free) + self._num_kept

    def blocks_needed(self, table: list[int], num_tokens: int) -> int:
        """Blocks a table must gain to hold `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - len(table))

    def can_grow(self, table: list[int], num_tokens: int) -> bool:
        return self.blocks_needed(table, num_tokens) <= self.num_free

    def grow(self, table: list[int], num_tokens: int) -> None:
        """Append blocks to `table` (in place) until it holds `num_tokens` tokens; EngineError if out.
        Kept entries are dropped, oldest first, while the free list is short."""
        need = self.blocks_needed(table, num_tokens)
        if need > self.num_free:
            raise EngineError(f"the KV cache is full: {need} more block(s) needed, {self.num_free} free "
                              f"of {self.num_blocks - 1}; shorten the request or give the cache more memory")
        while need > len(self.free):
            self.drop(next(iter(self.kept)))
        for _ in range(need):
            table.append(self.free.pop())

    def release(self, table: list[int]) -> None:
        """Return a table's blocks to the free list and empty it."""
        self.free.extend(reversed(table))
        table.clear()
        self.releases += 1

    def keep(self, key: object, table: list[int], count: int, contents: object) -> None:
        """Move the first `count` blocks of `table` (which keeps the rest) under `key`, with what they
        hold; an entry kept under the same key before is dropped."""
        self.drop(key)
        count = min(count, len(table))
        if count <= 0:
            return
        self.kept[key] = (table[:count], contents)
        self._num_kept += count
        del table[:count]
        self.releases += 1

    def take(self, key: object) -> tuple[list[int], object] | None:
        """The blocks kept under `key` and what they hold, now the caller's (None if none are kept)."""
        entry = self.kept.pop(key, None)
        if entry is not None:
            self._num_kept -= len(entry[0])
        return entry

    def drop(self, key: object) -> None:
        """Free the blocks kept under `key`, if any."""
        entry = self.take(key)
        if entry is not None:
            self.release(entry[0])


def read_anchor_states(cache, blocks: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A set's K and V [L, A, H, ...] in their canonical forms, read from this device's anchor pool (a copy).

    K: the codes (int8) or values [L, A, H, D]; int8 V: the DQP row layout [L, A, H, D + 1], each
    row's codes followed by its exponent, interleaved from the two pools the kernel reads.
    """
    idx = torch.tensor(blocks, device=cache.anchor_k.device)
    k = cache.anchor_k[:, idx].flatten(1, 2)[:, :length]
    v = cache.anchor_v[:, idx].flatten(1, 2)[:, :length]
    if cache.anchor_v_exp is not None:
        v = torch.cat([v, cache.anchor_v_exp[:, idx].flatten(1, 2)[:, :length, :, None]], dim=-1)
    return k, v


def write_anchor_states(cache, blocks: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
    """Write a set's K and V (read_anchor_states' forms) into its blocks of this device's pool; the last block's tail is zeroed."""
    parts = [(cache.anchor_k, k), (cache.anchor_v, v)]
    if cache.anchor_v_exp is not None:  # the row layout: codes to one pool, exponents to the other
        parts = [(cache.anchor_k, k), (cache.anchor_v, v[..., :-1]), (cache.anchor_v_exp, v[..., -1])]
    idx = torch.tensor(blocks, device=cache.anchor_k.device)
    bs = cache.block_size
    for pool, x in parts:
        padded = torch.zeros((x.shape[0], len(blocks) * bs, *x.shape[2:]), dtype=pool.dtype, device=pool.device)
        padded[:, : x.shape[1]] = x
        pool[:, idx] = padded.view(x.shape[0], len(blocks), bs, *x.shape[2:])


@dataclass(slots=True)
class AnchorSetSlot:
    """A compiled anchor set's place in the anchor pool."""

    key: str
    blocks: list[int]
    length: int  # tokens
    refs: int = 0


class AnchorPool:
    """Anchor blocks shared by sets: pinned while referenced, evicted least-recently-used otherwise."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))
        self.sets: OrderedDict[str, AnchorSetSlot] = OrderedDict()  # least recently used first

    def get(self, key: str) -> AnchorSetSlot | None:
        slot = self.sets.get(key)
        if slot is not None:
            self.sets.move_to_end(key)
        return slot

    def reserve(self, key: str, length: int) -> AnchorSetSlot:
        """Blocks for a new set of `length` tokens, evicting unpinned sets (oldest first) if needed."""
        if key in self.sets:
            raise EngineError(f"anchor set {key} is already in the pool")
        need = cdiv(length, self.block_size)
        if need > self.num_blocks:
            raise EngineError(f"an anchor set of {length} tokens needs {need} blocks; the anchor pool has "
                              f"{self.num_blocks}: fewer or shorter anchors, or a larger anchor pool")
        unpinned = [k for k, s in self.sets.items() if s.refs == 0]  # least recently used first
        # Refuse before evicting anything: a reservation that cannot succeed must not cost cached sets.
        if len(self.free) + sum(len(self.sets[k].blocks) for k in unpinned) < need:
            pinned = sum(len(s.blocks) for s in self.sets.values() if s.refs)
            raise EngineError(f"the anchor pool is full: {need} blocks needed, {len(self.free)} free, {pinned} pinned "
                              "by running sequences; retry when they finish or enlarge the anchor pool")
        for victim in unpinned:
            if len(self.free) >= need:
                break
            self.evict(victim)
        slot = AnchorSetSlot(key, [self.free.pop() for _ in range(need)], length)
        self.sets[key] = slot
        return slot

    def evict(self, key: str) -> None:
        slot = self.sets[key]
        if slot.refs:
            raise EngineError(f"anchor set {key} is read by {slot.refs} running sequence(s) and cannot be evicted")
        del self.sets[key]
        self.free.extend(reversed(slot.blocks))

    def pin(self, key: str) -> AnchorSetSlot:
        slot = self.sets[key]
        slot.refs += 1
        self.sets.move_to_end(key)
        return slot

    def unpin(self, key: str) -> None:
        slot = self.sets[key]
        if slot.refs <= 0:
            raise EngineError(f"anchor set {key} is not pinned")
        slot.refs -= 1
