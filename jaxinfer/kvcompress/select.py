"""TokenSelect: query-aware per-head selection of cached tokens at each decode step.

The whole cache is kept (selection saves reads and compute, not memory). At each step every
KV head scores its cached keys with its query group (a soft vote: each query head's
softmax, summed over the group), attends only to its `select` best plus the newest token,
and reuses the previous step's choice when the query barely moved (cosine similarity above
`reuse_threshold`), skipping the scoring pass. Legend as in jaxinfer.kvcompress.slots.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.kvcompress import slots as sl
from jaxinfer.kvcompress.attend import NEG_INF, attend, softcap
from jaxinfer.kvcompress.policies import DecodeContext, FullCache, PrefillContext


@flax.struct.dataclass
class SelectCache:
    slots: sl.SlotCache  # every token
    chosen: Any  # [(L,) S, select, K] int32 slots chosen at the previous step
    prev_q: Any  # [(L,) S, K, G, E] float32 the previous step's queries
    reused: Any  # [(L,) S] int32 steps whose choice was reused (a statistic)


@dataclasses.dataclass(frozen=True)
class TokenSelect:
    """Attend to `select` cached tokens per KV head: the `local` newest plus the best
    scoring older ones."""

    max_len: int
    select: int
    local: int = 16
    reuse_threshold: float = 0.9
    needs_probs: ClassVar[bool] = False
    needs_col_all: ClassVar[bool] = False
    name: ClassVar[str] = "tokenselect"

    @property
    def top(self) -> int:
        """Older tokens chosen by score (the rest of `select` is the local window)."""
        return self.select - min(self.local, self.select - 1)

    def prefill(self, ctx: PrefillContext) -> SelectCache:
        S, T, K, G, E = ctx.q.shape
        slots = FullCache(budget=self.max_len).prefill(ctx)
        return SelectCache(slots=slots, chosen=jnp.zeros((S, self.top, K), jnp.int32),
                           prev_q=jnp.zeros((S, K, G, E), jnp.float32),
                           reused=jnp.zeros((S,), jnp.int32))

    def decode(self, cache: SelectCache, layer, ctx: DecodeContext):
        S, K, G, E = ctx.q.shape
        slot = ctx.seen.astype(jnp.int32)  # every token is kept: slot = position
        slots = sl.write_slot(cache.slots, layer, jnp.broadcast_to(slot[:, None], (S, K)),
                              ctx.k, ctx.v, ctx.seen, jnp.zeros((S, K), jnp.float32))
        k_l, v_l, pos = slots.k[layer], slots.v[layer], slots.pos[layer]  # [S, N, K, E]
        q = ctx.q.astype(jnp.float32)
        prev = cache.prev_q[layer]
        cos = jnp.sum(q * prev, -1) / (jnp.linalg.norm(q, axis=-1)
                                       * jnp.linalg.norm(prev, axis=-1) + 1e-6)
        reuse = jnp.mean(cos, axis=(1, 2)) >= self.reuse_threshold  # [S]
        # The `local` newest tokens are always attended; the rest compete. Every token is
        # kept, so slot i holds position i.
        top = self.top
        local = self.select - top
        older = (pos >= 0) & (pos <= ctx.seen[:, None, None] - local)
        if ctx.window is not None:
            older = older & (ctx.seen[:, None, None] - pos < ctx.window)

        def score(_):
            s = jnp.einsum("skge,snke->skgn", q, k_l.astype(jnp.float32)) * ctx.scale
            s = softcap(s, ctx.soft_cap)
            m = older.transpose(0, 2, 1)[:, :, None]
            p = jax.nn.softmax(jnp.where(m, s, NEG_INF), axis=-1)
            vote = jnp.where(m, p, 0.0).sum(axis=2)  # [S, K, N]
            vote = jnp.where(older.transpose(0, 2, 1), vote, -1.0)
            return jnp.swapaxes(jax.lax.top_k(vote, top)[1], 1, 2).astype(jnp.int32)

        fresh = jax.lax.cond(jnp.all(reuse), lambda _: cache.chosen[layer], score, None)
        chosen = jnp.where(reuse[:, None, None], cache.chosen[layer], fresh)  # [S, sel, K]
        take = lambda a: jnp.take_along_axis(a, chosen[..., None], axis=1)  # noqa: E731
        recent = slot[:, None] - jnp.arange(local)[None, :]  # [S, local], newest first
        take_recent = lambda a: jnp.take_along_axis(  # noqa: E731
            a, jnp.maximum(recent, 0)[:, :, None, None], axis=1)
        keys = jnp.concatenate([take(k_l), take_recent(k_l)], axis=1)
        vals = jnp.concatenate([take(v_l), take_recent(v_l)], axis=1)
        ok = jnp.take_along_axis(older, chosen, axis=1)
        recent_ok = jnp.broadcast_to((recent >= 0)[:, :, None], (S, local, K))
        mask = jnp.concatenate([ok, recent_ok], axis=1)
        o, _ = attend(ctx.q[:, None], keys, vals, mask.transpose(0, 2, 1)[:, :, None],
                      scale=ctx.scale, soft_cap=ctx.soft_cap)
        return o.reshape(S, K * G, E), SelectCache(
            slots=slots, chosen=cache.chosen.at[layer].set(chosen),
            prev_q=cache.prev_q.at[layer].set(q),
            reused=cache.reused.at[layer].add(reuse.astype(jnp.int32)))
