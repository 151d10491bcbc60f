"""RazorAttention on tiny random models and on synthetic keys.

With no token dropped it reproduces the full cache; its arrays have the analytic size (R
retrieval heads full, the others sink + window + a compensation token); the compensation
token is the running mean of every dropped key and value and attends as `count` copies;
retrieval heads are the ones that attend like induction heads.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.kvcompress.attend import PrefillStats
from jaxinfer.kvcompress.model import decode_step, prefill
from jaxinfer.kvcompress.policies import DecodeContext, PrefillContext
from jaxinfer.kvcompress.razor import (
    RazorAttention,
    find_retrieval_heads,
    induction_scores,
    num_retrieval_heads,
)
from jaxinfer.kvcompress.registry import make_policy
from jaxinfer.kvcompress.slots import nbytes
from jaxinfer.model.params import init_params
from tests.model.test_forward import CONFIGS

LENGTHS = (9, 6)
STEPS = 5
MAX_LEN = 16
TOL = 2e-5

# gemma3's tiny config has one KV head; with two it has retrieval and other heads side by
# side on sliding and full layers. llama shares one head set over its layers (static
# indices), gemma3 has one per layer (gathered by the traced layer index).
MODELS = {
    "llama": (CONFIGS["llama"], ((1,), (1,))),
    "gemma3": (dataclasses.replace(CONFIGS["gemma3"], num_kv_heads=2), ((1,), (0,), (1,))),
}


def _run(params, cfg, policy, seed=0):
    """Ragged prefill of LENGTHS then STEPS decode steps: logits [S, STEPS + 1, V], state."""
    rng = np.random.default_rng(seed)
    toks = rng.integers(0, cfg.vocab_size, (len(LENGTHS), max(LENGTHS) + STEPS)).astype(np.int32)
    lengths = jnp.asarray(LENGTHS, jnp.int32)
    logits, state = prefill(params, cfg, policy, jnp.asarray(toks[:, :max(LENGTHS)]), lengths)
    out = [np.asarray(logits)]
    for j in range(STEPS):
        feed = jnp.asarray(toks[np.arange(len(LENGTHS)), np.asarray(LENGTHS) + j])
        logits, state = decode_step(params, cfg, policy, feed, state)
        out.append(np.asarray(logits))
    return np.stack(out, 1), state


@pytest.mark.parametrize("name", sorted(MODELS))
def test_no_drop_reproduces_full_cache_and_shrinks(name):
    cfg, heads = MODELS[name]
    params = init_params(cfg, seed=3, scale=0.3)
    full_logits, full_state = _run(params, cfg, make_policy("full", max_len=MAX_LEN))
    # sink + window covers every token of prompt + decode: nothing is dropped.
    razor = RazorAttention(max_len=MAX_LEN, window=MAX_LEN - 2, sink=2, retrieval_heads=heads)
    logits, state = _run(params, cfg, razor)
    np.testing.assert_allclose(logits, full_logits, atol=TOL, rtol=0)
    assert np.all(np.asarray(state.cache.comp_count) == 0)

    # Smaller windows: the analytic size (shapes only, nothing to run), below the full cache.
    small = dataclasses.replace(razor, window=4)
    shapes = jax.eval_shape(lambda p, t, n: prefill(p, cfg, small, t, n)[1].cache, params,
                            jnp.zeros((2, max(LENGTHS)), jnp.int32),
                            jnp.asarray(LENGTHS, jnp.int32))
    itemsize = jnp.dtype(cfg.dtype).itemsize
    expect = small.state_bytes(cfg.num_layers, len(LENGTHS), cfg.num_kv_heads, cfg.head_dim,
                               itemsize)
    assert nbytes(shapes) == expect < nbytes(full_state.cache)
    R = len(heads[0])
    assert shapes.full_k.shape == (cfg.num_layers, len(LENGTHS), MAX_LEN, R, cfg.head_dim)
    assert shapes.win_k.shape == (cfg.num_layers, len(LENGTHS), 6, cfg.num_kv_heads - R,
                                  cfg.head_dim)


def _synthetic(S=2, T=20, K=3, G=2, E=8, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32)
               for shape in ((S, T, K, G, E), (S, T, K, E), (S, T, K, E)))
    return q, k, v


def _ctx(q, k, v, lengths):
    zeros = jnp.zeros((k.shape[0], k.shape[2], k.shape[1]), jnp.float32)
    return PrefillContext(q=q, k=k, v=v, lengths=jnp.asarray(lengths, jnp.int32),
                          stats=PrefillStats(zeros, zeros, zeros))


def test_prefill_compensation_is_mean_of_dropped():
    q, k, v = _synthetic()
    lengths = (20, 9)
    policy = RazorAttention(max_len=24, window=4, sink=2, retrieval_heads=((1,),))
    c = jax.jit(lambda *a: policy.prefill(_ctx(*a)))(q, k, v, jnp.asarray(lengths))
    others = [0, 2]
    for s, n in enumerate(lengths):
        dropped = np.arange(2, n - 4)
        assert int(c.comp_count[s]) == len(dropped)
        np.testing.assert_allclose(c.comp_k[s], np.asarray(k)[s, dropped][:, others].mean(0),
                                   atol=1e-6)
        np.testing.assert_allclose(c.comp_v[s], np.asarray(v)[s, dropped][:, others].mean(0),
                                   atol=1e-6)
        kept = sorted(int(p) for p in c.win_pos[s] if p >= 0)
        assert kept == [0, 1, *range(n - 4, n)]
        for slot, p in enumerate(np.asarray(c.win_pos[s])):
            if p >= 0:
                np.testing.assert_array_equal(c.win_k[s, slot], np.asarray(k)[s, p][others])
        # The retrieval head keeps every valid token, zero padding after.
        np.testing.assert_array_equal(c.full_k[s, :n, 0], np.asarray(k)[s, :n, 1])
        assert not np.any(np.asarray(c.full_k[s, n:]))


@pytest.mark.parametrize("retrieval", [(2,), ()])
def test_decode_folds_leaving_tokens_and_attends_as_count_copies(retrieval):
    """Against a direct reference: retrieval heads attend over every token; the other heads
    over sinks + window + the mean of the dropped tokens repeated `count` times."""
    S, T, K, G, E = 2, 26, 3, 2, 8
    q, k, v = _synthetic(S, T, K, G, E, seed=1)
    lengths = np.asarray([14, 8])
    sink, window = 2, 4
    others = [h for h in range(K) if h not in retrieval]
    policy = RazorAttention(max_len=32, window=window, sink=sink,
                            retrieval_heads=(retrieval,) if retrieval else ())
    cache = jax.tree.map(lambda a: a[None], jax.jit(lambda *a: policy.prefill(_ctx(*a)))(
        q, k, v, jnp.asarray(lengths)))
    scale = E**-0.5

    @jax.jit
    def decode(cache, q, k, v, seen):
        ctx = DecodeContext(q=q, k=k, v=v, seen=seen, window=None, scale=scale, soft_cap=None)
        return policy.decode(cache, jnp.int32(0), ctx)

    qn, kn, vn = (np.asarray(a, np.float64) for a in (q, k, v))
    for step in range(8):
        seen = lengths + step
        s = np.arange(S)
        out, cache = decode(cache, q[s, seen], k[s, seen], v[s, seen],
                            jnp.asarray(seen, jnp.int32))
        out = np.asarray(out).reshape(S, K, G, E)
        for i in range(S):
            p = seen[i]
            dropped = np.arange(sink, p + 1 - window)
            assert int(cache.comp_count[0, i]) == len(dropped)
            kept = np.r_[np.arange(min(sink, p + 1)), np.arange(max(sink, p + 1 - window), p + 1)]
            assert sorted(int(x) for x in cache.win_pos[0, i] if x >= 0) == kept.tolist()
            np.testing.assert_allclose(cache.comp_k[0, i], kn[i, dropped][:, others].mean(0),
                                       atol=1e-5)
            for h in range(K):
                if h in retrieval:
                    keys, vals = kn[i, :p + 1, h], vn[i, :p + 1, h]
                else:
                    keys = np.concatenate([kn[i, kept, h]] + [kn[i, dropped, h].mean(0)[None]]
                                          * len(dropped))
                    vals = np.concatenate([vn[i, kept, h]] + [vn[i, dropped, h].mean(0)[None]]
                                          * len(dropped))
                logit = qn[i, p, h] @ keys.T * scale  # [G, n]
                w = np.exp(logit - logit.max(-1, keepdims=True))
                ref = (w / w.sum(-1, keepdims=True)) @ vals
                np.testing.assert_allclose(out[i, h], ref, atol=1e-5, err_msg=f"step {step}")


def test_induction_scores_find_planted_head():
    """A head whose second-copy query i matches first-copy key i + 1 scores highest."""
    L, S, half, K, G = 2, 2, 8, 3, 2
    T, E = 2 * half, 2 * half
    rng = np.random.default_rng(0)
    q = rng.normal(size=(L, S, T, K, G, E)) * 0.3
    k = rng.normal(size=(L, S, T, K, E)) * 0.3
    planted = (2, 0)
    for layer, h in enumerate(planted):
        k[layer, :, :, h] = 4.0 * np.eye(T)[None] + k[layer, :, :, h] * 0.1
        for i in range(half - 1):
            q[layer, :, half + i, h] = 4.0 * np.eye(T)[i + 1]
    scores = induction_scores(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32),
                              jnp.full((L,), 1 << 20, jnp.int32), half=half, scale=1.0,
                              soft_cap=None)
    assert scores.shape == (L, K)
    np.testing.assert_array_equal(np.argmax(np.asarray(scores), axis=1), planted)
    assert float(scores[0, 2]) > 0.9 * G  # nearly all of each query's mass on the target


def test_find_retrieval_heads_counts_and_determinism():
    cfg, _ = MODELS["gemma3"]
    params = init_params(cfg, seed=3, scale=0.3)
    heads = find_retrieval_heads(params, cfg, seq_len=16, seed=0, num_probes=2)
    assert len(heads) == cfg.num_layers
    R = num_retrieval_heads(cfg.num_kv_heads, 0.15)
    assert R == 1 and all(len(row) == R and 0 <= row[0] < cfg.num_kv_heads for row in heads)
    assert heads == find_retrieval_heads(params, cfg, seq_len=16, seed=0, num_probes=2)
    both = find_retrieval_heads(params, cfg, seq_len=16, num_probes=2, fraction=1.0)
    assert all(row == (0, 1) for row in both)
    RazorAttention(max_len=8, window=4, retrieval_heads=heads)  # a valid, hashable field
    assert num_retrieval_heads(8, 0.15) == 2 and num_retrieval_heads(4, 0.0) == 1


def test_rejects_ragged_head_table():
    with pytest.raises(ValueError, match="same number"):
        RazorAttention(max_len=8, window=4, retrieval_heads=((0,), (0, 1)))
    with pytest.raises(ValueError, match="distinct"):
        RazorAttention(max_len=8, window=4, retrieval_heads=((1, 1),))
