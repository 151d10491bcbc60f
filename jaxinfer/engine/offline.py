"""Offline batch planning (BatchLLM): group prompts by shared prefix and order the batch.

The whole batch is known up front, so the planner looks at it first: prompts sharing a
prefix of at least one page form a group whose leader computes the prefix once, after which
the other members reuse its pages (a shared partial page is copied on first write). Groups
start together so their pages are released together, and requests with more tokens to
decode start first so the tail of the batch is not one long request decoding alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence


@dataclasses.dataclass(frozen=True)
class PlannedRequest:
    """One request of the plan.

    Attributes:
      index: position in the caller's list.
      leader: index of the request whose KV this one reuses (None: computes its own).
      shared_tokens: prompt tokens taken from the leader (0 without a leader).
    """

    index: int
    leader: int | None = None
    shared_tokens: int = 0


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_batch(prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
               page_size: int, share_prefixes: bool = True) -> list[PlannedRequest]:
    """The admission order of an offline batch.

    Args:
      prompts: token ids per request.
      max_new_tokens: decode length per request (longer ones start first).
      page_size: shared prefixes shorter than a page are not worth a dependency.
      share_prefixes: False plans the order only (every request computes its own prompt).

    Returns:
      Every request once, in the order to submit it; followers come right after their
      leader, and share at most len(prompt) - 1 tokens (one must be computed).
    """
    order = sorted(range(len(prompts)), key=lambda i: list(prompts[i]))
    groups: list[list[int]] = []
    shared: list[int] = []
    for i in order:
        if groups:
            common = min(shared[-1], _common_prefix(prompts[groups[-1][0]], prompts[i]))
            if share_prefixes and common >= page_size:
                groups[-1].append(i)
                shared[-1] = common
                continue
        groups.append([i])
        shared.append(len(prompts[i]))

    def decode_first(i: int) -> tuple[int, int]:
        return (-max_new_tokens[i], i)

    planned_groups = []
    for members, prefix in zip(groups, shared, strict=True):
        members = sorted(members, key=decode_first)
        leader = members[0]
        plan = [PlannedRequest(leader)]
        for i in members[1:]:
            tokens = min(prefix, len(prompts[i]) - 1)
            plan.append(PlannedRequest(i, leader, tokens) if tokens >= page_size
                        else PlannedRequest(i))
        planned_groups.append(plan)
    planned_groups.sort(key=lambda plan: min(decode_first(p.index) for p in plan))
    return [p for plan in planned_groups for p in plan]
