"""GPTQ: group-wise quantization with second-order error feedback (host side, numpy).

Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers". For a linear weight W [N, K] (y = x @ W.T) and the second moment of its input
H = E[x x^T] [K, K] (`jaxinfer.quant.calibrate.activation_grams`), the layer's squared output
error for a weight error D is tr(D H D^T). GPTQ quantizes W one input column at a time, left
to right, and after each column moves that column's rounding error onto the columns not yet
quantized, weighted so that the output error those columns can still cancel is cancelled
(the optimal brain surgeon update restricted to the remaining columns):

  H += damp * mean(diag H) * I           (dampening; dead inputs, diag 0, get diag 1)
  U  = upper Cholesky factor of H^-1     (H^-1 = U^T U)
  for j in 0..K-1:
      q_j  = quantize(W[:, j])           (the group's grid: set when column j opens a group)
      e    = (W[:, j] - q_j) / U[j, j]
      W[:, j+1:] -= e U[j, j+1:]

The updates are applied lazily at two levels (within sub-blocks of `SUB_BLOCK` columns as
rank-1 updates, to the rest of a block and of the weight as matrix products), which gives the
same result as the column loop above. A group's grid (scale, offset) is chosen when the sweep
reaches the group's first column, from the group's current (error-updated) weights: round to
nearest on its range (`rtn`) or the weighted clipping search (`mse`, `quantize._search`, each
input feature weighted by its share of diag H as in the activation-aware search). Groups stay
contiguous (no act-order). With H = I nothing is moved and the result is the group
quantizer's own.

Dimension legend: B stacked matrices (layers), N output features, K input features,
g group size.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError
from jaxinfer.quant.format import QuantizedWeight, QuantScheme, pack_int4_np, parse_scheme

log = logging.getLogger(__name__)

# Dampening added to H's diagonal, as a share of its mean diagonal (the paper's 1%).
DAMP = 0.01
# Columns per lazily-updated block (rounded to a multiple of the group size), and per inner
# sub-block whose columns take the rank-1 updates (a divisor of every group size).
BLOCK = 128
SUB_BLOCK = 16
# Bound on the float64 copy of H held at once (bytes): stacked matrices go in chunks.
CHUNK_BYTES = 160 * 2**20


def gptq_quantize(w: Any, gram: Any, scheme: str | QuantScheme, *, damp: float = DAMP,
                  block: int = BLOCK, exact_group: bool = False, act_order: bool = False,
                  refit: int = 0) -> QuantizedWeight:
    """Quantize a dense weight [..., N, K] with GPTQ's error feedback.

    Args:
      w: the weight (numpy or jax, any float dtype); the last axis (K) is grouped.
      gram: the input second moment [..., K, K] (E[x x^T] or any positive multiple of it)
        with w's leading axes: one H per stacked matrix.
      scheme: a `QuantScheme` or its name; its bits, group size, symmetry and method
        (`rtn`: each group's full range, `mse`: the clipping search weighted by diag H)
        choose the grids.
      damp: share of mean(diag H) added to the diagonal (> 0 unless H is well conditioned).
      block: columns per lazily-updated block (rounded to a multiple of the group size).
      exact_group: refuse a group size that does not divide K (else the largest smaller
        supported one that does is used, as in `quantize_array`).
      act_order: sweep the input columns in decreasing diag H (the most active inputs
        first, their error moved onto the less active ones), with every group's grid chosen
        before the sweep from the original weights ("static groups"), so groups stay
        contiguous and the format is unchanged.
      refit: rounds of grid refitting after the sweep. Each round fits every group's
        (scale, offset) to its codes by least squares under H (the layer's output error
        with the codes held, `refit_grids`); all but the last then sweep again with the
        refitted grids held, giving new codes. 0: the sweep's own grids.

    Returns:
      A `QuantizedWeight` of numpy arrays (scale, offset float32), as `quantize_array`
      returns.

    Raises:
      ConfigError: shapes that do not match, non-finite values, a negative damp or block, or
        an H that is not positive definite after dampening.
    """
    from jaxinfer.quant.quantize import group_size_for

    scheme = parse_scheme(scheme)
    w = np.asarray(w, np.float32)
    gram = np.asarray(gram)
    if w.ndim < 2:
        raise ConfigError(f"gptq_quantize needs a weight [..., N, K], got shape {w.shape}")
    *lead, N, K = w.shape
    if gram.shape != (*lead, K, K):
        raise ConfigError(f"gptq_quantize: gram has shape {gram.shape}, expected "
                          f"{(*lead, K, K)} for the weight {w.shape}")
    if not np.isfinite(w).all() or not np.isfinite(gram).all():
        raise ConfigError("gptq_quantize: the weight and the gram matrix must be finite")
    if not damp >= 0 or block < 1 or refit < 0:
        raise ConfigError(f"gptq_quantize: damp must be >= 0, block >= 1 and refit >= 0, "
                          f"got damp={damp}, block={block}, refit={refit}")
    if exact_group and K % scheme.group_size:
        raise ConfigError(f"group size {scheme.group_size} does not divide K={K}")
    g = group_size_for(K, scheme.group_size)
    block = max(g, block // g * g)
    batch = int(np.prod(lead, dtype=np.int64))
    w3, h3 = w.reshape(batch, N, K), gram.reshape(batch, K, K)
    chunk = max(1, CHUNK_BYTES // (K * K * 8))
    parts = [_gptq_refit(w3[i:i + chunk], h3[i:i + chunk].astype(np.float64), scheme, g,
                         damp, block, act_order, refit)
             for i in range(0, batch, chunk)]
    q, scale, offset = (np.concatenate(xs) if xs[0] is not None else None
                        for xs in zip(*parts, strict=True))
    q = q.reshape(*lead, N, K)
    if scheme.bits == 4:
        q = pack_int4_np(q)
    G = K // g
    return QuantizedWeight(
        q=q, scale=scale.reshape(*lead, N, G),
        offset=None if offset is None else offset.reshape(*lead, N, G),
        bits=scheme.bits, group_size=g)


def inverse_cholesky(gram: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """The upper Cholesky factor U of (H + damp * mean(diag H) * I)^-1 [B, K, K] (float32),
    with dead inputs (diag H <= 0) decoupled (row and column zeroed, diag 1 + damp), so their
    error is not moved. A batch whose diagonal is all dead uses H = I.

    Computed without forming H^-1: with J the order reversal and J H J = L L^T (lower
    Cholesky), H^-1 = (J L^-T J)(J L^-1 J), so U = J L^-1 J (one Cholesky and one triangular
    solve, a third of inverse-then-Cholesky's work). The factorization runs in float32 (as
    the paper's implementation does) through XLA: on the shared 2-core machine numpy's /
    scipy's multi-threaded LAPACK took ~1-2 s per 1536 x 1536 matrix, XLA ~0.3 s.

    Raises:
      ConfigError: the dampened H is not positive definite.
    """
    h = (gram + np.swapaxes(gram, -1, -2)) / 2
    K = h.shape[-1]
    diag = np.diagonal(h, axis1=-2, axis2=-1).copy()
    dead = ~(diag > 0)
    h = np.where(dead[..., :, None] | dead[..., None, :], 0.0, h)
    alive = (~dead).sum(-1)
    mean = np.where(alive > 0, np.where(dead, 0.0, diag).sum(-1) / np.maximum(alive, 1), 1.0)
    index = np.arange(K)
    h[..., index, index] += np.where(dead, 1.0, 0.0) + (damp * mean)[..., None]
    u = np.asarray(_inverse_cholesky(jnp.asarray(h, jnp.float32)))
    if not np.isfinite(u).all():
        raise ConfigError(f"gptq: the gram matrix is not positive definite after dampening "
                          f"{damp} (raise damp, or calibrate on more tokens)")
    return u


@jax.jit
def _inverse_cholesky(h: jax.Array) -> jax.Array:
    """J L^-1 J for J h J = L L^T, h [B, K, K] (NaN where h is not positive definite)."""
    lower = jnp.linalg.cholesky(h[..., ::-1, ::-1])
    eye = jnp.broadcast_to(jnp.eye(h.shape[-1], dtype=h.dtype), h.shape)
    inverse = jax.lax.linalg.triangular_solve(lower, eye, left_side=True, lower=True)
    return inverse[..., ::-1, ::-1]


def _gptq_refit(w: np.ndarray, gram: np.ndarray, scheme: QuantScheme, g: int, damp: float,
                block: int, act_order: bool, refit: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The sweep, then `refit` rounds of grid refitting (each but the last followed by a
    sweep under the refitted grids): (q int8 [B, N, K], scale [B, N, G], offset or None)."""
    half = 2 ** (scheme.bits - 1)
    shift = 0 if scheme.symmetric else half
    q, scales, lows = _gptq(w, gram, scheme, g, damp, block, act_order=act_order)
    for round_ in range(refit):
        scales, lows = refit_grids(w, q + shift, scales, lows, gram, g,
                                   symmetric=scheme.symmetric, damp=damp)
        if round_ + 1 < refit:
            q, scales, lows = _gptq(w, gram, scheme, g, damp, block, act_order=act_order,
                                    grids=(scales, lows))
    offset = None if scheme.symmetric else (lows + np.float32(half) * scales).astype(np.float32)
    return q, scales, offset


def _gptq(w: np.ndarray, gram: np.ndarray, scheme: QuantScheme, g: int, damp: float,
          block: int, *, act_order: bool = False,
          grids: tuple[np.ndarray, np.ndarray] | None = None
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ of w [B, N, K] float32 under gram [B, K, K]: (q int8 [B, N, K], scale [B, N, G],
    low [B, N, G]) with a weight dequantized as (q + shift) * scale + low (shift 0 when
    symmetric, else 2^(bits-1)). Works on the transpose [B, K, N] so that a column is a
    contiguous row. `grids` (scale, low [B, N, G]) holds every group's grid fixed; with
    `act_order` and no grids, the static grids come from the original weights."""
    from jaxinfer.quant.quantize import importance_weights

    start = time.perf_counter()
    B, N, K = w.shape
    G = K // g
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    # The mse search weighs each input feature by its share of diag H (the activation-aware
    # weights, `quantize.importance_weights`).
    weights = importance_weights(diag)  # [B, K]
    half = 2 ** (scheme.bits - 1)
    shift = 0 if scheme.symmetric else half
    lo_code, hi_code = _code_range(scheme)
    static = grids is not None or act_order
    if static and grids is None:
        grids = _static_grids(w, weights, scheme, g)
    if act_order:  # the most active inputs first (stable: ties keep their order)
        perm = np.argsort(-diag, axis=-1, kind="stable")
    else:
        perm = np.broadcast_to(np.arange(K), (B, K))
    rows = np.arange(B)[:, None]
    U = inverse_cholesky(gram[rows[:, :, None], perm[:, :, None], perm[:, None, :]], damp)
    W = np.ascontiguousarray(np.swapaxes(w, -1, -2)[rows, perm])  # [B, K, N], sweep order
    Q = np.empty((B, K, N), np.int8)
    if static:
        scales = np.ascontiguousarray(np.swapaxes(grids[0], -1, -2), np.float32)  # [B, G, N]
        lows = np.ascontiguousarray(np.swapaxes(grids[1], -1, -2), np.float32)
        invs = np.divide(1.0, scales, out=np.zeros_like(scales), where=scales != 0)
        groups = perm // g  # [B, K]: each swept column's group
        bi = np.arange(B)
    else:
        scales = np.empty((B, G, N), np.float32)
        lows = np.empty((B, G, N), np.float32)
    sub = SUB_BLOCK if g % SUB_BLOCK == 0 else g
    scale = low = inv = None
    for b1 in range(0, K, block):
        b2 = min(b1 + block, K)
        E = np.empty((B, b2 - b1, N), np.float32)  # the block's scaled errors
        for s1 in range(b1, b2, sub):
            s2 = min(s1 + sub, b2)
            if not static and s1 % g == 0:  # a new group: its grid from its current weights
                group = s1 // g
                scale, low, lo_code, hi_code = _group_grid(
                    np.swapaxes(W[:, s1:s1 + g], -1, -2), weights[:, s1:s1 + g], scheme)
                scales[:, group], lows[:, group] = scale, low
                inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
            for j in range(s1, s2):
                if static:
                    scale, low = scales[bi, groups[:, j]], lows[bi, groups[:, j]]
                    inv = invs[bi, groups[:, j]]
                col = W[:, j]
                u = np.clip(np.rint((col - low) * inv), lo_code, hi_code)
                Q[:, j] = u - shift
                err = (col - (u * scale + low)) / U[:, j, j][:, None]
                E[:, j - b1] = err
                if j + 1 < s2:
                    W[:, j + 1:s2] -= U[:, j, j + 1:s2, None] * err[:, None, :]
            if s2 < b2:  # the sub-block's errors onto the rest of the block
                W[:, s2:b2] -= np.swapaxes(U[:, s1:s2, s2:b2], -1, -2) @ E[:, s1 - b1:s2 - b1]
        if b2 < K:  # the block's errors onto the rest of the weight
            W[:, b2:] -= np.swapaxes(U[:, b1:b2, b2:], -1, -2) @ E
    codes = np.empty_like(Q)
    codes[rows, perm] = Q  # back to the input order
    codes, scales, lows = (np.ascontiguousarray(np.swapaxes(a, -1, -2))
                           for a in (codes, scales, lows))
    log.debug("gptq %s: %.1f s", w.shape, time.perf_counter() - start)
    return codes, scales, lows


def _code_range(scheme: QuantScheme) -> tuple[int, int]:
    """The unsigned code range u of the scheme's grids (symmetric rtn keeps the codes
    symmetric, [-qmax, qmax]; the search uses all 2^bits codes)."""
    half = 2 ** (scheme.bits - 1)
    if not scheme.symmetric:
        return 0, 2 * half - 1
    return (-half, half - 1) if scheme.method == "mse" else (-(half - 1), half - 1)


def _static_grids(w: np.ndarray, weights: np.ndarray, scheme: QuantScheme, g: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Every group's grid (scale, low [B, N, G]) from the original weights w [B, N, K]."""
    B, N, K = w.shape
    parts = [_group_grid(w[:, :, k:k + g], weights[:, k:k + g], scheme)[:2]
             for k in range(0, K, g)]
    return (np.stack([p[0] for p in parts], -1).astype(np.float32),
            np.stack([p[1] for p in parts], -1).astype(np.float32))


def refit_grids(w: Any, codes: Any, scale: Any, low: Any, gram: Any, g: int, *,
                symmetric: bool, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Each row's group grids refitted to fixed codes under H: (scale, low [B, N, G]).

    For a row w [K] with unsigned codes u [K] (symmetric: the signed codes) and grids
    (s_a, l_a) per group a, the dequantized row is u_k s_a(k) + l_a(k), linear in the 2G
    grid values. The least-squares fit under the output error (w - w^)^T H (w - w^), H
    dampened as in the sweep, solves a 2G x 2G system per row (G x G when symmetric: low
    stays 0). A row whose solution is not finite, or whose output error it does not lower,
    keeps its grid, so the output error never rises.

    Args:
      w: the original weights [B, N, K]; codes: [B, N, K] (unsigned for asymmetric grids);
      scale, low: the current grids [B, N, G]; gram: H [B, K, K]; g: the group size.
    """
    w, codes = np.asarray(w, np.float32), np.asarray(codes, np.float32)
    h = np.asarray(gram, np.float64)
    K = h.shape[-1]
    diag = np.diagonal(h, axis1=-2, axis2=-1)
    alive = diag > 0
    mean = np.where(alive, diag, 0.0).sum(-1) / np.maximum(alive.sum(-1), 1)
    h = h + (damp * mean)[:, None, None] * np.eye(K)
    scale, low = np.asarray(scale, np.float32), np.asarray(low, np.float32)
    hj = jnp.asarray(h, jnp.float32)
    M, r = _refit_system(jnp.asarray(w), jnp.asarray(codes), hj, g=g, symmetric=symmetric)
    M, r = np.asarray(M, np.float64), np.asarray(r, np.float64)
    G = K // g
    ridge = 1e-9 * np.trace(M, axis1=-2, axis2=-1)[..., None, None] / M.shape[-1]
    with np.errstate(all="ignore"):
        try:
            theta = np.linalg.solve(M + ridge * np.eye(M.shape[-1]), r[..., None])[..., 0]
        except np.linalg.LinAlgError:  # a singular row somewhere: solve row by row
            pairs = zip(M.reshape(-1, *M.shape[-2:]), r.reshape(-1, r.shape[-1]), strict=True)
            theta = np.stack([_solve_or_nan(m, v) for m, v in pairs]).reshape(r.shape)
    ok = np.isfinite(theta).all(-1, keepdims=True)
    new_scale = np.where(ok, theta[..., :G], scale).astype(np.float32)
    new_low = low if symmetric else np.where(ok, theta[..., G:], low).astype(np.float32)
    old_err = _row_errors(jnp.asarray(w), jnp.asarray(codes), jnp.asarray(scale),
                          jnp.asarray(low), hj, g=g)
    new_err = _row_errors(jnp.asarray(w), jnp.asarray(codes), jnp.asarray(new_scale),
                          jnp.asarray(new_low), hj, g=g)
    better = np.asarray(new_err < old_err)[..., None]
    return np.where(better, new_scale, scale), np.where(better, new_low, low)


def _solve_or_nan(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    try:
        return np.linalg.solve(m, v)
    except np.linalg.LinAlgError:
        return np.full_like(v, np.nan)


@functools.partial(jax.jit, static_argnames=("g", "symmetric"))
def _refit_system(w: jax.Array, u: jax.Array, h: jax.Array, *, g: int, symmetric: bool
                  ) -> tuple[jax.Array, jax.Array]:
    """The normal equations (M [B, N, P, P], r [B, N, P]) of each row's grid values
    (P = G scales, then G lows unless symmetric) for codes u under H, one matrix at a
    time."""
    hp = jax.lax.Precision.HIGHEST

    def one(args: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        w, u, h = args  # [N, K], [N, K], [K, K]
        N, K = w.shape
        G = K // g
        hb = h.reshape(K, G, g)
        ug = u.reshape(N, G, g)
        # V[n, k, c] = sum_{j in group c} H[k, j] u[n, j]
        V = jnp.einsum("kcj,ncj->nkc", hb, ug, precision=hp).reshape(N, G, g, G)
        S = jnp.einsum("nai,naic->nac", ug, V, precision=hp)  # u_a^T H_ac u_c
        hw = jnp.einsum("kj,nj->nk", h, w, precision=hp).reshape(N, G, g)
        r_s = (ug * hw).sum(-1)
        if symmetric:
            return S, r_s
        Hs = hb.sum(-1).reshape(G, g, G)  # sum_{j in group c} H[k, j], k by group
        C = jnp.einsum("nai,aic->nac", ug, Hs, precision=hp)  # u_a^T H_ac 1
        O = jnp.broadcast_to(Hs.sum(1)[None], (N, G, G))  # 1^T H_ac 1
        M = jnp.concatenate([jnp.concatenate([S, C], -1),
                             jnp.concatenate([jnp.swapaxes(C, -1, -2), O], -1)], -2)
        return M, jnp.concatenate([r_s, hw.sum(-1)], -1)

    return jax.lax.map(one, (w, u, h))


@functools.partial(jax.jit, static_argnames=("g",))
def _row_errors(w: jax.Array, u: jax.Array, scale: jax.Array, low: jax.Array, h: jax.Array,
                *, g: int) -> jax.Array:
    """Each row's output error (w - w^)^T H (w - w^) [B, N] for codes u and grids."""
    hp = jax.lax.Precision.HIGHEST

    def one(args: tuple[jax.Array, ...]) -> jax.Array:
        w, u, scale, low, h = args
        d = w - (u * jnp.repeat(scale, g, -1) + jnp.repeat(low, g, -1))
        return jnp.einsum("nk,nk->n", jnp.einsum("nj,kj->nk", d, h, precision=hp), d,
                          precision=hp)

    return jax.lax.map(one, (w, u, scale, low, h))


def _group_grid(w: np.ndarray, weights: np.ndarray, scheme: QuantScheme
                ) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The grid of one group of columns w [B, N, g]: (scale [B, N], low [B, N], lo_code,
    hi_code), a column quantized as u = clip(round((w - low) / scale), lo_code, hi_code)
    and dequantized as u * scale + low. `rtn` and `mse` as in `quantize_array`."""
    from jaxinfer.quant.quantize import _search

    half = 2 ** (scheme.bits - 1)
    if scheme.method == "mse":
        a = np.broadcast_to(weights[:, None, None, :], (*w.shape[:2], 1, w.shape[2]))
        _, scale, low = _search(jnp.asarray(w[:, :, None, :]), jnp.asarray(a),
                                bits=scheme.bits, symmetric=scheme.symmetric)
        scale = np.asarray(scale, np.float32)[:, :, 0]
        low = np.asarray(low, np.float32)[:, :, 0]
        lo_code, hi_code = (-half, half - 1) if scheme.symmetric else (0, 2 * half - 1)
        return scale, low, lo_code, hi_code
    if scheme.symmetric:
        qmax = half - 1
        scale = (np.max(np.abs(w), axis=-1) / np.float32(qmax)).astype(np.float32)
        return scale, np.zeros_like(scale), -qmax, qmax
    low, high = np.min(w, axis=-1), np.max(w, axis=-1)
    scale = ((high - low) / np.float32(2 * half - 1)).astype(np.float32)
    return scale, low.astype(np.float32), 0, 2 * half - 1
