"""The `LLM` API on the real SmolLM2-135M-Instruct (Q4_1 GGUF), CPU float32.

Greedy outputs of each prompt alone are the oracle for batched runs (prompts of different
lengths and different max_tokens, more prompts than max_num_seqs, a KV pool that holds only
some requests at once, token-id prompts). Also: streaming deltas, stop strings, stop token
ids, max_tokens and the context limit, EOS in a chat answer, seeded sampling independent of
the batch, errors (InputError / CapacityError) that leak no KV pages and leave the LLM
usable, invalid LLM options, and `last_stats`.
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

import jaxinfer
from jaxinfer.errors import CapacityError, InputError, JaxinferError
from jaxinfer.sampling import SamplingParams
from tests.models import bible_text, smollm2_path

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 64
PROMPTS = [  # 4, 5, 11 and 7 tokens
    "Once upon a time",
    "The capital of France is",
    bible_text(0, 1),
    "def fibonacci(n):\n   ",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return jaxinfer.load(smollm2_path(), progress=False, kv_cache_tokens=2048,
                         max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def alone(llm):
    """Greedy output of each prompt generated on its own: the oracle of the batch tests."""
    return [llm.generate(p, GREEDY)[0] for p in PROMPTS]


def _free(llm) -> int:
    """Pages not held by any request (free, or cached and evictable), invariants checked."""
    allocator = llm.core.scheduler.allocator
    allocator.check_invariants()
    return allocator.num_free


def test_alone_outputs(llm, alone):
    for i, (p, out) in enumerate(zip(PROMPTS, alone, strict=True)):
        assert out.index == 0 and out.prompt == p
        assert out.prompt_token_ids == llm.tokenizer.encode(p)
        assert len(out.token_ids) == 24 and out.finish_reason == "length", i
        assert out.text == llm.tokenizer.decode(out.token_ids)
        assert out.ttft_s >= 0 and out.decode_s >= 0
    assert _free(llm) == llm.num_pages
    # The outputs differ per prompt (guards the batch tests against a constant answer).
    assert len({tuple(o.token_ids) for o in alone}) == len(PROMPTS)


def test_batch_of_different_lengths_matches_alone(llm, alone):
    outs = llm.generate(PROMPTS, GREEDY)
    assert [o.index for o in outs] == list(range(len(PROMPTS)))
    for o, a in zip(outs, alone, strict=True):
        assert o.prompt == a.prompt
        assert o.token_ids == a.token_ids
        assert o.text == a.text
    # Reversed order, with different max_tokens: each stops on its own, the rest go on.
    order = [2, 0, 3, 1]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
              for n in (3, 12, 11, 1)]
    outs = llm.generate([PROMPTS[i] for i in order], params)
    for o, i, sp in zip(outs, order, params, strict=True):
        assert o.token_ids == alone[i].token_ids[:sp.max_tokens]
        assert o.finish_reason == "length"
    assert _free(llm) == llm.num_pages


def test_streaming_deltas_concatenate_to_the_text(llm, alone):
    deltas = collections.defaultdict(list)
    sp = dataclasses.replace(GREEDY, max_tokens=12)
    outs = llm.generate(PROMPTS[:2], sp, on_text=lambda i, d: deltas[i].append(d))
    assert sorted(deltas) == [0, 1]
    for o, a in zip(outs, alone[:2], strict=True):
        assert o.token_ids == a.token_ids[:12]
        assert "".join(deltas[o.index]) == o.text == llm.tokenizer.decode(o.token_ids)
        assert all(deltas[o.index])  # no empty deltas
        assert len(deltas[o.index]) > 5  # streamed, not delivered at the end


def _stop_case(llm, alone_out):
    """A substring from the middle of the greedy text and the tokens needed to produce it."""
    full = alone_out.text
    k = len(full) // 2
    stop = full[k:k + 5]
    assert stop.strip() and full.find(stop) > 0
    # Generation must end at the first token whose text completes the stop string.
    n = next(n for n in range(1, 25) if stop in llm.tokenizer.decode(alone_out.token_ids[:n]))
    return full, stop, n


def test_stop_string_ends_generation_and_is_excluded(llm, alone):
    full, stop, n = _stop_case(llm, alone[0])
    deltas = []
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=stop)
    (out,) = llm.generate(PROMPTS[0], sp, on_text=lambda _, d: deltas.append(d))
    assert out.finish_reason == "stop"
    assert out.text == full[:full.find(stop)]
    assert out.token_ids == alone[0].token_ids[:n] and n < 24
    assert "".join(deltas) == out.text  # the held-back stop string is never streamed
    assert _free(llm) == llm.num_pages


def test_earliest_of_several_stop_strings_wins(llm, alone):
    full, stop, n = _stop_case(llm, alone[2])
    late = full[-6:]
    assert full.find(late) > full.find(stop)
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=(late, stop))
    outs = llm.generate([PROMPTS[2], PROMPTS[1]], sp)
    assert outs[0].text == full[:full.find(stop)] and outs[0].finish_reason == "stop"
    assert outs[0].token_ids == alone[2].token_ids[:n]
    # A stop string that never appears changes nothing.
    assert outs[1].token_ids == alone[1].token_ids and outs[1].finish_reason == "length"


def test_stop_token_id_ends_generation(llm, alone):
    ids = alone[3].token_ids
    n = next(n for n in range(3, 24) if ids[n] not in ids[:n])
    sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True,
                        stop_token_ids=[ids[n]])
    (out,) = llm.generate(PROMPTS[3], sp)
    assert out.finish_reason == "stop"
    assert out.token_ids == ids[:n + 1]  # the stop token is reported
    assert out.text.startswith(llm.tokenizer.decode(ids[:n]))


def test_max_tokens(llm, alone):
    (out,) = llm.generate(PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=5))
    assert out.token_ids == alone[1].token_ids[:5]
    assert out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(alone[1].token_ids[:5])


def test_output_is_cut_at_the_context_length(llm):
    ids = llm.tokenizer.encode(bible_text(0, 10))
    assert len(ids) > MAX_MODEL_LEN
    for n in (1, 4):
        (out,) = llm.generate(ids[:MAX_MODEL_LEN - n], GREEDY)
        assert len(out.token_ids) == n and out.finish_reason == "length"


def test_eos_ends_a_chat_answer(llm):
    (out,) = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                      SamplingParams(temperature=0.0, max_tokens=24))
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in set(llm.tokenizer.stop_token_ids) | set(llm.cfg.eos_token_ids)
    assert len(out.token_ids) < 24
    assert "Paris" in out.text
    assert "<|im_end|>" not in out.text and out.text == out.text.strip()
    assert out.prompt is not None and "What is the capital of France?" in out.prompt
    assert out.prompt_token_ids == llm.tokenizer.encode_chat(
        [{"role": "user", "content": "What is the capital of France?"}])


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(llm, alone):
    (a,) = llm.generate(PROMPTS[0], SEEDED)
    (b,) = llm.generate(PROMPTS[0], SEEDED)
    assert len(a.token_ids) == SEEDED.max_tokens
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != alone[0].token_ids[:SEEDED.max_tokens]  # it really sampled
    # Batched with another prompt, at another position: the same tokens.
    greedy = dataclasses.replace(GREEDY, max_tokens=SEEDED.max_tokens)
    outs = llm.generate([PROMPTS[1], PROMPTS[0]], [greedy, SEEDED])
    assert outs[1].token_ids == a.token_ids
    assert outs[0].token_ids == alone[1].token_ids[:8]  # the greedy neighbour is unaffected


def test_token_id_prompts(llm, alone):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS[:2]]
    sp = dataclasses.replace(GREEDY, max_tokens=12)
    (one,) = llm.generate(ids[1], sp)
    assert one.prompt is None and one.prompt_token_ids == ids[1]
    assert one.token_ids == alone[1].token_ids[:12]
    assert one.text == llm.tokenizer.decode(alone[1].token_ids[:12])
    both = llm.generate([tuple(ids[0]), PROMPTS[1]], sp)  # ids and text mixed
    assert [o.token_ids for o in both] == [alone[0].token_ids[:12], alone[1].token_ids[:12]]
    assert both[0].prompt is None and both[1].prompt == PROMPTS[1]
    assert both[0].prompt_token_ids == ids[0]


def test_numpy_token_ids(llm, alone):
    # Token ids straight from numpy (np.int64 elements) are a list of token ids, not a list
    # of prompts.
    ids = list(np.asarray(llm.tokenizer.encode(PROMPTS[0])))
    (out,) = llm.generate(ids, dataclasses.replace(GREEDY, max_tokens=4))
    assert out.token_ids == alone[0].token_ids[:4]


def test_prompt_longer_than_the_context(llm, alone):
    free = _free(llm)
    ids = llm.tokenizer.encode(bible_text(0, 10))
    n = len(ids)
    with pytest.raises(InputError, match=rf"prompt 0 has {n} tokens .*context holds "
                                         rf"{MAX_MODEL_LEN}"):
        llm.generate(ids, GREEDY)
    # Exactly the context length is too long too (no room for one output token).
    with pytest.raises(InputError, match=rf"has {MAX_MODEL_LEN} tokens"):
        llm.generate(ids[:MAX_MODEL_LEN], GREEDY)
    # One bad prompt in a batch fails the call, naming it, and runs nothing.
    with pytest.raises(InputError, match=rf"prompt 1 has {n} tokens"):
        llm.generate([PROMPTS[1], bible_text(0, 10)], GREEDY)
    assert _free(llm) == free == llm.num_pages
    (out,) = llm.generate(PROMPTS[1], dataclasses.replace(GREEDY, max_tokens=8))
    assert out.token_ids == alone[1].token_ids[:8]


@pytest.mark.parametrize(("prompts", "params", "match"), [
    ("", GREEDY, "empty"),
    ([[]], GREEDY, "empty"),
    ([[1, 2, 49152]], GREEDY, "vocabulary"),
    ([[1, -1]], GREEDY, "vocabulary"),
    (PROMPTS[:2], [GREEDY] * 3, "3 sampling parameters for 2 prompts"),
])
def test_invalid_requests_raise_input_error(llm, prompts, params, match):
    with pytest.raises(InputError, match=match):
        llm.generate(prompts, params)
    assert _free(llm) == llm.num_pages


def test_invalid_sampling_params_raise_input_error(llm):
    with pytest.raises(InputError, match="top_p"):
        llm.generate(PROMPTS[0], SamplingParams(temperature=0.5, top_p=0.0))
    with pytest.raises(InputError, match="temperature"):
        llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=-1.0))
    assert _free(llm) == llm.num_pages


@pytest.mark.parametrize("option", [
    dict(max_model_len=0),  # today: silently the model's whole context
    dict(max_model_len=-5),  # today: "prompt 0 has 1 tokens but the context holds -5"
    dict(kv_cache_tokens=-16),  # today: TypeError from jax
    dict(page_size=0),  # today: ZeroDivisionError
    dict(max_num_seqs=0),  # today: "the KV cache cannot hold the next request"
], ids=lambda o: "{}={}".format(*next(iter(o.items()))))
def test_invalid_llm_options_are_refused(llm, option):
    ((name, _),) = option.items()
    with pytest.raises(JaxinferError, match=name):
        jaxinfer.LLM(llm.params, llm.cfg, llm.tokenizer, **({"kv_cache_tokens": 256} | option))


def test_no_requests(llm):
    assert llm.generate([], GREEDY) == []


def test_exception_in_callback_leaks_no_pages(llm, alone):
    seen = []

    def boom(index, delta):
        seen.append(delta)
        if len(seen) == 3:
            raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        llm.generate(PROMPTS[:3], GREEDY, on_text=boom)
    assert _free(llm) == llm.num_pages
    outs = llm.generate(PROMPTS[:3], dataclasses.replace(GREEDY, max_tokens=8))
    assert [o.token_ids for o in outs] == [a.token_ids[:8] for a in alone[:3]]


def test_request_too_big_for_the_kv_pool(llm):
    small = jaxinfer.LLM(llm.params, llm.cfg, llm.tokenizer, kv_cache_tokens=32)
    assert small.num_pages == 2
    # prompt (11 tokens) + 100 new tokens, less the last sampled one, which is never cached
    with pytest.raises(CapacityError, match=r"needs 110 tokens of KV cache but the pool "
                                            r"holds 32"):
        small.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=100))
    assert _free(small) == 2
    # max_tokens beyond the context is cut to the context (8192), which still does not fit.
    with pytest.raises(CapacityError, match="needs 8191 tokens"):
        small.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10_000))


def test_more_prompts_than_max_num_seqs_and_stats(llm, alone):
    two = jaxinfer.LLM(llm.params, llm.cfg, llm.tokenizer, max_num_seqs=2,
                       kv_cache_tokens=2048)
    sp = dataclasses.replace(GREEDY, max_tokens=8)
    outs = two.generate(PROMPTS, sp)
    assert [o.token_ids for o in outs] == [a.token_ids[:8] for a in alone]
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert _free(two) == two.num_pages
    s = two.last_stats
    assert s.steps == 16  # twice: one prefill step for 2 prompts, then 7 decode steps
    assert s.prompt_tokens == sum(len(o.prompt_token_ids) for o in outs) == 27
    assert s.generated_tokens == 32
    # A fresh LLM compiles its prefill and decode programs, timed apart from the run.
    assert s.programs_compiled >= 3 and s.compile_s > 0
    assert two.compile_stats.programs == s.programs_compiled
    assert s.wall_s > s.compile_s
    # Time to first token and decode time exclude compilation.
    last = outs[3]
    assert last.ttft_s + last.decode_s <= s.wall_s - s.compile_s + 0.05

    again = two.generate(PROMPTS[:2], sp)  # shapes seen before: nothing compiles
    s2 = two.last_stats
    assert [o.token_ids for o in again] == [a.token_ids[:8] for a in alone[:2]]
    assert s2.programs_compiled == 0 and s2.compile_s == 0.0
    assert s2.prompt_tokens == 9 and s2.generated_tokens == 16 and s2.steps == 8
    assert s2.wall_s > 0


def test_small_pool_forces_waiting_and_preemption(llm, alone):
    """Three pages of 16 tokens for four requests of 8 new tokens: requests wait for pages
    and running ones are preempted (recomputed later); every output is still exact."""
    small = jaxinfer.LLM(llm.params, llm.cfg, llm.tokenizer, kv_cache_tokens=48)
    assert small.num_pages == 3
    outs = small.generate([PROMPTS[2], PROMPTS[1], PROMPTS[0], PROMPTS[3]],
                          dataclasses.replace(GREEDY, max_tokens=8))
    assert [o.token_ids for o in outs] == [alone[i].token_ids[:8] for i in (2, 1, 0, 3)]
    assert small.core.stats().kv_pages_in_use == 0
    assert _free(small) == small.num_pages
