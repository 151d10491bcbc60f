"""Ring attention: causal self-attention of one long prompt sharded along the `sequence` axis.

Each device keeps its query block and passes its key/value block around the ring (Li et al.,
"Sequence Parallelism: Long Sequence Training from System Perspective"), so no device ever
holds the whole sequence's keys or a T x T score matrix.

Dimensions: T tokens, R tokens per device (T / n), H query heads, K KV heads, G = H // K,
E head dim, n devices on the ring; `s` indexes key tokens in einsum strings.

Layout contract ("ring layout"): along T, the arrays are split into n equal contiguous
shards, shard d on ring position d. With zigzag=True the token order is the zigzag one:
the natural sequence is cut into 2n chunks and shard d holds chunks d and 2n-1-d, so under
a causal mask every device does the same work. Only attention mixes tokens, so a model
prefill permutes its token ids and positions once (`to_zigzag` / `ring_positions`) and keeps
every activation in ring layout; `ring_attention_natural` is the convenience for callers
holding natural-order arrays.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer.errors import InputError

try:
    from jax import shard_map as _shard_map

    _CHECK_KEYWORD = "check_vma"
except ImportError:  # jax releases before the top-level alias
    from jax.experimental.shard_map import shard_map as _shard_map

    _CHECK_KEYWORD = "check_rep"

# (q [R,H,E], k [S,K,E], v [S,K,E], q_positions [R], k_positions [S], *, sm_scale, causal,
#  sliding_window, soft_cap) -> (out f32 [R,H,E], logsumexp f32 [R,H])
BlockFn = Callable[..., tuple[jax.Array, jax.Array]]


# ---------------------------------------------------------------------------- zigzag layout


def _check_divisible(seq_len: int, n: int, multiple: int, what: str) -> None:
    if n < 1 or seq_len % multiple:
        raise InputError(f"{what}: sequence length {seq_len} is not a multiple of {multiple} "
                         f"(ring of {n}); pad the sequence first (ring_attention_natural does)")


def zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """Natural index of each zigzag slot: `x_zigzag = x[perm]`; shard d = chunks d, 2n-1-d.

    Args:
      seq_len: T, a multiple of 2n (pad the caller's sequence to one).
      n: ring size.

    Returns:
      int32 [T]. It is also the position of each ring-layout token of a prompt starting
      at position 0 (see `ring_positions`).
    """
    _check_divisible(seq_len, n, 2 * n, "zigzag_permutation")
    chunks = np.arange(seq_len, dtype=np.int32).reshape(2 * n, seq_len // (2 * n))
    order = np.stack([np.arange(n), 2 * n - 1 - np.arange(n)], axis=1).reshape(-1)
    return chunks[order].reshape(-1)


def inverse_zigzag_permutation(seq_len: int, n: int) -> np.ndarray:
    """Zigzag slot of each natural index: `x = x_zigzag[inverse]`."""
    return np.argsort(zigzag_permutation(seq_len, n)).astype(np.int32)


def to_zigzag(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
    """Natural order -> zigzag order along `axis` (slices and a reverse, no gather).

    The length along `axis` must be a multiple of 2n; pad in the caller.
    """
    x = jnp.moveaxis(x, axis, 0)
    T, rest = x.shape[0], x.shape[1:]
    _check_divisible(T, n, 2 * n, "to_zigzag")
    chunks = x.reshape(2 * n, T // (2 * n), *rest)
    pairs = jnp.stack([chunks[:n], jnp.flip(chunks[n:], axis=0)], axis=1)  # [n, 2, T/2n, ...]
    return jnp.moveaxis(pairs.reshape(T, *rest), 0, axis)


def from_zigzag(x: jax.Array, n: int, axis: int = 0) -> jax.Array:
    """Zigzag order -> natural order along `axis`; inverse of `to_zigzag`."""
    x = jnp.moveaxis(x, axis, 0)
    T, rest = x.shape[0], x.shape[1:]
    _check_divisible(T, n, 2 * n, "from_zigzag")
    pairs = x.reshape(n, 2, T // (2 * n), *rest)
    chunks = jnp.concatenate([pairs[:, 0], jnp.flip(pairs[:, 1], axis=0)], axis=0)
    return jnp.moveaxis(chunks.reshape(T, *rest), 0, axis)


def ring_positions(seq_len: int, n: int, *, zigzag: bool = True, start: int = 0) -> np.ndarray:
    """Global position of each ring-layout token of a prompt segment starting at `start`.

    These are the positions RoPE needs and the slots where the caller writes each device's
    K/V shard into the KV cache (position p goes to page p // C, row p % C).
    """
    natural = np.arange(seq_len, dtype=np.int32)
    if zigzag:
        natural = zigzag_permutation(seq_len, n)
    else:
        _check_divisible(seq_len, n, n, "ring_positions")
    return natural + np.int32(start)


# ---------------------------------------------------------------------------- block attention


def block_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, q_positions: jax.Array, k_positions: jax.Array,
    *, sm_scale: float, causal: bool, sliding_window: jax.Array | None, soft_cap: float | None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of a query block over one key/value block, masked by global positions.

    Args:
      q: [R, H, E]; k, v: [S, K, E]; q_positions: [R]; k_positions: [S]. Negative
        positions mark padding (never attended; such query rows come out zero).

    Returns:
      (out f32 [R, H, E], logsumexp f32 [R, H]); rows with no visible key give out 0 and
      logsumexp -inf, which `merge_partials` treats as "no contribution".
    """
    R, H, E = q.shape
    K = k.shape[1]
    G = H // K
    qs = q.astype(jnp.float32).reshape(R, K, G, E)
    scores = jnp.einsum("rkge,ske->rkgs", qs, k.astype(jnp.float32)) * sm_scale
    if soft_cap is not None:
        scores = jnp.tanh(scores / soft_cap) * soft_cap
    qp, kp = q_positions[:, None], k_positions[None, :]
    mask = (qp >= 0) & (kp >= 0)
    if causal:
        mask &= kp <= qp
    if sliding_window is not None:
        mask &= (qp - kp) < sliding_window
    scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    # A fully masked row has max -inf; shifting by 0 instead keeps exp() at 0, not NaN.
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    probs = jnp.exp(scores - row_max)
    row_sum = jnp.sum(probs, axis=-1, keepdims=True)
    out = jnp.einsum("rkgs,ske->rkge", probs, v.astype(jnp.float32))
    out = out / jnp.where(row_sum > 0, row_sum, 1.0)
    lse = jnp.where(row_sum > 0, row_max + jnp.log(jnp.where(row_sum > 0, row_sum, 1.0)),
                    -jnp.inf)
    return out.reshape(R, H, E), lse.reshape(R, H)


def merge_partials(out_a: jax.Array, lse_a: jax.Array, out_b: jax.Array,
                   lse_b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Combine two normalised partial attentions [R, H, E] with their logsumexps [R, H].

    Safe when either or both are fully masked (logsumexp -inf): no NaN, out stays 0.
    """
    lse = jnp.logaddexp(lse_a, lse_b)
    shift = jnp.where(jnp.isfinite(lse), lse, 0.0)
    weight_a = jnp.exp(lse_a - shift)[..., None]
    weight_b = jnp.exp(lse_b - shift)[..., None]
    return out_a * weight_a + out_b * weight_b, lse


# ---------------------------------------------------------------------------- the ring


def _visiting_block(attend: Callable, q, k, v, q_pos, k_pos, source, index, *, causal: bool,
                    zigzag: bool) -> tuple[jax.Array, jax.Array]:
    """Attention of the local queries over the K/V block of another ring position.

    Under a causal mask with positions increasing along the natural order, half of the
    work of each off-diagonal zigzag pair is fully masked and skipped; in contiguous
    layout a later block is skipped whole. The position masks still apply to the rest
    (sliding window, padding), so skipping changes cost, never the result.
    """
    if not causal:
        return attend(q, k, v, q_pos, k_pos)
    R = q.shape[0]
    half = R // 2

    def nothing():
        # lax.full_like keeps q's varying axes (ring, heads); a plain constant would not
        # match the other branch's type (the alternative is lax.pcast(..., to="varying")).
        return (lax.full_like(q, 0, jnp.float32),
                lax.full_like(q[:, :, 0], -jnp.inf, jnp.float32))

    if not zigzag:
        return lax.cond(source < index, lambda: attend(q, k, v, q_pos, k_pos), nothing)

    def earlier_source():
        # Its chunk `source` precedes both local chunks; its late chunk follows both.
        return attend(q, k[:half], v[:half], q_pos, k_pos[:half])

    def later_source():
        # Both its chunks lie between the local early and late chunk: only the late
        # local queries see them.
        out, lse = attend(q[half:], k, v, q_pos[half:], k_pos)
        skipped_out, skipped_lse = nothing()
        return (jnp.concatenate([skipped_out[:half], out], axis=0),
                jnp.concatenate([skipped_lse[:half], lse], axis=0))

    return lax.cond(source < index, earlier_source, later_source)


def _ring_local(q, k, v, positions, window, *, axis_name: str, n: int, causal: bool,
                zigzag: bool, sm_scale: float, soft_cap: float | None,
                block_fn: BlockFn) -> jax.Array:
    """Per-device body: q [R,H,E], k/v [R,K,E], positions [R] of this ring position."""
    attend = functools.partial(block_fn, sm_scale=sm_scale, causal=causal,
                               sliding_window=window, soft_cap=soft_cap)
    out, lse = attend(q, k, v, positions, positions)  # own block: the diagonal
    if n == 1:
        return out.astype(q.dtype)
    index = lax.axis_index(axis_name)
    ring = [(i, (i + 1) % n) for i in range(n)]

    def visit(step, held, out, lse):
        k_held, v_held, pos_held = held
        source = (index - step) % n
        part = _visiting_block(attend, q, k_held, v_held, positions, pos_held, source, index,
                               causal=causal, zigzag=zigzag)
        return merge_partials(out, lse, *part)

    def body(step, carry):
        held, out, lse = carry
        # Start passing the held block on before using it, so the transfer overlaps the
        # block's attention.
        arriving = lax.ppermute(held, axis_name, ring)
        out, lse = visit(step, held, out, lse)
        return arriving, out, lse

    # Every carry is derived from this device's shards, so it is already varying over the
    # ring axis (no lax.pcast needed); the last block arrives without being sent on.
    held = lax.ppermute((k, v, positions), axis_name, ring)
    held, out, lse = lax.fori_loop(1, n - 1, body, (held, out, lse))
    out, _ = visit(n - 1, held, out, lse)
    return out.astype(q.dtype)


def ring_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis_name: str = "sequence",
    sm_scale: float, causal: bool = True, zigzag: bool = True,
    sliding_window: int | jax.Array | None = None, soft_cap: float | None = None,
    positions: jax.Array | None = None, head_axis: str | None = None,
    block_fn: BlockFn | None = None, check_vma: bool = True,
) -> jax.Array:
    """Self-attention of one sequence whose tokens are sharded over the `axis_name` ring.

    Inputs and output are in ring layout (module docstring): T split into n contiguous
    shards over `axis_name`, zigzag-ordered when `zigzag`. Arrays not yet sharded that way
    are resharded with a `NamedSharding` (free when they already are). Other mesh axes are
    untouched: the computation is replicated over them, except that heads are split over
    `head_axis` when given (K must divide by its size; query head h uses KV head h // G).

    Only attention is computed: this function neither gathers nor returns keys and values.
    The caller owns its k/v shards and writes them to the KV cache at `positions` (or
    `ring_positions(...)`), each device writing its own shard.

    Args:
      q: [T, H, E]; k, v: [T, K, E], in ring layout. T must be a multiple of 2n (zigzag)
        or n; pad at the end with negative positions (`ring_attention_natural` does).
      mesh: a mesh with an `axis_name` axis of size n.
      sm_scale: score scale; soft_cap: `tanh(s / cap) * cap` after scaling.
      causal: mask keys after the query. Zigzag skipping assumes `positions` increase
        along the natural order (one prompt segment), negatives marking padding.
      sliding_window: keys with `q_pos - k_pos >= window` are masked (needs causal).
      positions: int [T] global positions in ring layout; default `ring_positions(T, n)`.
      block_fn: replaces `block_attention` (same signature), e.g. by a kernel; a Pallas
        kernel in interpret mode needs `check_vma=False`.

    Returns:
      [T, H, E] in q's dtype and ring layout, sharded like q.
    """
    T, H, E = q.shape
    if k.shape != v.shape or k.ndim != 3 or k.shape[0] != T or k.shape[2] != E:
        raise InputError(f"ring_attention: k {k.shape} and v {v.shape} must be [T, K, E] "
                         f"with q {q.shape}")
    if H % k.shape[1]:
        raise InputError(f"ring_attention: {H} query heads are not a multiple of "
                         f"{k.shape[1]} KV heads")
    if sliding_window is not None and not causal:
        raise InputError("ring_attention: sliding_window needs causal=True")
    if axis_name not in mesh.shape:
        raise InputError(f"ring_attention: mesh axes {tuple(mesh.shape)} lack {axis_name!r}")
    n = mesh.shape[axis_name]
    _check_divisible(T, n, 2 * n if zigzag else n, "ring_attention")
    if head_axis is not None and k.shape[1] % mesh.shape[head_axis]:
        raise InputError(f"ring_attention: {k.shape[1]} KV heads do not split over "
                         f"{head_axis!r} of size {mesh.shape[head_axis]}")
    if positions is None:
        positions = jnp.asarray(ring_positions(T, n, zigzag=zigzag))

    token_spec, position_spec = P(axis_name, head_axis, None), P(axis_name)
    q, k, v = (jax.device_put(x, NamedSharding(mesh, token_spec)) for x in (q, k, v))
    positions = jax.device_put(positions.astype(jnp.int32), NamedSharding(mesh, position_spec))
    args, in_specs = [q, k, v, positions], [token_spec, token_spec, token_spec, position_spec]
    if sliding_window is not None:
        args.append(jnp.asarray(sliding_window, jnp.int32))
        in_specs.append(P())

    body = functools.partial(
        _ring_local, axis_name=axis_name, n=n, causal=causal, zigzag=zigzag,
        sm_scale=sm_scale, soft_cap=soft_cap, block_fn=block_fn or block_attention)

    def local(q, k, v, positions, window=None):
        return body(q, k, v, positions, window)

    mapped = _shard_map(local, mesh=mesh, in_specs=tuple(in_specs), out_specs=token_spec,
                        **{_CHECK_KEYWORD: check_vma})
    return mapped(*args)


def ring_attention_natural(
    q: jax.Array, k: jax.Array, v: jax.Array, *, mesh: Mesh, axis_name: str = "sequence",
    zigzag: bool = True, positions: jax.Array | None = None, **kwargs,
) -> jax.Array:
    """`ring_attention` for natural-order q [T, H, E], k/v [T, K, E] of any length T.

    Pads T to the ring's multiple (padding gets position -1), permutes to ring layout,
    and undoes both on the output. The permutations move data between devices; a model
    that keeps activations in ring layout calls `ring_attention` directly instead.
    `positions` ([T], natural order) defaults to 0..T-1; other keywords are forwarded.
    """
    T = q.shape[0]
    n = mesh.shape[axis_name]
    multiple = 2 * n if zigzag else n
    pad = -T % multiple
    if positions is None:
        positions = jnp.arange(T, dtype=jnp.int32)
    positions = jnp.pad(positions.astype(jnp.int32), (0, pad), constant_values=-1)
    q, k, v = (jnp.pad(x, ((0, pad), (0, 0), (0, 0))) for x in (q, k, v))
    if zigzag:
        q, k, v, positions = (to_zigzag(x, n) for x in (q, k, v, positions))
    out = ring_attention(q, k, v, mesh=mesh, axis_name=axis_name, zigzag=zigzag,
                         positions=positions, **kwargs)
    if zigzag:
        out = from_zigzag(out, n)
    return out[:T]
