"""Quantized KV caches: int8 and low-bit per-token caches, KIVI, and MiKV.

Legend: L layers, S sequences, N max tokens, K KV heads, E head dim, G token group
(KIVI's key groups), W residual ring. Codes are unsigned, asymmetric (x = code * scale +
min) and packed along E (two 4-bit or four 2-bit codes per byte), so the arrays really are
the advertised size. Scales and minimums are float16, as in KIVI.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.struct
import jax
import jax.numpy as jnp

from jaxinfer.kvcompress import slots as sl
from jaxinfer.kvcompress.attend import attend, attend_with_new
from jaxinfer.kvcompress.policies import H2O, DecodeContext, PrefillContext

SCALE_DTYPE = jnp.float16


def _shifts(bits: int, lead: int) -> jax.Array:
    """Bit offsets of the codes in a byte, shaped to broadcast after `lead` axes."""
    per = 8 // bits
    return (jnp.arange(per, dtype=jnp.uint8) * jnp.uint8(bits)).reshape((1,) * lead + (per,))


def pack(codes: jax.Array, bits: int) -> jax.Array:
    """uint8 codes [..., E] in [0, 2**bits) -> [..., E * bits / 8] bytes."""
    if bits == 8:
        return codes.astype(jnp.uint8)
    per = 8 // bits
    c = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], -1, per)
    shifts = _shifts(bits, c.ndim - 1)
    return jnp.bitwise_or.reduce(c << shifts, axis=-1).astype(jnp.uint8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
    """Inverse of `pack`: [..., E * bits / 8] -> uint8 codes [..., E]."""
    if bits == 8:
        return packed
    shifts = _shifts(bits, packed.ndim)
    c = (packed[..., None] >> shifts) & jnp.uint8(2**bits - 1)
    return c.reshape(*packed.shape[:-1], -1)


def quantize(x: jax.Array, bits: int, axis: int | tuple[int, ...]
             ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Asymmetric round-to-nearest over `axis` (the group): (codes, scale, min), scale and
    min keeping the reduced axes with size 1."""
    x = x.astype(jnp.float32)
    lo = jnp.min(x, axis=axis, keepdims=True)
    hi = jnp.max(x, axis=axis, keepdims=True)
    scale = jnp.maximum(hi - lo, 1e-8) / (2**bits - 1)
    scale, lo = scale.astype(SCALE_DTYPE), lo.astype(SCALE_DTYPE)
    codes = jnp.clip(jnp.round((x - lo.astype(jnp.float32)) / scale.astype(jnp.float32)),
                     0, 2**bits - 1)
    return codes.astype(jnp.uint8), scale, lo


def dequantize(codes: jax.Array, scale: jax.Array, lo: jax.Array) -> jax.Array:
    return codes.astype(jnp.float32) * scale.astype(jnp.float32) + lo.astype(jnp.float32)


# --- per-token caches (int8 KV, MiKV's low-precision store) -------------------------------

@flax.struct.dataclass
class TokenQuantCache:
    """Every token quantized per (token, KV head) over groups of `group` channels."""

    k: Any  # [(L,) S, N, K, E*bits/8] uint8
    k_scale: Any  # [(L,) S, N, K, E/group]
    k_min: Any
    v: Any
    v_scale: Any
    v_min: Any


def _tok_quant(x: jax.Array, bits: int, group: int):
    g = x.reshape(*x.shape[:-1], -1, group)
    c, s, m = quantize(g, bits, axis=-1)
    return pack(c.reshape(x.shape), bits), s[..., 0], m[..., 0]


def _tok_dequant(packed, scale, lo, bits: int, group: int) -> jax.Array:
    c = unpack(packed, bits)
    c = c.reshape(*c.shape[:-1], -1, group)
    return dequantize(c, scale[..., None], lo[..., None]).reshape(*c.shape[:-2], -1)


def token_quant_prefill(k, v, lengths, max_len: int, bits: int, group: int) -> TokenQuantCache:
    S, T = k.shape[:2]
    pad = [(0, 0), (0, max_len - T), (0, 0), (0, 0)]
    kq, ks, km = _tok_quant(jnp.pad(k, pad), bits, group)
    vq, vs, vm = _tok_quant(jnp.pad(v, pad), bits, group)
    return TokenQuantCache(kq, ks, km, vq, vs, vm)


def token_quant_write(c: TokenQuantCache, layer, k, v, seen, bits: int, group: int
                      ) -> TokenQuantCache:
    s = jnp.arange(k.shape[0])
    kq, ks, km = _tok_quant(k, bits, group)
    vq, vs, vm = _tok_quant(v, bits, group)
    upd = lambda a, x: a.at[layer, s, seen].set(x, mode="drop")  # noqa: E731
    return TokenQuantCache(upd(c.k, kq), upd(c.k_scale, ks), upd(c.k_min, km),
                           upd(c.v, vq), upd(c.v_scale, vs), upd(c.v_min, vm))


def token_quant_read(c: TokenQuantCache, layer, bits: int, group: int):
    return (_tok_dequant(c.k[layer], c.k_scale[layer], c.k_min[layer], bits, group),
            _tok_dequant(c.v[layer], c.v_scale[layer], c.v_min[layer], bits, group))


def _window_mask(pos: jax.Array, seen: jax.Array, window) -> jax.Array:
    """[S, 1, 1, N] tokens at positions pos [S, N] readable by the query at `seen`."""
    m = (pos >= 0) & (pos <= seen[:, None])
    if window is not None:
        m = m & (seen[:, None] - pos < window)
    return m[:, None, None, :]


@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    """Every token kept, quantized per token (int8 KV with bits=8)."""

    max_len: int
    bits: int = 8
    group: int = 64
    needs_probs: ClassVar[bool] = False
    needs_col_all: ClassVar[bool] = False
    name: ClassVar[str] = "int8"

    def prefill(self, ctx: PrefillContext) -> TokenQuantCache:
        return token_quant_prefill(ctx.k, ctx.v, ctx.lengths, self.max_len, self.bits,
                                   min(self.group, ctx.k.shape[-1]))

    def decode(self, cache: TokenQuantCache, layer, ctx: DecodeContext):
        g = min(self.group, ctx.k.shape[-1])
        cache = token_quant_write(cache, layer, ctx.k, ctx.v, ctx.seen, self.bits, g)
        k, v = token_quant_read(cache, layer, self.bits, g)
        S, N = k.shape[:2]
        pos = jnp.broadcast_to(jnp.arange(N), (S, N))
        o, _ = attend(ctx.q[:, None], k, v, _window_mask(pos, ctx.seen, ctx.window),
                      scale=ctx.scale, soft_cap=ctx.soft_cap)
        return o.reshape(S, -1, ctx.q.shape[-1]), cache


# --- KIVI -----------------------------------------------------------------------------

@flax.struct.dataclass
class KIVICache:
    """Keys quantized per channel over groups of G tokens, values per token; the newest
    tokens (between R and R + G - 1 of them) stay in full precision in a ring of W = R + G."""

    k: Any  # [(L,) S, N, K, E*bits/8]
    k_scale: Any  # [(L,) S, N/G, K, E]
    k_min: Any
    v: Any  # [(L,) S, N, K, E*bits/8]
    v_scale: Any  # [(L,) S, N, K, E/group]
    v_min: Any
    ring_k: Any  # [(L,) S, W, K, E] model dtype
    ring_v: Any


@dataclasses.dataclass(frozen=True)
class KIVI:
    """KIVI: 2- or 4-bit keys per channel and values per token, recent tokens exact."""

    max_len: int
    bits: int = 2
    group: int = 32  # G: tokens per key group, channels per value group
    residual: int = 32  # R: newest tokens always kept in full precision
    needs_probs: ClassVar[bool] = False
    needs_col_all: ClassVar[bool] = False
    name: ClassVar[str] = "kivi"

    @property
    def ring(self) -> int:
        return self.residual + self.group

    def quantized_count(self, seen: jax.Array) -> jax.Array:
        return jnp.maximum(seen - self.residual, 0) // self.group * self.group

    def _key_groups(self, k: jax.Array):
        """k [S, n*G, K, E] -> packed codes, scale/min [S, n, K, E] (per channel)."""
        S, T, K, E = k.shape
        g = k.reshape(S, T // self.group, self.group, K, E)
        c, s, m = quantize(g, self.bits, axis=2)
        return pack(c.reshape(S, T, K, E), self.bits), s[:, :, 0], m[:, :, 0]

    def prefill(self, ctx: PrefillContext) -> KIVICache:
        S, T, K, E = ctx.k.shape
        if self.max_len % self.group:
            raise ValueError(f"KIVI max_len {self.max_len} must be a multiple of group "
                             f"{self.group}")
        pad = [(0, 0), (0, self.max_len - T), (0, 0), (0, 0)]
        kq, ks, km = self._key_groups(jnp.pad(ctx.k, pad))
        vq, vs, vm = _tok_quant(jnp.pad(ctx.v, pad), self.bits, min(self.group, E))
        nq = self.quantized_count(ctx.lengths)
        t = jnp.arange(T)[None, :]
        slot = jnp.where((t >= nq[:, None]) & (t < ctx.lengths[:, None]), t % self.ring,
                         self.ring)
        s = jnp.arange(S)[:, None]
        ring = jnp.zeros((S, self.ring, K, E), ctx.k.dtype)
        return KIVICache(kq, ks, km, vq, vs, vm,
                         ring.at[s, slot].set(ctx.k, mode="drop"),
                         ring.at[s, slot].set(ctx.v, mode="drop"))

    def decode(self, cache: KIVICache, layer, ctx: DecodeContext):
        S, K, G, E = ctx.q.shape
        W, Gt = self.ring, self.group
        s = jnp.arange(S)
        seen = ctx.seen
        cache = cache.replace(
            ring_k=cache.ring_k.at[layer, s, seen % W].set(ctx.k.astype(cache.ring_k.dtype)),
            ring_v=cache.ring_v.at[layer, s, seen % W].set(ctx.v.astype(cache.ring_v.dtype)))
        count = seen + 1
        nq_old, nq = self.quantized_count(seen), self.quantized_count(count)
        # A full group left the residual window: quantize it into the main store.
        grow = nq > nq_old
        start = nq_old % W
        idx = (start[:, None] + jnp.arange(Gt)[None, :]) % W  # [S, G]
        gk = jnp.take_along_axis(cache.ring_k[layer], idx[:, :, None, None], axis=1)
        gv = jnp.take_along_axis(cache.ring_v[layer], idx[:, :, None, None], axis=1)
        kq, ks, km = self._key_groups(gk)
        vq, vs, vm = _tok_quant(gv, self.bits, min(Gt, E))
        tok = jnp.where(grow[:, None], nq_old[:, None] + jnp.arange(Gt)[None, :],
                        self.max_len)  # out of range: dropped
        grp = jnp.where(grow, nq_old // Gt, self.max_len)
        si = s[:, None]
        cache = cache.replace(
            k=cache.k.at[layer, si, tok].set(kq, mode="drop"),
            v=cache.v.at[layer, si, tok].set(vq, mode="drop"),
            v_scale=cache.v_scale.at[layer, si, tok].set(vs, mode="drop"),
            v_min=cache.v_min.at[layer, si, tok].set(vm, mode="drop"),
            k_scale=cache.k_scale.at[layer, s, grp].set(ks[:, 0], mode="drop"),
            k_min=cache.k_min.at[layer, s, grp].set(km[:, 0], mode="drop"))
        # Read: dequantized store (positions < nq) then the ring (positions in [nq, count)).
        N = self.max_len
        kc = unpack(cache.k[layer], self.bits).reshape(S, N // Gt, Gt, K, E)
        kf = dequantize(kc, cache.k_scale[layer][:, :, None], cache.k_min[layer][:, :, None])
        kf = kf.reshape(S, N, K, E)
        vf = _tok_dequant(cache.v[layer], cache.v_scale[layer], cache.v_min[layer], self.bits,
                          min(Gt, E))
        store_pos = jnp.where(jnp.arange(N)[None, :] < nq[:, None], jnp.arange(N)[None, :], -1)
        i = jnp.arange(W)[None, :]
        base = count[:, None] - W
        ring_pos = base + (i - base) % W  # the position each ring slot holds
        ring_pos = jnp.where((ring_pos >= nq[:, None]) & (ring_pos >= 0), ring_pos, -1)
        keys = jnp.concatenate([kf, cache.ring_k[layer].astype(jnp.float32)], axis=1)
        vals = jnp.concatenate([vf, cache.ring_v[layer].astype(jnp.float32)], axis=1)
        pos = jnp.concatenate([store_pos, ring_pos], axis=1)
        o, _ = attend(ctx.q[:, None], keys, vals, _window_mask(pos, seen, ctx.window),
                      scale=ctx.scale, soft_cap=ctx.soft_cap)
        return o.reshape(S, K * G, E), cache


# --- MiKV -----------------------------------------------------------------------------

@flax.struct.dataclass
class MiKVCache:
    low: TokenQuantCache  # every token, low precision
    high: sl.SlotCache  # the important ones, full precision


@dataclasses.dataclass(frozen=True)
class MiKV:
    """Mixed precision instead of eviction: every token stays in a low-precision store;
    the `budget` most important (H2O scores, recent window included) also keep a
    full-precision copy, which attention reads instead of the low-precision one."""

    budget: int
    max_len: int
    low_bits: int = 2
    group: int = 32
    recent: int = 16
    needs_probs: ClassVar[bool] = True
    needs_col_all: ClassVar[bool] = True  # the H2O selector's prefill scores
    name: ClassVar[str] = "mikv"

    @property
    def selector(self) -> H2O:
        return H2O(budget=self.budget, recent=self.recent)

    def prefill(self, ctx: PrefillContext) -> MiKVCache:
        g = min(self.group, ctx.k.shape[-1])
        return MiKVCache(
            low=token_quant_prefill(ctx.k, ctx.v, ctx.lengths, self.max_len, self.low_bits, g),
            high=self.selector.prefill(ctx))

    def decode(self, cache: MiKVCache, layer, ctx: DecodeContext):
        S, K, G, E = ctx.q.shape
        g = min(self.group, E)
        high = cache.high
        lk, lv = token_quant_read(cache.low, layer, self.low_bits, g)  # [S, N, K, E]
        N = lk.shape[1]
        hpos = high.pos[layer]  # [S, B, K]
        # Low-precision tokens that have a full-precision copy are not read twice.
        covered = jnp.zeros((S, N + 1, K), bool).at[
            jnp.arange(S)[:, None, None], jnp.where(hpos >= 0, hpos, N),
            jnp.arange(K)[None, None, :]].set(True)[:, :N]
        lpos = jnp.broadcast_to(jnp.arange(N), (S, N))
        lmask = _window_mask(lpos, ctx.seen - 1, ctx.window)[:, 0, 0]  # [S, N]: earlier tokens
        lmask = lmask[:, None, :] & ~covered.transpose(0, 2, 1)  # [S, K, N]
        hmask = sl.slot_mask(hpos, ctx.seen, ctx.window)
        keys = jnp.concatenate([lk, high.k[layer].astype(jnp.float32)], axis=1)
        vals = jnp.concatenate([lv, high.v[layer].astype(jnp.float32)], axis=1)
        o, p, p_new = attend_with_new(ctx.q, keys, vals, jnp.concatenate([lmask, hmask], -1),
                                      ctx.k, ctx.v, scale=ctx.scale, soft_cap=ctx.soft_cap)
        probs = p[..., N:].sum(axis=2).transpose(0, 2, 1)  # [S, B, K]
        high = high.replace(score=high.score.at[layer].add(probs))
        target = sl.target_slot(self.selector.victim_rank(high, layer, ctx.seen), ctx.seen)
        high = sl.write_slot(high, layer, target, ctx.k, ctx.v, ctx.seen, p_new.sum(axis=2))
        low = token_quant_write(cache.low, layer, ctx.k, ctx.v, ctx.seen, self.low_bits, g)
        return o.reshape(S, K * G, E), MiKVCache(low=low, high=high)
