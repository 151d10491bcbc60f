"""Roofline of one model step (the LLM-Viewer idea): the FLOPs and bytes a prefill or decode
step must spend, bounded by a chip's peak FLOP/s and memory bandwidth.

Also measures this machine's peaks, so benchmarks can state their own roofline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.errors import CheckpointError, ConfigError, InputError

Phase = Literal["prefill", "decode"]

# Canonical compute dtypes and their storage bytes; tf32 computes f32 data on tensor cores.
DTYPE_BYTES: dict[str, float] = {"f32": 4, "tf32": 4, "bf16": 2, "fp16": 2, "int8": 1}
_DTYPE_ALIASES = {"float32": "f32", "bfloat16": "bf16", "float16": "fp16"}


def canonical_dtype(dtype: str) -> str:
    """`f32`, `tf32`, `bf16`, `fp16` or `int8` (also accepts `float32`, `bfloat16`...)."""
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
    if name not in DTYPE_BYTES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_BYTES)}")
    return name


# ------------------------------------------------------------------ hardware
@dataclasses.dataclass(frozen=True)
class Hardware:
    """One chip: dense peak FLOP/s per compute dtype (int8: OP/s), bandwidth, capacity."""

    name: str
    peak_flops: Mapping[str, float]
    mem_bw_bytes_s: float
    memory_bytes: float
    source: str  # "published spec (...)" or "measured (...)"

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; InputError where no figure is known."""
        key = canonical_dtype(dtype)
        if key not in self.peak_flops:
            raise InputError(f"{self.name} has no {key} peak ({self.source}); known: "
                             f"{', '.join(self.peak_flops)}")
        return self.peak_flops[key]

    def ridge_point(self, dtype: str) -> float:
        """FLOP per byte above which a step is compute bound."""
        return self.peak(dtype) / self.mem_bw_bytes_s


_DATASHEET = "published spec (vendor datasheet)"
_H100_FLOPS = {"f32": 66.9e12, "tf32": 494.7e12, "bf16": 989.4e12, "fp16": 989.4e12,
               "int8": 1978.9e12}  # SXM, dense (no 2:4 sparsity)

HARDWARE: dict[str, Hardware] = {
    "h100": Hardware("H100 SXM", _H100_FLOPS, 3.35e12, 80e9, _DATASHEET),
    "h200": Hardware("H200 SXM", _H100_FLOPS, 4.8e12, 141e9, _DATASHEET),
    "tpu-v5e": Hardware("TPU v5e", {"bf16": 197e12, "int8": 394e12}, 819e9, 16e9, _DATASHEET),
    "tpu-v6e": Hardware("TPU v6e", {"bf16": 918e12, "int8": 1836e12}, 1640e9, 32e9, _DATASHEET),
    "h100-measured": Hardware("H100 SXM (measured)", {"bf16": 800e12}, 3.0e12, 80e9,
                              "measured (BENCHMARKS.md: device copy, bf16 matmul)"),
}


def device_name() -> str:
    """`cpu-<cores>core` on CPU, else the accelerator's kind (e.g. `nvidia-h100-80gb-hbm3`)."""
    dev = jax.devices()[0]
    if dev.platform == "cpu":
        return f"cpu-{os.cpu_count()}core"
    return dev.device_kind.lower().replace(" ", "-")


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best


def _stream_bandwidth(rows: int = 8192, cols: int = 16384) -> float:
    """GB/s of the faster of two jitted vector-matrix forms over a 512 MiB matrix."""
    w = jax.random.normal(jax.random.PRNGKey(0), (rows, cols), jnp.float32)
    x = jnp.ones((1, cols), jnp.float32)
    forms = (jax.jit(lambda x, w: x @ w.T), jax.jit(lambda x, w: jnp.einsum("td,fd->tf", x, w)))
    best = min(_best_time(lambda f=f: f(x, w), 10) for f in forms)
    return w.nbytes / best / 1e9


def _matmul_gflops(n: int = 2048) -> float:
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    matmul = jax.jit(lambda a, b: a @ b)
    return 2 * n**3 / _best_time(lambda: matmul(a, a), 10) / 1e9


def measure_peaks() -> dict[str, float]:
    """This machine's streaming bandwidth (GB/s) and float32 matmul GFLOP/s, measured now."""
    return {"peak_bw_gbs": round(_stream_bandwidth(), 2),
            "peak_gflops": round(_matmul_gflops(), 1)}


def hardware_from_peaks(peaks: Mapping[str, float], name: str | None = None) -> Hardware:
    """The `Hardware` of `measure_peaks()` figures (only an f32 compute peak is measured)."""
    stats = jax.devices()[0].memory_stats() or {}  # None on CPU
    memory = stats.get("bytes_limit") or os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(name or device_name(), {"f32": peaks["peak_gflops"] * 1e9},
                    peaks["peak_bw_gbs"] * 1e9, float(memory), "measured (this machine, now)")


def measured_cpu() -> Hardware:
    """This machine's roofline, measured now (a few seconds)."""
    return hardware_from_peaks(measure_peaks())


# ------------------------------------------------------------------ cost model
def _projection_flops_per_token(cfg: ModelConfig) -> dict[str, float]:
    d, e, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    h, k, layers = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
    return {"qkv": 2.0 * d * e * (h + 2 * k) * layers, "o": 2.0 * h * e * d * layers,
            "mlp": 2.0 * 3 * d * f * layers}  # GLU MLP: gate, up and down matrices


def matmul_flops_per_token(cfg: ModelConfig) -> float:
    """Projection + MLP FLOPs of one token through all layers (no LM head, no attention)."""
    return sum(_projection_flops_per_token(cfg).values())


def _windows(cfg: ModelConfig) -> list[float]:
    return [cfg.sliding_window if t == "sliding" else math.inf for t in cfg.layer_types]


def attention_flops(cfg: ModelConfig, context: float) -> float:
    """q.k and p.v FLOPs of one token attending to `context` keys, all layers (sliding
    layers: at most the window)."""
    return 4.0 * cfg.num_heads * cfg.head_dim * sum(min(context, w) for w in _windows(cfg))


def head_flops(cfg: ModelConfig) -> float:
    """LM head FLOPs of one row of logits."""
    return 2.0 * cfg.vocab_size * cfg.hidden_size


def _attended_keys(context: int, new: int, window: float) -> float:
    """Sum over the `new` queries after `context` cached tokens of the keys each attends
    (itself included): sum of min(p, window) for p in context+1 .. context+new."""
    first, last = context + 1, context + new
    if last <= window:
        return (first + last) * new / 2
    if first > window:
        return new * window
    return (first + window) * (window - first + 1) / 2 + (last - window) * window


@dataclasses.dataclass(frozen=True)
class PartCost:
    """What one part of a step computes and moves (bytes: off-chip memory traffic)."""

    flops: float = 0.0
    weight_bytes: float = 0.0
    kv_read_bytes: float = 0.0
    kv_write_bytes: float = 0.0
    activation_bytes: float = 0.0

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.kv_read_bytes + self.kv_write_bytes + self.activation_bytes


@dataclasses.dataclass(frozen=True)
class StepCost:
    """One model step: `batch` sequences, each adding `new_tokens` after `context` cached."""

    phase: Phase
    batch: int
    new_tokens: int
    context: int
    dtype: str
    kv_dtype: str
    parts: Mapping[str, PartCost]
    resident_bytes: float  # all weights plus the KV cache held during the step

    def _sum(self, name: str) -> float:
        return sum(getattr(p, name) for p in self.parts.values())

    flops = property(lambda self: self._sum("flops"))
    weight_bytes = property(lambda self: self._sum("weight_bytes"))
    kv_read_bytes = property(lambda self: self._sum("kv_read_bytes"))
    kv_write_bytes = property(lambda self: self._sum("kv_write_bytes"))
    activation_bytes = property(lambda self: self._sum("activation_bytes"))
    total_bytes = property(lambda self: self._sum("bytes"))

    @property
    def tokens(self) -> int:
        """Tokens the step computes (prompt tokens in prefill, one per sequence in decode)."""
        return self.batch * self.new_tokens

    @property
    def arithmetic_intensity(self) -> float:
        """FLOP per byte moved."""
        return self.flops / self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        fields = ("flops", "weight_bytes", "kv_read_bytes", "kv_write_bytes", "activation_bytes",
                  "total_bytes", "arithmetic_intensity", "resident_bytes")
        return {"phase": self.phase, "batch": self.batch, "new_tokens": self.new_tokens,
                "context": self.context, "dtype": self.dtype, "kv_dtype": self.kv_dtype,
                **{f: getattr(self, f) for f in fields},
                "parts": {k: {"flops": p.flops, "bytes": p.bytes} for k, p in self.parts.items()}}


def step_cost(cfg: ModelConfig, *, phase: Phase, batch: int, context: int = 0,
              prompt_len: int | None = None, dtype: str = "bf16",
              kv_dtype: str | None = None) -> StepCost:
    """FLOPs and bytes of one step, assuming each weight and KV entry is read once per step.

    Args:
      cfg: the model's shape.
      phase: "prefill" computes `prompt_len` tokens per sequence (after `context` cached
        ones, 0 for a fresh prompt) with causal attention and the LM head on the last token
        only; "decode" computes one token per sequence attending to `context` cached tokens
        and itself.
      batch: sequences in the step.
      dtype: weights and activations (`f32`, `tf32`, `bf16`, `fp16`, `int8`).
      kv_dtype: the KV cache (default: `dtype`'s storage).

    Each matmul reads its input and writes its output once (elementwise work, norms and
    the GLU product fused into their neighbours); attention is flash-style (scores never
    leave the chip) and reads each key and value it needs once; the embedding is a gather
    of one row per token, whether or not the LM head shares its matrix.
    """
    dtype, kv_dtype = canonical_dtype(dtype), canonical_dtype(kv_dtype or dtype)
    if phase == "prefill":
        if prompt_len is None or prompt_len < 1:
            raise InputError(f"prefill needs prompt_len >= 1, got {prompt_len}")
        new = prompt_len
    elif phase == "decode":
        if prompt_len is not None:
            raise InputError("prompt_len applies to prefill; decode adds one token per sequence")
        new = 1
    else:
        raise InputError(f"unknown phase {phase!r}; use 'prefill' or 'decode'")
    if batch < 1 or context < 0:
        raise InputError(f"need batch >= 1 and context >= 0, got {batch} and {context}")
    d, e, f, v = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size, cfg.vocab_size
    h, k, layers = cfg.num_heads, cfg.num_kv_heads, cfg.num_layers
    w = a = DTYPE_BYTES[dtype]
    kv_token = 2 * k * e * DTYPE_BYTES[kv_dtype]  # K and V of one token in one layer
    tokens = batch * new
    windows = _windows(cfg)
    # Keys read once per sequence: the new ones, and the cached ones inside some window.
    read_keys = sum(new + min(context, window - 1) for window in windows)
    held_keys = sum(min(context + new, window) for window in windows)
    qkv_params = d * e * (h + 2 * k) + cfg.qkv_bias * (h + 2 * k) * e + cfg.qk_norm * 2 * e
    o_params = h * e * d + cfg.o_bias * d
    norm_params = layers * (4 if cfg.sandwich_norms else 2) * d + d
    flops = _projection_flops_per_token(cfg)
    parts = {
        "embedding": PartCost(weight_bytes=tokens * d * w, activation_bytes=tokens * d * a),
        "qkv": PartCost(tokens * flops["qkv"], layers * qkv_params * w,
                        activation_bytes=layers * tokens * (d + (h + 2 * k) * e) * a),
        "attention": PartCost(
            4.0 * batch * h * e * sum(_attended_keys(context, new, wd) for wd in windows),
            kv_read_bytes=batch * read_keys * kv_token,
            kv_write_bytes=layers * tokens * kv_token,
            activation_bytes=layers * tokens * 2 * h * e * a),  # read q, write the output
        "o": PartCost(tokens * flops["o"], layers * o_params * w,
                      activation_bytes=layers * tokens * (h * e + d) * a),
        "mlp": PartCost(tokens * flops["mlp"], layers * 3 * d * f * w,
                        activation_bytes=layers * tokens * (2 * d + 4 * f) * a),
        "norms": PartCost(weight_bytes=norm_params * w),
        "lm_head": PartCost(batch * head_flops(cfg), v * d * w,
                            activation_bytes=batch * (d + v) * a),
    }
    all_weights = layers * (qkv_params + o_params + 3 * d * f) + norm_params + v * d * (
        1 if cfg.tie_word_embeddings else 2)
    return StepCost(phase, batch, new, context, dtype, kv_dtype, parts,
                    resident_bytes=all_weights * w + batch * held_keys * kv_token)


# ------------------------------------------------------------------ bound
@dataclasses.dataclass(frozen=True)
class Bound:
    """The fastest a step can run on one chip: the slower of its compute and its traffic."""

    hardware: str
    dtype: str
    compute_time_s: float
    memory_time_s: float
    bound_time_s: float
    bound: Literal["compute", "memory"]
    ridge_point: float  # FLOP/byte where the two meet
    arithmetic_intensity: float
    tokens_per_s: float
    fits_memory: bool


def roofline_bound(cost: StepCost, hw: Hardware, dtype: str | None = None) -> Bound:
    """Bound `cost` on `hw`, computing at `hw`'s peak for `dtype` (default: the cost's)."""
    dtype = canonical_dtype(dtype or cost.dtype)
    compute = cost.flops / hw.peak(dtype)
    memory = cost.total_bytes / hw.mem_bw_bytes_s
    bound_time = max(compute, memory)
    return Bound(hw.name, dtype, compute, memory, bound_time,
                 "compute" if compute >= memory else "memory", hw.ridge_point(dtype),
                 cost.arithmetic_intensity, cost.tokens / bound_time,
                 cost.resident_bytes <= hw.memory_bytes)


def bench_roofline(cfg: ModelConfig, hw: Hardware, *, prompt_lens: Sequence[int],
                   new_tokens: int, flops: float, dtype: str) -> dict[str, float]:
    """Roofline fields of a `jaxinfer bench` record, at the f32 peak the run measured.

    One prompt: `roofline_ttft_s` and `roofline_decode_tok_s` (mid-generation context).
    Several: `roofline_gen_tok_s` from the workload's `flops` and, on the memory side, the
    `new_tokens` sequential steps every request needs, each reading all weights at least once.
    """
    if len(prompt_lens) == 1:
        (n,) = prompt_lens
        ttft = roofline_bound(step_cost(cfg, phase="prefill", batch=1, prompt_len=n,
                                        dtype=dtype), hw, "f32")
        decode = roofline_bound(step_cost(cfg, phase="decode", batch=1,
                                          context=n + new_tokens // 2, dtype=dtype), hw, "f32")
        return {"roofline_ttft_s": round(ttft.bound_time_s, 4),
                "roofline_decode_tok_s": round(decode.tokens_per_s, 2)}
    weights = step_cost(cfg, phase="decode", batch=1, dtype=dtype).weight_bytes
    wall = max(flops / hw.peak("f32"), new_tokens * weights / hw.mem_bw_bytes_s)
    return {"roofline_gen_tok_s": round(len(prompt_lens) * new_tokens / wall, 2)}


# ------------------------------------------------------------------ model shapes and sweep
def _llama(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int,
           head_dim: int, context: int, tied: bool) -> ModelConfig:
    return ModelConfig(family="llama", vocab_size=vocab, hidden_size=hidden,
                       intermediate_size=inter, num_layers=layers, num_heads=heads,
                       num_kv_heads=kv_heads, head_dim=head_dim,
                       max_position_embeddings=context, tie_word_embeddings=tied)


# Shapes only, for users without a checkpoint. smollm2-135m is the embedded default model's
# config as `load_config` reads it from the GGUF (parsing that file takes ~5 s, so not here).
MODEL_SHAPES: dict[str, ModelConfig] = {
    "smollm2-135m": _llama(49152, 576, 1536, 30, 9, 3, 64, 8192, tied=True),
    "llama-3-8b": _llama(128256, 4096, 14336, 32, 32, 8, 128, 8192, tied=False),
    "llama-3-70b": _llama(128256, 8192, 28672, 80, 64, 8, 128, 8192, tied=False),
}


def model_shape(model: str) -> ModelConfig:
    """A named shape of `MODEL_SHAPES`, else the config of a GGUF file or HF folder."""
    if model.lower() in MODEL_SHAPES:
        return MODEL_SHAPES[model.lower()]
    from jaxinfer.weights.loader import load_config, resolve_model_path

    try:
        path = resolve_model_path(model)
    except CheckpointError as e:
        raise ConfigError(f"{e}; or name a model shape: {', '.join(MODEL_SHAPES)}") from None
    return load_config(path)


def select_hardware(names: str) -> list[tuple[str, Hardware]]:
    """Comma-separated keys of `HARDWARE`, `cpu` (measured now) or `all` (the table)."""
    chosen = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name == "all":
            chosen += HARDWARE.items()
        elif name == "cpu":
            chosen.append(("cpu", measured_cpu()))
        elif name in HARDWARE:
            chosen.append((name, HARDWARE[name]))
        else:
            raise InputError(f"unknown hardware {name!r}; use {', '.join(HARDWARE)}, cpu or all")
    return chosen


def parse_sizes(text: str, what: str, minimum: int) -> list[int]:
    """`"1,16,64"` -> [1, 16, 64], each at least `minimum`."""
    try:
        sizes = [int(s) for s in text.split(",")]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers, got {text!r}") from None
    if any(s < minimum for s in sizes):
        raise InputError(f"{what} must be >= {minimum}, got {text!r}")
    return sizes


def sweep(cfg: ModelConfig, hw: Hardware, *, batches: Iterable[int], contexts: Iterable[int],
          prompt_lens: Iterable[int], dtype: str, kv_dtype: str | None = None
          ) -> list[tuple[StepCost, Bound]]:
    """Prefill of each batch x prompt length, then decode of each batch x context."""
    batches, contexts, prompt_lens = list(batches), list(contexts), list(prompt_lens)
    costs = [step_cost(cfg, phase="prefill", batch=b, prompt_len=n, dtype=dtype,
                       kv_dtype=kv_dtype) for b in batches for n in prompt_lens]
    costs += [step_cost(cfg, phase="decode", batch=b, context=c, dtype=dtype, kv_dtype=kv_dtype)
              for b in batches for c in contexts]
    return [(c, roofline_bound(c, hw)) for c in costs]


def _num(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.2f}" if x >= 1 else f"{x:.3g}"


_COLUMNS = ("phase", "batch", "tokens", "context", "GFLOP", "GB moved", "FLOP/B", "bound",
            "time ms", "tok/s", "fits")


def format_table(rows: Sequence[tuple[StepCost, Bound]]) -> str:
    """An aligned text table (tokens: computed per sequence; tok/s: tokens computed)."""
    cells = [_COLUMNS] + [
        (c.phase, str(c.batch), str(c.new_tokens), str(c.context), _num(c.flops / 1e9),
         _num(c.total_bytes / 1e9), _num(c.arithmetic_intensity), b.bound,
         _num(b.bound_time_s * 1e3), _num(b.tokens_per_s), "yes" if b.fits_memory else "NO")
        for c, b in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(s.ljust(wd) if i == 0 else s.rjust(wd)
                               for i, (s, wd) in enumerate(zip(r, widths, strict=True)))
                     for r in cells)


def run_roofline(model: str, hardware: str, *, batches: str, contexts: str, prompt_lens: str,
                 dtype: str, kv_dtype: str | None = None, as_json: bool = False) -> None:
    """`jaxinfer roofline`: print the sweep per hardware, as a table or JSON lines."""
    cfg = model_shape(model)
    dtype = canonical_dtype(dtype)
    sizes = dict(batches=parse_sizes(batches, "--batch", 1),
                 contexts=parse_sizes(contexts, "--context", 0),
                 prompt_lens=parse_sizes(prompt_lens, "--prompt-len", 1))
    chosen = select_hardware(hardware)
    usable = [(k, hw) for k, hw in chosen if dtype in hw.peak_flops]
    for key, hw in chosen:
        if dtype not in hw.peak_flops:
            print(f"skipping {key}: no {dtype} peak ({', '.join(hw.peak_flops)} known)",
                  file=sys.stderr)
    if not usable:
        raise InputError(f"no chosen hardware has a {dtype} peak; try another --dtype")
    for i, (key, hw) in enumerate(usable):
        rows = sweep(cfg, hw, **sizes, dtype=dtype, kv_dtype=kv_dtype)
        if as_json:
            for cost, bound in rows:
                bound_fields = dataclasses.asdict(bound)
                del bound_fields["hardware"]  # the key names it; `hardware_name` spells it
                print(json.dumps({"model": model, "hardware": key, "hardware_name": hw.name,
                                  "source": hw.source, **cost.to_dict(), **bound_fields}))
            continue
        print(("\n" if i else "") + f"{model} ({cfg.num_params() / 1e9:.3g}B parameters) on "
              f"{hw.name} [{hw.source}]: {dtype} {hw.peak(dtype) / 1e12:g} TFLOP/s, "
              f"{hw.mem_bw_bytes_s / 1e12:g} TB/s, ridge {hw.ridge_point(dtype):.0f} FLOP/B, "
              f"{hw.memory_bytes / 1e9:g} GB")
        print(format_table(rows))
