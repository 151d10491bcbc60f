"""The full model with `attention_impl="pallas_gpu"` / `"pallas_tpu"` against the XLA path.

The Pallas kernels run in interpret mode on CPU. Three steps of a ragged batch: a prefill of
three prompts (flash attention), a mixed step (two decode tokens and a chunk continuing a
cached prompt across page boundaries), then a decode step. Logits and the cache must match
the XLA reference.
"""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from tests.model.test_forward import CONFIGS as FORWARD_CONFIGS

PAGE = 16
TOL = 5e-5

# test_forward's models with head dim 16 (the Triton kernel's minimum) and a soft cap.
CONFIGS = {"llama": FORWARD_CONFIGS["llama"].replace(head_dim=16),
           "gemma3": FORWARD_CONFIGS["gemma3"].replace(attn_logit_softcap=3.0)}

_forward = jax.jit(forward, static_argnums=1)


def _steps(cfg: ModelConfig) -> list[list[SequenceChunk]]:
    rng = np.random.default_rng(0)
    a, b, c = (rng.integers(0, cfg.vocab_size, n).tolist() for n in (22, 7, 40))
    pa, pb, pc = [3, 0], [5], [1, 6, 2]
    return [
        [SequenceChunk(a[:20], 0, pa), SequenceChunk(b[:5], 0, pb), SequenceChunk(c[:17], 0, pc)],
        [SequenceChunk([a[20]], 20, pa), SequenceChunk([b[5]], 5, pb),
         SequenceChunk(c[17:37], 17, pc)],
        [SequenceChunk([a[21]], 21, pa), SequenceChunk([b[6]], 6, pb),
         SequenceChunk([c[37]], 37, pc)],
    ]


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pallas_model_matches_xla(name: str, impl: str) -> None:
    ref_cfg = CONFIGS[name]
    cfg = ref_cfg.replace(attention_impl=impl)
    params = init_params(ref_cfg, seed=3, scale=0.3)
    caches = {c: init_cache(c, 8, PAGE) for c in (ref_cfg, cfg)}
    for i, chunks in enumerate(_steps(ref_cfg)):
        step = build_step_batch(chunks, page_size=PAGE, num_slots=8 * PAGE)
        # The first step is a prefill from position 0: the flash attention kernel's case.
        assert step.prefix_free == (i == 0)
        logits = {}
        for c in (ref_cfg, cfg):
            logits[c], caches[c] = _forward(params, c, Batch.from_step(step), caches[c])
        np.testing.assert_allclose(np.asarray(logits[cfg]), np.asarray(logits[ref_cfg]),
                                   atol=TOL, rtol=0, err_msg=f"step {i}")
    chex.assert_trees_all_close(caches[cfg], caches[ref_cfg], atol=TOL, rtol=0)


def test_pallas_gpu_needs_pages_of_16() -> None:
    cfg = CONFIGS["llama"].replace(attention_impl="pallas_gpu")
    params = init_params(cfg, seed=3, scale=0.3)
    # A chunk after cached tokens reads the pages (a prefill from 0 needs no pages).
    step = build_step_batch([SequenceChunk([1, 2, 3], 2, [0, 1])], page_size=4, num_slots=32)
    with pytest.raises(ValueError, match="page size"):
        _forward(params, cfg, Batch.from_step(step), init_cache(cfg, 8, 4))


def test_default_impl_by_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from jaxinfer.model import attention

    for backend, impl in (("gpu", "pallas_gpu"), ("tpu", "pallas_tpu"), ("rocm", "xla")):
        monkeypatch.setattr(attention.jax, "default_backend", lambda b=backend: b)
        assert attention.default_attention_impl() == impl
    # Asking for the TPU kernels on a GPU backend names the problem.
    monkeypatch.setattr(attention.jax, "default_backend", lambda: "gpu")
    cfg = CONFIGS["llama"].replace(attention_impl="pallas_tpu")
    step = build_step_batch([SequenceChunk([1, 2, 3], 0, [0])], page_size=PAGE, num_slots=128)
    with pytest.raises(ConfigError, match="cannot run on the 'gpu' backend"):
        forward(init_params(cfg, seed=3, scale=0.3), cfg, Batch.from_step(step),
                init_cache(cfg, 8, PAGE))
