"""Continuous batching is exact: greedy outputs of the engine equal single-request generation.

The oracle is a plain greedy loop over a float64 numpy transformer written here from the
model's definition (no paging, no KV cache, no jaxinfer code): every token recomputes the
whole sequence. Each engine configuration runs a batch of random-token prompts, some added
between `step()` calls while others decode, and every output must equal the oracle token
for token:

  * each prompt alone on an EngineCore (the second oracle, checked against the first);
  * chunked prefill with a small token budget and chunk limit (prompts split over several
    steps beside running decodes);
  * chunked prefill off (a long prompt gets a step of its own, over the budget);
  * prefix caching: cached full pages reused by concurrent and later requests, a prompt
    that is an exact page multiple, pages holding generated tokens;
  * `LLM.generate`'s BatchLLM planning (`share_prefix`): a shared partial page is copied on
    first write; a second call reuses the prefix cache as well;
  * a KV pool small enough that running requests are preempted and recomputed;
  * the contiguous layout (page_size == max_model_len, one page per sequence).

Each test also checks, from the scheduler's own step plans, that the situation it is about
really happened (chunks beside decodes, page copies, preemptions, ...), and that every KV
page is free again at the end.

The models are tiny and random (float32); the oracle's top-1 / top-2 logit margin is
asserted along every trajectory, so a numerical near-tie cannot make a test flaky. Compiled
step programs depend only on the model and the cache geometry, so cores of equal geometry
share them (`ModelRunner._programs`) to keep the compile time of the module small.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import chex
import jax
import numpy as np
import pytest

import jaxinfer
from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.engine.core import EngineConfig, EngineCore
from jaxinfer.engine.scheduler import SchedulerOutput
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.sampling import SamplingParams
from tests.models import CharTokenizer

CFG = ModelConfig(family="llama", vocab_size=128, hidden_size=32, intermediate_size=48,
                  num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  max_position_embeddings=128)
PARAMS = init_params(CFG, seed=3, scale=0.3)
PAGE = 16  # the shared cache geometry: 12 pages of 16 tokens
POOL_TOKENS = 12 * PAGE
MAX_LEN = 64
# The engine options of most tests (each test overrides those it is about); few distinct
# step shapes, so the compiled programs are mostly shared between tests.
BUDGET, CHUNK = 32, 16  # tokens per step, prompt tokens per request and step
OPTIONS = dict(page_size=PAGE, kv_cache_tokens=POOL_TOKENS, max_model_len=MAX_LEN,
               max_num_batched_tokens=BUDGET, long_prefill_chunk=CHUNK, max_num_seqs=4)
MIN_MARGIN = 1e-3  # smallest top-1 / top-2 logit gap allowed along an oracle trajectory


def random_tokens(seed: int, *lengths: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, CFG.vocab_size, n).tolist() for n in lengths]


# Prompts around page boundaries (1 token, a page - 1, a page, a page + 1, ...) with their
# max_tokens and the engine step at which each is added; prompt + output <= MAX_LEN.
LENGTHS = (1, 2, 15, 16, 17, 31, 33, 45)
MAX_TOKENS = (12, 9, 20, 6, 15, 11, 18, 19)
ARRIVALS = (0, 0, 1, 3, 4, 7, 10, 13)
PROMPTS = tuple(random_tokens(2024, *LENGTHS))

# Prompts sharing a 2-page prefix, for the prefix-cache tests.
_BASE, _A, _B, _C = random_tokens(5, 2 * PAGE, 4, 5, 9)
FIRST = _BASE + _A
CONCURRENT = _BASE + _B  # arrives while FIRST runs: reuses its 2 pages
PAGE_MULTIPLE = list(_BASE)  # exactly 2 pages: the last one is recomputed, 1 is reused
PARTIAL = _BASE[:20] + _C  # diverges inside the second page: 1 page reused

# `LLM.generate` batch: a 19-token prefix (a page and 3 tokens) with various suffixes.
_PREFIX, *_SUFFIXES = random_tokens(6, 19, 6, 13, 1, 4)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


_Tokenizer = CharTokenizer


# --------------------------------------------------------------------------------- the oracle

def _reference_logits(tokens: Sequence[int]) -> np.ndarray:
    """Logits [T, V] of a whole sequence: a float64 numpy Llama (no cache, no paging)."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), PARAMS)
    K, H, E = CFG.num_kv_heads, CFG.num_heads, CFG.head_dim
    G = H // K
    T = len(tokens)
    inv_freq = np.asarray(CFG.rope.inv_freq(E, CFG.max_position_embeddings), np.float64)
    angles = np.arange(T, dtype=np.float64)[:, None] * inv_freq[None]
    cos, sin = np.cos(angles)[:, None], np.sin(angles)[:, None]

    def norm(x: np.ndarray, w: np.ndarray) -> np.ndarray:
        return w * x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + CFG.rms_norm_eps)

    def rope(x: np.ndarray) -> np.ndarray:  # rotate-half, [T, N, E]
        x1, x2 = x[..., :E // 2], x[..., E // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)

    causal = np.tril(np.ones((T, T), bool))
    x = p.embed[np.asarray(tokens)]
    for layer in range(CFG.num_layers):
        lp = jax.tree.map(lambda a, i=layer: a[i], p.layers)
        qkv = (norm(x, lp.attn_norm) @ lp.wqkv.T).reshape(T, K, G + 2, E)
        q = rope(qkv[:, :, :G].reshape(T, H, E))  # query head h = k * G + g
        k = np.repeat(rope(qkv[:, :, G]), G, axis=1)
        v = np.repeat(qkv[:, :, G + 1], G, axis=1)
        scores = np.einsum("the,she->hts", q, k) / np.sqrt(E)
        scores = np.where(causal[None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        x = x + np.einsum("hts,she->the", weights, v).reshape(T, H * E) @ lp.wo.T
        gate_up = (norm(x, lp.mlp_norm) @ lp.w_gate_up.T).reshape(T, -1, 2)
        gate = gate_up[..., 0]
        x = x + (gate / (1.0 + np.exp(-gate)) * gate_up[..., 1]) @ lp.w_down.T
    head = p.embed if p.lm_head is None else p.lm_head
    return norm(x, p.final_norm) @ head.T


@functools.cache
def _reference(prompt: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    tokens = list(prompt)
    for i in range(max_tokens):
        logits = _reference_logits(tokens)[-1]
        second, first = np.sort(logits)[-2:]
        assert first - second >= MIN_MARGIN, (
            f"near-tie at output {i} of a {len(prompt)}-token prompt ({first - second:.2e}): "
            "the oracle is not decisive; pick other seeds")
        tokens.append(int(np.argmax(logits)))
    return tuple(tokens[len(prompt):])


def reference(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """Greedy continuation of `prompt`, recomputing the whole sequence for every token."""
    return list(_reference(tuple(prompt), max_tokens))


# ------------------------------------------------------------------------------ engine driver

@pytest.fixture(scope="module")
def make_core():
    """EngineCore factory; cores of equal cache geometry share their compiled programs."""
    programs: dict[tuple[int, int], dict] = {}

    def share(core: EngineCore) -> EngineCore:
        runner = core.runner
        if hasattr(runner, "_programs"):
            runner._programs = programs.setdefault((core.num_pages, core.page_size),
                                                   runner._programs)
        return core

    def make(**options) -> EngineCore:
        return share(EngineCore(PARAMS, CFG, _Tokenizer(), EngineConfig(**(OPTIONS | options))))

    make.share = share
    return make


def spy(core: EngineCore) -> list[SchedulerOutput]:
    """Record every step plan the core's scheduler makes (the core calls it each step)."""
    plans: list[SchedulerOutput] = []
    schedule = core.scheduler.schedule

    def recording() -> SchedulerOutput:
        plans.append(schedule())
        return plans[-1]

    core.scheduler.schedule = recording
    return plans


@dataclasses.dataclass
class Run:
    tokens: dict[str, list[int]]
    num_cached: dict[str, int]
    plans: list[SchedulerOutput]
    waiting: list[int]  # requests waiting after each step


def run(core: EngineCore, requests: Sequence[tuple[int, str, Sequence[int], int]]) -> Run:
    """Add (step, id, prompt, max_tokens) requests at their steps and step until all finish."""
    plans = spy(core)
    pending = sorted(requests, key=lambda r: r[0])
    tokens: dict[str, list[int]] = {rid: [] for _, rid, _, _ in requests}
    num_cached: dict[str, int] = {}
    finished: list[str] = []
    waiting = []
    step = 0
    while pending or core.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, prompt, max_tokens = pending.pop(0)
            core.add_request(prompt, greedy(max_tokens), request_id=rid)
        for delta in core.step():
            assert delta.request_id not in finished
            tokens[delta.request_id].extend(delta.token_ids)
            if delta.finished:
                assert delta.finish_reason == "length", delta
                finished.append(delta.request_id)
                num_cached[delta.request_id] = delta.num_cached_tokens
        waiting.append(core.stats().num_waiting)
        step += 1
        assert step < 2000, "the engine stopped making progress"
    assert sorted(finished) == sorted(tokens)
    assert core.stats().kv_pages_in_use == 0  # every page released
    core.scheduler.allocator.check_invariants()
    return Run(tokens, num_cached, plans, waiting)


def check_outputs(result: Run, requests: Sequence[tuple[int, str, Sequence[int], int]]) -> None:
    for _, rid, prompt, max_tokens in requests:
        assert result.tokens[rid] == reference(prompt, max_tokens), rid


def staggered() -> list[tuple[int, str, list[int], int]]:
    return [(step, f"r{i}-len{len(p)}", p, n)
            for i, (step, p, n) in enumerate(zip(ARRIVALS, PROMPTS, MAX_TOKENS, strict=True))]


def is_prompt_chunk(entry) -> bool:
    return entry.start < entry.request.num_prompt_tokens and len(entry.token_ids) > 1


# ------------------------------------------------------------------------------------- tests

def test_oracle_matches_the_model_forward():
    """The numpy oracle computes the same logits as jaxinfer's forward pass, and its greedy
    trajectories are decisive and differ per prompt (no constant answer)."""
    tokens = PROMPTS[-1]
    step = build_step_batch([SequenceChunk(tokens, 0, list(range(-(-len(tokens) // PAGE))))],
                            page_size=PAGE, num_slots=8 * PAGE)
    logits, _ = jax.jit(forward, static_argnums=1, static_argnames="all_logits")(
        PARAMS, CFG, Batch.from_step(step), init_cache(CFG, 8, PAGE), all_logits=True)
    chex.assert_trees_all_close(np.asarray(logits)[:len(tokens)],
                                _reference_logits(tokens).astype(np.float32),
                                atol=2e-4, rtol=0)
    outputs = {tuple(reference(p, n)) for p, n in zip(PROMPTS, MAX_TOKENS, strict=True)}
    assert len(outputs) == len(PROMPTS)


def test_each_prompt_alone_matches_the_oracle(make_core):
    """The second oracle: one request at a time, each prompt computed in one step (the
    default budget), no prefix caching."""
    core = make_core(max_num_batched_tokens=512, long_prefill_chunk=512, max_num_seqs=64,
                     enable_prefix_caching=False)
    for _, rid, prompt, max_tokens in staggered():
        result = run(core, [(0, rid, prompt, max_tokens)])
        assert result.tokens[rid] == reference(prompt, max_tokens), rid
        assert all(len(plan.scheduled) == 1 for plan in result.plans)


def test_chunked_prefill_beside_decodes(make_core):
    """Prompts cut into chunks of at most 16 tokens under a 32-token budget, computed beside
    the running decodes of requests added earlier."""
    core = make_core(enable_prefix_caching=False)
    requests = staggered()
    result = run(core, requests)
    check_outputs(result, requests)
    assert all(plan.num_batched_tokens <= BUDGET for plan in result.plans)
    assert all(len(e.token_ids) <= CHUNK for plan in result.plans for e in plan.scheduled)
    # A prompt's later chunk (start > 0) shares a step with decodes.
    assert any(any(is_prompt_chunk(e) and e.start > 0 for e in plan.scheduled)
               and any(e.start >= e.request.num_prompt_tokens for e in plan.scheduled)
               for plan in result.plans)
    # Each prompt longer than a chunk took several steps.
    for _, rid, prompt, _ in requests:
        chunks = [e for plan in result.plans for e in plan.scheduled
                  if e.request_id == rid and e.start < len(prompt)]
        assert len(chunks) >= -(-len(prompt) // CHUNK), rid
    assert max(result.waiting) > 0  # max_num_seqs held requests back


def test_without_chunked_prefill(make_core):
    """Each prompt is computed in one step; one longer than the 32-token budget gets a step
    of its own."""
    core = make_core(enable_chunked_prefill=False, enable_prefix_caching=False)
    requests = staggered()
    result = run(core, requests)
    check_outputs(result, requests)
    entries = [e for plan in result.plans for e in plan.scheduled]
    assert all(e.samples for e in entries)  # never a partial prompt
    over = [plan for plan in result.plans if plan.num_batched_tokens > BUDGET]
    assert over and all(len(plan.scheduled) == 1 for plan in over)
    # Short prompts do join running decodes.
    assert any(len(plan.scheduled) > 1 and any(len(e.token_ids) > 1 for e in plan.scheduled)
               for plan in result.plans)


@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "unchunked"])
def test_prefix_cache_reuse(make_core, chunked):
    """Requests sharing a 2-page prefix reuse cached pages: beside the request that computed
    them, after it, as an exact page multiple (its last page is recomputed), diverging
    inside a page, and through a page that holds generated tokens."""
    core = make_core(enable_chunked_prefill=chunked)
    after_output = FIRST + reference(FIRST, 16)[:13]  # 49 tokens, 13 of them outputs
    requests = [
        (0, "first", FIRST, 16),
        (4, "concurrent", CONCURRENT, 12),
        (4, "twin", list(CONCURRENT), 7),  # the same prompt, admitted in the same step
        (5, "page_multiple", PAGE_MULTIPLE, 10),
        (6, "partial", PARTIAL, 9),
        (30, "after_output", after_output, 8),  # "first" is done by then
    ]
    result = run(core, requests)
    check_outputs(result, requests)
    assert result.tokens["after_output"][:3] == result.tokens["first"][13:]
    assert result.num_cached == {
        "first": 0, "concurrent": 32, "twin": 32, "page_multiple": 16, "partial": 16,
        "after_output": 48}
    assert core.stats().prefix_cache_hit_rate > 0


def copy_writers(plans: Sequence[SchedulerOutput]) -> set[tuple[int, ...]]:
    """Prompts of the requests that write a page copied in the same step (copy-on-write)."""
    writers = set()
    for plan in plans:
        copies = {destination for _, destination in plan.page_copies}
        writers |= {tuple(e.request.prompt_token_ids) for e in plan.scheduled
                    if copies & set(e.pages)}
    return writers


def test_llm_generate_shares_a_partial_page_copy_on_write(make_core):
    """`LLM.generate` plans the batch (BatchLLM): followers take the leader's pages through
    `share_prefix`, including a partial last page that is copied when first written: by the
    leader, which is still filling it (24-token chunks), and by the followers."""
    llm = jaxinfer.LLM(PARAMS, CFG, _Tokenizer(), page_size=PAGE, kv_cache_tokens=POOL_TOKENS,
                       max_model_len=MAX_LEN, max_num_batched_tokens=24, max_num_seqs=4)
    make_core.share(llm.core)
    prompts = [_PREFIX + suffix for suffix in _SUFFIXES]  # the 20-token one shares 19 too
    prompts.insert(3, list(PROMPTS[7]))  # 45 tokens
    prompts.append(list(PROMPTS[7]))  # its duplicate shares 44 (2 pages and 12 tokens)
    max_tokens = [9, 14, 6, 10, 12, 5]
    plans = spy(llm.core)
    outs = llm.generate(prompts, [greedy(n) for n in max_tokens])
    for out, prompt, n in zip(outs, prompts, max_tokens, strict=True):
        assert out.token_ids == reference(prompt, n), out.index
    # Leaders (the longest output of each group) compute; followers reuse.
    assert [out.num_cached_tokens for out in outs] == [19, 0, 19, 0, 19, 44]
    writers = copy_writers(plans)
    assert tuple(prompts[1]) in writers  # the leader of the 19-token prefix
    assert writers & {tuple(prompts[i]) for i in (0, 2, 4)}  # and a follower
    assert llm.core.stats().kv_pages_in_use == 0
    llm.core.scheduler.allocator.check_invariants()

    # Again: the prefix cache now holds the full pages too; same outputs.
    del plans[:]
    again = llm.generate(prompts, [greedy(n) for n in max_tokens])
    assert [o.token_ids for o in again] == [o.token_ids for o in outs]
    assert all(o.num_cached_tokens >= 16 for o in again)
    assert llm.core.stats().kv_pages_in_use == 0


@pytest.mark.parametrize("caching", [True, False], ids=["prefix-cache", "no-prefix-cache"])
def test_preemption_recomputes_exactly(make_core, caching):
    """Seven requests of up to 4 pages each in a 12-page pool: running requests lose their
    pages and recompute their prompt and outputs later."""
    core = make_core(enable_prefix_caching=caching)
    prompts = random_tokens(9, 38, 25, 33, 20, 40, 29, 35)
    arrivals = (0, 0, 0, 2, 4, 6, 9)
    requests = [(step, f"p{i}", prompt, 24)
                for i, (step, prompt) in enumerate(zip(arrivals, prompts, strict=True))]
    result = run(core, requests)
    check_outputs(result, requests)
    assert core.num_preemptions > 0
    assert core.stats().num_preemptions == core.num_preemptions
    assert sum(len(plan.preempted) for plan in result.plans) == core.num_preemptions
    # A preempted request recomputed tokens beyond its prompt (its outputs).
    assert any(len(e.token_ids) > 1 and e.start + len(e.token_ids) > e.request.num_prompt_tokens
               for plan in result.plans for e in plan.scheduled)


def test_contiguous_layout(make_core):
    """vAttention-style: page_size == max_model_len, so each sequence holds one page; three
    pages for eight requests, prompts chunked beside decodes."""
    core = make_core(page_size=MAX_LEN, kv_cache_tokens=3 * MAX_LEN)
    requests = staggered()
    result = run(core, requests)
    check_outputs(result, requests)
    assert all(len(e.pages) == 1 for plan in result.plans for e in plan.scheduled)
    assert max(len(plan.scheduled) for plan in result.plans) == 3
    assert max(result.waiting) > 0
    assert any(any(is_prompt_chunk(e) and e.start > 0 for e in plan.scheduled)
               for plan in result.plans)
