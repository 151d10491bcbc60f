"""The `serve` benchmark of BENCHMARKS.md, and the stall experiment of chunked prefill.

Two parts, each printing one JSON object per result line (and appending it to
`ServeBenchOptions.output`):

* **Rate sweep** (`workload: "serve"`): the OpenAI-compatible server runs in-process on
  loopback; a real HTTP client (httpx) streams `/v1/completions` requests whose prompts are
  token ids (the `batch` length distribution extended to `num_requests` prompts: lengths
  `Random(7).randrange(64, 513)`, prompt i seeded i), greedy, `ignore_eos`, arriving as a
  Poisson process at each rate (the same exponential draws, scaled by 1/rate; "inf" sends
  all at once). Reported per rate: TTFT p50/p99, time per output token p50/p99 (per
  request: (last token - first token) / (tokens - 1)), the inter-token gaps of all
  streams p50/p99, `req_s`, `gen_tok_s`, `wall_s`.
* **Stall experiment** (`workload: "serve_stall"`, Sarathi-Serve's claim): short requests
  decode steadily, then long prompts arrive one after another; the inter-token gaps of the
  short requests while the long prompts are prefilled are compared with the gaps before,
  with chunked prefill on (steps of at most `stall_budget` tokens) and off (each long
  prompt computed in one step of its own, stalling every decode). `tpot_p99_rise` is the
  p99 gap during the long prompts over the p99 gap before them.

Timings are client-side (what an HTTP client sees), after warm-up passes that compile the
step programs; `compile_s` in each record says how many seconds of compilation still fell
inside the timed run (shapes the warm-up did not cover), so a polluted figure is visible.
Prefix caching is off by default: every rate sends the same prompts.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxinfer.bench import (
    BATCH_NEW,
    batch_prompts,
    device_name,
    measure_peaks,
    random_prompt,
    workload_flops,
)
from jaxinfer.weights.loader import DEFAULT_MODEL_NAME

__all__ = ["DEFAULT_RATES", "ServeBenchOptions", "parse_rates", "poisson_arrivals",
           "run_serve_benchmark", "serve_prompts", "stall_prompts"]

#: Default request rates of the sweep (requests per second; inf: all at once).
DEFAULT_RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, math.inf)


@dataclasses.dataclass(frozen=True)
class ServeBenchOptions:
    """What `run_serve_benchmark` runs.

    Attributes:
      model: GGUF file, Hugging Face folder or checkpoints/ name (None: SmolLM2-135M).
      dtype: "float32" or "bfloat16".
      sweep: run the rate sweep (`workload: "serve"`).
      stall: run the stall experiment (`workload: "serve_stall"`).
      rates: request rates of the sweep, requests/s; `math.inf` sends all at once.
      num_requests: requests per rate.
      max_tokens: new tokens per request of the sweep.
      arrival_seed: seed of the Poisson inter-arrival draws.
      max_num_seqs, max_num_batched_tokens, long_prefill_chunk, page_size,
        enable_prefix_caching, enable_chunked_prefill: the sweep engine's `EngineConfig`
        (long_prefill_chunk None: the token budget).
      kv_cache_tokens: the sweep engine's KV pool (None: every request at full length).
      warmup_rates: untimed passes over the sweep's requests before the timed ones, to
        compile the step programs (all at once covers the large batches, a finite rate
        the trickle of lone prompts beside few decodes).
      max_attempts: a timed pass (sweep rate or stall run) during which the engine still
        compiled a program is run again, up to this many times in all; the last attempt
        is reported with its `attempts` and `compile_s`. Step shapes depend on how
        requests happen to meet in the engine, so no warm-up covers all of them.
      stall_budget: token budget (and prefill chunk) of the chunked-prefill engine.
      stall_short_requests, stall_short_prompt_len, stall_short_new_tokens: the steady
        decoding load.
      stall_long_requests, stall_long_prompt_len: the long prompts (lengths drawn from
        `Random(13).randrange(*stall_long_prompt_len)`, half-open range).
      stall_long_new_tokens: new tokens of each long prompt.
      stall_trigger_tokens: tokens every short request has streamed before the first long
        prompt is sent (the end of the quiet window).
      stall_long_spacing_tokens: further short-request tokens between two long prompts.
      stall_control: also run the short requests alone on the same engine and compare each
        busy-window gap with the same request's gap at the same token in that run
        (`tpot_p99_rise_vs_control`): the rise the long prompts cause, apart from the
        shorts' own growing context, which the quiet window (their first tokens) lacks.
      peaks: measure the machine's bandwidth / FLOP peaks and report them (and
        `compute_util` for the sweep).
      output: file to append the JSON lines to.
      progress: tqdm progress bars on stderr.
    """

    model: str | None = None
    dtype: str = "float32"
    sweep: bool = True
    stall: bool = True
    rates: tuple[float, ...] = DEFAULT_RATES
    num_requests: int = 64
    max_tokens: int = BATCH_NEW
    arrival_seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    long_prefill_chunk: int | None = None
    page_size: int = 16
    enable_prefix_caching: bool = False
    enable_chunked_prefill: bool = True
    kv_cache_tokens: int | None = None
    warmup_rates: tuple[float, ...] = (math.inf, 4.0)
    max_attempts: int = 3
    stall_budget: int = 512
    stall_short_requests: int = 8
    stall_short_prompt_len: int = 64
    stall_short_new_tokens: int = 128
    stall_long_requests: int = 4
    stall_long_prompt_len: tuple[int, int] = (1500, 2001)
    stall_long_new_tokens: int = 4
    stall_trigger_tokens: int = 32
    stall_long_spacing_tokens: int = 8
    stall_control: bool = True
    peaks: bool = True
    output: str | None = None
    progress: bool = True


# ------------------------------------------------------------------ workloads
def parse_rates(text: str) -> tuple[float, ...]:
    """"0.5,1,2,inf" as rates (requests/s); "inf" means all at once."""
    rates = []
    for part in text.split(","):
        part = part.strip().lower()
        if part:
            rate = math.inf if part in ("inf", "infinity") else float(part)
            if not rate > 0:
                raise ValueError(f"request rate {part!r} must be > 0")
            rates.append(rate)
    if not rates:
        raise ValueError("no request rates given")
    return tuple(rates)


def serve_prompts(num_requests: int) -> list[list[int]]:
    """The `batch` prompts extended to `num_requests`: lengths `Random(7).randrange(64, 513)`,
    prompt i seeded i (the first 32 are `bench.batch_prompts()`)."""
    return batch_prompts(num_requests)


def poisson_arrivals(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `rate` requests/s.

    The same unit-rate exponential draws serve every rate (scaled by 1/rate), so rates
    differ only in speed; the first request goes at 0. `inf`: all at 0.
    """
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    gaps = [0.0] + [rng.expovariate(1.0) for _ in range(num_requests - 1)]
    return [float(t) for t in np.cumsum(gaps) / rate]


def stall_prompts(options: ServeBenchOptions,
                  seed_base: int = 1000) -> tuple[list[list[int]], list[list[int]]]:
    """The stall experiment's short and long prompts (`seed_base` picks other token ids for
    the warm-up run; the lengths are the same)."""
    shorts = [random_prompt(seed_base + i, options.stall_short_prompt_len)
              for i in range(options.stall_short_requests)]
    lengths = random.Random(13)
    longs = [random_prompt(seed_base + 500 + i, lengths.randrange(*options.stall_long_prompt_len))
             for i in range(options.stall_long_requests)]
    return shorts, longs


# ------------------------------------------------------------------ the client
@dataclasses.dataclass
class _Stream:
    """What the client saw of one streamed request (perf_counter seconds)."""

    send_s: float = math.nan
    end_s: float = math.nan
    chunk_s: list[float] = dataclasses.field(default_factory=list)
    usage_tokens: int | None = None
    error: str | None = None

    @property
    def num_tokens(self) -> int:
        """Tokens generated: the usage block's count, else the chunks (one token or more)."""
        return self.usage_tokens if self.usage_tokens is not None else len(self.chunk_s)

    @property
    def ttft(self) -> float:
        return self.chunk_s[0] - self.send_s if self.chunk_s else math.nan

    @property
    def tpot(self) -> float:
        """(last token - first token) / (tokens - 1); nan with fewer than two tokens."""
        n = self.num_tokens
        if n < 2 or len(self.chunk_s) < 2:
            return math.nan
        return (self.chunk_s[-1] - self.chunk_s[0]) / (n - 1)

    def gaps(self) -> list[tuple[float, float]]:
        """(arrival time, gap since the previous chunk) of every chunk after the first."""
        return [(b, b - a) for a, b in zip(self.chunk_s, self.chunk_s[1:], strict=False)]


async def _stream_completion(client: Any, url: str, prompt: list[int], max_tokens: int,
                             result: _Stream,
                             on_chunk: Callable[[], None] | None = None) -> None:
    """POST one streaming completion and record its chunk arrival times into `result`."""
    import httpx

    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    result.send_s = time.perf_counter()
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                message = json.loads(data)
                if "error" in message:
                    result.error = str(message["error"].get("message", message["error"]))
                    continue
                if message.get("choices"):
                    # Every chunk carries at least one new token (the server sends a delta
                    # once its text is non-empty or it is the last), sometimes more.
                    result.chunk_s.append(now)
                    if on_chunk is not None:
                        on_chunk()
                if message.get("usage"):
                    result.usage_tokens = int(message["usage"]["completion_tokens"])
    except httpx.HTTPError as e:
        result.error = f"{type(e).__name__}: {e}"
    finally:
        result.end_s = time.perf_counter()


def _client(max_connections: int) -> Any:
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(None),
                             limits=httpx.Limits(max_connections=max_connections,
                                                 max_keepalive_connections=max_connections))


async def _run_rate(url: str, prompts: Sequence[list[int]], arrivals: Sequence[float],
                    max_tokens: int, bar: Any) -> list[_Stream]:
    """Send `prompts[i]` at `arrivals[i]` seconds from now; wait for every answer."""
    results = [_Stream() for _ in prompts]
    async with _client(len(prompts) + 4) as client:
        loop = asyncio.get_running_loop()
        start = loop.time()

        async def one(i: int) -> None:
            delay = start + arrivals[i] - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await _stream_completion(client, url, prompts[i], max_tokens, results[i])
            if bar is not None:
                bar.update(1)

        await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return results


# ------------------------------------------------------------------ statistics
def _pct(values: Sequence[float], q: float) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return float(np.percentile(finite, q)) if finite else math.nan


def _r(x: float, digits: int = 4) -> float | None:
    """Rounded, with nan (no data) as JSON null."""
    return None if not math.isfinite(x) else round(x, digits)


def _rate_label(rate: float) -> float | str:
    return "inf" if math.isinf(rate) else rate


def _summarize_rate(results: list[_Stream]) -> dict[str, Any]:
    ok = [r for r in results if r.error is None and r.chunk_s]
    gaps = [g for r in ok for _, g in r.gaps()]
    start = min(r.send_s for r in results)
    wall = max(r.end_s for r in results) - start
    tokens = sum(r.num_tokens for r in ok)
    return {
        "completed": len(ok), "errors": len(results) - len(ok),
        "ttft_p50_s": _r(_pct([r.ttft for r in ok], 50)),
        "ttft_p99_s": _r(_pct([r.ttft for r in ok], 99)),
        "tpot_p50_s": _r(_pct([r.tpot for r in ok], 50)),
        "tpot_p99_s": _r(_pct([r.tpot for r in ok], 99)),
        "itl_p50_s": _r(_pct(gaps, 50)),
        "itl_p99_s": _r(_pct(gaps, 99)),
        "req_s": _r(len(ok) / wall, 3), "gen_tok_s": _r(tokens / wall, 2),
        "wall_s": _r(wall, 2), "generated_tokens": tokens,
        # Tokens that arrived merged with the next one (text held back by the detokenizer
        # for an incomplete character): gaps then span two tokens.
        "merged_tokens": sum(r.num_tokens - len(r.chunk_s) for r in ok),
        "first_error": next((r.error for r in results if r.error is not None), None),
    }


# ------------------------------------------------------------------ engines
def _load(options: ServeBenchOptions) -> Any:
    from jaxinfer.weights.loader import load_model

    return load_model(options.model, dtype=options.dtype, progress=options.progress)


class _Served:
    """An engine over the loaded model, started, behind an in-process HTTP server."""

    def __init__(self, loaded: Any, config: Any, max_pending: int):
        from jaxinfer.engine.engine import Engine
        from jaxinfer.server.app import create_app
        from jaxinfer.server.launch import ServerThread

        self.engine = Engine(loaded.params, loaded.cfg, loaded.tokenizer, config,
                             model_name=loaded.path.name)
        self.engine.start()
        self.server = ServerThread(create_app(self.engine, max_pending=max_pending)).start()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def compile_stats(self) -> Any:
        return self.engine.core.runner.compile_stats

    def timed(self, run: Callable[[], Any], attempts: int) -> tuple[Any, dict[str, Any]]:
        """`run()` until a run compiles no program (at most `attempts` runs); the last
        run's result and its compile figures."""
        attempt = 0
        while True:
            attempt += 1
            seconds, programs = self.compile_stats.seconds, self.compile_stats.programs
            result = run()
            self.check()
            compiled = self.compile_stats.programs - programs
            if not compiled or attempt >= attempts:
                break
        return result, {"attempts": attempt,
                        "compile_s": round(self.compile_stats.seconds - seconds, 2),
                        "programs_compiled": compiled}

    def check(self) -> None:
        if self.engine.error is not None:
            raise RuntimeError(f"the engine thread failed: {self.engine.error!r}")

    def close(self) -> None:
        self.server.stop()
        self.engine.shutdown()
        del self.engine, self.server
        gc.collect()  # drop the KV cache before the next engine allocates its own


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _sweep_config(options: ServeBenchOptions, prompts: list[list[int]], context: int) -> Any:
    from jaxinfer.engine.core import EngineConfig

    longest = max(map(len, prompts)) + options.max_tokens
    need = sum(_round_up(len(p) + options.max_tokens, options.page_size) for p in prompts)
    kv_tokens = options.kv_cache_tokens or max(need, _round_up(longest, options.page_size))
    return EngineConfig(
        max_num_seqs=options.max_num_seqs,
        max_num_batched_tokens=options.max_num_batched_tokens,
        long_prefill_chunk=options.long_prefill_chunk or options.max_num_batched_tokens,
        max_model_len=min(context, _round_up(longest + 1, options.page_size)),
        kv_cache_tokens=kv_tokens, page_size=options.page_size,
        enable_prefix_caching=options.enable_prefix_caching,
        enable_chunked_prefill=options.enable_chunked_prefill)


def _stall_config(options: ServeBenchOptions, chunked: bool, context: int) -> Any:
    from jaxinfer.engine.core import EngineConfig

    short = options.stall_short_prompt_len + options.stall_short_new_tokens
    long = options.stall_long_prompt_len[1] - 1 + options.stall_long_new_tokens
    max_model_len = _round_up(max(short, long) + 1, options.page_size)
    if max_model_len > context:
        raise ValueError(f"stall experiment: prompts of up to {long} tokens do not fit the "
                         f"model's context of {context}; lower stall_long_prompt_len")
    kv = (options.stall_short_requests * _round_up(short, options.page_size)
          + options.stall_long_requests * _round_up(long, options.page_size))
    return EngineConfig(
        max_num_seqs=options.stall_short_requests + options.stall_long_requests,
        max_num_batched_tokens=options.stall_budget, long_prefill_chunk=options.stall_budget,
        max_model_len=max_model_len, kv_cache_tokens=kv + 4 * options.page_size,
        page_size=options.page_size, enable_prefix_caching=False,
        enable_chunked_prefill=chunked)


# ------------------------------------------------------------------ rate sweep
def _sweep_pass(options: ServeBenchOptions, url: str, prompts: list[list[int]], rate: float,
                what: str) -> list[_Stream]:
    arrivals = poisson_arrivals(len(prompts), rate, options.arrival_seed)
    with tqdm(total=len(prompts), desc=f"{what} rate={_rate_label(rate)}", unit="req",
              file=sys.stderr, disable=not options.progress, leave=False) as bar:
        return asyncio.run(_run_rate(url, prompts, arrivals, options.max_tokens, bar))


def _run_sweep(options: ServeBenchOptions, loaded: Any, base: dict[str, Any],
               peaks: dict[str, float], emit: Callable[[dict[str, Any]], None]) -> None:
    prompts = serve_prompts(options.num_requests)
    config = _sweep_config(options, prompts, loaded.cfg.max_position_embeddings)
    served = _Served(loaded, config, max_pending=max(options.num_requests,
                                                     4 * options.max_num_seqs))
    flops = workload_flops(loaded.cfg, prompts, options.max_tokens)
    engine_fields = {
        "num_requests": options.num_requests, "max_tokens": options.max_tokens,
        "max_num_seqs": config.max_num_seqs,
        "max_num_batched_tokens": config.max_num_batched_tokens,
        "chunked_prefill": config.enable_chunked_prefill,
        "prefix_caching": config.enable_prefix_caching}
    try:
        for rate in options.warmup_rates:
            _sweep_pass(options, served.url, prompts, rate, "warm-up")
            served.check()
        for rate in options.rates:
            results, compiled = served.timed(
                lambda rate=rate: _sweep_pass(options, served.url, prompts, rate, "serve"),
                options.max_attempts)
            stats = _summarize_rate(results)
            record = {**base, "rate": _rate_label(rate), **stats, **engine_fields, **compiled}
            if peaks and stats["wall_s"]:
                record["compute_util"] = round(
                    flops / stats["wall_s"] / 1e9 / peaks["peak_gflops"], 3)
            emit(record)
    finally:
        served.close()


# ------------------------------------------------------------------ stall experiment
async def _stall_scenario(url: str, shorts: list[list[int]], longs: list[list[int]],
                          options: ServeBenchOptions) -> tuple[list[_Stream], list[_Stream]]:
    """Short requests decode; long prompts are sent as the shorts pass token thresholds."""
    short_results = [_Stream() for _ in shorts]
    long_results = [_Stream() for _ in longs]
    thresholds = [options.stall_trigger_tokens + k * options.stall_long_spacing_tokens
                  for k in range(len(longs))]
    triggers = [asyncio.Event() for _ in longs]

    def progressed() -> None:
        done = min(len(r.chunk_s) for r in short_results)
        for threshold, event in zip(thresholds, triggers, strict=True):
            if done >= threshold:
                event.set()

    async with _client(len(shorts) + len(longs) + 4) as client:
        async def long_request(k: int) -> None:
            await triggers[k].wait()
            await _stream_completion(client, url, longs[k], options.stall_long_new_tokens,
                                     long_results[k])

        async def short_request(i: int) -> None:
            await _stream_completion(client, url, shorts[i], options.stall_short_new_tokens,
                                     short_results[i], progressed)

        tasks = [asyncio.ensure_future(short_request(i)) for i in range(len(shorts))]
        tasks += [asyncio.ensure_future(long_request(k)) for k in range(len(longs))]
        await asyncio.gather(*tasks[:len(shorts)])
        for event in triggers:  # shorts that ended early must not leave longs waiting
            event.set()
        await asyncio.gather(*tasks[len(shorts):])
    return short_results, long_results


def _window_gaps(streams: Sequence[_Stream], start: float, end: float) -> list[float]:
    """Gaps of the streams' chunks arriving in (start, end]."""
    return [gap for r in streams for at, gap in r.gaps() if start < at <= end]


def _control_fields(shorts: list[_Stream], control: list[_Stream], start: float,
                    end: float) -> dict[str, Any]:
    """The busy window's gaps against the same requests' gaps at the same tokens when they
    ran alone (same prompts, greedy, so the same tokens and chunks)."""
    busy, ctrl = [], []
    for stream, alone in zip(shorts, control, strict=True):
        alone_gaps = alone.gaps()
        for j, (at, gap) in enumerate(stream.gaps()):
            if start < at <= end and j < len(alone_gaps):
                busy.append(gap)
                ctrl.append(alone_gaps[j][1])
    if not busy:
        return {"control_gaps": 0}
    busy_p99, ctrl_p99 = _pct(busy, 99), _pct(ctrl, 99)
    return {"control_gaps": len(ctrl), "control_itl_p50_s": _r(_pct(ctrl, 50)),
            "control_itl_p99_s": _r(ctrl_p99),
            "tpot_p99_rise_vs_control": _r(busy_p99 / ctrl_p99, 2) if ctrl_p99 > 0 else None,
            "tpot_p50_rise_vs_control": _r(_pct(busy, 50) / _pct(ctrl, 50), 2)}


def _summarize_stall(shorts: list[_Stream], longs: list[_Stream],
                     control: list[_Stream] | None = None) -> dict[str, Any]:
    errors = [r.error for r in shorts + longs if r.error is not None]
    quiet_start = max(r.chunk_s[0] for r in shorts if r.chunk_s)
    sent = [r.send_s for r in longs if math.isfinite(r.send_s)]
    long_first = [r.chunk_s[0] for r in longs if r.chunk_s]
    quiet_end = min(sent) if sent else math.nan
    busy_end = max(long_first) if long_first else math.nan
    quiet = _window_gaps(shorts, quiet_start, quiet_end)
    busy = _window_gaps(shorts, quiet_end, busy_end)
    quiet_p99, busy_p99 = _pct(quiet, 99), _pct(busy, 99)
    return {
        "quiet_gaps": len(quiet), "busy_gaps": len(busy),
        "quiet_itl_p50_s": _r(_pct(quiet, 50)), "quiet_itl_p99_s": _r(quiet_p99),
        "busy_itl_p50_s": _r(_pct(busy, 50)), "busy_itl_p99_s": _r(busy_p99),
        "busy_itl_max_s": _r(max(busy, default=math.nan)),
        "tpot_p99_rise": _r(busy_p99 / quiet_p99, 2) if quiet_p99 > 0 else None,
        "tpot_p50_rise": _r(_pct(busy, 50) / _pct(quiet, 50), 2) if quiet else None,
        "long_ttft_p50_s": _r(_pct([r.ttft for r in longs], 50)),
        "long_ttft_max_s": _r(max((r.ttft for r in longs if r.chunk_s), default=math.nan)),
        "busy_window_s": _r(busy_end - quiet_end, 3),
        # The busy window is only meaningful if every short request still ran through it.
        "shorts_outlived_window": all(r.chunk_s and r.chunk_s[-1] >= busy_end
                                      for r in shorts),
        "errors": len(errors), "first_error": errors[0] if errors else None,
        **(_control_fields(shorts, control, quiet_end, busy_end) if control else {}),
    }


def _run_stall(options: ServeBenchOptions, loaded: Any, base: dict[str, Any],
               emit: Callable[[dict[str, Any]], None]) -> None:
    shorts, longs = stall_prompts(options)
    warm_shorts, warm_longs = stall_prompts(options, seed_base=5000)
    records = {}
    context = loaded.cfg.max_position_embeddings
    phases = 6 if options.stall_control else 4
    with tqdm(total=phases, desc="serve_stall", unit="phase", file=sys.stderr,
              disable=not options.progress, leave=False) as bar:
        for chunked in (True, False):
            config = _stall_config(options, chunked, context)
            served = _Served(loaded, config, max_pending=4 * config.max_num_seqs)
            try:
                asyncio.run(_stall_scenario(served.url, warm_shorts, warm_longs, options))
                served.check()
                bar.update(1)
                (short_results, long_results), compiled = served.timed(
                    lambda url=served.url: asyncio.run(
                        _stall_scenario(url, shorts, longs, options)),
                    options.max_attempts)
                bar.update(1)
                control = None
                if options.stall_control:
                    control, _ = served.timed(
                        lambda url=served.url: asyncio.run(
                            _stall_scenario(url, shorts, [], options))[0],
                        options.max_attempts)
                    bar.update(1)
            finally:
                served.close()
            record = {**base, "chunked_prefill": chunked,
                      "max_num_batched_tokens": config.max_num_batched_tokens,
                      "short_requests": len(shorts),
                      "short_prompt_len": options.stall_short_prompt_len,
                      "short_new_tokens": options.stall_short_new_tokens,
                      "long_prompt_lens": [len(p) for p in longs],
                      **_summarize_stall(short_results, long_results, control),
                      **compiled}
            records[chunked] = record
    on, off = records[True], records[False]
    if on["busy_itl_p99_s"] and off["busy_itl_p99_s"]:
        # How much smaller the worst decode stalls are with chunking (the claim: > 1).
        on["vs_unchunked"] = {"busy_itl_p99": round(off["busy_itl_p99_s"]
                                                    / on["busy_itl_p99_s"], 2)}
    for record in (on, off):
        emit(record)


# ------------------------------------------------------------------ driver
def run_serve_benchmark(options: ServeBenchOptions) -> list[dict[str, Any]]:
    """Run the rate sweep and/or the stall experiment; print and return the JSON records.

    The model is loaded once and shared by every engine (each engine has its own KV cache
    and compiled programs, so each warms up separately).
    """
    if not (options.sweep or options.stall):
        raise ValueError("nothing to run: set sweep and/or stall")
    loaded = _load(options)
    peaks = measure_peaks() if options.peaks else {}
    base = {"workload": "serve", "system": "jaxinfer",
            "model": options.model or DEFAULT_MODEL_NAME, "device": device_name(),
            "dtype": options.dtype, **peaks}
    records: list[dict[str, Any]] = []

    def emit(record: dict[str, Any]) -> None:
        line = json.dumps(record)
        print(line, flush=True)
        if options.output:
            with open(options.output, "a") as f:
                f.write(line + "\n")
        records.append(record)

    if options.sweep:
        _run_sweep(options, loaded, base, peaks, emit)
    if options.stall:
        _run_stall(options, loaded, {**base, "workload": "serve_stall"}, emit)
    return records


def run_serve_benchmark_from(options: Any, rates: tuple[float, ...] | None = None,
                             sweep: bool = True, stall: bool = True,
                             stall_short_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """`jaxinfer bench --workload serve`: the serve benchmark with the CLI's options
    (a `jaxinfer.bench.BenchOptions`)."""
    serve_options = ServeBenchOptions(
        model=options.model, dtype=options.dtype, output=options.output,
        page_size=options.page_size, kv_cache_tokens=options.kv_cache_tokens,
        max_num_batched_tokens=options.max_num_batched_tokens,
        stall_budget=options.max_num_batched_tokens,
        rates=rates or DEFAULT_RATES, sweep=sweep, stall=stall)
    if stall_short_new_tokens is not None:
        serve_options = dataclasses.replace(serve_options,
                                            stall_short_new_tokens=stall_short_new_tokens)
    return run_serve_benchmark(serve_options)
