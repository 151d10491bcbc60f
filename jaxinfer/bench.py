"""Benchmarks of BENCHMARKS.md (`single`, `batch`, `shared_prefix`; `serve` lives in
`jaxinfer.bench_serve`): JSON lines with the peer and the roofline.

Every invocation measures the machine's streaming bandwidth and matmul FLOP/s itself and
runs the Hugging Face peer in the same process (`--compare hf`), because absolute times on
shared machines drift from run to run: compare ratios, not numbers across runs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import statistics
import sys
import time
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from jaxinfer.cache.paged import kv_bytes_per_token
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import param_bytes
from jaxinfer.roofline import (  # the cost model and peaks (bench_serve takes them here)
    attention_flops,
    bench_roofline,
    device_name,
    hardware_from_peaks,
    head_flops,
    matmul_flops_per_token,
    measure_peaks,
)
from jaxinfer.weights.loader import DEFAULT_MODEL_NAME

SINGLE_PROMPT_LEN, SINGLE_NEW = 128, 128
BATCH_PROMPTS, BATCH_NEW = 32, 64
SHARED_REQUESTS, SHARED_PREFIX_LEN, SHARED_SUFFIX_LEN, SHARED_NEW = 32, 512, 32, 16
HF_BATCH = 16
WORKLOADS = ("single", "batch", "shared_prefix")


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """What `jaxinfer bench` runs."""

    model: str | None = None
    dtype: str = "float32"
    workload: str = "single"
    compare: str | None = None
    repeats: int = 3
    output: str | None = None
    max_model_len: int | None = None
    page_size: int = 16
    kv_cache_tokens: int | None = None
    max_num_batched_tokens: int = 512
    quantize: str | None = None  # weight-only quantization scheme (docs/quantization.md)

    def llm_options(self) -> dict[str, Any]:
        """The engine options of the jaxinfer system."""
        return dict(max_model_len=self.max_model_len, page_size=self.page_size,
                    kv_cache_tokens=self.kv_cache_tokens,
                    max_num_batched_tokens=self.max_num_batched_tokens)


# ------------------------------------------------------------------ workloads
def random_prompt(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 49000) for _ in range(length)]


def single_prompts() -> list[list[int]]:
    return [random_prompt(1, SINGLE_PROMPT_LEN)]


def batch_prompts(count: int = BATCH_PROMPTS) -> list[list[int]]:
    lengths = random.Random(7)
    sizes = [lengths.randrange(64, 513) for _ in range(count)]
    return [random_prompt(i, n) for i, n in enumerate(sizes)]


def shared_prefix_prompts() -> list[list[int]]:
    prefix = random_prompt(11, SHARED_PREFIX_LEN)
    return [prefix + random_prompt(100 + i, SHARED_SUFFIX_LEN) for i in range(SHARED_REQUESTS)]


def workload_inputs(workload: str) -> tuple[list[list[int]], int]:
    """The prompts and new tokens per request of a workload."""
    if workload == "single":
        return single_prompts(), SINGLE_NEW
    if workload == "batch":
        return batch_prompts(), BATCH_NEW
    if workload == "shared_prefix":
        return shared_prefix_prompts(), SHARED_NEW
    raise ValueError(f"unknown workload {workload!r}; choose one of {', '.join(WORKLOADS)}")


# ------------------------------------------------------------------ cost model
def workload_flops(cfg: ModelConfig, prompts: list[list[int]], new_tokens: int) -> float:
    """FLOPs of prefilling `prompts` and decoding `new_tokens` each (LM head per output)."""
    total = 0.0
    for p in prompts:
        n = len(p)
        total += n * matmul_flops_per_token(cfg) + attention_flops(cfg, (n + 1) / 2) * n
        for i in range(new_tokens):
            total += head_flops(cfg)
            if i:
                total += matmul_flops_per_token(cfg) + attention_flops(cfg, n + i)
    return total


def decode_step_bytes(cfg: ModelConfig, params_bytes: int, context: float) -> float:
    """Bytes one batch-1 decode step must read: every weight once plus the KV so far."""
    return params_bytes + kv_bytes_per_token(cfg) * context


# ------------------------------------------------------------------ systems
class JaxinferSystem:
    name = "jaxinfer"

    def __init__(self, options: BenchOptions, llm: Any = None, name: str | None = None):
        import jaxinfer

        self.llm = llm or jaxinfer.load(options.model, dtype=options.dtype,
                                        quantize=options.quantize, **options.llm_options())
        self.cfg = self.llm.cfg
        self.name = name or self.name

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
        from jaxinfer.sampling import SamplingParams

        params = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True)
        self.llm.reset_prefix_cache()  # repetitions must not reuse the previous run's KV
        start = time.perf_counter()
        compile_before = self.llm.compile_stats.seconds
        outs = self.llm.generate(prompts, params)
        wall = time.perf_counter() - start - (self.llm.compile_stats.seconds - compile_before)
        assert all(len(o.token_ids) == new_tokens for o in outs)
        decode_s = max(o.decode_s for o in outs)
        return {"ttft_s": outs[0].ttft_s, "decode_s": decode_s, "wall_s": wall,
                "tokens": [o.token_ids for o in outs],
                "cached_tokens": sum(o.num_cached_tokens for o in outs)}


class HFSystem:
    name = "hf-transformers"

    def __init__(self, model_path: str):
        import torch
        import transformers

        torch.set_num_threads(os.cpu_count() or 1)
        self.torch = torch
        kwargs: dict[str, Any] = dict(dtype=torch.float32)
        if model_path.endswith(".gguf"):
            folder, name = os.path.split(model_path)
            kwargs["gguf_file"] = name
        else:
            folder = model_path
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
        self.pad_id = int(self.model.config.eos_token_id if isinstance(
            self.model.config.eos_token_id, int) else 0)

    def _generate(self, batch: list[list[int]], new_tokens: int) -> Any:
        torch = self.torch
        width = max(map(len, batch))
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
        with torch.no_grad():
            return self.model.generate(
                input_ids=ids, attention_mask=mask, do_sample=False,
                max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                pad_token_id=self.pad_id)

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
        start = time.perf_counter()
        if len(prompts) == 1:
            self._generate(prompts, 1)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = self._generate(prompts, new_tokens)
            total = time.perf_counter() - start
            tokens = [out[0, len(prompts[0]):].tolist()]
            return {"ttft_s": ttft, "decode_s": total - ttft, "wall_s": total,
                    "tokens": tokens}
        tokens = []
        for i in range(0, len(prompts), HF_BATCH):
            chunk = prompts[i:i + HF_BATCH]
            out = self._generate(chunk, new_tokens)
            tokens += out[:, -new_tokens:].tolist()
        return {"ttft_s": float("nan"), "decode_s": float("nan"),
                "wall_s": time.perf_counter() - start, "tokens": tokens, "cached_tokens": 0}


class LlamaCppSystem:
    """llama.cpp (through `llama-cpp-python`) on the same GGUF file, its blocks as stored:
    the int4 peer of the `single` workload. Greedy (top-k 1), every core, one sequence."""

    name = "llama.cpp"

    def __init__(self, model_path: str, context: int = 1024):
        llama_cpp = import_llama_cpp()
        if not model_path.endswith(".gguf"):
            raise ConfigError(f"--compare llamacpp reads a .gguf file; {model_path!r} is not "
                              "one (pass --model FILE.gguf)")
        threads = os.cpu_count() or 1
        self.model = llama_cpp.Llama(model_path=model_path, n_ctx=context, n_batch=512,
                                     n_threads=threads, n_threads_batch=threads,
                                     verbose=False)
        self.version = llama_cpp.__version__

    def run(self, prompts: list[list[int]], new_tokens: int) -> dict[str, float]:
        if len(prompts) != 1:
            raise ConfigError("the llama.cpp peer runs the single workload (one sequence)")
        self.model.reset()  # no KV reuse between repetitions
        start = time.perf_counter()
        tokens: list[int] = []
        ttft = 0.0
        for token in self.model.generate(prompts[0], top_k=1, temp=0.0, reset=True):
            if not tokens:
                ttft = time.perf_counter() - start
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        total = time.perf_counter() - start
        return {"ttft_s": ttft, "decode_s": total - ttft, "wall_s": total, "tokens": [tokens]}


def import_llama_cpp() -> Any:
    """The `llama_cpp` module, or a ConfigError saying how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise ConfigError("--compare llamacpp needs llama-cpp-python, which is not installed; "
                          "`pip install llama-cpp-python` compiles llama.cpp from source "
                          "(about 8 minutes on 2 cores)") from None
    return llama_cpp


# ------------------------------------------------------------------ driver
def _median_run(system: Any, prompts: list[list[int]], new_tokens: int,
                repeats: int) -> dict[str, float]:
    system.run(prompts, new_tokens)  # warm-up: compilation, allocator, caches
    runs = [system.run(prompts, new_tokens)
            for _ in tqdm(range(repeats), desc=f"{system.name}", leave=False, file=sys.stderr)]
    keys = ("ttft_s", "decode_s", "wall_s")
    result: dict[str, Any] = {k: statistics.median(r[k] for r in runs) for k in keys}
    result["tokens"] = runs[-1]["tokens"]
    result["cached_tokens"] = runs[-1].get("cached_tokens", 0)
    return result


def _token_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return round(float(np.mean([x == y for p, q in zip(a, b, strict=True)
                                for x, y in zip(p, q, strict=True)])), 4)


def run_benchmark(options: BenchOptions) -> list[dict[str, Any]]:
    """Run one workload for jaxinfer (and the peer); print and return the JSON records.

    `shared_prefix` runs jaxinfer twice, with prefix caching (the default) and without
    (`enable_prefix_caching=False`: neither the prefix cache nor BatchLLM prefix sharing),
    on the same weights, and reports the ratio.
    """
    from jaxinfer.llm import LLM

    if options.compare == "llamacpp":  # fail before anything loads
        if options.workload != "single":
            raise ConfigError(f"--compare llamacpp runs the single workload, not "
                              f"{options.workload!r} (use --compare hf for the others)")
        import_llama_cpp()
    ours = JaxinferSystem(options)
    cfg = ours.cfg
    prompts, new_tokens = workload_inputs(options.workload)
    peaks = measure_peaks()
    base = {"workload": options.workload, "model": options.model or DEFAULT_MODEL_NAME,
            "device": device_name(), "dtype": options.dtype, "quantize": options.quantize,
            "page_size": options.page_size, **peaks}
    flops = workload_flops(cfg, prompts, new_tokens)
    roofline = bench_roofline(cfg, hardware_from_peaks(peaks), prompt_lens=list(map(len, prompts)),
                              new_tokens=new_tokens, flops=flops, dtype=options.dtype)
    pbytes = param_bytes(ours.llm.params)
    systems: list[Any] = [ours]
    if options.workload == "shared_prefix":
        systems.append(JaxinferSystem(options, name="jaxinfer-no-prefix-cache", llm=LLM(
            ours.llm.params, cfg, ours.llm.tokenizer, enable_prefix_caching=False,
            **options.llm_options())))
    if options.compare == "hf":
        from jaxinfer.weights.loader import resolve_model_path

        systems.append(HFSystem(str(resolve_model_path(options.model))))
    elif options.compare == "llamacpp":
        from jaxinfer.weights.loader import resolve_model_path

        systems.append(LlamaCppSystem(str(resolve_model_path(options.model))))
    records = []
    for system in systems:
        r = _median_run(system, prompts, new_tokens, options.repeats)
        rec: dict[str, Any] = {**base, "system": system.name}
        if options.workload == "single":
            decode_tok_s = (new_tokens - 1) / r["decode_s"]
            context = len(prompts[0]) + new_tokens / 2
            step_bytes = decode_step_bytes(cfg, pbytes, context)
            rec.update(ttft_s=round(r["ttft_s"], 4), decode_tok_s=round(decode_tok_s, 2),
                       bw_util=round(step_bytes * decode_tok_s / 1e9 / peaks["peak_bw_gbs"], 3),
                       ttft_compute_util=round(
                           workload_flops(cfg, prompts, 1) / r["ttft_s"] / 1e9
                           / peaks["peak_gflops"], 3), **roofline)
        else:
            generated = len(prompts) * new_tokens
            rec.update(gen_tok_s=round(generated / r["wall_s"], 2), wall_s=round(r["wall_s"], 2),
                       compute_util=round(flops / r["wall_s"] / 1e9 / peaks["peak_gflops"], 3),
                       **roofline)
            if options.workload == "shared_prefix":
                rec["cached_prompt_tokens"] = r["cached_tokens"]
                if r["cached_tokens"]:  # the FLOP count assumes every prompt is computed
                    del rec["compute_util"], rec["roofline_gen_tok_s"]
        if isinstance(system, JaxinferSystem):
            stats = system.llm.compile_stats
            rec["compile_s"] = round(stats.seconds, 2)
            rec["programs"] = stats.programs
        rec["_tokens"] = r["tokens"]
        records.append(rec)
    key = "decode_tok_s" if options.workload == "single" else "gen_tok_s"
    first = records[0]
    for other in records[1:]:
        label = {HFSystem.name: "vs_hf", LlamaCppSystem.name: "vs_llamacpp"}.get(
            other["system"], "vs_no_prefix_cache")
        first[label] = {key: round(first[key] / other[key], 2),
                        "token_agreement": _token_agreement(first["_tokens"], other["_tokens"])}
        if options.workload == "single":
            first[label]["ttft_speedup"] = round(other["ttft_s"] / first["ttft_s"], 2)
    for rec in records:
        rec.pop("_tokens")
        line = json.dumps(rec)
        print(line, flush=True)
        if options.output:
            with open(options.output, "a") as f:
                f.write(line + "\n")
    return records
