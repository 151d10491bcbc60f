"""Stall-free token-budget scheduler and per-request page tables (host side, never imports jax).

There are no prefill or decode phases (Sarathi-Serve, vLLM v1): each step spends a token
budget to bring requests' computed tokens up to their known tokens, one token for every
decoding request first, then prefill chunks, so a long prompt never stalls running decodes.
"""

from __future__ import annotations

import bisect
import collections
import dataclasses
import itertools
from collections.abc import Mapping

from jaxinfer.batch import SequenceChunk, bucket
from jaxinfer.cache.allocator import PageAllocator
from jaxinfer.engine.request import Request, RequestStatus, is_length_limited
from jaxinfer.errors import CapacityError, InputError

__all__ = ["ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput",
           "is_length_limited"]

PREEMPTION_MODES = ("recompute",)


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """Scheduling limits and policies.

    Attributes:
      max_num_batched_tokens: token budget of one step.
      max_num_seqs: most running requests (and so sequences in one step).
      long_prefill_chunk: most prompt tokens one request computes in one step.
      enable_chunked_prefill: split prompts across steps beside decodes. When False a prompt
        is computed in one step; one that does not fit beside the decodes gets a step of
        its own, over the budget if need be, and the decodes stall (the baseline).
      enable_prefix_caching: reuse cached full pages of equal prefixes.
      preemption: what to do with a request whose pages are taken; only "recompute".
    """

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    long_prefill_chunk: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    preemption: str = "recompute"

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "long_prefill_chunk"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InputError(f"invalid scheduler option {name}={value!r}: "
                                 "must be an integer >= 1")
        for name in ("enable_chunked_prefill", "enable_prefix_caching"):
            if not isinstance(getattr(self, name), bool):
                raise InputError(f"invalid scheduler option {name}={getattr(self, name)!r}: "
                                 "must be True or False")
        # Every running request must get its decode token in every step.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InputError(
                f"max_num_batched_tokens={self.max_num_batched_tokens} is below max_num_seqs="
                f"{self.max_num_seqs}: every running request needs a token each step; raise "
                "the budget or lower max_num_seqs")
        if self.preemption not in PREEMPTION_MODES:
            raise InputError(f"invalid scheduler option preemption={self.preemption!r}: "
                             f"must be one of {PREEMPTION_MODES}")


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step.

    Attributes:
      request: the request (its state is advanced by `Scheduler.update`).
      start: position of the first new token (its computed tokens before the step).
      token_ids: the new tokens, `all_token_ids[start:start + n]`.
      pages: the request's whole page table, covering at least start + n tokens.
      samples: this step's last logits give the request's next token.
    """

    request: Request
    start: int
    token_ids: tuple[int, ...]
    pages: tuple[int, ...]
    samples: bool

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    """What one step computes. The runner applies `page_copies` before the step writes.

    Attributes:
      scheduled: single-token entries (decodes) first, then prefill chunks.
      preempted: ids of requests that lost their pages in this step.
      page_copies: (source, destination) page pairs to copy, in order, before the step.
      num_batched_tokens: new tokens in the step.
    """

    scheduled: tuple[ScheduledRequest, ...]
    preempted: tuple[str, ...]
    page_copies: tuple[tuple[int, int], ...]
    num_batched_tokens: int

    @property
    def num_decodes(self) -> int:
        """Leading single-token entries (a kernel may treat them as decode)."""
        return sum(len(entry.token_ids) == 1 for entry in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    def to_sequence_chunks(self) -> list[SequenceChunk]:
        """The step as `build_step_batch` input; logits only where a token is sampled."""
        return [SequenceChunk(entry.token_ids, entry.start, entry.pages, entry.samples)
                for entry in self.scheduled]


@dataclasses.dataclass
class _Step:
    """Scratch state of one `schedule` call."""

    budget: int
    entries: list[ScheduledRequest] = dataclasses.field(default_factory=list)
    scheduled_ids: set[str] = dataclasses.field(default_factory=set)
    preempted: list[str] = dataclasses.field(default_factory=list)
    page_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)


class Scheduler:
    """Decides each step's tokens and owns every request's page table.

    Waiting requests are admitted by (priority, arrival_time), preempted ones first, in the
    order they had been admitted. When a running request needs a page and none is free, the
    most recently admitted running request loses its pages (recompute); admission never
    preempts. Prefixes that waiting requests hold through `share_prefix` are dropped only
    as a last resort, before giving up with a CapacityError.

    Args:
      config: limits and policies.
      num_pages: pages in the KV cache pool.
      page_size: tokens per page.
    """

    def __init__(self, config: SchedulerConfig, num_pages: int, page_size: int):
        self.config = config
        self.page_size = page_size
        self.allocator = PageAllocator(num_pages, page_size, config.enable_prefix_caching)
        self._requests: dict[str, Request] = {}  # every unfinished request
        self._waiting: list[Request] = []  # sorted by (priority, arrival_time, arrival order)
        self._preempted: collections.deque[Request] = collections.deque()  # before _waiting
        self._running: list[Request] = []  # admission order: the last is preempted first
        self._pages: dict[str, list[int]] = {}
        self._order: dict[str, int] = {}
        self._counter = itertools.count()

    # ------------------------------------------------------------------ requests

    def add_request(self, request: Request) -> None:
        """Queue a new request.

        Raises:
          InputError: the id is in use or the request is not fresh.
          CapacityError: the request could not fit in the whole pool even alone.
        """
        if request.request_id in self._requests:
            raise InputError(f"request id {request.request_id!r} is already in use")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens:
            raise InputError(f"request {request.request_id!r} must be new (WAITING, nothing "
                             f"computed); it is {request.status.name}")
        # The last sampled token is never computed, so the largest KV is this many tokens.
        most_tokens = request.num_prompt_tokens + request.max_new_tokens - 1
        capacity = self.allocator.num_pages * self.page_size
        if most_tokens > capacity:
            raise CapacityError(
                f"request {request.request_id!r} may need {most_tokens} tokens of KV cache but "
                f"the pool holds {capacity}; shorten it, lower max_new_tokens or grow the cache")
        self._requests[request.request_id] = request
        self._order[request.request_id] = next(self._counter)
        bisect.insort(self._waiting, request, key=self._waiting_key)

    def abort_request(self, request_id: str) -> bool:
        """Abort an unfinished request in any state; False if it is unknown or finished."""
        if request_id not in self._requests:
            return False
        self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)
        return True

    def finish_request(self, request_id: str, status: RequestStatus) -> None:
        """Mark a request finished with `status` and free its pages (its computed count is 0).

        Raises:
          InputError: the request is unknown or already finished, or `status` is not final.
        """
        if not status.is_finished:
            raise InputError(f"finish_request needs a FINISHED_* status, got {status.name}")
        request = self._requests.pop(request_id, None)
        if request is None:
            raise InputError(f"no unfinished request {request_id!r}")
        for queue in (self._running, self._waiting, self._preempted):
            if request in queue:
                queue.remove(request)
        self._release_pages(request)
        del self._order[request_id]
        request.status = status

    def share_prefix(self, source_id: str, destination_id: str, num_tokens: int) -> None:
        """Let a waiting request reuse the KV of another request's first `num_tokens` tokens.

        The destination takes references on the source's pages covering those tokens,
        including a partial last page, which is copied when either side first writes it.

        Raises:
          InputError: the tokens differ, are not computed yet, or cover the whole prompt, or
            the destination is not a fresh waiting request.
        """
        source = self._requests.get(source_id)
        destination = self._requests.get(destination_id)
        if source is None or destination is None:
            raise InputError(f"share_prefix needs two unfinished requests, got {source_id!r} "
                             f"and {destination_id!r}")
        if destination.status is not RequestStatus.WAITING or destination_id in self._pages:
            raise InputError(f"request {destination_id!r} must be waiting with no pages to "
                             "receive a shared prefix")
        if not 1 <= num_tokens < destination.num_prompt_tokens:
            raise InputError(
                f"cannot share {num_tokens} tokens with a {destination.num_prompt_tokens}-token "
                "prompt: at least one prompt token must remain to compute")
        if num_tokens > source.num_computed_tokens:
            raise InputError(f"request {source_id!r} has computed {source.num_computed_tokens} "
                             f"tokens, fewer than the {num_tokens} to share")
        if (destination.prompt_token_ids[:num_tokens]
                != source.slice_token_ids(0, num_tokens)):
            raise InputError(f"the first {num_tokens} tokens of {destination_id!r} and "
                             f"{source_id!r} differ")
        pages = self._pages[source_id][:-(-num_tokens // self.page_size)]
        self.allocator.share(pages)
        self._pages[destination_id] = list(pages)
        destination.num_computed_tokens = num_tokens

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + len(self._preempted)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def running(self) -> tuple[Request, ...]:
        """Running requests in admission order."""
        return tuple(self._running)

    @property
    def waiting(self) -> tuple[Request, ...]:
        """Waiting requests in admission order (preempted ones first)."""
        return (*self._preempted, *self._waiting)

    @property
    def kv_pages_in_use(self) -> int:
        """Pages held by requests (cached but unreferenced pages are not in use)."""
        return self.allocator.num_pages - self.allocator.num_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.allocator.hit_rate

    def pages_of(self, request_id: str) -> tuple[int, ...]:
        """The request's page table (empty when it holds none)."""
        return tuple(self._pages.get(request_id, ()))

    # ------------------------------------------------------------------ scheduling

    def schedule(self) -> SchedulerOutput:
        """Choose the next step's tokens, allocating (and copying) pages for them.

        Raises:
          CapacityError: a request cannot make progress even with every other page free.
          RuntimeError: a running request reached max_new_tokens without being finished.
        """
        for request in self._running:
            if is_length_limited(request):
                raise RuntimeError(f"request {request.request_id!r} has max_new_tokens output "
                                   "tokens; call finish_request before scheduling again")
        step = _Step(budget=self.config.max_num_batched_tokens)
        alone = not self.config.enable_chunked_prefill and self._schedule_prompt_alone(step)
        if not alone:
            self._schedule_running(step, decodes=True)
            # The decode section is padded to a power of two (`build_step_batch`): charge
            # the padding so that decodes + prefill chunks stay inside the budget's bucket
            # instead of spilling into one twice its size.
            if num_decodes := len(step.entries):
                step.budget = max(0, step.budget - (bucket(num_decodes) - num_decodes))
            self._schedule_running(step, decodes=False)
            # Pages are short when someone was just preempted: admitting now would only
            # preempt again (and could re-admit the request just preempted).
            if not step.preempted:
                self._schedule_waiting(step)
        if not step.entries and not self._running and self.num_waiting:
            self._unblock(step)
        # Stable: decodes, then one-token prefill chunks, then longer chunks.
        entries = sorted(step.entries, key=lambda entry: len(entry.token_ids) > 1)
        return SchedulerOutput(
            scheduled=tuple(entries), preempted=tuple(step.preempted),
            page_copies=tuple(step.page_copies),
            num_batched_tokens=sum(len(entry.token_ids) for entry in entries))

    def update(self, output: SchedulerOutput, sampled_tokens: Mapping[str, int]) -> list[Request]:
        """Record a finished step: advance computed tokens, append sampled ones, cache pages.

        Requests finished or aborted since `schedule` are skipped.

        Args:
          output: the step, as returned by the last `schedule`.
          sampled_tokens: the new token of every entry with `samples`, by request id.

        Returns:
          The requests that got a token; the caller checks their stop conditions and calls
          `finish_request` on those that stop (including `is_length_limited` ones).
        """
        live = [entry for entry in output.scheduled
                if entry.request.status is RequestStatus.RUNNING]
        for entry in live:  # check everything before changing anything
            request = entry.request
            if request.num_computed_tokens != entry.start:
                raise InputError(f"stale step for {request.request_id!r}: it starts at "
                                 f"{entry.start} but {request.num_computed_tokens} tokens are "
                                 "computed; update each schedule() output exactly once")
            if entry.samples and request.request_id not in sampled_tokens:
                raise InputError(f"no sampled token for request {request.request_id!r}")
        sampled = []
        for entry in live:
            request = entry.request
            request.num_computed_tokens += len(entry.token_ids)
            if self.config.enable_prefix_caching and (
                    request.num_computed_tokens // self.page_size > entry.start // self.page_size):
                num_full = request.num_computed_tokens // self.page_size * self.page_size
                self.allocator.cache_pages(request.slice_token_ids(0, num_full),
                                           self._pages[request.request_id], num_full)
            if entry.samples:
                request.output_token_ids.append(int(sampled_tokens[request.request_id]))
                sampled.append(request)
        return sampled

    def _schedule_running(self, step: _Step, decodes: bool) -> None:
        """One token per decoding request, or the next chunk of each prefilling one."""
        index = 0
        while index < len(self._running) and step.budget > 0:
            request = self._running[index]
            if (request.num_tokens_to_compute == 1) != decodes:
                index += 1
                continue
            wanted = min(request.num_tokens_to_compute, step.budget)
            if self.config.enable_chunked_prefill:
                wanted = min(wanted, self.config.long_prefill_chunk)
            num_tokens = self._make_room(request, wanted, step)
            if num_tokens:
                self._add_entry(request, num_tokens, step)
            if request.status is RequestStatus.RUNNING:
                index += 1

    def _make_room(self, request: Request, wanted: int, step: _Step) -> int:
        """Tokens (<= wanted) of `request` its pages can take, preempting if none fit.

        Victims are taken from the running tail (most recently admitted). A request that is
        itself the tail preempts itself; one that is alone and still cannot grow is an error.
        """
        while True:
            fits = min(wanted, self._room(request))
            if fits > 0:
                return fits
            victim = self._running[-1]
            if victim.request_id in step.scheduled_ids:
                return 0  # the tail already has its tokens; they make progress without us
            if victim is request and len(self._running) == 1:
                if self._release_waiting_pages():
                    continue
                raise CapacityError(
                    f"request {request.request_id!r} needs a KV page beyond its "
                    f"{len(self._pages[request.request_id])} but none is free even with no "
                    "other request running")
            self._preempt(victim, step)
            if victim is request:
                return 0

    def _schedule_waiting(self, step: _Step) -> None:
        """Admit waiting requests in order while budget, sequence slots and pages allow."""
        chunked = self.config.enable_chunked_prefill
        while (step.budget > 0 and len(self._running) < self.config.max_num_seqs
               and (self._preempted or self._waiting)):
            request = self._head()
            cached = self._peek_cached(request)
            computed = request.num_computed_tokens + len(cached) * self.page_size
            remaining = request.num_tokens - computed
            if chunked:
                num_tokens = min(remaining, step.budget, self.config.long_prefill_chunk)
            elif remaining <= step.budget:
                num_tokens = remaining
            else:
                return  # waits for a step of its own
            # No shrinking to the free pages: a request admitted on a sliver of memory is the
            # first to be preempted, wasting the compute. Later requests wait too (FCFS).
            if self._room(request, cached) < num_tokens:
                return
            self._admit(request, cached, num_tokens, step)

    def _schedule_prompt_alone(self, step: _Step) -> bool:
        """Without chunking: give the head prompt a step of its own if it cannot share one."""
        if not (self._preempted or self._waiting) or len(self._running) >= self.config.max_num_seqs:
            return False
        request = self._head()
        cached = self._peek_cached(request)
        remaining = request.num_tokens - request.num_computed_tokens - len(cached) * self.page_size
        beside = step.budget - sum(r.num_tokens_to_compute for r in self._running)
        if remaining <= beside or self._room(request, cached) < remaining:
            return False
        self._admit(request, cached, remaining, step)
        return True

    def _unblock(self, step: _Step) -> None:
        """Nothing runs and the queue head does not fit: free pages that waiting requests hold
        through shared prefixes, or report that the head can never be admitted."""
        while self._release_waiting_pages():
            if self.config.enable_chunked_prefill or not self._schedule_prompt_alone(step):
                self._schedule_waiting(step)
            if step.entries:
                return
        request = self._head()
        raise CapacityError(
            f"request {request.request_id!r} cannot be admitted: {self.allocator.num_free} of "
            f"{self.allocator.num_pages} KV pages are free and no request is running")

    # ------------------------------------------------------------------ pages

    def _peek_cached(self, request: Request) -> list[int]:
        """Prefix-cache pages a request would reuse on admission (none if it holds pages)."""
        if request.request_id in self._pages:
            return []  # it received a shared prefix; its computed tokens already count it
        return self.allocator.peek_prefix(request.all_token_ids)

    def _room(self, request: Request, cached: list[int] | tuple[int, ...] = ()) -> int:
        """New tokens `request` could write given free pages (after reusing `cached` ones)."""
        pages = self._pages.get(request.request_id, [])
        size = self.page_size
        computed = request.num_computed_tokens + len(cached) * size
        held = len(pages) + len(cached)
        # Reviving an unreferenced cached page takes it out of the free pool.
        free = self.allocator.num_free - sum(self.allocator.refcount(p) == 0 for p in cached)
        # Pages already held past the computed tokens will be written: each shared or cached
        # one costs a fresh page for its copy (counted conservatively, whatever is written).
        copies = sum(self.allocator.needs_copy(p) for p in pages[computed // size:])
        return max(0, (held + free - copies) * size - computed)

    def _admit(self, request: Request, cached: list[int], num_tokens: int, step: _Step) -> None:
        if request.request_id not in self._pages:  # else it holds a shared prefix already
            # Takes the peeked pages and counts the lookup, hit or miss, for the hit rate.
            pages = self.allocator.match_prefix(request.all_token_ids)
            assert pages == cached, "the prefix cache changed between peek and match"
            self._pages[request.request_id] = pages
            request.num_computed_tokens = len(pages) * self.page_size
        if request.num_preemptions == 0:
            request.num_cached_tokens = request.num_computed_tokens
        if request in self._preempted:
            self._preempted.remove(request)
        else:
            self._waiting.remove(request)
        request.status = RequestStatus.RUNNING
        self._running.append(request)
        self._add_entry(request, num_tokens, step)

    def _add_entry(self, request: Request, num_tokens: int, step: _Step) -> None:
        """Copy shared pages about to be written, allocate new ones, and record the entry."""
        pages = self._pages[request.request_id]
        size = self.page_size
        start = request.num_computed_tokens
        end = start + num_tokens
        for index in range(start // size, min(len(pages), -(-end // size))):
            page = pages[index]
            fresh = self.allocator.copy_on_write(page)
            if fresh != page:
                step.page_copies.append((page, fresh))
                pages[index] = fresh
        if -(-end // size) > len(pages):
            pages.extend(self.allocator.allocate(-(-end // size) - len(pages)))
        step.entries.append(ScheduledRequest(
            request=request, start=start, token_ids=tuple(request.slice_token_ids(start, end)),
            pages=tuple(pages), samples=end == request.num_tokens))
        step.scheduled_ids.add(request.request_id)
        step.budget -= num_tokens

    def _preempt(self, request: Request, step: _Step) -> None:
        """Recompute mode: drop the request's pages; it returns to the front of the queue."""
        self._running.remove(request)
        self._release_pages(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._preempted.appendleft(request)
        step.preempted.append(request.request_id)

    def _release_pages(self, request: Request) -> None:
        pages = self._pages.pop(request.request_id, None)
        if pages:
            self.allocator.free(pages)
        request.num_computed_tokens = 0

    def _release_waiting_pages(self) -> bool:
        """Drop the shared prefixes waiting requests hold (they recompute them instead).

        Returns whether any was dropped: that frees pages, or unshares pages whose holder
        then writes them without a copy.
        """
        holders = [r for r in (*self._preempted, *self._waiting) if r.request_id in self._pages]
        for request in holders:
            self._release_pages(request)
        return bool(holders)

    def _head(self) -> Request:
        return self._preempted[0] if self._preempted else self._waiting[0]

    def _waiting_key(self, request: Request) -> tuple[int, float, int]:
        return (request.priority, request.arrival_time, self._order[request.request_id])
