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

_SOURCES = ("paged_attention.cc", "linear.cc")
_TARGET = "jaxinfer_ragged_paged_attention"
_LINEAR = "jaxinfer_linear"
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
