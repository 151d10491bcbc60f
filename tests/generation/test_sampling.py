"""Sampling: `SamplingParams` validation and the device `sample` function.

Validation: every invalid value raises InputError naming the parameter. Device: greedy rows
are the argmax, top_k=1 is greedy, seeded draws are reproducible and independent of the other
rows, temperature sampling matches softmax(logits / T) (chi-square over many seeded rows), and
top-k / top-p / min-p only ever return tokens from the set they define.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxinfer.errors import InputError
from jaxinfer.model.sampler import greedy_argmax, sample
from jaxinfer.sampling import SamplingParams, pack_sampling, resolve_seed

# ---------------------------------------------------------------------------- validation
INVALID = [
    ("temperature", -0.1),
    ("temperature", -1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "1.0"),
    ("top_p", 0.0),
    ("top_p", 1.0001),
    ("top_p", -0.5),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.5),
    ("min_p", -0.01),
    ("min_p", 1.01),
    ("min_p", math.nan),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 10.0),
    ("seed", 1.5),
    ("seed", "7"),
]


@pytest.mark.parametrize(("name", "value"), INVALID, ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_names_the_parameter(name, value):
    with pytest.raises(InputError) as info:
        SamplingParams(**{name: value})
    assert name in str(info.value)
    assert isinstance(info.value, ValueError)  # InputError is also a ValueError


@pytest.mark.parametrize("stop", ["", ("ok", ""), [""]])
def test_empty_stop_string_is_refused(stop):
    with pytest.raises(InputError, match="stop"):
        SamplingParams(stop=stop)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.0), dict(temperature=0), dict(temperature=2.5),
    dict(top_p=1.0), dict(top_p=1e-6), dict(top_k=-1), dict(top_k=0), dict(top_k=1),
    dict(min_p=0.0), dict(min_p=1.0), dict(max_tokens=1), dict(seed=0), dict(seed=2**40),
    dict(seed=None), dict(stop=("a", "bc")),
])
def test_valid_values_are_accepted(kwargs):
    SamplingParams(**kwargs)


def test_numpy_scalars_are_accepted():
    # Values computed with numpy (np.float32 / np.int64 are not float / int subclasses) are
    # valid numbers; stop_token_ids already accepts numpy integers.
    p = SamplingParams(temperature=np.float32(0.5), top_p=np.float32(0.9),
                       min_p=np.float32(0.05), top_k=np.int64(5), max_tokens=np.int64(7),
                       seed=np.int64(3))
    assert (p.temperature, p.top_k, p.max_tokens, p.seed) == (0.5, 5, 7, 3)


def test_stop_string_and_token_ids_are_normalised():
    p = SamplingParams(stop="END", stop_token_ids=[3, np.int64(5)])
    assert p.stop == ("END",)
    assert p.stop_token_ids == (3, 5) and all(type(t) is int for t in p.stop_token_ids)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.5).greedy


def test_resolve_seed():
    assert resolve_seed(SamplingParams(seed=5)) == 5
    drawn = {resolve_seed(SamplingParams()) for _ in range(8)}
    assert len(drawn) > 1  # a fresh seed per request when none is given
    assert all(0 <= d < 2**32 for d in drawn)


def test_pack_sampling_pads_with_greedy_rows():
    params = [SamplingParams(temperature=0.7, top_k=-1, top_p=0.9, min_p=0.1),
              SamplingParams(temperature=0.0, top_k=5)]
    a = pack_sampling(params, [7, 2**32 + 3], [0, 4], 4)
    np.testing.assert_allclose(a.temperature, [0.7, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(a.top_k, [0, 5, 0, 0])  # -1 becomes 0 (off)
    np.testing.assert_allclose(a.top_p, [0.9, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(a.min_p, [0.1, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(a.seed, [7, 3, 0, 0])
    np.testing.assert_array_equal(a.step, [0, 4, 0, 0])
    assert a.seed.dtype == np.uint32 and not a.all_greedy
    assert pack_sampling([params[1]], [1], [0], 2).all_greedy


# ---------------------------------------------------------------------------- device sample
@functools.partial(jax.jit, static_argnames="all_greedy")
def _sample(logits, temperature, top_k, top_p, min_p, seed, step, all_greedy=False):
    return sample(logits, temperature, top_k, top_p, min_p, seed, step, all_greedy=all_greedy)


def draw(logits, *, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=0, step=0,
         all_greedy=False) -> np.ndarray:
    """Sample one token per row of `logits` [S, V]; scalars broadcast to every row."""
    logits = np.asarray(logits, np.float32)
    S = logits.shape[0]

    def col(x, dtype):
        return jnp.asarray(np.broadcast_to(np.asarray(x, dtype), (S,)).copy())

    out = _sample(jnp.asarray(logits), col(temperature, np.float32), col(top_k, np.int32),
                  col(top_p, np.float32), col(min_p, np.float32), col(seed, np.uint32),
                  col(step, np.int32), all_greedy=all_greedy)
    assert out.shape == (S,) and out.dtype == jnp.int32
    return np.asarray(out)


def test_greedy_rows_are_argmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 300)).astype(np.float32) * 3
    expected = np.argmax(logits, -1)
    np.testing.assert_array_equal(draw(logits, temperature=0.0, all_greedy=True), expected)
    # Greedy rows mixed with sampling rows (the sort path): the greedy rows are still argmax.
    temps = np.array([0.0, 1.5, 0.0, 2.0, 0.0, 1.0])
    out = draw(logits, temperature=temps, seed=np.arange(6))
    np.testing.assert_array_equal(out[temps == 0], expected[temps == 0])


def test_greedy_argmax_takes_the_first_of_tied_maxima():
    rng = np.random.default_rng(1)
    logits = rng.integers(-3, 4, size=(64, 50)).astype(np.float32)  # many ties per row
    logits[5] = 7.0  # a constant row: index 0
    logits[6, -1] = 100.0  # the maximum at the last index
    logits[7] = -np.inf
    logits[7, 9] = -1e30
    np.testing.assert_array_equal(np.asarray(greedy_argmax(jnp.asarray(logits))),
                                  np.argmax(logits, -1))


def test_top_k_one_is_greedy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(64, 200)).astype(np.float32)
    out = draw(logits, temperature=5.0, top_k=1, seed=np.arange(64))
    np.testing.assert_array_equal(out, np.argmax(logits, -1))


def test_tiny_top_p_and_full_min_p_are_greedy():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 50)).astype(np.float32)
    expected = np.argmax(logits, -1)
    np.testing.assert_array_equal(draw(logits, top_p=1e-6, seed=np.arange(64)), expected)
    np.testing.assert_array_equal(draw(logits, min_p=1.0, seed=np.arange(64)), expected)


def test_seeded_draw_is_reproducible_and_independent_of_other_rows():
    V = 1000
    flat = np.zeros((1, V), np.float32)  # uniform: the draw depends on the key only
    rng = np.random.default_rng(3)
    alone = {(seed, step): int(draw(flat, seed=seed, step=step)[0])
             for seed in (0, 7, 123456789, 2**32 - 1) for step in (0, 1, 5)}
    assert len(set(alone.values())) > len(alone) // 2  # the key matters
    for (seed, step), token in alone.items():
        assert int(draw(flat, seed=seed, step=step)[0]) == token  # reproducible
        # The same row inside batches with other rows of other sizes and settings.
        for batch, index in ((2, 1), (4, 0), (8, 5)):
            logits = rng.normal(size=(batch, V)).astype(np.float32)
            logits[index] = 0.0
            temps = rng.uniform(0.0, 2.0, batch)
            seeds = rng.integers(0, 2**32, batch)
            steps = rng.integers(0, 50, batch)
            top_k = rng.integers(0, 5, batch)
            temps[index], seeds[index], steps[index], top_k[index] = 1.0, seed, step, 0
            out = draw(logits, temperature=temps, seed=seeds, step=steps, top_k=top_k)
            assert int(out[index]) == token, (seed, step, batch, index)


def test_step_changes_the_draw():
    flat = np.zeros((64, 1000), np.float32)
    a = draw(flat, seed=11, step=np.arange(64))
    assert len(set(a.tolist())) > 50  # 64 draws from 1000 tokens barely repeat


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = counts.sum() * probs
    return float(np.sum((counts - expected) ** 2 / expected))


# Critical values of chi-square at p = 1e-6 (the seeds are fixed, so this never flakes;
# it only fails when the distribution is wrong).
CHI2_CRIT = {1: 23.9, 2: 27.6, 3: 30.7, 4: 33.4, 5: 35.9, 6: 38.3, 7: 40.5}
N_DRAWS = 40_000


def _counts(logits_row, n=N_DRAWS, **kwargs) -> np.ndarray:
    logits = np.tile(np.asarray(logits_row, np.float32), (n, 1))
    out = draw(logits, seed=np.arange(n), **kwargs)
    return np.bincount(out, minlength=len(logits_row))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("temperature", [1.0, 0.6, 2.0])
def test_temperature_sampling_matches_softmax(temperature):
    logits = np.array([1.2, -0.3, 2.0, 0.4, 0.0, -1.0], np.float32)
    counts = _counts(logits, temperature=temperature)
    probs = _softmax(logits.astype(np.float64) / temperature)
    stat = _chi_square(counts, probs)
    assert stat < CHI2_CRIT[len(logits) - 1], (counts / N_DRAWS, probs, stat)


def test_temperature_changes_the_distribution():
    # Guards the chi-square test's power: the wrong temperature must be rejected.
    logits = np.array([1.2, -0.3, 2.0, 0.4, 0.0, -1.0], np.float32)
    counts = _counts(logits, temperature=0.6)
    assert _chi_square(counts, _softmax(logits.astype(np.float64))) > 10 * CHI2_CRIT[5]


# Known probabilities, shuffled over 8 token ids so that the sort matters.
PROBS = np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.03, 0.015, 0.005])
IDS = np.array([5, 2, 7, 0, 3, 6, 1, 4])  # token IDS[r] has probability PROBS[r]


def _known_logits() -> np.ndarray:
    logits = np.full(8, np.nan, np.float32)
    logits[IDS] = np.log(PROBS)
    return logits


@pytest.mark.parametrize(("kwargs", "kept"), [
    (dict(top_k=3), 3),
    (dict(top_k=1), 1),
    (dict(top_k=100), 8),
    (dict(top_k=0), 8),  # 0 disables
    (dict(top_p=0.5), 2),  # 0.4 < 0.5 <= 0.65
    (dict(top_p=0.7), 3),  # 0.65 < 0.7 <= 0.8
    (dict(top_p=0.3), 1),
    (dict(top_p=0.97), 6),  # 0.95 < 0.97 <= 0.98
    (dict(min_p=0.3), 3),  # keeps p >= 0.12
    (dict(min_p=0.5), 2),  # keeps p >= 0.2
    (dict(min_p=0.1), 5),  # keeps p >= 0.04
    (dict(top_k=5, top_p=0.85, min_p=0.3), 3),  # min_p is the tightest
    (dict(top_k=2, top_p=0.85, min_p=0.1), 2),  # top_k is the tightest
    (dict(top_k=6, top_p=0.5, min_p=0.1), 2),  # top_p is the tightest
])
def test_filters_keep_exactly_the_allowed_set(kwargs, kept):
    counts = _counts(_known_logits(), **kwargs)
    allowed = IDS[:kept]
    outside = np.setdiff1d(np.arange(8), allowed)
    assert counts[outside].sum() == 0, f"sampled outside {sorted(allowed)}: {counts}"
    # The survivors keep their relative probabilities.
    probs = PROBS[:kept] / PROBS[:kept].sum()
    if kept > 1:
        stat = _chi_square(counts[allowed], probs)
        assert stat < CHI2_CRIT[kept - 1], (counts[allowed] / N_DRAWS, probs)


def test_filters_apply_after_temperature():
    # At temperature 2 the probabilities become sqrt(PROBS) normalised, so their ratios to
    # the likeliest are 1, 0.79, 0.61, 0.5, ...: min_p=0.55 keeps 3 tokens (at temperature 1
    # the ratios are 1, 0.625, 0.375, ... and it would keep 2).
    scaled = np.sqrt(PROBS) / np.sqrt(PROBS).sum()
    counts = _counts(_known_logits(), temperature=2.0, min_p=0.55)
    assert counts[IDS[3:]].sum() == 0 and np.all(counts[IDS[:3]] > 0)
    stat = _chi_square(counts[IDS[:3]], scaled[:3] / scaled[:3].sum())
    assert stat < CHI2_CRIT[2]


def test_each_row_uses_its_own_filters():
    n = 3000
    logits = np.tile(_known_logits(), (n, 1))
    top_k = np.tile([1, 2, 3], n // 3)
    out = draw(logits, top_k=top_k, seed=np.arange(n))
    for k in (1, 2, 3):
        assert set(out[top_k == k].tolist()) == set(IDS[:k].tolist())


def test_masked_tokens_are_never_sampled():
    n = 4000
    logits = np.zeros((n, 16), np.float32)
    logits[:, ::2] = -np.inf  # even ids forbidden
    out = draw(logits, temperature=50.0, seed=np.arange(n))
    assert np.all(out % 2 == 1)
    assert len(set(out.tolist())) == 8


# ------------------------------------------------------------------ penalties and logprobs
def _numpy_penalties(logits, prompt, output, presence, frequency, repetition):
    """transformers' repetition penalty, then OpenAI's frequency/presence, in float64."""
    out = logits.astype(np.float64).copy()
    seen = set(prompt) | set(output)
    for t in seen:
        out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
    for t in set(output):
        count = output.count(t)
        out[t] -= frequency * count + presence
    return out


def test_penalties_match_numpy():
    from jaxinfer.model.sampler import apply_penalties
    from jaxinfer.sampling import pack_sampling

    rng = np.random.default_rng(0)
    V = 50
    logits = rng.standard_normal((3, V)).astype(np.float32) * 3
    histories = [([1, 2, 3, 3], [3, 7, 7, 7, 9]), ([4, 5], []), ([0, 49], [49, 49, 0, 8])]
    params = [SamplingParams(presence_penalty=0.5, frequency_penalty=0.25,
                             repetition_penalty=1.3),
              SamplingParams(repetition_penalty=0.7),
              SamplingParams(frequency_penalty=-1.0)]
    arrays = pack_sampling(params, [0, 0, 0], [0, 0, 0], 4, histories=histories,
                           vocab_size=V)
    got = np.asarray(apply_penalties(
        np.concatenate([logits, np.zeros((1, V), np.float32)]), arrays.penalty_ids,
        arrays.output_counts, arrays.in_prompt, arrays.presence, arrays.frequency,
        arrays.repetition))
    for i, ((prompt, output), p) in enumerate(zip(histories, params, strict=True)):
        expected = _numpy_penalties(logits[i], prompt if p.repetition_penalty != 1 else [],
                                    output, p.presence_penalty, p.frequency_penalty,
                                    p.repetition_penalty)
        np.testing.assert_allclose(got[i], expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got[3], 0.0)  # the padding row is untouched


def test_no_penalty_arrays_without_penalties():
    from jaxinfer.sampling import pack_sampling

    arrays = pack_sampling([SamplingParams()], [0], [0], 1)
    assert arrays.penalty_ids is None and not arrays.want_logprobs


def test_logprobs_are_raw_log_softmax():
    from jaxinfer.model.sampler import token_logprobs

    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 30)).astype(np.float32)
    tokens = np.array([4, 29], np.int32)
    chosen, top_ids, top_values = token_logprobs(logits, tokens, 3)
    expected = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(chosen), expected[[0, 1], tokens], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(top_ids), np.argsort(-expected, -1)[:, :3])
    np.testing.assert_allclose(np.asarray(top_values), np.sort(expected, -1)[:, ::-1][:, :3],
                               atol=1e-6)


@pytest.mark.parametrize("name, value", [("presence_penalty", 2.5),
                                         ("frequency_penalty", -3.0),
                                         ("repetition_penalty", 0.0),
                                         ("logprobs", 21), ("logprobs", -1)])
def test_invalid_penalties_and_logprobs(name, value):
    with pytest.raises(InputError, match=name):
        SamplingParams(**{name: value})
