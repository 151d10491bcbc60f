"""Block sizes of the ragged paged attention kernels, as data.

Keys: (head dim, dtype size in bytes, decode-only batch). Values were chosen for H100 (GPU)
and TPU v5e/v6e from the kernels' structure (rows = block_q x query group, keys per step);
`scripts/gpu_check.sh` measures them on a lent GPU and this table is where tuned values go.
"""

from __future__ import annotations

import jax.numpy as jnp

# GPU (Triton): block_q new tokens per program, block_k keys per inner step.
_GPU = {
    # (head_dim, itemsize, decode): settings
    (64, 2, False): dict(block_q=32, block_k=64, num_warps=4, num_stages=2),
    (128, 2, False): dict(block_q=32, block_k=64, num_warps=4, num_stages=2),
    (256, 2, False): dict(block_q=16, block_k=32, num_warps=8, num_stages=2),
    (64, 2, True): dict(block_q=1, block_k=64, num_warps=4, num_stages=3),
    (128, 2, True): dict(block_q=1, block_k=64, num_warps=4, num_stages=3),
    (256, 2, True): dict(block_q=1, block_k=32, num_warps=4, num_stages=2),
}
_GPU_DEFAULT = dict(block_q=16, block_k=32, num_warps=4, num_stages=2)

# TPU (Mosaic): block_q new tokens per grid step (rows padded to a multiple of 8), one page
# of keys per grid step (the page is the DMA unit).
_TPU = {
    (128, 2, False): dict(block_q=32),
    (256, 2, False): dict(block_q=16),
    (64, 2, False): dict(block_q=32),
}
_TPU_DEFAULT = dict(block_q=16)


def gpu_tuning(*, head_dim: int, dtype: jnp.dtype, decode: bool) -> dict[str, int]:
    """Triton launch settings for a head dim, dtype and batch kind."""
    key = (head_dim, jnp.dtype(dtype).itemsize, decode)
    return dict(_GPU.get(key, _GPU_DEFAULT))


def tpu_tuning(*, head_dim: int, dtype: jnp.dtype, decode: bool) -> dict[str, int]:
    """Mosaic settings for a head dim, dtype and batch kind (decode uses block_q=1)."""
    if decode:
        return dict(block_q=1)
    return dict(_TPU.get((head_dim, jnp.dtype(dtype).itemsize, False), _TPU_DEFAULT))
