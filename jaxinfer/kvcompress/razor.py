"""RazorAttention: retrieval heads keep every token; every other KV head keeps attention
sinks, a recent window and one compensation token standing for all the tokens it dropped.

Legend: L layers, S sequences, T tokens, N max tokens, K KV heads, R retrieval KV heads
per layer, O = K - R other KV heads, W = sink + window slots, G query group, E head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.config import ModelConfig
from jaxinfer.kvcompress.attend import NEG_INF, attend, softcap
from jaxinfer.kvcompress.model import capture_prefill
from jaxinfer.kvcompress.policies import DecodeContext, PrefillContext
from jaxinfer.model.params import Params

HeadTable = tuple[tuple[int, ...], ...]


@flax.struct.dataclass
class RazorCache:
    """Kept tokens of one or all layers (a leading L axis when stacked)."""

    full_k: Any  # [(L,) S, N, R, E] retrieval heads; slot i holds position i
    full_v: Any
    win_k: Any  # [(L,) S, W, O, E] other heads: sinks in [0, sink), then a ring of `window`
    win_v: Any
    win_pos: Any  # [(L,) S, W] int32 position each window slot holds, -1 when empty
    comp_k: Any  # [(L,) S, O, E] float32 mean key of the dropped tokens
    comp_v: Any  # [(L,) S, O, E] float32 mean value of the dropped tokens
    comp_count: Any  # [(L,) S] int32 tokens the compensation token stands for


def num_retrieval_heads(num_kv_heads: int, fraction: float) -> int:
    """R = ceil(fraction * K), at least 1 and at most K."""
    return min(num_kv_heads, max(1, math.ceil(fraction * num_kv_heads)))


@dataclasses.dataclass(frozen=True)
class RazorAttention:
    """Retrieval heads (`retrieval_heads[layer]`, the same count R in every layer; empty:
    none) read the full cache of `max_len` tokens; the other heads read the first `sink`
    tokens, the newest `window` and a compensation token (mean of the dropped keys and
    values) whose logit is raised by log(count) so it carries the dropped tokens' mass."""

    max_len: int
    window: int
    sink: int = 4
    retrieval_heads: HeadTable = ()
    needs_probs: ClassVar[bool] = False
    needs_col_all: ClassVar[bool] = False
    # Its decode reads the window before folding the leaving token: scan per-layer slices
    # (see kvcompress.model.decode_step).
    writes_in_place: ClassVar[bool] = False
    name: ClassVar[str] = "razor"

    def __post_init__(self) -> None:
        if self.window < 1 or self.sink < 0:
            raise ValueError(f"RazorAttention needs window >= 1 and sink >= 0 "
                             f"(got {self.window}, {self.sink})")
        counts = {len(row) for row in self.retrieval_heads}
        if len(counts) > 1:
            raise ValueError(f"every layer needs the same number of retrieval heads, got "
                             f"{self.retrieval_heads}")
        if any(len(set(row)) != len(row) or min(row, default=0) < 0
               for row in self.retrieval_heads):
            raise ValueError(f"retrieval heads must be distinct and >= 0: "
                             f"{self.retrieval_heads}")

    @property
    def slots(self) -> int:
        """W: window slots of a non-retrieval head (the compensation token is apart)."""
        return self.sink + self.window

    def state_bytes(self, num_layers: int, num_seqs: int, num_kv_heads: int, head_dim: int,
                    itemsize: int) -> int:
        """Analytic size of the stacked `RazorCache` (keys and values in `itemsize` bytes)."""
        R = len(self.retrieval_heads[0]) if self.retrieval_heads else 0
        O = num_kv_heads - R
        per_seq = (2 * self.max_len * R * head_dim * itemsize  # retrieval heads
                   + 2 * self.slots * O * head_dim * itemsize + 4 * self.slots  # window
                   + 2 * O * head_dim * 4 + 4)  # compensation token and its count
        return num_layers * num_seqs * per_seq

    def _heads(self, layer: Any, num_kv_heads: int) -> tuple[Any, Any]:
        """(retrieval [R], others [O]) KV head indices of `layer`: static numpy arrays when
        every layer shares one set, else gathered from the table by the traced layer."""
        table = self.retrieval_heads
        if any(h >= num_kv_heads for row in table for h in row):
            raise ValueError(f"retrieval heads {table} out of range for {num_kv_heads} KV heads")
        others = tuple(tuple(h for h in range(num_kv_heads) if h not in row) for row in table)
        if len(set(table)) <= 1:
            row = table[0] if table else ()
            rest = others[0] if table else tuple(range(num_kv_heads))
            return np.asarray(row, np.int32), np.asarray(rest, np.int32)
        if layer is None:
            raise ValueError("per-layer retrieval heads need the layer index in the "
                             "PrefillContext (`ctx.layer`)")
        return (jnp.asarray(table, jnp.int32)[layer], jnp.asarray(others, jnp.int32)[layer])

    def _ring_slot(self, pos: jax.Array) -> jax.Array:
        """Window slot of a token at position `pos`: sinks stay put, the rest cycle."""
        return jnp.where(pos < self.sink, pos, self.sink + (pos - self.sink) % self.window)

    def prefill(self, ctx: PrefillContext) -> RazorCache:
        S, T, K, E = ctx.k.shape
        if self.max_len < T:
            raise ValueError(f"prefill of {T} tokens exceeds RazorAttention max_len "
                             f"{self.max_len}")
        retrieval, others = self._heads(getattr(ctx, "layer", None), K)
        n = ctx.lengths.astype(jnp.int32)[:, None]  # [S, 1]
        t = jnp.arange(T, dtype=jnp.int32)[None, :]
        valid = t < n
        pad = [(0, 0), (0, self.max_len - T), (0, 0), (0, 0)]
        keep_all = lambda a: jnp.pad(
            jnp.where(valid[:, :, None, None], jnp.take(a, retrieval, axis=2), 0), pad)

        # Window slot j holds position j (a sink) or the newest position of its ring class.
        j = jnp.arange(self.slots, dtype=jnp.int32)[None, :]
        last = n - 1
        ring = last - (last - j) % self.window  # (p - sink) % window == j - sink
        pos = jnp.where(j < self.sink, j, ring)
        pos = jnp.where((pos >= 0) & (pos < n) & ((j < self.sink) | (pos >= self.sink)),
                        pos, -1)
        k_o, v_o = jnp.take(ctx.k, others, axis=2), jnp.take(ctx.v, others, axis=2)
        idx = jnp.maximum(pos, 0)[:, :, None, None]
        in_window = (pos >= 0)[:, :, None, None]
        gather = lambda a: jnp.where(
            in_window, jnp.take_along_axis(a, idx, axis=1), 0).astype(a.dtype)

        dropped = (t >= self.sink) & (t < n - self.window)  # [S, T]
        count = jnp.maximum(n[:, 0] - self.window - self.sink, 0)
        denom = jnp.maximum(count, 1).astype(jnp.float32)[:, None, None]
        mean = lambda a: jnp.einsum(
            "st,stoe->soe", dropped.astype(jnp.float32), a.astype(jnp.float32)) / denom
        return RazorCache(full_k=keep_all(ctx.k), full_v=keep_all(ctx.v),
                          win_k=gather(k_o), win_v=gather(v_o), win_pos=pos,
                          comp_k=mean(k_o), comp_v=mean(v_o), comp_count=count)

    def decode(self, cache: RazorCache, layer: jax.Array, ctx: DecodeContext
               ) -> tuple[jax.Array, RazorCache]:
        S, K, G, E = ctx.q.shape
        # The cache may be one layer's slice (kvcompress.model); the head table is indexed
        # by the model's layer.
        model_layer = layer if ctx.model_layer is None else ctx.model_layer
        retrieval, others = self._heads(model_layer, K)
        R, O = retrieval.shape[0], others.shape[0]
        s = jnp.arange(S)
        seen = ctx.seen.astype(jnp.int32)
        k_r, v_r = jnp.take(ctx.k, retrieval, axis=1), jnp.take(ctx.v, retrieval, axis=1)
        full_k = cache.full_k.at[layer, s, seen].set(k_r.astype(cache.full_k.dtype), mode="drop")
        full_v = cache.full_v.at[layer, s, seen].set(v_r.astype(cache.full_v.dtype), mode="drop")

        # The token leaving the ring (if its slot was occupied) joins the running mean.
        slot = self._ring_slot(seen)  # [S]
        leaving = cache.win_pos[layer, s, slot] >= 0
        count = cache.comp_count[layer] + leaving.astype(jnp.int32)
        share = jnp.where(leaving, 1.0 / jnp.maximum(count, 1).astype(jnp.float32), 0.0)
        fold = lambda mean, win: mean + share[:, None, None] * (
            win[layer, s, slot].astype(jnp.float32) - mean)
        comp_k = fold(cache.comp_k[layer], cache.win_k)
        comp_v = fold(cache.comp_v[layer], cache.win_v)
        k_o, v_o = jnp.take(ctx.k, others, axis=1), jnp.take(ctx.v, others, axis=1)
        cache = RazorCache(
            full_k=full_k, full_v=full_v,
            win_k=cache.win_k.at[layer, s, slot].set(k_o.astype(cache.win_k.dtype)),
            win_v=cache.win_v.at[layer, s, slot].set(v_o.astype(cache.win_v.dtype)),
            win_pos=cache.win_pos.at[layer, s, slot].set(seen),
            comp_k=cache.comp_k.at[layer].set(comp_k),
            comp_v=cache.comp_v.at[layer].set(comp_v),
            comp_count=cache.comp_count.at[layer].set(count))

        out = jnp.zeros((S, K, G, E), ctx.q.dtype)
        if R:
            N = self.max_len
            pos = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32), (S, N))
            o, _ = attend(jnp.take(ctx.q, retrieval, axis=1)[:, None], full_k[layer],
                          full_v[layer], _readable(pos, seen, ctx.window), scale=ctx.scale,
                          soft_cap=ctx.soft_cap)
            out = out.at[:, retrieval].set(o[:, 0])
        if O:
            # The compensation token sits at the newest dropped position, so a sliding
            # layer stops reading it once the dropped tokens fall out of its window.
            comp_pos = jnp.where(count > 0, self.sink + count - 1, -1)
            pos = jnp.concatenate([cache.win_pos[layer], comp_pos[:, None]], axis=1)
            bias = jnp.concatenate([jnp.zeros((S, self.slots), jnp.float32),
                                    jnp.log(jnp.maximum(count, 1).astype(jnp.float32))[:, None]],
                                   axis=1)[:, None, None, :]
            keys = jnp.concatenate([cache.win_k[layer].astype(jnp.float32), comp_k[:, None]], 1)
            vals = jnp.concatenate([cache.win_v[layer].astype(jnp.float32), comp_v[:, None]], 1)
            o, _ = attend(jnp.take(ctx.q, others, axis=1)[:, None], keys, vals,
                          _readable(pos, seen, ctx.window), scale=ctx.scale,
                          soft_cap=ctx.soft_cap, bias=bias)
            out = out.at[:, others].set(o[:, 0])
        return out.reshape(S, K * G, E), cache


def _readable(pos: jax.Array, seen: jax.Array, window: Any) -> jax.Array:
    """[S, 1, 1, N] slots at positions pos [S, N] that the query at `seen` [S] may read."""
    ok = (pos >= 0) & (pos <= seen[:, None])
    if window is not None:
        ok = ok & (seen[:, None] - pos < window)
    return ok[:, None, None, :]


# --- retrieval-head identification ---------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("half", "scale", "soft_cap"))
def induction_scores(q: jax.Array, k: jax.Array, windows: jax.Array, *, half: int,
                     scale: float, soft_cap: float | None) -> jax.Array:
    """How much each KV head attends like an induction / echo head on a repeated probe.

    Args:
      q: [L, S, 2*half, K, G, E] rotated queries of a sequence whose second half repeats
        its first; k: [L, S, 2*half, K, E] rotated keys.
      windows: [L] int32 each layer's attention window (a huge value: none).

    Returns:
      [L, K] float32: the attention the second copy's token i gives the first copy's token
      i + 1 (the token that followed it last time), summed over the query group and
      averaged over probe sequences and positions.
    """
    T = 2 * half
    rows = q[:, :, half:T - 1].astype(jnp.float32)  # queries at positions half + i
    s = jnp.einsum("lsikge,lstke->lskgit", rows, k.astype(jnp.float32)) * scale
    s = softcap(s, soft_cap)
    qpos = half + jnp.arange(half - 1)[:, None]
    kpos = jnp.arange(T)[None, :]
    ok = (kpos <= qpos)[None] & ((qpos - kpos)[None] < windows[:, None, None])  # [L, i, t]
    s = jnp.where(ok[:, None, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1)
    target = jnp.arange(1, half)[:, None]  # [i, 1]: key position i + 1
    hit = jnp.take_along_axis(p, jnp.broadcast_to(target, p.shape[:-1] + (1,)), axis=-1)
    return hit[..., 0].sum(axis=3).mean(axis=(1, 3))


def find_retrieval_heads(params: Params, cfg: ModelConfig, *, seq_len: int = 128,
                         seed: int = 0, num_probes: int = 4, fraction: float = 0.15
                         ) -> HeadTable:
    """The R = ceil(fraction * K) KV heads of each layer that best copy from context.

    Feeds `num_probes` random token sequences of `seq_len // 2` tokens, each repeated
    twice, and ranks KV heads by `induction_scores` (ties go to the lower index, so the
    result depends only on params, cfg and seed).

    Returns:
      Per layer, the sorted indices of its retrieval KV heads (a `RazorAttention` field).
    """
    half = seq_len // 2
    if half < 2:
        raise ValueError(f"find_retrieval_heads needs seq_len >= 4 (got {seq_len})")
    first = np.random.default_rng(seed).integers(0, cfg.vocab_size, (num_probes, half))
    tokens = jnp.asarray(np.concatenate([first, first], axis=1), jnp.int32)
    lengths = jnp.full((num_probes,), 2 * half, jnp.int32)
    _, (q, k, _, _, _) = capture_prefill(params, cfg, tokens, lengths)
    no_window = np.iinfo(np.int32).max // 2
    windows = np.where(cfg.sliding_layer_mask, cfg.sliding_window or no_window, no_window)
    scores = np.asarray(induction_scores(q, k, jnp.asarray(windows, jnp.int32), half=half,
                                         scale=cfg.attention_scale,
                                         soft_cap=cfg.attn_logit_softcap))
    R = num_retrieval_heads(cfg.num_kv_heads, fraction)
    best = np.argsort(-scores, axis=1, kind="stable")[:, :R]
    return tuple(tuple(sorted(int(h) for h in row)) for row in best)
