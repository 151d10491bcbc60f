"""Block sizes of the quantized matmul kernels, kept as data, with their memory estimates.

Keyed by (bits, token bucket): a bucket is the smallest listed bound >= T (None: larger).
Entries are starting points chosen from the kernels' structure for H100 (Triton) and TPU
v5e/v6e (Mosaic), not yet measured; `scripts/gpu_check.py --parts quant_matmul` measures
the GPU kernel, and tuned values go here. Dimension legend: T tokens, N output features,
K input features, g group size.
"""

from __future__ import annotations

from typing import TypedDict

from jax.experimental import pallas as pl

# T buckets: decode (whole batch in one 16-row MMA tile), small batches, prefill.
TOKEN_BUCKETS = (16, 64, 256, None)
# Shared memory per block on H100 (227 KiB usable) and a conservative VMEM budget for TPU
# (Mosaic's default scoped limit is 16 MiB on v5e, 32 MiB on v6e).
GPU_SHARED_MEMORY_BYTES = 227 * 1024
TPU_DEFAULT_SCOPED_VMEM_BYTES = 12 * 2**20
_LANES = 128


class GpuTuning(TypedDict):
    """Triton launch parameters.

    block_t: token rows per program (>= 16: Triton's dot tile); block_n: output features
    per program; block_k: K entries per loop step (a multiple of the group size; the kernel
    rounds it); num_warps, num_stages: Triton settings; min_programs: the wrapper splits K
    over more programs (summed in float32 after the kernel) until the grid has at least this
    many, so that a decode matmul's few output blocks still occupy every SM.
    """

    block_t: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    min_programs: int


class TpuTuning(TypedDict):
    """Mosaic block sizes: block_t tokens (multiple of 16), block_n output features
    (multiple of 128), block_k K entries (multiple of 256 for int4, 128 for int8)."""

    block_t: int
    block_n: int
    block_k: int


def _gpu(block_t: int, block_n: int, block_k: int, num_warps: int, num_stages: int,
         min_programs: int) -> GpuTuning:
    return GpuTuning(block_t=block_t, block_n=block_n, block_k=block_k, num_warps=num_warps,
                     num_stages=num_stages, min_programs=min_programs)


def _tpu(block_t: int, block_n: int, block_k: int) -> TpuTuning:
    return TpuTuning(block_t=block_t, block_n=block_n, block_k=block_k)


# (bits, token bucket) -> settings. Decode rows stream long K runs per program (128 bytes
# of each weight row per step) with deep pipelining; 264 programs = 2 per H100 SM.
GPU_TUNING: dict[tuple[int, int | None], GpuTuning] = {
    (4, 16): _gpu(16, 32, 256, 4, 4, 264),
    (8, 16): _gpu(16, 32, 128, 4, 4, 264),
    (4, 64): _gpu(32, 64, 128, 4, 4, 132),
    (8, 64): _gpu(32, 64, 128, 4, 4, 132),
    (4, 256): _gpu(64, 128, 128, 4, 3, 132),
    (8, 256): _gpu(64, 128, 128, 4, 3, 132),
    (4, None): _gpu(128, 128, 128, 8, 3, 0),
    (8, None): _gpu(128, 128, 64, 8, 3, 0),
}

TPU_TUNING: dict[tuple[int, int | None], TpuTuning] = {
    (4, 16): _tpu(16, 512, 1024),
    (8, 16): _tpu(16, 512, 512),
    (4, 64): _tpu(64, 512, 1024),
    (8, 64): _tpu(64, 512, 512),
    (4, 256): _tpu(256, 512, 512),
    (8, 256): _tpu(256, 512, 512),
    (4, None): _tpu(512, 512, 512),
    (8, None): _tpu(512, 512, 512),
}


def token_bucket(num_tokens: int) -> int | None:
    """The smallest bucket bound >= num_tokens (None past the largest)."""
    return next(b for b in TOKEN_BUCKETS if b is None or num_tokens <= b)


def gpu_tuning(num_tokens: int, bits: int) -> GpuTuning:
    """Triton settings for T tokens and 4- or 8-bit weights."""
    return dict(GPU_TUNING[(bits, token_bucket(num_tokens))])  # type: ignore[return-value]


def tpu_tuning(num_tokens: int, bits: int) -> TpuTuning:
    """Mosaic block sizes for T tokens and 4- or 8-bit weights."""
    return dict(TPU_TUNING[(bits, token_bucket(num_tokens))])  # type: ignore[return-value]


def gpu_shared_memory_bytes(*, block_t: int, block_n: int, block_k: int, bits: int,
                            x_itemsize: int, num_stages: int) -> int:
    """Shared memory of one program: the pipelined x and packed-weight tiles of every stage,
    plus the dequantized weight tile staged for the tensor-core dot."""
    per_stage = block_t * block_k * x_itemsize + block_n * block_k * bits // 8
    return num_stages * per_stage + block_n * block_k * x_itemsize


def tpu_vmem_bytes(*, block_t: int, block_n: int, block_k: int, bits: int, x_itemsize: int,
                   scale_groups: int, scale_itemsize: int, has_offset: bool,
                   out_itemsize: int) -> int:
    """VMEM of one grid step: double-buffered blocks, the f32 accumulator and temporaries.

    scale_groups: the scale block's group columns (padded to whole 128-lane tiles in VMEM).
    """
    packed = block_k * bits // 8  # K' entries per step
    scale_block = block_n * -(-scale_groups // _LANES) * _LANES * scale_itemsize
    blocks = (block_t * block_k * x_itemsize + block_n * packed
              + scale_block * (2 if has_offset else 1) + block_t * block_n * out_itemsize)
    accumulator = 4 * block_t * block_n
    # Expanded scale/offset, the dequantized halves and the one-hot expansion matrix (f32).
    temporaries = 4 * (4 * block_n * packed + scale_groups * packed)
    return 2 * blocks + accumulator + temporaries


def matmul_cost(T: int, N: int, K: int, bits: int, group_size: int, x_itemsize: int,
                scale_itemsize: int, has_offset: bool, out_itemsize: int) -> pl.CostEstimate:
    """Flops and bytes of one call (weights read once), for XLA's scheduler."""
    scale_bytes = N * (K // group_size) * scale_itemsize * (2 if has_offset else 1)
    return pl.CostEstimate(
        flops=2 * T * N * K, transcendentals=0,
        bytes_accessed=N * K * bits // 8 + scale_bytes + T * K * x_itemsize
        + T * N * out_itemsize)
