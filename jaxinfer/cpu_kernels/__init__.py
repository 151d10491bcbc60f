"""Native CPU kernels called through `jax.ffi`, built on first use with the system compiler.

XLA:CPU runs decode attention over a paged cache poorly (it gathers a padded copy of the
pages, then its small batched dots run at a few GFLOP/s) and streams weights at half speed
for 2-8 token rows (docs/architecture.md). The kernels here read the cache and the stacked
weights in place. They are optional: without a C++ compiler the model uses the XLA path,
with a warning.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError

log = logging.getLogger(__name__)

_SOURCES = ("paged_attention.cc", "linear.cc", "linear_quant.cc")
_TARGET = "jaxinfer_ragged_paged_attention"
_LINEAR = "jaxinfer_linear"
_QUANT_LINEAR = "jaxinfer_quant_linear"
_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def linear_max_rows() -> int:
    """Most rows for which the native matmul beats XLA's dot here: its AVX-512 register
    tiles win up to 64 rows, the AVX2 fallback loop up to 16 (docs/architecture.md)."""
    return 64 if " avx512f" in f" {_cpu_signature()} " else 16


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "jaxinfer" / "cpu_kernels"


def _build() -> Path:
    """Compile the kernels (once per source, compiler flags, jaxlib version and CPU)."""
    here = Path(__file__).parent
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    include = jax.ffi.include_dir()
    flags = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
             f"-I{include}"]
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(jax.__version__.encode())
    digest.update(_cpu_signature().encode())
    out = _cache_dir() / digest.hexdigest()[:16] / "libjaxinfer_cpu.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [compiler, *flags, *(str(here / n) for n in _SOURCES), "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"compiling CPU kernels failed:\n{result.stderr[-2000:]}")
    tmp.replace(out)  # atomic: concurrent builders never load a half-written file
    return out


def require_cpu_backend(option: str) -> None:
    """Refuse the native kernels when jax computes on another backend (GPU, TPU)."""
    backend = jax.default_backend()
    if backend != "cpu":
        raise ConfigError(
            f"{option}='cpu' selects native CPU kernels, but jax runs on {backend}; use "
            f"{option}='xla' (jaxinfer.load picks the right one by default)")


def available() -> bool:
    """Whether the native kernels are built and registered (builds them on first call)."""
    with _lock:
        if "ok" not in _state:
            try:
                library = ctypes.cdll.LoadLibrary(str(_build()))
                jax.ffi.register_ffi_target(
                    _TARGET, jax.ffi.pycapsule(library.RaggedPagedAttention), platform="cpu")
                jax.ffi.register_ffi_target(
                    _LINEAR, jax.ffi.pycapsule(library.Linear), platform="cpu")
                jax.ffi.register_ffi_target(
                    _QUANT_LINEAR, jax.ffi.pycapsule(library.QuantLinear), platform="cpu")
                _state["library"] = library
                _state["ok"] = True
            except Exception as e:  # no compiler, no headers, unsupported platform
                log.warning("native CPU kernels unavailable, using the XLA reference: %s", e)
                _state["ok"] = False
        return bool(_state["ok"])


def ragged_paged_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lens: jax.Array,
    page_table: jax.Array, query_start: jax.Array, layer: jax.Array | int,
    window: jax.Array | int | None, *, sm_scale: float, soft_cap: float | None = None,
) -> jax.Array:
    """Causal attention of ragged query tokens over the paged cache, read in place.

    Sequence s owns tokens [query_start[s], query_start[s+1]) of q, at the last positions
    of its kv_lens[s] cached tokens (their own keys are already in the cache).

    Args:
      q: [T, H, E] float32 queries.
      k_cache, v_cache: [L, NP, C, K, E] float32, the whole stacked cache.
      kv_lens: [S] tokens in cache per sequence after this step (0: padding).
      page_table: [S, P] page ids.
      query_start: [S + 1] int32 cumulative query offsets.
      layer: which layer's pages to read.
      window: sliding window (keys at distance >= window are masked); None or <= 0: none.
      sm_scale, soft_cap: softmax scale and optional tanh soft cap.

    Returns:
      [T, H, E] float32; zero rows for tokens of no sequence (padding).
    """
    if not available():
        raise RuntimeError(
            "attention_impl='cpu' needs the native CPU kernels, which failed to build (see the "
            "warning above); use attention_impl='xla'")
    window = 0 if window is None else window
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    return call(q, k_cache, v_cache, kv_lens.astype(jnp.int32), page_table.astype(jnp.int32),
                query_start.astype(jnp.int32), jnp.asarray(layer, jnp.int32),
                jnp.asarray(window, jnp.int32),
                sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0))


def paged_decode_attention(
    q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, kv_lens: jax.Array,
    page_table: jax.Array, layer: jax.Array | int, window: jax.Array | int | None, *,
    sm_scale: float, soft_cap: float | None = None,
) -> jax.Array:
    """Decode attention (token s of sequence s): `ragged_paged_attention` with one query
    per sequence. q is [S, H, E]; returns [S, H, E], zero rows for padding sequences."""
    query_start = jnp.arange(q.shape[0] + 1, dtype=jnp.int32)
    return ragged_paged_attention(q, k_cache, v_cache, kv_lens, page_table, query_start,
                                  layer, window, sm_scale=sm_scale, soft_cap=soft_cap)


def linear(x: jax.Array, w_stacked: jax.Array, layer: jax.Array | int) -> jax.Array:
    """x [T, D] times layer `layer` of stacked weights [L, N, D] -> [T, N], float32.

    Reads the layer's weights in place (no slice copy); meant for small T (decode).
    """
    if not available():
        raise RuntimeError(
            "matmul_impl='cpu' needs the native CPU kernels, which failed to build (see the "
            "warning above); use matmul_impl='xla'")
    call = jax.ffi.ffi_call(_LINEAR, jax.ShapeDtypeStruct((x.shape[0], w_stacked.shape[1]),
                                                          jnp.float32))
    return call(x, w_stacked, jnp.asarray(layer, jnp.int32))


_QUANT_GROUP_SIZES = (16, 32, 64, 128, 256)
_QUANT_SCALE_DTYPES = (jnp.float32, jnp.float16, jnp.bfloat16)


def quant_linear_max_rows() -> int:
    """Most rows for which the native quantized matmul beats XLA's f32 dot on the already
    dequantized weight here: 1.3-1.9x still at 32 rows on SmolLM2-135M's shapes with
    AVX-512 (scripts/bench_quant_linear.py); the AVX2 fallback applies a dequantized row to
    4 tokens at a time and is unmeasured, so it stops at 8. Above it: dequantize + dot."""
    return 32 if " avx512f" in f" {_cpu_signature()} " else 8


def _check_quant_operands(x, q, scale, offset, bits: int, group_size: int) -> None:
    """Raise ConfigError naming the first operand that does not follow the quantized format."""
    if bits not in (4, 8):
        raise ConfigError(f"quant_linear: bits={bits} is not supported; use 4 or 8")
    if group_size not in _QUANT_GROUP_SIZES:
        raise ConfigError(f"quant_linear: group_size={group_size} is not one of "
                          f"{_QUANT_GROUP_SIZES}")
    if x.ndim != 2 or x.dtype != jnp.float32:
        raise ConfigError(f"quant_linear: x must be float32 [T, K], got {x.dtype} {x.shape}; "
                          "cast the activations to float32")
    K = x.shape[1]
    if K % 32 or K % group_size:
        raise ConfigError(f"quant_linear: K={K} must be a multiple of 32 and of group_size="
                          f"{group_size}; use the XLA path (matmul_impl='xla') for this weight")
    want = jnp.int8 if bits == 8 else jnp.uint8
    if q.ndim != 3 or q.dtype != want:
        raise ConfigError(f"quant_linear: bits={bits} needs q as {jnp.dtype(want).name} "
                          f"[L, N, K{'' if bits == 8 else ' // 2'}], got {q.dtype} {q.shape}")
    packed = K if bits == 8 else K // 2
    if q.shape[2] != packed:
        raise ConfigError(f"quant_linear: q {q.shape} does not match x's K={K} (bits={bits} "
                          f"stores {packed} bytes per row)")
    groups = (q.shape[0], q.shape[1], K // group_size)
    for name, a in (("scale", scale), ("offset", offset)):
        if a is None and name == "offset":
            continue
        if a.dtype not in _QUANT_SCALE_DTYPES:
            raise ConfigError(f"quant_linear: {name} dtype {a.dtype} is not float32, float16 "
                              "or bfloat16; convert it to float32")
        if tuple(a.shape) != groups:
            raise ConfigError(f"quant_linear: {name} shape {a.shape} should be [L, N, K // "
                              f"group_size] = {groups}")


def quant_linear(x: jax.Array, q_stacked: jax.Array, scale: jax.Array,
                 offset: jax.Array | None, layer: jax.Array | int, *, bits: int,
                 group_size: int) -> jax.Array:
    """x [T, K] times layer `layer` of a stacked group-quantized weight -> [T, N] float32.

    The weight follows `jaxinfer.quant.format`: W[n, k] = q[n, k] * scale[n, k // g]
    (+ offset[n, k // g]), dequantized in registers and read in place (no slice copy).
    Meant for T <= `quant_linear_max_rows()` (decode).

    Args:
      x: [T, K] float32 activations; K a multiple of 32 and of group_size.
      q_stacked: int8 [L, N, K] (bits=8) or uint8 [L, N, K // 2] (bits=4, two nibbles a byte).
      scale: [L, N, K // group_size] float32, float16 or bfloat16.
      offset: like scale, or None (symmetric).
      layer: int32 scalar, may be traced; out of range raises at run time.
      bits: 4 or 8.
      group_size: 16, 32, 64, 128 or 256.

    Raises:
      ConfigError: an operand does not follow the format (the message names it).
    """
    x, q_stacked, scale = jnp.asarray(x), jnp.asarray(q_stacked), jnp.asarray(scale)
    offset = None if offset is None else jnp.asarray(offset)
    _check_quant_operands(x, q_stacked, scale, offset, bits, group_size)
    if not available():
        raise RuntimeError(
            "matmul_impl='cpu' needs the native CPU kernels, which failed to build (see the "
            "warning above); use matmul_impl='xla'")
    if offset is None:  # an empty operand tells the kernel there is no offset
        offset = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(_QUANT_LINEAR, jax.ShapeDtypeStruct(
        (x.shape[0], q_stacked.shape[1]), jnp.float32))
    return call(x, q_stacked, scale, offset, jnp.asarray(layer, jnp.int32),
                bits=np.int32(bits), group_size=np.int32(group_size))
