"""The Pallas GPU kernels compiled for a real GPU (Triton), against the references.

Marked `gpu`: skipped without a CUDA backend; `scripts/gpu_check.sh` runs them on a lent GPU.
The same cases run in interpret mode on CPU in test_ragged_paged_attention_pallas.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.ragged_paged_attention import ragged_paged_attention_gpu
from tests.kernels.test_ragged_paged_attention_pallas import (
    RAGGED,
    assert_close,
    make_case,
    reference,
)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA GPU")]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("E", [64, 128])
def test_ragged_paged_attention_compiled(dtype, E: int) -> None:
    case = make_case(0, *RAGGED, H=32, K=8, E=E, C=16, dtype=dtype)
    kw = dict(sm_scale=E ** -0.5, sliding_window=24, soft_cap=30.0)
    out = ragged_paged_attention_gpu(case.q, case.k_cache, case.v_cache, case.kv_lens,
                                     case.page_table, case.query_start,
                                     max_query_len=case.max_query_len, layer=1, **kw)
    assert_close(out, reference(case, 1, **kw), dtype)


def test_decode_compiled_long_context() -> None:
    case = make_case(1, [1] * 8, [4000, 17, 1000, 0, 2047, 2048, 5, 300], H=32, K=8, E=128,
                     C=16, dtype=jnp.bfloat16, extra_tokens=0)
    kw = dict(sm_scale=128 ** -0.5)
    out = ragged_paged_attention_gpu(case.q, case.k_cache, case.v_cache, case.kv_lens,
                                     case.page_table, case.query_start, max_query_len=1,
                                     layer=0, **kw)
    assert_close(out, reference(case, 0, **kw), jnp.bfloat16)
