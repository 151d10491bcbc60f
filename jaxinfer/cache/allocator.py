"""KV page allocator: free list, reference counts and a prefix cache (host side, no jax).

A page is free, referenced (refcount > 0), or cached: unreferenced but still holding the
keys and values of a full page whose chained hash is registered, so a later request with
the same prefix reuses it. Cached pages are evicted least-recently-used first, only when an
allocation needs their memory.
"""

from __future__ import annotations

import collections
import hashlib
from collections.abc import Sequence

import numpy as np

from jaxinfer.errors import CapacityError, InputError

# Parent of the first page. Hashes are sha256 digests rather than Python's 64-bit `hash`:
# two prefixes with one hash would share KV, letting a request read another's keys and
# values, so collisions must be infeasible even for crafted prompts.
ROOT_HASH = b""


def hash_page(parent_hash: bytes, token_ids: Sequence[int]) -> bytes:
    """Chained hash of one full page: equal hashes imply equal whole prefixes."""
    digest = hashlib.sha256(parent_hash)
    digest.update(np.asarray(token_ids, np.int64).tobytes())
    return digest.digest()


def hash_pages(token_ids: Sequence[int], page_size: int) -> list[bytes]:
    """Chained hashes of every full page of `token_ids` (a trailing partial page has none)."""
    hashes: list[bytes] = []
    parent = ROOT_HASH
    for start in range(0, len(token_ids) - page_size + 1, page_size):
        parent = hash_page(parent, token_ids[start:start + page_size])
        hashes.append(parent)
    return hashes


class PageAllocator:
    """Hands out KV cache pages by reference count, keeping freed full pages as a prefix cache.

    Args:
      num_pages: pages in the pool (P).
      page_size: tokens per page (C).
      enable_prefix_caching: keep and match full pages by hash.
    """

    def __init__(self, num_pages: int, page_size: int, enable_prefix_caching: bool = True):
        for name, value in (("num_pages", num_pages), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"invalid {name}={value!r}: must be an integer >= 1")
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = bool(enable_prefix_caching)
        self._refcounts = [0] * num_pages
        self._free = list(range(num_pages - 1, -1, -1))  # a stack: pop() hands out page 0 first
        # Unreferenced cached pages, least recently used first.
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._page_by_hash: dict[bytes, int] = {}
        # Chain hash of every full page known, cached or not: a request that computed a
        # duplicate of a cached page still extends its chain from here without rehashing.
        self._hash_by_page: dict[int, bytes] = {}
        self.num_query_tokens = 0
        self.num_hit_tokens = 0

    # ------------------------------------------------------------------ counts

    @property
    def num_free(self) -> int:
        """Pages `allocate` can hand out: free plus evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_pages(self) -> int:
        """Pages registered in the prefix cache (referenced or not)."""
        return len(self._page_by_hash)

    @property
    def hit_rate(self) -> float:
        """Prompt tokens served from the prefix cache / tokens looked up (0 before any)."""
        return self.num_hit_tokens / self.num_query_tokens if self.num_query_tokens else 0.0

    def refcount(self, page: int) -> int:
        return self._refcounts[page]

    def is_shared(self, page: int) -> bool:
        """More than one holder: writing it would change what another sequence reads."""
        return self._refcounts[page] > 1

    def is_cached(self, page: int) -> bool:
        """The page is the prefix cache's copy of its hash (so its content must not change)."""
        page_hash = self._hash_by_page.get(page)
        return page_hash is not None and self._page_by_hash.get(page_hash) == page

    def needs_copy(self, page: int) -> bool:
        """Whether a holder must copy the page before writing into it.

        Shared pages, and full pages whose hash is known even when a twin is the cache's
        copy: their hash is the parent of later pages' hashes and may make them the cache's
        copy when freed, so their content must never change.
        """
        return self.is_shared(page) or page in self._hash_by_page

    # ------------------------------------------------------------------ allocation

    def allocate(self, num: int) -> list[int]:
        """Take `num` pages (refcount 1), evicting least-recently-used cached pages if needed.

        Raises:
          CapacityError: fewer than `num` pages are free or evictable.
        """
        if num < 0:
            raise ValueError(f"cannot allocate {num} pages")
        if num > self.num_free:
            raise CapacityError(
                f"cannot allocate {num} KV pages: {self.num_free} of {self.num_pages} are free "
                f"({len(self._evictable)} of them cached); finish or preempt requests first")
        pages = []
        for _ in range(num):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._evictable.popitem(last=False)
                del self._page_by_hash[self._hash_by_page.pop(page)]
            self._refcounts[page] = 1
            pages.append(page)
        return pages

    def share(self, pages: Sequence[int]) -> None:
        """Take one more reference on each of `pages`, which must already be referenced."""
        for page in pages:
            if self._refcounts[page] < 1:
                raise ValueError(f"page {page} is not referenced; only held pages can be shared")
        for page in pages:
            self._refcounts[page] += 1

    def free(self, pages: Sequence[int]) -> None:
        """Drop one reference on each of `pages`; unreferenced pages become free or cached.

        A sequence's last pages are the least likely to be shared, so they are released first
        and are the first to be evicted.
        """
        counts = collections.Counter(pages)
        for page, count in counts.items():
            if self._refcounts[page] < count:
                raise ValueError(f"page {page} freed {count} times but has "
                                 f"{self._refcounts[page]} references")
        for page in reversed(pages):
            self._refcounts[page] -= 1
            if self._refcounts[page]:
                continue
            page_hash = self._hash_by_page.get(page)
            # A duplicate whose cached twin was evicted becomes the cache's copy.
            if page_hash is not None and self._page_by_hash.setdefault(page_hash, page) == page:
                self._evictable[page] = None
            else:
                self._hash_by_page.pop(page, None)
                self._free.append(page)

    def reset_prefix_cache(self) -> int:
        """Forget every unreferenced cached page (they become free); returns how many.

        Pages held by requests keep their hashes. Benchmarks call this between repetitions
        so that a repeated prompt does not measure the cache.
        """
        evicted = list(self._evictable)
        for page in evicted:
            page_hash = self._hash_by_page.pop(page)
            if self._page_by_hash.get(page_hash) == page:
                del self._page_by_hash[page_hash]
            self._free.append(page)
        self._evictable.clear()
        return len(evicted)

    def copy_on_write(self, page: int) -> int:
        """The page a holder of `page` may write: itself, or a fresh one if it needs a copy.

        When a fresh page is returned the caller's reference moves to it and the caller must
        copy the old page's content into it before writing (the scheduler records the copy).
        """
        if self._refcounts[page] < 1:
            raise ValueError(f"page {page} is not referenced")
        if not self.needs_copy(page):
            return page
        (fresh,) = self.allocate(1)
        self.free([page])
        return fresh

    # ------------------------------------------------------------------ prefix cache

    def peek_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """Cached pages of the longest cached full-page prefix; takes nothing, counts nothing.

        At most `(len(token_ids) - 1) // page_size` pages: the last token is always left to
        compute, since its logits give the next token.
        """
        if not self.enable_prefix_caching:
            return []
        pages = []
        parent = ROOT_HASH
        size = self.page_size
        for index in range((len(token_ids) - 1) // size):
            parent = hash_page(parent, token_ids[index * size:(index + 1) * size])
            page = self._page_by_hash.get(parent)
            if page is None:
                break
            pages.append(page)
        return pages

    def match_prefix(self, token_ids: Sequence[int]) -> list[int]:
        """`peek_prefix`, then take a reference on each matched page and count the hit.

        Returns:
          The matched pages, in order; the caller now holds one reference on each.
        """
        if not self.enable_prefix_caching:
            return []
        pages = self.peek_prefix(token_ids)
        for page in pages:
            if self._refcounts[page] == 0:
                del self._evictable[page]  # in use again: freed later at the recent end
            self._refcounts[page] += 1
        self.num_query_tokens += len(token_ids)
        self.num_hit_tokens += len(pages) * self.page_size
        return pages

    def cache_pages(
        self, token_ids: Sequence[int], pages: Sequence[int], num_computed: int
    ) -> None:
        """Register every page of `pages` fully covered by the first `num_computed` tokens.

        Idempotent. A hash already registered keeps its first page; the newcomer stays an
        ordinary page. Hashing resumes after the last page whose hash is already known, so
        calling this after every step costs only the newly filled pages.

        Args:
          token_ids: the sequence's tokens (at least the first `num_computed`).
          pages: the sequence's pages (its page table).
          num_computed: leading tokens whose KV is written.
        """
        if not self.enable_prefix_caching:
            return
        size = self.page_size
        num_full = min(num_computed // size, len(pages), len(token_ids) // size)
        first = num_full
        while first > 0 and pages[first - 1] not in self._hash_by_page:
            first -= 1
        parent = self._hash_by_page[pages[first - 1]] if first else ROOT_HASH
        for index in range(first, num_full):
            page = pages[index]
            if self._refcounts[page] < 1:
                raise ValueError(f"page {page} is not referenced; cache only held pages")
            parent = hash_page(parent, token_ids[index * size:(index + 1) * size])
            self._hash_by_page[page] = parent
            self._page_by_hash.setdefault(parent, page)

    # ------------------------------------------------------------------ checks

    def check_invariants(self) -> None:
        """Raise AssertionError if the bookkeeping is inconsistent (for tests; O(P))."""
        free = set(self._free)
        evictable = set(self._evictable)
        assert len(free) == len(self._free), "a page is on the free list twice"
        assert not free & evictable, "a page is both free and cached"
        for page, count in enumerate(self._refcounts):
            assert count >= 0, f"page {page} has refcount {count}"
            idle = page in free or page in evictable
            assert idle == (count == 0), f"page {page}: refcount {count}, idle {idle}"
        for page in free:
            assert page not in self._hash_by_page, f"free page {page} still has a hash"
        for page in evictable:
            assert self.is_cached(page), f"evictable page {page} is not the cache's copy"
        for page_hash, page in self._page_by_hash.items():
            assert self._hash_by_page.get(page) == page_hash, f"page {page} hash mismatch"
