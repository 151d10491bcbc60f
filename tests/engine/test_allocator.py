"""PageAllocator: reference counts, free list, LRU prefix cache, hash chaining, copy-on-write."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxinfer.cache.allocator import PageAllocator, hash_page, hash_pages
from jaxinfer.errors import CapacityError, InputError


def _cached(allocator: PageAllocator, token_ids: list[int]) -> list[int]:
    """Allocate pages for `token_ids`, register them as computed, and release them."""
    pages = allocator.allocate(-(-len(token_ids) // allocator.page_size))
    allocator.cache_pages(token_ids, pages, len(token_ids))
    allocator.free(pages)
    return pages


def test_allocate_and_free_track_reference_counts() -> None:
    allocator = PageAllocator(num_pages=4, page_size=2)
    pages = allocator.allocate(3)
    assert len(set(pages)) == 3
    assert [allocator.refcount(p) for p in pages] == [1, 1, 1]
    assert allocator.num_free == 1
    allocator.share(pages[:1])
    assert allocator.is_shared(pages[0]) and not allocator.is_shared(pages[1])
    allocator.free(pages)
    assert [allocator.refcount(p) for p in pages] == [1, 0, 0]
    assert allocator.num_free == 3
    allocator.free(pages[:1])
    assert allocator.num_free == 4
    assert allocator.allocate(0) == []
    allocator.check_invariants()


def test_allocate_never_hands_out_a_referenced_page() -> None:
    allocator = PageAllocator(num_pages=5, page_size=1)
    held = allocator.allocate(2)
    allocator.free(allocator.allocate(3))
    assert not set(allocator.allocate(3)) & set(held)


def test_capacity_error_names_asked_and_free() -> None:
    allocator = PageAllocator(num_pages=4, page_size=2)
    allocator.allocate(3)
    with pytest.raises(CapacityError, match=r"cannot allocate 2 KV pages: 1 of 4 are free"):
        allocator.allocate(2)
    assert allocator.num_free == 1  # a failed allocation takes nothing


def test_misuse_is_refused() -> None:
    allocator = PageAllocator(num_pages=2, page_size=2)
    (page,) = allocator.allocate(1)
    allocator.free([page])
    with pytest.raises(ValueError, match="freed 1 times but has 0 references"):
        allocator.free([page])
    with pytest.raises(ValueError, match="not referenced"):
        allocator.share([page])
    with pytest.raises(InputError, match="page_size"):
        PageAllocator(num_pages=2, page_size=0)
    allocator.check_invariants()


def test_hashes_chain_over_the_whole_prefix() -> None:
    # Equal second pages under different first pages must not collide.
    first = hash_pages([1, 2, 3, 4], page_size=2)
    second = hash_pages([9, 9, 3, 4], page_size=2)
    assert first[0] != second[0] and first[1] != second[1]
    assert first[1] == hash_page(first[0], [3, 4])
    assert hash_pages([1, 2, 3], page_size=2) == first[:1]  # no hash for a partial page

    allocator = PageAllocator(num_pages=8, page_size=2)
    _cached(allocator, [1, 2, 3, 4, 5])
    assert allocator.peek_prefix([9, 9, 3, 4, 5]) == []
    assert len(allocator.peek_prefix([1, 2, 3, 4, 5])) == 2


def test_match_never_covers_the_whole_sequence() -> None:
    allocator = PageAllocator(num_pages=8, page_size=2)
    pages = _cached(allocator, [1, 2, 3, 4])
    assert allocator.match_prefix([1, 2, 3, 4]) == pages[:1]  # the last token stays to compute
    assert allocator.match_prefix([1, 2, 3, 4, 7]) == pages
    assert allocator.match_prefix([1]) == []
    assert allocator.refcount(pages[0]) == 2 and allocator.refcount(pages[1]) == 1
    allocator.check_invariants()


def test_freed_cached_pages_stay_matchable_and_count_as_free() -> None:
    allocator = PageAllocator(num_pages=4, page_size=2)
    pages = _cached(allocator, [1, 2, 3, 4, 5])
    assert allocator.num_free == 4
    assert allocator.num_cached_pages == 2  # the partial third page was not registered
    assert allocator.match_prefix([1, 2, 3, 4, 6]) == pages[:2]
    assert allocator.num_free == 2
    allocator.check_invariants()


def test_eviction_is_least_recently_used_and_tail_pages_go_first() -> None:
    allocator = PageAllocator(num_pages=6, page_size=1)
    a = _cached(allocator, [1, 2, 3])  # freed first (oldest)
    b = _cached(allocator, [7, 8, 9])
    assert allocator.num_free == 6 and not set(a) & set(b)
    # Touch a: now b is least recently used; within b the tail page is evicted first.
    allocator.free(allocator.match_prefix([1, 2, 3, 0]))
    assert allocator.allocate(1) == [b[2]]
    assert allocator.peek_prefix([7, 8, 9, 0]) == b[:2]
    assert allocator.allocate(2) == [b[1], b[0]]
    assert allocator.peek_prefix([7, 8, 9, 0]) == []
    assert allocator.peek_prefix([1, 2, 3, 0]) == a
    allocator.check_invariants()


def test_free_pages_are_used_before_cached_ones() -> None:
    allocator = PageAllocator(num_pages=4, page_size=1)
    cached = _cached(allocator, [5, 6])
    assert set(allocator.allocate(2)).isdisjoint(cached)
    assert allocator.peek_prefix([5, 6, 0]) == cached


def test_cache_pages_is_idempotent_and_keeps_the_first_page() -> None:
    allocator = PageAllocator(num_pages=8, page_size=2)
    first = allocator.allocate(2)
    allocator.cache_pages([1, 2, 3, 4], first, 4)
    allocator.cache_pages([1, 2, 3, 4], first, 4)
    duplicate = allocator.allocate(2)
    allocator.cache_pages([1, 2, 3, 4], duplicate, 4)
    assert allocator.num_cached_pages == 2
    assert allocator.peek_prefix([1, 2, 3, 4, 0]) == first
    # The duplicate is an ordinary page: freeing it makes it free, not cached.
    allocator.free(duplicate)
    assert allocator.num_cached_pages == 2
    # Only pages covered by computed tokens are registered.
    partial = allocator.allocate(2)
    allocator.cache_pages([7, 7, 7, 7], partial, 3)
    assert allocator.peek_prefix([7, 7, 7, 7, 0]) == partial[:1]
    allocator.check_invariants()


def test_a_duplicate_takes_over_when_its_cached_twin_is_evicted() -> None:
    allocator = PageAllocator(num_pages=2, page_size=2)
    (first,) = _cached(allocator, [1, 2])
    (duplicate,) = allocator.allocate(1)  # evicts nothing: page 1 was free
    allocator.cache_pages([1, 2], [duplicate], 2)
    (evicting,) = allocator.allocate(1)  # evicts `first`
    assert evicting == first
    allocator.free([duplicate])
    assert allocator.peek_prefix([1, 2, 0]) == [duplicate]
    allocator.check_invariants()


def test_hit_rate_counts_tokens() -> None:
    allocator = PageAllocator(num_pages=8, page_size=4)
    assert allocator.hit_rate == 0.0
    _cached(allocator, list(range(8)))
    allocator.match_prefix(list(range(8)) + [50, 51])  # 10 asked, 8 hit
    allocator.match_prefix([9] * 6)  # 6 asked, 0 hit
    allocator.peek_prefix(list(range(10)))  # not counted
    assert (allocator.num_query_tokens, allocator.num_hit_tokens) == (16, 8)
    assert allocator.hit_rate == pytest.approx(0.5)


def test_prefix_caching_disabled() -> None:
    allocator = PageAllocator(num_pages=4, page_size=2, enable_prefix_caching=False)
    pages = _cached(allocator, [1, 2, 3, 4])
    assert allocator.num_cached_pages == 0
    assert allocator.match_prefix([1, 2, 3, 4, 5]) == []
    assert allocator.num_query_tokens == 0
    assert set(allocator.allocate(4)) >= set(pages)


def test_copy_on_write() -> None:
    allocator = PageAllocator(num_pages=6, page_size=2)
    (own,) = allocator.allocate(1)
    assert allocator.copy_on_write(own) == own  # exclusive, uncached: written in place
    allocator.share([own])
    fresh = allocator.copy_on_write(own)
    assert fresh != own
    assert (allocator.refcount(own), allocator.refcount(fresh)) == (1, 1)
    # An exclusive page registered in the prefix cache must not change either.
    allocator.cache_pages([3, 4], [own], 2)
    assert allocator.needs_copy(own) and not allocator.is_shared(own)
    moved = allocator.copy_on_write(own)
    assert moved != own and allocator.refcount(own) == 0
    assert allocator.peek_prefix([3, 4, 0]) == [own]  # still cached, now evictable
    # So must a full duplicate of a cached page: its hash is known and may be promoted.
    (duplicate,) = allocator.allocate(1)
    allocator.cache_pages([3, 4], [duplicate], 2)
    assert not allocator.is_cached(duplicate) and allocator.needs_copy(duplicate)
    assert allocator.copy_on_write(duplicate) != duplicate
    allocator.check_invariants()


operations = st.lists(
    st.tuples(st.sampled_from(["allocate", "free", "share", "match", "cache", "cow"]),
              st.integers(0, 4), st.lists(st.integers(0, 2), min_size=1, max_size=9)),
    max_size=60)


@settings(max_examples=200, deadline=None)
@given(operations)
def test_random_operations_keep_invariants(ops: list[tuple[str, int, list[int]]]) -> None:
    allocator = PageAllocator(num_pages=6, page_size=2)
    holders: list[list[int]] = []  # each holder owns one reference on each of its pages
    for op, number, tokens in ops:
        if op == "allocate":
            if number <= allocator.num_free:
                holders.append(allocator.allocate(number))
            else:
                with pytest.raises(CapacityError):
                    allocator.allocate(number)
        elif op == "match":
            pages = allocator.match_prefix(tokens)
            assert len(pages) <= (len(tokens) - 1) // 2
            holders.append(pages)
        elif holders:
            holder = holders[number % len(holders)]
            if op == "free":
                allocator.free(holder)
                holders.remove(holder)
            elif op == "share":
                allocator.share(holder)
                holders.append(list(holder))
            elif op == "cache":
                allocator.cache_pages(tokens, holder, len(tokens))
            elif op == "cow" and holder and allocator.num_free:
                holder[-1] = allocator.copy_on_write(holder[-1])
        allocator.check_invariants()
        for page in range(allocator.num_pages):
            assert allocator.refcount(page) == sum(h.count(page) for h in holders)
    for holder in holders:
        allocator.free(holder)
    assert all(allocator.refcount(page) == 0 for page in range(allocator.num_pages))
    assert allocator.num_free == allocator.num_pages
    allocator.check_invariants()


def test_reset_prefix_cache_frees_only_unreferenced_cached_pages():
    allocator = PageAllocator(num_pages=6, page_size=2)
    tokens = [1, 2, 3, 4, 5]
    held = allocator.allocate(3)
    allocator.cache_pages(tokens, held, 4)  # two full pages cached
    other = allocator.allocate(2)
    allocator.cache_pages([9, 9, 8, 8], other, 4)
    allocator.free(other)  # cached and evictable
    assert allocator.num_cached_pages >= 2
    assert allocator.reset_prefix_cache() == 2
    assert allocator.match_prefix([9, 9, 8, 8, 7]) == []  # forgotten
    assert allocator.match_prefix(tokens) == held[:2]  # still held: still cached
    allocator.check_invariants()
