"""Paged KV cache bookkeeping: which block ids each request owns, ref counts, and the automatic
prefix cache (chained hashes of full blocks rooted in the request's adapter, cache_salt and images;
LRU eviction). Pure Python: never touches tensors."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from minserve.engine.request import Request

if TYPE_CHECKING:
    from minserve.engine.state_cache import StateSlotPool, StateSnapshots

# The key of a full block: its parent's hash (for the first block: the request's prefix root)
# and its own token ids. On a hit the key is compared in full, so a hash collision can never hand
# a request somebody else's K/V, nor a first block to another adapter, salt or image.
BlockKey = tuple[Any, tuple[int, ...]]


def hash_block(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent_hash, token_ids))


def prefix_root(request: Request) -> tuple[Any, ...]:
    """The root a request's first block chains to: blocks are shared only under an equal root."""
    return (request.adapter_name, request.adapter_load, request.cache_salt,
            tuple(item.content_hash for item in request.mm_items))


@dataclass(slots=True, eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: int | None = None       # set once the block is full and published
    key: BlockKey | None = None         # (parent_hash, token_ids) behind block_hash


class BlockPool:
    """All blocks, the free queue and the hash -> block map of the prefix cache.

    The free queue holds every block with ref_cnt == 0, least recently freed first. A free block
    may still carry a hash: it stays findable by prefix lookups until it is evicted, which happens
    only when it reaches the front of the queue and somebody needs a fresh block."""

    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.cached: dict[int, KVCacheBlock] = {}   # block_hash -> block

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    def lookup(self, block_hash: int, key: BlockKey) -> KVCacheBlock | None:
        block = self.cached.get(block_hash)
        if block is None or block.key != key:
            return None
        return block

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks (a prefix hit); free ones leave the free queue."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_cnt == 0:
                del self.free_queue[block_id]
            block.ref_cnt += 1

    def allocate(self, num: int) -> list[int]:
        """Pop `num` blocks from the front of the free queue, evicting their cached hashes."""
        assert num <= len(self.free_queue), "caller must check num_free_blocks first"
        out = []
        for _ in range(num):
            block_id, _ = self.free_queue.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self.cached.get(block.block_hash) is block:
                    del self.cached[block.block_hash]
                block.block_hash = block.key = None
            block.ref_cnt = 1
            out.append(block_id)
        return out

    def release(self, block_ids: list[int]) -> None:
        """Drop one reference per block; blocks reaching zero go to the back of the free queue.
        Callers pass a request's blocks tail first, so a prompt's last blocks are evicted before
        its first ones (the first ones are the most shareable)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            assert block.ref_cnt > 0, f"block {block_id} released twice"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self.free_queue[block_id] = None

    def publish(self, block_id: int, block_hash: int, key: BlockKey) -> None:
        """Make a full block findable. If an equal block is already published (two requests
        computed the same prefix at once), the first one stays the canonical copy."""
        if block_hash in self.cached:
            return
        block = self.blocks[block_id]
        block.block_hash, block.key = block_hash, key
        self.cached[block_hash] = block


class KVCacheManager:
    """Hands out KV cache blocks to requests.

    One request's token positions against its block_ids (block_size 4 in the picture):

        block_ids:  | b7 | b2 | b9 | b4 | b5 | new | new |
        tokens:     |xxxx|xxxx|xxxx|xxxx|xx..|.... |.... |
                    |<-- prefix hit --->|
                    |<---- num_computed_tokens --->|<- num_new_tokens ->|
                     computed: already in the cache      scheduled this step

    A waiting request first asks get_computed_blocks() for the longest run of full blocks whose
    tokens (and all tokens before them) equal blocks already in the cache; allocate_slots() then
    takes references on those and allocates fresh blocks for the rest, or returns None, changing
    nothing, when the pool cannot cover it. After each step cache_full_blocks() publishes every
    block that became full, so later requests can share it."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 state_slots: StateSlotPool | None = None,
                 state_snapshots: StateSnapshots | None = None) -> None:
        """state_slots: a hybrid model's linear-attention state slots (engine/state_cache.py),
        one per running request, taken with its first blocks and given back with them;
        state_snapshots: the states saved at block boundaries, where its prefix hits stop."""
        self.state_slots, self.state_snapshots = state_slots, state_snapshots
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        # Per request: hashes of its full blocks computed so far, and how many are published.
        self._block_hashes: dict[str, list[int]] = {}
        self._num_published: dict[str, int] = {}
        self.prefix_cache_queries = 0   # tokens looked up
        self.prefix_cache_hits = 0      # tokens found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def reset(self) -> None:
        """Forget every block's contents (sleep mode freed the cache); no request holds one."""
        self.pool = BlockPool(self.pool.num_blocks)
        self._block_hashes.clear()
        self._num_published.clear()

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (free cached blocks count as free)."""
        return 1.0 - self.pool.num_free_blocks / max(self.pool.num_blocks, 1)

    def _hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        """The chained hashes of the request's first num_full_blocks blocks (memoized)."""
        hashes = self._block_hashes.setdefault(request.request_id, [])
        if len(hashes) < num_full_blocks:
            token_ids = request.all_token_ids
            bs = self.block_size
            parent = hashes[-1] if hashes else hash(prefix_root(request))
            for i in range(len(hashes), num_full_blocks):
                parent = hash_block(parent, tuple(token_ids[i * bs:(i + 1) * bs]))
                hashes.append(parent)
        return hashes

    def _key(self, request: Request, token_ids: list[int], hashes: list[int], i: int) -> BlockKey:
        bs = self.block_size
        return (hashes[i - 1] if i else prefix_root(request)), tuple(token_ids[i * bs:(i + 1) * bs])

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """The longest cached prefix of the request, as (block_ids, num_cached_tokens).

        At least one token is always left uncomputed: the step must run something to produce the
        logits of the next token."""
        if not self.enable_prefix_caching:
            return [], 0
        num_full = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes(request, num_full)
        token_ids = request.all_token_ids
        block_ids = []
        for i in range(num_full):
            block = self.pool.lookup(hashes[i], self._key(request, token_ids, hashes, i))
            if block is None:
                break
            block_ids.append(block.block_id)
        while self.state_snapshots is not None and block_ids and \
                self.state_snapshots.lookup(self.block_key(request, len(block_ids))) is None:
            block_ids.pop()    # a hybrid model resumes only where the states were saved
        num_cached_tokens = len(block_ids) * self.block_size
        self.prefix_cache_queries += request.num_tokens
        self.prefix_cache_hits += num_cached_tokens
        return block_ids, num_cached_tokens

    def block_key(self, request: Request, num_blocks: int) -> tuple[int, BlockKey]:
        """(hash, key) of the request's block num_blocks - 1: its first num_blocks blocks."""
        hashes = self._hashes(request, num_blocks)     # (memoized: it may hold more)
        return hashes[num_blocks - 1], self._key(request, request.all_token_ids, hashes,
                                                 num_blocks - 1)

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None,
    ) -> list[int] | None:
        """Give the request room for num_new_tokens more tokens after its computed ones (and after
        `computed_blocks`, a prefix hit from get_computed_blocks, taken here). Returns the newly
        allocated block ids, or None, with nothing changed, when there are not enough free blocks.
        On success request.block_ids is extended."""
        computed_blocks = computed_blocks or []
        bs = self.block_size
        num_tokens_after = (request.num_computed_tokens + len(computed_blocks) * bs
                            + num_new_tokens)
        num_required = -(-num_tokens_after // bs)
        num_new_blocks = max(num_required - len(request.block_ids) - len(computed_blocks), 0)
        # Hit blocks nobody references sit in the free queue; taking them shrinks it.
        num_hit_free = sum(1 for b in computed_blocks if self.pool.blocks[b].ref_cnt == 0)
        if num_new_blocks > self.pool.num_free_blocks - num_hit_free:
            return None
        if self.state_slots is not None and self.state_slots.allocate(request.request_id) is None:
            return None
        self.pool.touch(computed_blocks)
        new_blocks = self.pool.allocate(num_new_blocks)
        request.block_ids.extend(computed_blocks)
        request.block_ids.extend(new_blocks)
        if computed_blocks:
            self._num_published[request.request_id] = len(computed_blocks)
        return new_blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the blocks that became full (all their tokens computed) since the last call."""
        if not self.enable_prefix_caching:
            return
        num_full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        start = self._num_published.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._hashes(request, num_full)
        token_ids = request.all_token_ids
        for i in range(start, num_full):
            self.pool.publish(request.block_ids[i], hashes[i],
                              self._key(request, token_ids, hashes, i))
        self._num_published[request.request_id] = num_full

    def rollback(self, request: Request, num_tokens: int) -> None:
        """Release the request's blocks past its first num_tokens slots (speculative decoding:
        the slots of rejected drafts). Tail first, like free(); never a published block, since
        only computed tokens are published and rejected ones never count as computed.

            block_ids:  | b7 | b2 | b9 | b4 |        num_tokens = 6, block_size 4
            tokens:     |xxxx|xx..|....|....|   ->   | b7 | b2 |   (b9, b4 released)"""
        keep = -(-num_tokens // self.block_size)
        if keep < len(request.block_ids):
            self.pool.release(request.block_ids[:keep - 1:-1] if keep else request.block_ids[::-1])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        """Release all the request's blocks (finish, abort or preemption); tail blocks first."""
        self.pool.release(request.block_ids[::-1])
        request.block_ids = []
        if self.state_slots is not None:
            self.state_slots.free(request.request_id)
        self._num_published.pop(request.request_id, None)
        # The hashes stay valid (tokens never change) but are cheap to recompute; drop them so
        # finished requests leave nothing behind.
        self._block_hashes.pop(request.request_id, None)
