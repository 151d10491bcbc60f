"""Benchmark inputs follow BENCHMARKS.md exactly (every system must see the same tokens),
and the cost model counts what the workloads compute. No timing here: benchmarks are run
by `jaxinfer bench`, not by the tests."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from jaxinfer import bench, bench_serve
from jaxinfer.config import ModelConfig


def test_workload_inputs_follow_benchmarks_md():
    (single,), new = bench.workload_inputs("single")
    rng = random.Random(1)
    assert single == [rng.randrange(100, 49000) for _ in range(128)] and new == 128

    prompts, new = bench.workload_inputs("batch")
    sizes = random.Random(7)
    assert [len(p) for p in prompts] == [sizes.randrange(64, 513) for _ in range(32)]
    assert prompts[5] == bench.random_prompt(5, len(prompts[5])) and new == 64
    assert sum(map(len, prompts)) == 7603  # BENCHMARKS.md: 7,603 prompt tokens

    prompts, new = bench.workload_inputs("shared_prefix")
    prefix = bench.random_prompt(11, 512)
    assert len(prompts) == 32 and new == 16
    for i, p in enumerate(prompts):
        assert p[:512] == prefix and p[512:] == bench.random_prompt(100 + i, 32)

    with pytest.raises(ValueError, match="unknown workload"):
        bench.workload_inputs("nope")


def test_serve_requests_extend_the_batch_workload():
    prompts = bench_serve.serve_prompts(64)
    assert len(prompts) == 64 and prompts[:32] == bench.batch_prompts()
    assert all(64 <= len(p) <= 512 for p in prompts)


def test_poisson_arrivals():
    arrivals = bench_serve.poisson_arrivals(4000, 2.0, seed=0)
    assert arrivals == sorted(arrivals) and arrivals[0] >= 0
    gaps = np.diff([0.0, *arrivals])
    assert abs(gaps.mean() - 0.5) < 0.03  # exponential gaps of mean 1 / rate
    assert bench_serve.poisson_arrivals(4000, 2.0, seed=0) == arrivals
    assert bench_serve.poisson_arrivals(5, math.inf) == [0.0] * 5  # all at once


def test_parse_rates():
    assert bench_serve.parse_rates("0.5, 1,inf") == (0.5, 1.0, math.inf)
    for bad in ("", "0", "-1", "fast"):
        with pytest.raises(ValueError):
            bench_serve.parse_rates(bad)


def test_flop_model_matches_benchmarks_md(monkeypatch):
    cfg = ModelConfig(family="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                      num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                      max_position_embeddings=8192)
    # ~0.213 GFLOP per prompt token without the LM head; ~0.27 with it (a generated token).
    assert bench.matmul_flops_per_token(cfg) / 1e9 == pytest.approx(0.213, abs=0.003)
    assert (bench.matmul_flops_per_token(cfg) + bench.head_flops(cfg)) / 1e9 == \
        pytest.approx(0.27, abs=0.005)
    prompts, new = bench.workload_inputs("batch")
    total = bench.workload_flops(cfg, prompts, new)
    # BENCHMARKS.md: 1.62 TFLOP of prefill + 0.55 of decode, counting the matmuls; our count
    # adds attention (q.k and p.v), so compute_util is measured against more work.
    monkeypatch.setattr(bench, "attention_flops", lambda cfg, context: 0.0)
    matmuls = bench.workload_flops(cfg, prompts, new)
    assert matmuls / 1e12 == pytest.approx(2.17, abs=0.02)
    assert 0.03 < (total - matmuls) / 1e12 < 0.15


def test_median_run_reports_the_median_and_takes_peers_without_cache_counts():
    class Peer:
        name = "peer"
        walls = iter([9.0, 3.0, 1.0, 2.0])  # the first call is the untimed warm-up

        def run(self, prompts, new_tokens):
            return {"ttft_s": 0.1, "decode_s": 1.0, "wall_s": next(self.walls),
                    "tokens": [[1, 2]]}

    result = bench._median_run(Peer(), [[5]], 2, repeats=3)
    assert result["wall_s"] == 2.0 and result["cached_tokens"] == 0


def test_llamacpp_peer_refuses_what_it_cannot_run(monkeypatch):
    """`--compare llamacpp` is checked before anything loads: the single workload only, and
    a missing llama-cpp-python names the install command."""
    from jaxinfer.errors import ConfigError

    with pytest.raises(ConfigError, match="single workload"):
        bench.run_benchmark(bench.BenchOptions(workload="batch", compare="llamacpp"))
    monkeypatch.setitem(__import__("sys").modules, "llama_cpp", None)  # not importable
    with pytest.raises(ConfigError, match="pip install llama-cpp-python"):
        bench.run_benchmark(bench.BenchOptions(workload="single", compare="llamacpp"))


def test_llamacpp_peer_generates_our_greedy_tokens():
    """Where llama-cpp-python is installed (it compiles llama.cpp from source, so CI does
    not install it): llama.cpp greedy-decoding the SmolLM2 Q4_1 file gives the tokens our
    engine gives on the same file kept quantized, an independent oracle for the GGUF path."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional peer")
    import jaxinfer
    from jaxinfer.weights.loader import default_model_path

    prompt = bench.random_prompt(3, 32)
    peer = bench.LlamaCppSystem(str(default_model_path()), context=128).run([prompt], 16)
    ours = bench.JaxinferSystem(bench.BenchOptions(), llm=jaxinfer.load(
        quantize="gguf", progress=False, max_model_len=128)).run([prompt], 16)
    assert peer["tokens"][0][:8] == ours["tokens"][0][:8]
    assert peer["ttft_s"] > 0 and peer["decode_s"] > 0


def test_stall_summary_compares_busy_gaps_with_the_same_tokens_alone():
    """The stall experiment's control: each busy-window gap is set against the same
    request's gap at the same token when the shorts ran alone, so a rise that comes from
    the shorts' own growing context is not charged to the long prompts."""
    S = bench_serve._Stream
    # Two shorts whose gaps grow with their context (0.1 s, 0.2 s, ... alone); with long
    # prompts around, gaps 2-4 (arriving in the busy window (1.0, 2.0]) are 1.5x longer.
    control = [S(send_s=0.0, chunk_s=[0.1 * k * (k + 1) / 2 for k in range(6)])
               for _ in range(2)]
    shorts = []
    for _ in range(2):
        t, chunks = 0.0, [0.0]
        for k in range(1, 6):
            t += 0.1 * k * (1.5 if 2 <= k - 1 <= 4 else 1.0)
            chunks.append(t)
        shorts.append(S(send_s=0.0, chunk_s=chunks))
    busy_at = [at for at, _ in shorts[0].gaps()]
    start, end = busy_at[1], busy_at[4]  # window (gap 1's arrival, gap 4's arrival]
    out = bench_serve._control_fields(shorts, control, start, end)
    assert out["control_gaps"] == 6  # gaps 2, 3, 4 of both streams
    assert out["tpot_p99_rise_vs_control"] == pytest.approx(1.5)
    assert out["tpot_p50_rise_vs_control"] == pytest.approx(1.5)
    assert out["control_itl_p99_s"] == pytest.approx(0.5, abs=1e-3)
    # the quiet-window ratio of the same streams says more: the shorts' context grew
    quiet = bench_serve._window_gaps(shorts, 0.0, start)
    busy = bench_serve._window_gaps(shorts, start, end)
    assert max(busy) / max(quiet) > 3
    # a control that ended early covers only the gaps it has
    short_control = [S(send_s=0.0, chunk_s=c.chunk_s[:4]) for c in control]
    assert bench_serve._control_fields(shorts, short_control, start, end)["control_gaps"] == 2
