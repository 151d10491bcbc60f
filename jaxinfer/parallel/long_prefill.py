"""Long-prompt prefill over the `sequence` mesh axis: ring attention, sharded KV cache.

The prompt's tokens are placed in zigzag ring layout (device d holds chunks d and 2n-1-d of
2n equal chunks, `jaxinfer.parallel.ring`), so every per-token computation (embedding,
projections, MLP) runs on each device's own tokens and attention is the ring. Keys and
values go straight into a KV pool whose pages are sharded over the same axis: the prompt's
pages are chosen (`ring_pages`) so that each page lives on the device that holds its tokens,
and each device writes its own shard (no device ever holds more than its share of the
sequence's activations or KV). Decode then continues from that cache with the ordinary
`forward` on the same mesh (GSPMD partitions the page gather; see docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxinfer.cache.paged import KVCache
from jaxinfer.config import ModelConfig
from jaxinfer.errors import CapacityError, InputError
from jaxinfer.model.transformer import Batch, LayerHooks, compute_logits, hidden_states
from jaxinfer.parallel.ring import ring_attention, zigzag_permutation
from jaxinfer.parallel.sharding import ShardingRules


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Where a prompt of `num_tokens` lives on an n-device ring.

    Attributes:
      padded: tokens after padding to 2n chunks of whole pages.
      chunk: tokens per zigzag chunk (a multiple of the page size).
      pages: the prompt's page ids in position order (page i holds positions i*C..i*C+C-1);
        each on the device that holds those positions.
      permutation: ring-layout index -> natural position (`x_ring = x_natural[perm]`).
    """

    num_tokens: int
    n: int
    page_size: int
    padded: int
    chunk: int
    pages: tuple[int, ...]
    permutation: np.ndarray


def ring_pages(num_tokens: int, n: int, page_size: int, num_pages: int) -> RingLayout:
    """Lay a prompt out on an n-device ring and pick its pages from a page-sharded pool.

    The pool's pages are split evenly over the ring (device d owns pages d*NP/n ..); the
    prompt uses the first pages of each device's range.
    """
    if num_pages % n:
        raise InputError(f"the KV pool has {num_pages} pages, not a multiple of the "
                         f"{n}-device sequence axis; size it in multiples of {n} pages")
    per_device = num_pages // n
    pages_per_chunk = -(-num_tokens // (2 * n * page_size))
    chunk = pages_per_chunk * page_size
    if 2 * pages_per_chunk > per_device:
        raise CapacityError(
            f"a {num_tokens}-token prompt needs {2 * pages_per_chunk} pages per device, each "
            f"device owns {per_device}; give the pool at least {2 * pages_per_chunk * n} pages")
    pages = []
    for i in range(2 * n * pages_per_chunk):
        c, within = divmod(i, pages_per_chunk)  # chunk, page within chunk
        device, local_chunk = (c, 0) if c < n else (2 * n - 1 - c, 1)
        pages.append(device * per_device + local_chunk * pages_per_chunk + within)
    padded = 2 * n * chunk
    return RingLayout(num_tokens, n, page_size, padded, chunk, tuple(pages),
                      zigzag_permutation(padded, n))


def cache_sharding(mesh: Mesh, cache_shape: Sequence[int], *, axis_name: str = "sequence",
                   rules: ShardingRules | None = None) -> NamedSharding:
    """The KV pool [L, NP, C, K, E] with pages over `axis_name` (heads as `rules` say)."""
    rules = (rules or ShardingRules()).replace(cache_pages=axis_name)
    return rules.cache_sharding(mesh, cache_shape)


def ring_prefill(
    params: Any, cfg: ModelConfig, cache: KVCache, token_ids: Sequence[int], *, mesh: Mesh,
    axis_name: str = "sequence", rules: ShardingRules | None = None,
) -> tuple[jax.Array, KVCache, RingLayout]:
    """Prefill one long prompt over the ring; return its last token's logits [V] (float32),
    the cache holding its keys/values, and the layout (its `pages` continue in decode).

    The cache is placed with its pages over `axis_name` (`cache_sharding`); keep it there
    for the decode steps.
    """
    n = mesh.shape[axis_name]
    T = len(token_ids)
    if T < 1:
        raise InputError("the prompt is empty")
    if cfg.max_position_embeddings < T:
        raise InputError(f"the prompt has {T} tokens, more than the model's context of "
                         f"{cfg.max_position_embeddings}")
    if cfg.matmul_impl == "cpu":  # native single-device custom call: GSPMD would replicate it
        cfg = cfg.replace(matmul_impl="xla")
    layout = ring_pages(T, n, cache.page_size, cache.num_pages)
    C, perm, Tp = cache.page_size, layout.permutation, layout.padded
    positions = np.arange(Tp, dtype=np.int32)
    positions = np.where(positions < T, positions, -1)
    tokens = np.zeros(Tp, np.int32)
    tokens[:T] = np.asarray(token_ids, np.int32)
    # Each ring-layout token's slot in its device's local page range (padding: dropped).
    per_device = cache.num_pages // n
    page_of = np.asarray(layout.pages, np.int64)[np.arange(Tp) // C]
    local_slot = (page_of % per_device) * C + np.arange(Tp) % C
    local_slot = np.where(positions >= 0, local_slot, per_device * C).astype(np.int32)

    spec = cache_sharding(mesh, cache.k.shape, axis_name=axis_name, rules=rules).spec
    token_spec = PartitionSpec(axis_name)
    put = functools.partial(jax.device_put, device=NamedSharding(mesh, token_spec))
    cache = jax.device_put(cache, NamedSharding(mesh, spec))
    logits, cache = _ring_prefill_jit(params, cfg, cache, put(tokens[perm]),
                                      put(positions[perm]), put(local_slot[perm]), T - 1,
                                      mesh=mesh, axis_name=axis_name, cache_spec=spec)
    return logits, cache, layout


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "axis_name", "cache_spec"),
                   donate_argnames=("cache",))
def _ring_prefill_jit(params: Any, cfg: ModelConfig, cache: KVCache, tokens: jax.Array,
                      positions: jax.Array, local_slots: jax.Array, last: int | jax.Array, *,
                      mesh: Mesh, axis_name: str, cache_spec: PartitionSpec) -> tuple:
    Tp = tokens.shape[0]
    head_axis = cache_spec[3] if len(cache_spec) > 3 else None
    kv_spec = PartitionSpec(axis_name, head_axis, None)

    def write_local(kc, vc, layer, slots, k, v):
        C = kc.shape[2]
        page, offset = slots // C, slots % C
        return (kc.at[layer, page, offset].set(k.astype(kc.dtype), mode="drop"),
                vc.at[layer, page, offset].set(v.astype(vc.dtype), mode="drop"))

    def write_kv(k_cache, v_cache, layer, k, v, batch):
        return jax.shard_map(
            write_local, mesh=mesh,
            in_specs=(cache_spec, cache_spec, PartitionSpec(), PartitionSpec(axis_name),
                      kv_spec, kv_spec),
            out_specs=(cache_spec, cache_spec))(k_cache, v_cache, layer, local_slots, k, v)

    def attend(cfg, q, k, v, k_cache, v_cache, layer, batch, window):
        return ring_attention(q, k, v, mesh=mesh, axis_name=axis_name,
                              sm_scale=cfg.attention_scale, causal=True, zigzag=True,
                              sliding_window=window, soft_cap=cfg.attn_logit_softcap,
                              positions=positions, head_axis=head_axis)

    zeros = jnp.zeros((1,), jnp.int32)
    batch = Batch(tokens=tokens, positions=positions, slot_mapping=local_slots,
                  query_start=jnp.asarray([0, Tp], jnp.int32), kv_lens=jnp.full((1,), Tp),
                  page_table=zeros[None], logits_indices=zeros, max_query_len=Tp)
    x, cache = hidden_states(params, cfg, batch, cache, LayerHooks(write_kv, attend))
    # The last prompt token's row, as a masked sum: an all-reduce of one row, never a
    # gather of the sequence.
    x_last = jnp.sum(jnp.where((positions == last)[:, None], x, jnp.zeros((), x.dtype)), axis=0)
    return compute_logits(params, cfg, x_last[None])[0], cache


def prefill_by_plan(params: Any, cfg: ModelConfig, prompts: Sequence[Sequence[int]], plan: Any,
                    *, devices: Sequence[jax.Device] | None = None,
                    page_size: int = 16) -> list[jax.Array]:
    """Execute an adaptive sequence-parallel plan (`jaxinfer.parallel.adaptive`).

    Each prompt runs where the plan put it: split prompts as a ring prefill over their group
    of devices (a sub-mesh), whole prompts as an ordinary prefill on their one device. Work
    on different devices is dispatched without waiting, so it overlaps. Each placement gets
    its own KV pool on its devices (sized to the prompt); returns the last-token logits [V]
    of every prompt, in batch order.
    """
    from jaxinfer.batch import SequenceChunk, build_step_batch
    from jaxinfer.cache import init_cache
    from jaxinfer.model.transformer import forward
    from jaxinfer.parallel.sharding import make_mesh

    devices = list(jax.devices() if devices is None else devices)
    if plan.num_devices != len(devices):
        raise InputError(f"the plan is for {plan.num_devices} devices, {len(devices)} given")
    if len(plan.placements) != len(prompts):
        raise InputError(f"the plan places {len(plan.placements)} prompts, {len(prompts)} given")
    if cfg.matmul_impl == "cpu" or cfg.attention_impl == "cpu":
        cfg = cfg.replace(matmul_impl="xla", attention_impl="xla")
    step_fn = jax.jit(forward, static_argnums=1)
    outputs: list[jax.Array | None] = [None] * len(prompts)
    on_device: dict[Any, Any] = {}
    for place in plan.placements:
        prompt = list(prompts[place.sequence])
        group = devices[place.first_device:place.first_device + place.num_devices]
        if place.num_devices > 1:
            mesh = make_mesh(1, 1, len(group), devices=group)
            n = len(group)
            pages = 2 * n * -(-len(prompt) // (2 * n * page_size))
            replicated = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
            logits, _, _ = ring_prefill(replicated, cfg, init_cache(cfg, pages, page_size),
                                        prompt, mesh=mesh)
            outputs[place.sequence] = logits
        else:
            device = group[0]
            if device not in on_device:
                on_device[device] = jax.device_put(params, device)
            pages = -(-len(prompt) // page_size)
            step = build_step_batch([SequenceChunk(prompt, 0, list(range(pages)))],
                                    page_size=page_size, num_slots=pages * page_size)
            cache = jax.device_put(init_cache(cfg, pages, page_size), device)
            batch = jax.device_put(Batch.from_step(step), device)
            logits, _ = step_fn(on_device[device], cfg, batch, cache)
            outputs[place.sequence] = logits[0]
    return outputs  # type: ignore[return-value]


# ------------------------------------------------------------------ decode over a page-sharded pool

def sequence_parallel_decode_hooks(mesh: Mesh, cache_spec: PartitionSpec, *,
                                   axis_name: str = "sequence") -> LayerHooks:
    """Decode attention over a KV pool whose pages are split over `axis_name`.

    Each device attends the decode queries to the keys on its own pages only and returns a
    partial softmax (output and log-sum-exp); the partials merge with one `pmax` and two
    `psum`s of [S, H, E]-sized arrays. No device reads another's pages (GSPMD's generic
    partitioning of the page gather would bring every page of a layer to every device).
    Batches must be decode-only (one token per sequence, token s of sequence s).
    """
    head_axis = cache_spec[3] if len(cache_spec) > 3 else None
    q_spec = PartitionSpec(None, head_axis, None)

    def local(q, k_cache, v_cache, layer, kv_lens, page_table, window, *, sm_scale, soft_cap):
        per_device = k_cache.shape[1]
        first = jax.lax.axis_index(axis_name) * per_device
        local_ids = page_table - first
        owned = (local_ids >= 0) & (local_ids < per_device)  # [S, P]
        k = k_cache[layer][jnp.clip(local_ids, 0, per_device - 1)]  # [S, P, C, K, E]
        v = v_cache[layer][jnp.clip(local_ids, 0, per_device - 1)]
        S, P, C, K, E = k.shape
        H = q.shape[1]
        G = H // K
        k = k.reshape(S, P * C, K, E).astype(jnp.float32)
        v = v.reshape(S, P * C, K, E).astype(jnp.float32)
        pos = jnp.arange(P * C, dtype=jnp.int32)
        mask = jnp.repeat(owned, C, axis=1) & (pos[None, :] < kv_lens[:, None])
        mask &= (kv_lens[:, None] - 1 - pos[None, :]) < window
        qs = q.reshape(S, K, G, E).astype(jnp.float32)
        scores = jnp.einsum("skge,snke->skgn", qs, k) * sm_scale
        if soft_cap is not None:
            scores = jnp.tanh(scores / soft_cap) * soft_cap
        scores = jnp.where(mask[:, None, None, :], scores, -jnp.inf)
        m_local = jnp.max(scores, axis=-1)  # [S, K, G]
        m = jax.lax.pmax(m_local, axis_name)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(scores - m[..., None])
        num = jax.lax.psum(jnp.einsum("skgn,snke->skge", p, v), axis_name)
        den = jax.lax.psum(jnp.sum(p, axis=-1), axis_name)
        out = num / jnp.where(den > 0, den, 1.0)[..., None]
        return out.reshape(S, H, E).astype(q.dtype)

    def attend(cfg, q, k, v, k_cache, v_cache, layer, batch, window):
        if window is None:
            window = jnp.int32(1 << 30)
        f = functools.partial(local, sm_scale=cfg.attention_scale, soft_cap=cfg.attn_logit_softcap)
        return jax.shard_map(
            f, mesh=mesh,
            in_specs=(q_spec, cache_spec, cache_spec, PartitionSpec(), PartitionSpec(),
                      PartitionSpec(), PartitionSpec()),
            out_specs=q_spec)(q, k_cache, v_cache, layer, batch.kv_lens, batch.page_table,
                              jnp.asarray(window, jnp.int32))

    return LayerHooks(attend=attend)
