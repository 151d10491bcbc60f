#!/usr/bin/env python3
"""Speed of the compressed KV caches (issue 7): decode at long context, prefill overhead.

Two benchmarks on SmolLM2-135M (float32, CPU), one JSON object per line on stdout,
progress on stderr. The machine is shared, so every figure is a ratio against the full
cache measured in the same process, next to it in time.

decode  S sequences at `--context` tokens (default 8 x 8192, where the KV reads outweigh
        the ~540 MB of weights). Prefilling that for real would take minutes per policy,
        so each policy's state is built synthetically: every layer gets random keys,
        values, queries and attention statistics of the real shapes, which go through the
        policy's own `prefill` (exactly what `compress` does on a captured prefill), with
        `seen` = context. The step's cost depends on the shapes, not on the numbers. One
        full-cache state (budget = context + the steps run) stays alive for the whole run;
        each other policy's state is built, timed and deleted in turn. Steps alternate
        full / policy (after a compile step of each), so every ratio compares neighbours
        in time. Policies: full (XLA and native kernel), streaming at 25% (native kernel,
        which reads the kept slots in place, and XLA), h2o at 25% (XLA), int8, kivi4, kivi2.
        Bytes reported: `state_bytes` (every array of the cache), `read_bytes` (what the
        step's attention reads as the code is written: the keys/values of the slots it
        attends plus positions and scores for eviction caches, the whole store for the
        quantized caches, which dequantize every slot each step) and `weight_bytes`; with
        `peak_bw_gbs` measured in the same run, `bw_util` = (read + weights) / step / peak.
        `roofline_vs_full` is the ratio those bytes alone predict. Bars: a 25%-budget step
        <= 0.5x the full-cache step; KIVI-2 reads fewer bytes than int8.

prefill One `--prefill-context`-token prompt (default 4096; BENCHMARKS.md's `long` prompt,
        random ids of seed 3) through `prefill` with the full cache and with h2o, snapkv,
        d2o, streaming at 25% and kivi2; each policy is compiled ahead of time (no warm-up
        run) and timed `--prefill-repeats` times in interleaved rounds (median), beside the
        serving engine's own prefill of the same prompt (`jaxinfer.load()` defaults, one
        output token, prefix cache reset) in the same rounds.
        overhead = (t_policy - t_full) / t_full and vs_engine = t_policy / t_engine. Bar:
        the compression work costs <= 10% of the prefill it follows, checked both ways
        (`passed`, `passed_vs_engine`). The compression step is also timed alone: `compress`
        of one captured prefill (`capture_prefill`), as `compress_frac` =
        t_compress / t_full_prefill. That excludes the attention statistics a policy makes
        the prefill compute (H2O's accumulated attention, `needs_col_all`; SnapKV's
        observation-window columns), so `overhead` is the bar's figure and `compress_frac`
        says how much of it is the selection itself.

    python scripts/bench_kv.py                         # the issue's sizes
    python scripts/bench_kv.py --seqs 2 --context 2048 --prefill-context 1024
    python scripts/bench_kv.py --smoke                 # tiny, for CI (2 x 256, 256 prefill)
    python scripts/bench_kv.py --only decode
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxinfer import cpu_kernels  # noqa: E402
from jaxinfer.kvcompress.attend import PrefillStats  # noqa: E402
from jaxinfer.kvcompress.model import (  # noqa: E402
    KVState,
    capture_prefill,
    compress,
    decode_step,
    prefill,
)
from jaxinfer.kvcompress.policies import PrefillContext  # noqa: E402
from jaxinfer.kvcompress.registry import make_policy  # noqa: E402
from jaxinfer.kvcompress.slots import SlotCache, nbytes  # noqa: E402
from jaxinfer.model.params import param_bytes  # noqa: E402
from jaxinfer.roofline import measure_peaks  # noqa: E402

# (label, policy name, budget fraction or None, use_native)
DECODE_RUNS = (
    ("streaming-native", "streaming", 0.25, True),
    ("streaming", "streaming", 0.25, False),
    ("h2o", "h2o", 0.25, False),
    ("int8", "int8", None, False),
    ("kivi4", "kivi4", None, False),
    ("kivi2", "kivi2", None, False),
)
PREFILL_RUNS = (("h2o", 0.25), ("snapkv", 0.25), ("d2o", 0.25), ("streaming", 0.25),
                ("kivi2", None))
PREFILL_NEW_TOKENS = 32  # the `long` workload's generation, sizes max_len
ENGINE = "engine"  # the serving engine's own prefill of the same prompt


def log(msg: str) -> None:
    print(f"[bench_kv {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


def random_prompt(seed: int, length: int) -> list[int]:
    """BENCHMARKS.md's canonical prompt: Random(seed).randrange(100, 49000) per token."""
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def budget_of(frac: float | None, context: int) -> int | None:
    return None if frac is None else max(8, int(round(frac * context)))


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# ------------------------------------------------------------------ synthetic state
@functools.partial(jax.jit, static_argnames=("cfg", "policy"))
def synthetic_state(cfg: Any, policy: Any, base_k: jax.Array, base_v: jax.Array,
                    base_stat: jax.Array, lengths: jax.Array) -> KVState:
    """The state `compress(policy, captured, lengths)` would give for a capture whose
    layers hold random keys/values/queries/statistics (base arrays rolled along T and
    rescaled per layer, so layers differ without generating L x the random numbers).

    base_k, base_v: [S, T, K, E]; base_stat: [S, K, T] positive; queries are random too
    (only ActQKV reads them; XLA drops them otherwise)."""
    S, T, K, E = base_k.shape
    G = cfg.num_query_groups

    def one(layer: jax.Array) -> Any:
        shift = layer * 37 + 1
        k = jnp.roll(base_k, shift, axis=1) * (1.0 + 0.01 * layer)
        v = jnp.roll(base_v, 2 * shift, axis=1)
        q = jnp.broadcast_to(jnp.roll(base_k, 3 * shift, axis=1)[:, :, :, None, :],
                             (S, T, K, G, E))
        col_all = jnp.roll(base_stat, shift, axis=-1)
        col_obs = jnp.roll(base_stat, 5 * shift, axis=-1)
        stats = PrefillStats(col_all=col_all, col_obs=col_obs,
                             col_hits=jnp.floor(col_obs * 8.0), col_obs_long=col_obs)
        return policy.prefill(PrefillContext(q=q, k=k.astype(base_k.dtype),
                                             v=v.astype(base_v.dtype), lengths=lengths,
                                             stats=stats))

    cache = jax.lax.map(one, jnp.arange(cfg.num_layers, dtype=jnp.int32))
    return KVState(cache=cache, seen=lengths.astype(jnp.int32))


def read_bytes(policy: Any, cache: Any, seen: int, native: bool) -> int:
    """Bytes of KV state one decode step reads, as the policies' decode is written.

    Eviction caches ([L, S, B+1, K, E] slots): the XLA path attends all B+1 slots (masked);
    the native kernel reads only the valid prefix min(seen, B) + 1. Both read the slot
    positions (mask / victim choice); policies that score by attention read and write the
    scores too. Quantized caches unpack and dequantize their whole store every step."""
    if not isinstance(cache, SlotCache):
        return nbytes(cache)
    L, S, B1, K, E = cache.k.shape
    slots = min(seen, B1 - 1) + 1 if native else B1
    kv = 2 * L * S * slots * K * E * cache.k.dtype.itemsize
    meta = nbytes(cache.pos)
    if getattr(policy, "needs_probs", False):
        meta += 2 * nbytes(cache.score)
    if getattr(policy, "merge", False):
        meta += nbytes(cache.mult)
    return int(kv + meta)


class DecodeTimer:
    """Times single decode steps of one state, keeping the (donated) state current."""

    def __init__(self, params, cfg, policy, state: KVState, native: bool, tokens: jax.Array):
        self.params, self.cfg, self.policy, self.native = params, cfg, policy, native
        self.state, self.tokens = state, tokens

    def step(self) -> float:
        t0 = time.perf_counter()
        logits, self.state = decode_step(self.params, self.cfg, self.policy, self.tokens,
                                         self.state, use_native=self.native)
        jax.block_until_ready((logits, self.state))
        dt = time.perf_counter() - t0
        if not bool(jnp.all(jnp.isfinite(logits))):
            raise RuntimeError(f"non-finite logits from {self.policy}")
        return dt


def bench_decode(model, args, peaks: dict[str, float], common: dict[str, Any]) -> list[dict]:
    params, cfg = model.params, model.cfg
    S, T = args.seqs, args.context
    native_ok = cpu_kernels.available()
    runs = [r for r in DECODE_RUNS if native_ok or not r[3]]
    if not native_ok:
        log("native CPU kernels unavailable: skipping the native-kernel runs")
    steps_per_state = 1 + args.steps  # compile step + timed steps
    # The full cache lives all run: it takes a compile step per path and a step per pair.
    max_len = T + 2 * steps_per_state + len(runs) * args.steps + 8
    rng = np.random.default_rng(0)
    dt = jnp.dtype(cfg.dtype)
    base_k = jnp.asarray(rng.standard_normal((S, T, cfg.num_kv_heads, cfg.head_dim),
                                             np.float32), dt)
    base_v = jnp.asarray(rng.standard_normal(base_k.shape, np.float32), dt)
    base_stat = jnp.asarray(rng.exponential(1.0, (S, cfg.num_kv_heads, T)).astype(np.float32))
    lengths = jnp.full((S,), T, jnp.int32)
    tokens = jnp.asarray(rng.integers(100, 49000, S), jnp.int32)
    wbytes = param_bytes(params)
    rows: list[dict] = []

    def build(policy):
        t0 = time.perf_counter()
        state = synthetic_state(cfg, policy, base_k, base_v, base_stat, lengths)
        jax.block_until_ready(state)
        return state, time.perf_counter() - t0

    def row_for(label, name, policy, budget, native, times, full_times, state_b, read_b,
                full_label, full_state_b, full_read_b, build_s):
        t, tf = median(times), median(full_times)
        tot = read_b + wbytes
        return dict(bench="decode", policy=label, kv_policy=name, native=native,
                    budget=budget, budget_frac=None if budget is None else round(budget / T, 4),
                    seqs=S, context=T, **common, step_s=round(t, 5),
                    step_s_all=[round(x, 5) for x in times], full_step_s=round(tf, 5),
                    full=full_label, vs_full=round(t / tf, 4),
                    state_bytes=state_b, read_bytes=read_b, weight_bytes=wbytes,
                    full_state_bytes=full_state_b, full_read_bytes=full_read_b,
                    bytes_vs_full=round(state_b / full_state_b, 4),
                    read_vs_full=round(read_b / full_read_b, 4),
                    # The step ratio the bytes alone predict (weights + KV reads).
                    roofline_vs_full=round(tot / (full_read_b + wbytes), 4),
                    eff_gbs=round(tot / t / 1e9, 2),
                    bw_util=round(tot / t / 1e9 / peaks["peak_bw_gbs"], 3),
                    build_s=round(build_s, 2))

    full = make_policy("full", max_len=max_len)
    log(f"decode: building the full cache, {S} x {T} (budget {max_len})")
    fstate, fbuild = build(full)
    f_state_b = nbytes(fstate.cache)
    log(f"  full state {f_state_b / 1e9:.2f} GB built in {fbuild:.1f} s")
    fulls = {False: DecodeTimer(params, cfg, full, fstate, False, tokens)}
    del fstate
    if native_ok:
        # Both paths read the same state; only the attention differs.
        fulls[True] = fulls[False]
    compiled = set()
    full_all: dict[bool, list[float]] = {False: [], True: []}

    def full_step(native: bool) -> float:
        timer = fulls[native]
        timer.native = native
        if native not in compiled:
            log(f"  compiling full step (native={native})")
            timer.step()
            compiled.add(native)
        return timer.step()

    for label, name, frac, native in runs:
        budget = budget_of(frac, T)
        policy = make_policy(name, max_len=max_len, budget=budget)
        log(f"decode: {label} (budget {budget}): building")
        state, bsec = build(policy)
        state_b = nbytes(state.cache)
        read_b = read_bytes(policy, state.cache, T, native)
        timer = DecodeTimer(params, cfg, policy, state, native, tokens)
        del state
        t0 = time.perf_counter()
        timer.step()  # compile
        log(f"  built {state_b / 1e9:.3f} GB in {bsec:.1f} s, compile step "
            f"{time.perf_counter() - t0:.1f} s; timing {args.steps} paired steps")
        times, ftimes = [], []
        for _ in range(args.steps):
            ftimes.append(full_step(native))
            times.append(timer.step())
        full_all[native] += ftimes
        fseen = int(fulls[native].state.seen[0])
        f_read_b = read_bytes(full, fulls[native].state.cache, fseen, native)
        row = row_for(label, name, policy, budget, native, times, ftimes, state_b, read_b,
                      "full-native" if native else "full", f_state_b, f_read_b, bsec)
        emit(row)
        rows.append(row)
        log(f"  {label}: {row['step_s']:.4f} s/step vs full {row['full_step_s']:.4f} "
            f"({row['vs_full']:.3f}x)")
        del timer

    # The full cache's own lines (all its timed steps; ratio 1 by definition).
    for native in (False, True):
        if not full_all[native]:
            continue
        timer = fulls[native]
        seen = int(timer.state.seen[0])
        rb = read_bytes(full, timer.state.cache, seen, native)
        row = row_for("full-native" if native else "full", "full", full, max_len, native,
                      full_all[native], full_all[native], f_state_b, rb,
                      "full-native" if native else "full", f_state_b, rb, fbuild)
        emit(row)
        rows.append(row)
    fulls.clear()  # frees the full cache before the prefill benchmark
    return rows


def decode_verdicts(rows: list[dict], context: int, seqs: int) -> None:
    by = {r["policy"]: r for r in rows}
    # Bar 1: every 25%-budget step against the full cache on its own path, and the fastest
    # 25% step against the fastest full step.
    quarter = [r for r in rows if r["budget_frac"] == 0.25]
    full_rows = [by[k] for k in ("full", "full-native") if k in by]
    if quarter and full_rows:
        best_q = min(quarter, key=lambda r: r["step_s"])
        best_f = min(full_rows, key=lambda r: r["step_s"])
        # Times of different rows come from different moments: compare through the ratios
        # measured side by side (each policy's vs_full), chaining native/XLA through the
        # full-cache steps of both paths.
        f_ratio = {r["policy"]: r["step_s"] for r in full_rows}
        fastest_full = min(f_ratio.values())
        best_ratio = min(r["vs_full"] * f_ratio[r["full"]] / fastest_full for r in quarter)
        emit(dict(bench="verdict", bar="decode_25pct_le_0.5x_full", seqs=seqs,
                  context=context, target=0.5,
                  per_policy={r["policy"]: r["vs_full"] for r in quarter},
                  best_policy=best_q["policy"], best_full=best_f["policy"],
                  best_vs_best_full=round(best_ratio, 4),
                  roofline_vs_full={r["policy"]: r["roofline_vs_full"] for r in quarter},
                  passed=bool(best_ratio <= 0.5),
                  all_passed=bool(all(r["vs_full"] <= 0.5 for r in quarter))))
    if "kivi2" in by and "int8" in by:
        k2, i8 = by["kivi2"], by["int8"]
        emit(dict(bench="verdict", bar="kivi2_reads_fewer_bytes_than_int8", seqs=seqs,
                  context=context, kivi2_state_bytes=k2["state_bytes"],
                  int8_state_bytes=i8["state_bytes"], kivi2_read_bytes=k2["read_bytes"],
                  int8_read_bytes=i8["read_bytes"],
                  bytes_ratio=round(k2["read_bytes"] / i8["read_bytes"], 4),
                  kivi2_step_s=k2["step_s"], int8_step_s=i8["step_s"],
                  kivi2_vs_full=k2["vs_full"], int8_vs_full=i8["vs_full"],
                  passed=bool(k2["read_bytes"] < i8["read_bytes"]),
                  faster_too=bool(k2["vs_full"] < i8["vs_full"])))


# ------------------------------------------------------------------ prefill overhead
def bench_prefill(model, args, common: dict[str, Any]) -> list[dict]:
    params, cfg = model.params, model.cfg
    T = args.prefill_context
    max_len = T + PREFILL_NEW_TOKENS
    tokens = jnp.asarray([random_prompt(3, T)], jnp.int32)
    lengths = jnp.asarray([T], jnp.int32)
    runs = [("full", "full", None)] + [(f"{n}" if f is None else f"{n}@{f:g}", n, f)
                                       for n, f in PREFILL_RUNS]
    compiled, policies = {}, {}
    for label, name, frac in runs:
        budget = budget_of(frac, T)
        policies[label] = (name, budget, make_policy(name, max_len=max_len, budget=budget))
        t0 = time.perf_counter()
        compiled[label] = prefill.lower(params, cfg, policies[label][2], tokens,
                                        lengths).compile()
        log(f"prefill: compiled {label} in {time.perf_counter() - t0:.1f} s")
    # The serving engine as users run it (`jaxinfer.load()` defaults: chunked prefill of
    # 512-token steps over the paged cache, no statistics): the prefill a user of the
    # compressed path would otherwise have. Warmed on another prompt of the same length
    # (compiles its buckets); the prefix cache is reset before every timed prompt.
    import jaxinfer
    from jaxinfer.sampling import SamplingParams
    engine = jaxinfer.load(args.model, progress=False, max_model_len=max_len)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    t0 = time.perf_counter()
    engine.generate([random_prompt(4, T)], one)
    log(f"prefill: warmed the engine in {time.perf_counter() - t0:.1f} s")
    prompt_ids = [int(t) for t in np.asarray(tokens[0])]
    times: dict[str, list[float]] = {label: [] for label, _, _ in runs}
    times[ENGINE] = []
    state_b: dict[str, int] = {}
    for rnd in range(args.prefill_repeats):
        # Rotate the order each round so no policy always follows the same neighbour.
        order = runs[rnd % len(runs):] + runs[:rnd % len(runs)]
        engine.reset_prefix_cache()
        t0 = time.perf_counter()
        engine.generate([prompt_ids], one)
        times[ENGINE].append(time.perf_counter() - t0)
        log(f"prefill round {rnd + 1}/{args.prefill_repeats}: engine {times[ENGINE][-1]:.2f} s")
        for label, _, _ in order:
            t0 = time.perf_counter()
            logits, state = compiled[label](params, tokens, lengths)
            jax.block_until_ready((logits, state))
            times[label].append(time.perf_counter() - t0)
            state_b[label] = nbytes(state.cache)
            del logits, state
            log(f"prefill round {rnd + 1}/{args.prefill_repeats}: {label} "
                f"{times[label][-1]:.2f} s")
    # Compression alone, on one captured prefill.
    compress_s: dict[str, float] = {}
    if not args.no_compress_check:
        log("prefill: capture_prefill for the compress-only timing")
        _, captured = capture_prefill(params, cfg, tokens, lengths)
        jax.block_until_ready(captured)
        for label, _, _ in runs:
            policy = policies[label][2]
            fn = compress.lower(policy, captured, lengths).compile()
            ts = []
            for _ in range(max(3, args.prefill_repeats)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(captured, lengths))
                ts.append(time.perf_counter() - t0)
            compress_s[label] = median(ts)
        del captured
    del engine
    tf, te = median(times["full"]), median(times[ENGINE])
    emit(dict(bench="prefill", policy=ENGINE, seqs=1, context=T, **common,
              prefill_s=round(te, 3), prefill_s_all=[round(x, 3) for x in times[ENGINE]],
              full_prefill_s=round(tf, 3)))
    rows = []
    for label, name, frac in runs:
        t = median(times[label])
        row = dict(bench="prefill", policy=label, kv_policy=name, budget=policies[label][1],
                   budget_frac=frac, seqs=1, context=T, **common,
                   prefill_s=round(t, 3), prefill_s_all=[round(x, 3) for x in times[label]],
                   full_prefill_s=round(tf, 3), overhead=round((t - tf) / tf, 4),
                   engine_prefill_s=round(te, 3), vs_engine=round(t / te, 4),
                   state_bytes=state_b[label],
                   bytes_vs_full=round(state_b[label] / state_b["full"], 4))
        if label in compress_s:
            row["compress_s"] = round(compress_s[label], 4)
            row["compress_frac"] = round(compress_s[label] / tf, 4)
        emit(row)
        rows.append(row)
    comp = [r for r in rows if r["policy"] != "full"]
    emit(dict(bench="verdict", bar="compression_le_10pct_of_prefill", seqs=1, context=T,
              target=0.10, overhead={r["policy"]: r["overhead"] for r in comp},
              compress_frac={r["policy"]: r.get("compress_frac") for r in comp},
              max_overhead=max(r["overhead"] for r in comp),
              vs_engine={r["policy"]: r["vs_engine"] for r in comp},
              passed_vs_engine=bool(all(r["vs_engine"] <= 1.10 for r in comp)),
              max_compress_frac=max((r.get("compress_frac") or 0.0) for r in comp),
              passed=bool(all(r["overhead"] <= 0.10 for r in comp)),
              passed_compress_only=(None if not compress_s else
                                    bool(all(r["compress_frac"] <= 0.10 for r in comp)))))
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=8, help="decode: sequences (default 8)")
    ap.add_argument("--context", type=int, default=8192,
                    help="decode: tokens already in each sequence's cache (default 8192)")
    ap.add_argument("--steps", type=int, default=2,
                    help="decode: timed steps per policy, each paired with a full step")
    ap.add_argument("--prefill-context", type=int, default=4096,
                    help="prefill: prompt length (default 4096)")
    ap.add_argument("--prefill-repeats", type=int, default=2,
                    help="prefill: timed rounds over all policies (default 2)")
    ap.add_argument("--no-compress-check", action="store_true",
                    help="prefill: skip timing `compress` alone on a captured prefill")
    ap.add_argument("--only", choices=("decode", "prefill"), help="run one benchmark")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny sizes for CI: 2 x 256 decode, 256-token prefill, 2 steps")
    ap.add_argument("--model", default=None, help="model path (default: SmolLM2-135M)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.seqs, args.context, args.steps = 2, 256, 2
        args.prefill_context, args.prefill_repeats = 256, 2
    if args.context < 32 or args.prefill_context < 64:
        ap.error("--context must be >= 32 and --prefill-context >= 64")

    from jaxinfer.weights.loader import load_model
    t0 = time.perf_counter()
    model = load_model(args.model, attention_impl="xla", matmul_impl="cpu")
    log(f"loaded the model in {time.perf_counter() - t0:.1f} s; measuring peaks")
    peaks = measure_peaks()
    dev = jax.devices()[0]
    device = f"cpu-{os.cpu_count()}core" if dev.platform == "cpu" else dev.device_kind
    common = dict(model="SmolLM2-135M", dtype=str(jnp.dtype(model.cfg.dtype)),
                  device=device, **peaks)
    log(f"peaks {peaks}")
    if args.only in (None, "decode"):
        rows = bench_decode(model, args, peaks, common)
        decode_verdicts(rows, args.context, args.seqs)
    if args.only in (None, "prefill"):
        bench_prefill(model, args, common)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
