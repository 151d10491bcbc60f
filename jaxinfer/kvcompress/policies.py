"""Eviction, merging and selection policies over `SlotCache` (see jaxinfer.kvcompress.slots).

Each policy is a small frozen dataclass (static under jit) with a token budget B per
(layer, sequence, KV head). `prefill` turns a prefill's keys, values and attention
statistics into a cache of B slots; `decode` attends one new token per sequence over the
kept slots and decides which slot leaves. Legend: S sequences, T tokens, K KV heads,
G query group, E head dim, B budget.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer import cpu_kernels
from jaxinfer.kvcompress import slots as sl
from jaxinfer.kvcompress.attend import (
    LONG_OBS_WINDOW,
    OBS_WINDOW,
    PrefillStats,
    attend,
    attend_with_new,
)


@flax.struct.dataclass
class PrefillContext:
    """What a policy sees at the end of a prefill layer (no L axis)."""

    q: jax.Array  # [S, T, K, G, E] rotated queries
    k: jax.Array  # [S, T, K, E] rotated keys
    v: jax.Array  # [S, T, K, E]
    lengths: jax.Array  # [S]
    stats: PrefillStats
    layer: jax.Array | None = None  # traced layer index (policies with per-layer tables)
    # The layer's sliding window (traced; None: the model has none): keys further than it
    # from a query are invisible to that query, at prefill and at every later step.
    window: jax.Array | None = None


@dataclasses.dataclass(frozen=True)
class DecodeContext:
    """One decode step of one layer: q [S, K, G, E], k, v [S, K, E], the new token's
    position `seen` [S], the layer's window (None: none), softmax scale and soft cap."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    seen: jax.Array
    window: jax.Array | None
    scale: float
    soft_cap: float | None
    use_native: bool = False  # the native CPU kernel may read the slots in place
    # The model's layer index, when the cache passed to `decode` is one layer's slice
    # (its `layer` argument is then 0); policies with per-layer tables read this.
    model_layer: jax.Array | None = None


def _protect(score: jax.Array, pos: jax.Array, upto: jax.Array, sink: int, recent: int):
    """Raise the score of sink tokens (pos < sink) and of the `recent` newest tokens
    (pos > upto - recent) so no policy removes them."""
    keep = (pos < sink) | (pos > upto - recent)
    return jnp.where(keep & (pos >= 0), sl.INF, score)


def _maxpool(x: jax.Array, kernel: int) -> jax.Array:
    """Max-pool over the last axis (SnapKV clusters selected tokens with their neighbours)."""
    if kernel <= 1:
        return x
    pad = kernel // 2
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) * (x.ndim - 1) + (kernel,),
                                 (1,) * x.ndim, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])


@dataclasses.dataclass(frozen=True)
class SlotPolicy:
    """Base of the eviction policies: B slots, sinks and a recent window always kept,
    optional merging of dropped tokens into their most similar kept key (D2O / KVMerger)."""

    budget: int
    sink: int = 0
    recent: int = 0
    merge: bool = False
    merge_threshold: float = 0.5
    merge_bias: bool = True
    # Newest tokens decode never evicts (None: `recent`, the prefill's protected window).
    decode_recent: int | None = None
    needs_probs: ClassVar[bool] = True
    # Whether `prefill_score` reads `stats.col_all` (H2O's accumulated attention over every
    # prefill query, +30% of the prefill's attention); the prefill skips it otherwise.
    needs_col_all: ClassVar[bool] = False
    # Whether `prefill_score` reads `stats.col_obs_long` (SnapKV's longer window).
    needs_col_obs_long: ClassVar[bool] = False
    # False for the full cache, which keeps every token in slot = position (TokenSelect
    # relies on that) even where a window hides it.
    evicts: ClassVar[bool] = True
    name: ClassVar[str] = "slots"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        """[S, K, T] importance of each prefill token (higher is kept)."""
        raise NotImplementedError

    def update_score(self, score: jax.Array, probs: jax.Array, valid: jax.Array) -> jax.Array:
        """New scores [S, B, K] after a step that gave the slots per-KV-head attention
        `probs` [S, B, K]; `valid` [S, B, K] marks occupied slots. Also used with a zero
        score for the incoming token's initial score."""
        return score + probs

    def prefill(self, ctx: PrefillContext) -> sl.SlotCache:
        S, T = ctx.k.shape[:2]
        t = jnp.broadcast_to(jnp.arange(T)[None, None, :], (S, ctx.k.shape[2], T))
        raw = self.prefill_score(ctx)
        score = _protect(raw, t, ctx.lengths[:, None, None] - 1, self.sink, self.recent)
        if ctx.window is not None and self.evicts:
            # A sliding-window layer never reads keys that left its window: a slot spent on
            # one is lost (H2O's accumulated attention still ranks such keys high, and
            # ActQKV's probe kept them on Gemma 3 until this: +250% perplexity).
            gone = ctx.lengths[:, None, None] - 1 - t >= ctx.window
            score = jnp.where(gone, -sl.INF, score)
        return sl.select_prefill(ctx.k, ctx.v, ctx.lengths, score, self.budget,
                                 merge=self.merge, merge_threshold=self.merge_threshold,
                                 raw_score=raw, merge_weight=self.merge_weight(ctx))

    def merge_weight(self, ctx: PrefillContext) -> jax.Array | None:
        """[S, K, T] the importance a merging prefill averages values by (None: the
        prefill score)."""
        return None

    def victim_rank(self, cache: sl.SlotCache, layer: jax.Array, seen: jax.Array) -> jax.Array:
        """[S, B, K] lowest leaves; the incoming token (position `seen`) is never a victim."""
        recent = self.recent if self.decode_recent is None else self.decode_recent
        return _protect(cache.score[layer], cache.pos[layer], seen[:, None, None] - 1,
                        self.sink, recent - 1)

    def decode(self, cache: sl.SlotCache, layer: jax.Array, ctx: DecodeContext
               ) -> tuple[jax.Array, sl.SlotCache]:
        S, K, G, E = ctx.q.shape
        B = cache.budget
        if not self.needs_probs:
            # The victim does not depend on this step's attention: write first, then read
            # the slots (in place, with the native kernel when allowed).
            target = sl.target_slot(self.victim_rank(cache, layer, ctx.seen), ctx.seen)
            cache = sl.write_slot(cache, layer, target, ctx.k, ctx.v, ctx.seen,
                                  jnp.zeros((S, K), jnp.float32))
            if ctx.use_native and ctx.window is None:
                # Valid slots are the prefix [0, min(seen + 1, B)): one contiguous "page"
                # per sequence, read in place from the stacked cache.
                kv_len = jnp.minimum(ctx.seen + 1, B)
                o = cpu_kernels.paged_decode_attention(
                    ctx.q.reshape(S, K * G, E), cache.k, cache.v, kv_len,
                    jnp.arange(S, dtype=jnp.int32)[:, None], layer, None, sm_scale=ctx.scale,
                    soft_cap=ctx.soft_cap)
                return o, cache
            mask = sl.slot_mask(cache.pos[layer], ctx.seen, ctx.window)
            o, _ = attend(ctx.q[:, None], cache.k[layer], cache.v[layer], mask[:, :, None],
                          scale=ctx.scale, soft_cap=ctx.soft_cap)
            return o.reshape(S, K * G, E), cache
        # Read the kept slots and this step's token, then score, pick the victim, write.
        pos = cache.pos[layer]
        mask = sl.slot_mask(pos, ctx.seen, ctx.window)
        bias = sl.merge_bias(cache.mult[layer]) if self.merge and self.merge_bias else None
        o, p, p_new = attend_with_new(ctx.q, cache.k[layer], cache.v[layer], mask, ctx.k,
                                      ctx.v, scale=ctx.scale, soft_cap=ctx.soft_cap, bias=bias)
        probs = p.sum(axis=2).transpose(0, 2, 1)  # [S, B, K]
        valid = pos >= 0
        cache = cache.replace(score=cache.score.at[layer].set(
            self.update_score(cache.score[layer], probs, valid)))
        target = sl.target_slot(self.victim_rank(cache, layer, ctx.seen), ctx.seen)
        if self.merge:
            cache = sl.merge_victim(cache, layer, target, ctx.seen, self.merge_threshold,
                                     ctx.window)
        new_score = self.update_score(jnp.zeros((S, 1, K), jnp.float32),
                                      p_new.sum(axis=2)[:, None], valid)[:, 0]
        cache = sl.write_slot(cache, layer, target, ctx.k, ctx.v, ctx.seen, new_score)
        return o.reshape(S, K * G, E), cache


@dataclasses.dataclass(frozen=True)
class FullCache(SlotPolicy):
    """No compression: every token kept (the reference the others are measured against).
    The budget must cover the longest sequence; `decode` refuses nothing but never evicts
    a token before the budget is reached."""

    needs_probs: ClassVar[bool] = False
    evicts: ClassVar[bool] = False
    name: ClassVar[str] = "full"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        T = ctx.k.shape[1]
        return jnp.broadcast_to(-jnp.arange(T, dtype=jnp.float32), ctx.stats.col_all.shape)

    def victim_rank(self, cache, layer, seen):
        return cache.pos[layer].astype(jnp.float32)  # oldest first, only past the budget


@dataclasses.dataclass(frozen=True)
class StreamingLLM(SlotPolicy):
    """Attention sinks (the first `sink` tokens) plus the most recent tokens."""

    sink: int = 4
    needs_probs: ClassVar[bool] = False
    name: ClassVar[str] = "streaming"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        T = ctx.k.shape[1]
        return jnp.broadcast_to(jnp.arange(T, dtype=jnp.float32), ctx.stats.col_all.shape)

    def victim_rank(self, cache, layer, seen):
        pos = cache.pos[layer]
        return jnp.where(pos < self.sink, sl.INF, pos.astype(jnp.float32))


@dataclasses.dataclass(frozen=True)
class H2O(SlotPolicy):
    """Heavy hitters (largest accumulated attention) plus a recent window."""

    needs_col_all: ClassVar[bool] = True
    name: ClassVar[str] = "h2o"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        return ctx.stats.col_all


@dataclasses.dataclass(frozen=True)
class Scissorhands(SlotPolicy):
    """Persistence of importance: tokens that keep receiving more than a uniform share of
    attention are kept; the count decays so old importance fades."""

    decay: float = 0.95
    name: ClassVar[str] = "scissorhands"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        return ctx.stats.col_hits

    def update_score(self, score, probs, valid):
        n = jnp.maximum(valid.sum(axis=1, keepdims=True), 1).astype(jnp.float32)  # [S, 1, K]
        return self.decay * score + (probs > 1.0 / n).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class SnapKV(SlotPolicy):
    """Selection at the end of prefill by the attention of an observation window,
    pooled over neighbours; the newest `recent` tokens are kept. Decode then evicts by
    accumulated attention as H2O does; the registry gives it H2O's protected window of the
    newest budget/2 tokens (`decode_recent`): SnapKV itself never evicts generated tokens,
    a static budget must, and this keeps them for budget/2 steps.

    `observe` picks the window (docs/kv_compression.md, "Eviction on Gemma 3"):
      "short"  the last `OBS_WINDOW` = 32 queries, as in the SnapKV paper; keeps what a
               prompt's final question asks for, but on Gemma 3's diffuse global layers
               predicts poorly what the next tokens read (+6.6% perplexity at 25%);
      "long"   the last `LONG_OBS_WINDOW` = 128 queries: Gemma 3 +4.1%, but a short final
               question is diluted (SmolLM2 passkey at 25%: 7 of 9 cells -> 5 of 9);
      "both"   (default) a token's larger per-query mean attention of the two windows:
               close to "long" on text, "short"'s passkey cells. Chosen on held-out text.
    """

    recent: int = 32
    kernel: int = 7
    observe: str = "both"
    name: ClassVar[str] = "snapkv"

    def __post_init__(self) -> None:
        if self.observe not in ("short", "long", "both"):
            raise ValueError(f"SnapKV observe={self.observe!r}: choose short, long or both")

    @property
    def needs_col_obs_long(self) -> bool:  # type: ignore[override]
        return self.observe != "short"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        st = ctx.stats
        if self.observe == "short":
            return _maxpool(st.col_obs, self.kernel)
        if st.col_obs_long is None:
            raise ValueError(f"SnapKV(observe={self.observe!r}) scores by "
                             "PrefillStats.col_obs_long; prefill with obs_long > 0 "
                             "(model.prefill does for it)")
        if self.observe == "long":
            return _maxpool(st.col_obs_long, self.kernel)
        n = ctx.lengths[:, None, None].astype(jnp.float32)  # queries each window holds
        short = st.col_obs / jnp.maximum(jnp.minimum(n, OBS_WINDOW), 1.0)
        long_ = st.col_obs_long / jnp.maximum(jnp.minimum(n, LONG_OBS_WINDOW), 1.0)
        return _maxpool(jnp.maximum(short, long_), self.kernel)


@dataclasses.dataclass(frozen=True)
class ActQKV(SnapKV):
    """SnapKV with ActQKV's activation-aware probe: one query per head built from the
    observation window, each query weighted by how far its activation departs from the
    window mean (outlier queries carry the retrieval intent), scores the keys. The probe
    is built from the last `recent` (32) queries."""

    needs_col_obs_long: ClassVar[bool] = False
    name: ClassVar[str] = "actqkv"

    def prefill_score(self, ctx: PrefillContext) -> jax.Array:
        S, T, K, G, E = ctx.q.shape
        t = jnp.arange(T)
        in_obs = ((t[None, :] >= ctx.lengths[:, None] - self.recent)
                  & (t[None, :] < ctx.lengths[:, None])).astype(jnp.float32)  # [S, T]
        q = ctx.q.astype(jnp.float32)
        n = jnp.maximum(in_obs.sum(axis=1), 1.0)  # [S]
        mean = jnp.einsum("stkge,st->skge", q, in_obs) / n[:, None, None, None]
        dev = jnp.linalg.norm(q - mean[:, None], axis=-1)  # [S, T, K, G]
        w = dev * in_obs[:, :, None, None]
        w = w / jnp.maximum(w.sum(axis=1, keepdims=True), 1e-6)
        probe = jnp.einsum("stkge,stkg->skge", q, w)  # [S, K, G, E]
        s = jnp.einsum("skge,stke->skgt", probe, ctx.k.astype(jnp.float32)) * E ** -0.5
        valid = t[None, None, None, :] < ctx.lengths[:, None, None, None]
        p = jax.nn.softmax(jnp.where(valid, s, -1e30), axis=-1)
        return _maxpool(jnp.where(valid, p, 0.0).sum(axis=2), self.kernel)


@dataclasses.dataclass(frozen=True)
class D2O(H2O):
    """H2O eviction whose dropped tokens are merged into the kept token with the most
    similar key (cosine >= merge_threshold) instead of discarded (D2O / KVMerger-style):
    the slot's value becomes the importance-weighted average of its own and the merged
    values, and its logit gains log(multiplicity), the merged share of importance, so the
    slot receives the attention mass of the tokens it stands for.

    The prefill's merge weights are the attention each token receives from the observation
    window (SnapKV's estimate of what later queries read), not H2O's accumulated attention,
    which favours early tokens: with the accumulated weights the mass-preserving bias raised
    KL on both models, with the window's it lowers KL below dropping on both
    (docs/kv_compression.md, "Two changes on 2026-11-29")."""

    merge: bool = True
    merge_threshold: float = 0.8
    merge_bias: bool = True
    name: ClassVar[str] = "d2o"

    def merge_weight(self, ctx: PrefillContext) -> jax.Array:
        return ctx.stats.col_obs
