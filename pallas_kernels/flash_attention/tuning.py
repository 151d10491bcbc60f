"""Block sizes for the flash attention kernels, kept as data.

Entries are starting points taken from common Triton / Mosaic flash attention settings,
not yet measured on this project's hardware; re-tune with `jaxinfer bench` and edit here.
"""

from __future__ import annotations

from typing import TypedDict

import jax.numpy as jnp
from jax.typing import DTypeLike


class FlashTuning(TypedDict):
    """Launch parameters of one flash attention kernel.

    block_q: score-tile rows per program. On GPU a row is one (token, query head) pair of a
      KV group, so the wrapper divides by the padded group size to get query tokens per
      block; on TPU it is query tokens per block (each of the G heads gets its own dot).
    block_k: keys per inner step.
    num_warps, num_stages: Triton launch settings (None on TPU).
    """

    block_q: int
    block_k: int
    num_warps: int | None
    num_stages: int | None


def _gpu(block_q: int, block_k: int, num_warps: int, num_stages: int) -> FlashTuning:
    return FlashTuning(block_q=block_q, block_k=block_k, num_warps=num_warps,
                       num_stages=num_stages)


def _tpu(block_q: int, block_k: int) -> FlashTuning:
    return FlashTuning(block_q=block_q, block_k=block_k, num_warps=None, num_stages=None)


# (platform, head_dim, dtype name) -> launch parameters.
FLASH_TUNING: dict[tuple[str, int, str], FlashTuning] = {
    ("gpu", 64, "bfloat16"): _gpu(128, 64, 4, 3),
    ("gpu", 64, "float16"): _gpu(128, 64, 4, 3),
    ("gpu", 64, "float32"): _gpu(64, 32, 4, 2),
    ("gpu", 128, "bfloat16"): _gpu(128, 64, 8, 3),
    ("gpu", 128, "float16"): _gpu(128, 64, 8, 3),
    ("gpu", 128, "float32"): _gpu(64, 32, 4, 2),
    ("gpu", 256, "bfloat16"): _gpu(64, 32, 8, 2),
    ("gpu", 256, "float32"): _gpu(32, 32, 4, 1),
    ("tpu", 64, "bfloat16"): _tpu(256, 512),
    ("tpu", 128, "bfloat16"): _tpu(256, 512),
    ("tpu", 256, "bfloat16"): _tpu(128, 256),
    ("tpu", 64, "float32"): _tpu(128, 256),
    ("tpu", 128, "float32"): _tpu(128, 256),
    ("tpu", 256, "float32"): _tpu(128, 128),
}

_DEFAULTS: dict[str, FlashTuning] = {
    "gpu": _gpu(64, 32, 4, 2),
    "tpu": _tpu(128, 128),
}


def flash_tuning(platform: str, head_dim: int, dtype: DTypeLike) -> FlashTuning:
    """Launch parameters for `platform` ("gpu" or "tpu"; "cuda"/"rocm" mean "gpu").

    Falls back to a conservative per-platform default for unlisted head dims and dtypes.
    """
    platform = "gpu" if platform in ("cuda", "rocm") else platform
    if platform not in _DEFAULTS:
        raise ValueError(f"no flash attention tuning for platform {platform!r}")
    key = (platform, int(head_dim), jnp.dtype(dtype).name)
    return dict(FLASH_TUNING.get(key, _DEFAULTS[platform]))  # type: ignore[return-value]
