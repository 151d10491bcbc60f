"""Quantized models end to end: the forward pass against the dense model with the same
(dequantized) weights, kernels against the XLA path, GGUF kept quantized against the
loader's dequantized weights, Orbax round trips and sharding."""

from __future__ import annotations

import gguf
import jax
import numpy as np
import pytest

from jaxinfer import cpu_kernels
from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.config import ModelConfig
from jaxinfer.convert import convert, inspect_checkpoint
from jaxinfer.errors import ConfigError
from jaxinfer.model.params import init_params, param_bytes
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.quant import QuantizedWeight, dequantize_params, is_quantized, quantize_params
from jaxinfer.quant.format import dequantize_np
from jaxinfer.quant.gguf_repack import repack
from jaxinfer.quant.matmul import native_max_rows, pallas_kernel, quant_dense, xla_quant_linear
from jaxinfer.quant.quantize import quantize_array
from jaxinfer.quant.sharding import param_shardings
from jaxinfer.weights.gguf_io import GGUFFile
from jaxinfer.weights.loader import config_from_gguf, load_params
from jaxinfer.weights.names import apply_rope_permutation, checkpoint_tensors, split_parts
from jaxinfer.weights.orbax_io import load_model_dir, save_model_dir
from tests.model.test_forward import CONFIGS
from tests.models import smollm2_path
from tests.weights.gguf_writer import write_llama_gguf

PAGE = 4
_forward = jax.jit(forward, static_argnums=1, static_argnames="all_logits")
TINY = ModelConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=96,
                   num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                   max_position_embeddings=64)
# Per tensor kind: its ggml type (the LM head stays F32: a dense field beside quantized ones).


def _logits(params, cfg, tokens):
    cache = init_cache(cfg, -(-len(tokens) // PAGE) + 1, PAGE)
    pages = list(range(cache.k.shape[1]))
    step = build_step_batch([SequenceChunk(tokens, 0, pages)], page_size=PAGE,
                            num_slots=cache.num_slots)
    logits, _ = _forward(params, cfg, Batch.from_step(step), cache, all_logits=True)
    return np.asarray(logits)[:len(tokens)]


def _tokens(cfg, n=11, seed=0):
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, n).tolist()


def _leaves_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name,scheme", [("llama", "int8-g16"), ("gemma3", "int4-g32-asym")])
def test_quantized_forward_equals_dense_with_dequantized_weights(name, scheme):
    cfg = CONFIGS[name]
    params = quantize_params(init_params(cfg, seed=3, scale=0.3), scheme)
    assert all(is_quantized(getattr(params.layers, f))
               for f in ("wqkv", "wo", "w_gate_up", "w_down"))
    assert is_quantized(params.embed) and not is_quantized(params.layers.attn_norm)
    assert params.embed.bits == 8  # the embedding / LM head stays 8-bit unless -head4
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(params, cfg, tokens),
                               _logits(dequantize_params(params), cfg, tokens),
                               atol=1e-4, rtol=0)


def test_activation_stats_and_activation_aware_quantization():
    """`activation_stats` (probed projections) gives E[x^2] of each projection's input: layer
    0's wqkv input is the normed embedding. The weighted quantizer runs from it."""
    from jaxinfer.model.layers import rms_norm
    from jaxinfer.quant.calibrate import activation_stats

    cfg = CONFIGS["llama"]
    dense = init_params(cfg, seed=3, scale=0.3)
    windows = [_tokens(cfg, 9, seed=1), _tokens(cfg, 5, seed=2)]
    stats = activation_stats(dense, cfg, windows, page_size=PAGE)
    assert set(stats) == {"wqkv", "wo", "w_gate_up", "w_down"}
    assert stats["w_down"].shape == (cfg.num_layers, cfg.intermediate_size)
    tokens = np.concatenate(windows)
    h = rms_norm(np.asarray(dense.embed)[tokens], dense.layers.attn_norm[0], cfg.rms_norm_eps,
                 cfg.norm_weight_offset)
    np.testing.assert_allclose(stats["wqkv"][0], np.square(np.asarray(h)).mean(0), rtol=1e-5)
    params = quantize_params(dense, "int4-g16-asym", importance=stats)
    assert params.layers.w_down.bits == 4
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(params, cfg, tokens),
                               _logits(dequantize_params(params), cfg, tokens),
                               atol=1e-4, rtol=0)


def test_native_cpu_kernel_in_the_model_matches_xla():
    """matmul_impl="cpu": the native quantized kernel (prefill and decode rows) against the
    XLA dequantize-then-dot path, on a batch of 3 prompts then 3 decode tokens."""
    assert native_max_rows() > 0 and cpu_kernels.available()
    base = TINY  # every K a multiple of 32, as the native kernel needs
    fast = base.replace(matmul_impl="cpu", attention_impl="cpu")
    params = quantize_params(init_params(base, seed=3, scale=0.3), "int4-g32-asym")
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, base.vocab_size, n).tolist() for n in (5, 3, 6)]
    pages = [[0, 1], [2, 3], [4, 5]]
    caches = {c: init_cache(c, 8, PAGE) for c in (base, fast)}
    chunks = [SequenceChunk(p[:-1], 0, pg) for p, pg in zip(prompts, pages, strict=True)]
    for step in range(2):
        out = {}
        for c in (base, fast):
            batch = build_step_batch(chunks, page_size=PAGE, num_slots=caches[c].num_slots)
            logits, caches[c] = _forward(params, c, Batch.from_step(batch), caches[c])
            out[c] = np.asarray(logits)
        np.testing.assert_allclose(out[fast], out[base], atol=1e-4, rtol=0, err_msg=f"{step}")
        chunks = [SequenceChunk([p[-1]], len(p) - 1, pg)
                  for p, pg in zip(prompts, pages, strict=True)]


@pytest.mark.parametrize("impl", ["pallas_gpu", "pallas_tpu"])
def test_pallas_dispatch_matches_xla(impl):
    """`quant_dense` under a Pallas attention_impl runs the Pallas kernel (interpreted on
    CPU) on the stacked weight at a traced layer; it must equal the XLA path."""
    kernel = pallas_kernel(impl)
    assert kernel is not None
    w = jax.tree.map(jax.numpy.asarray, quantize_array(
        np.random.default_rng(0).standard_normal((2, 128, 256)).astype(np.float32),
        "int4-g64-asym"))
    x = jax.numpy.asarray(np.random.default_rng(1).standard_normal((3, 256)), np.float32)
    cfg = TINY.replace(attention_impl=impl)
    got = jax.jit(quant_dense, static_argnums=0)(cfg, x, w, jax.numpy.int32(1))
    np.testing.assert_allclose(np.asarray(got), np.asarray(xla_quant_linear(x, w, 1)),
                               atol=2e-4, rtol=1e-5)


def test_orbax_round_trip_keeps_packed_arrays(tmp_path):
    cfg = CONFIGS["gemma3"]
    dense = init_params(cfg, seed=3, scale=0.3)
    save_model_dir(tmp_path / "dense", dense, cfg)
    result = convert(tmp_path / "dense", tmp_path / "int4", to="orbax",
                     quantize="int4-g16-asym", progress=False)
    assert result.quantization == "int4-g16-asym"
    loaded, _ = load_model_dir(tmp_path / "int4")
    _leaves_equal(loaded, quantize_params(dense, "int4-g16-asym"))
    assert loaded.layers.wqkv.q.dtype == np.uint8 and loaded.layers.wqkv.bits == 4
    report = inspect_checkpoint(tmp_path / "int4")
    assert report["extra"]["quantization"]["scheme"] == "int4-g16-asym"
    assert {"layers.wqkv.q", "layers.wqkv.scale", "layers.wqkv.offset"} <= {
        t["name"] for t in report["tensors"]}
    with pytest.raises(ConfigError, match="bits=5 is not supported"):
        convert(tmp_path / "dense", tmp_path / "bad", to="orbax", quantize="int5",
                progress=False)
    with pytest.raises(ConfigError, match="--keep-quantized keeps a GGUF"):
        convert(tmp_path / "dense", tmp_path / "bad", keep_quantized=True, progress=False)


# ----------------------------------------------------------------------------- GGUF
TINY_TYPES = {"attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q5_1", "attn_output": "Q8_0",
              "ffn_gate": "Q5_0", "ffn_up": "Q4_1", "ffn_down": "Q8_0", "token_embd": "Q8_0"}


def _write_tiny_gguf(path, params, cfg):
    """Our params written as a llama GGUF the way llama.cpp lays it out (q/k rows permuted)."""
    def tensors():
        for t in checkpoint_tensors(cfg, "gguf"):
            value = params
            for part in t.entry.field.split("."):
                value = getattr(value, part)
            value = np.asarray(value if t.layer is None else value[t.layer], np.float32)
            array = split_parts(t.entry, value, cfg)[t.part]
            kind = t.name.split(".")[-2]
            if kind in ("attn_q", "attn_k"):
                heads = cfg.num_heads if kind == "attn_q" else cfg.num_kv_heads
                array = apply_rope_permutation(array, heads)
            yield t.name, array, TINY_TYPES.get(kind)

    write_llama_gguf(path, num_layers=cfg.num_layers,
                     context_length=cfg.max_position_embeddings, hidden_size=cfg.hidden_size,
                     intermediate_size=cfg.intermediate_size, num_heads=cfg.num_heads,
                     num_kv_heads=cfg.num_kv_heads, rms_norm_eps=cfg.rms_norm_eps,
                     rope_theta=cfg.rope.theta, vocab_size=cfg.vocab_size, tensors=tensors())


def test_tiny_gguf_kept_quantized_and_converted(tmp_path):
    path = tmp_path / "tiny.gguf"
    _write_tiny_gguf(path, init_params(TINY, seed=5, scale=0.2), TINY)
    gguf_file = GGUFFile(path)
    cfg = config_from_gguf(gguf_file)
    kept = load_params(gguf_file, cfg, quantize="gguf", progress=False)
    dense = load_params(gguf_file, cfg, progress=False)
    assert kept.layers.wqkv.bits == 8  # Q4_1 / Q4_0 / Q5_1 parts meet at 8 bits
    assert kept.layers.w_gate_up.bits == 8 and kept.layers.wo.bits == 8
    assert kept.lm_head is not None and not is_quantized(kept.lm_head)
    # Every weight, after the q/k row permutation and the fused layouts, equals the loader's
    # dequantized one (the forward pass on quantized weights is tested above).
    expanded = jax.tree.leaves(dequantize_params(kept))
    for a, b in zip(expanded, jax.tree.leaves(dense), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    convert(path, tmp_path / "kept", keep_quantized=True, progress=False)
    loaded, _ = load_model_dir(tmp_path / "kept")
    _leaves_equal(loaded, kept)
    assert inspect_checkpoint(tmp_path / "kept")["extra"]["quantization"]["scheme"] == "gguf"


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M's Q4_1 GGUF opened once: (file, config on the XLA path)."""
    gguf_file = GGUFFile(smollm2_path())
    return gguf_file, config_from_gguf(gguf_file, attention_impl="xla", matmul_impl="xla")


def test_smollm2_kept_quantized_logits_equal_dequantized(smollm2):
    gguf_file, cfg = smollm2
    kept = load_params(gguf_file, cfg, quantize="gguf", progress=False)
    assert isinstance(kept.layers.w_down, QuantizedWeight) and kept.layers.w_down.bits == 4
    assert kept.embed.bits == 8 and kept.lm_head is None  # Q8_0 tied embedding
    dense = load_params(gguf_file, cfg, progress=False)
    assert param_bytes(kept) < 0.3 * param_bytes(dense)
    tokens = [1, 504, 3575, 282, 4649, 314, 7042, 30, 378, 3575, 282, 9598, 314]
    np.testing.assert_allclose(_logits(kept, cfg, tokens), _logits(dense, cfg, tokens),
                               atol=1e-3, rtol=0)


def test_smollm2_rows_repack_exactly(smollm2):
    """Real Q4_1 and Q8_0 blocks (a few rows) against gguf's own dequantization."""
    gguf_file, _ = smollm2
    for name in ("blk.0.attn_q.weight", "token_embd.weight"):
        t = gguf_file.tensors[name]
        shape = (4, gguf_file.tensor_shape(name)[1])
        raw = np.asarray(t.data[:4])
        want = gguf.quants.dequantize(raw, t.tensor_type).reshape(shape)
        np.testing.assert_array_equal(dequantize_np(repack(raw, t.tensor_type.name, shape)),
                                      want)


def test_gguf_mode_refuses_other_sources(tmp_path):
    cfg = CONFIGS["llama"]
    save_model_dir(tmp_path / "m", init_params(cfg), cfg)
    with pytest.raises(ConfigError, match="not a GGUF file"):
        load_params(tmp_path / "m", cfg, quantize="gguf")


# ----------------------------------------------------------------------------- sharding
def test_sharded_quantized_forward_and_group_split_error():
    """`shard_params` (what `LLM(mesh=...)` runs) on a 2 x 4 mesh: the 2 KV heads are
    replicated to 4 inside the quantized wqkv (q, scale, offset alike), the packed arrays
    placed by `param_shardings`; logits equal the single-device quantized model."""
    from jaxinfer.parallel.sharding import make_mesh, shard_params

    mesh = make_mesh(data=2, tensor=4)
    cfg = ModelConfig(family="llama", vocab_size=96, hidden_size=32, intermediate_size=64,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position_embeddings=64)
    params = quantize_params(init_params(cfg, seed=2, scale=0.3), "int4-g16-asym")
    placed, placed_cfg = shard_params(params, cfg, mesh)
    assert placed_cfg.num_kv_heads == 4 and is_quantized(placed.layers.wqkv)
    assert placed.layers.wqkv.shape[1] == 4 * (1 + 2) * 16  # one query head + K + V per shard
    assert placed.layers.wo.scale.sharding.spec[2] == "tensor"  # groups of the heads axis
    assert placed.layers.wqkv.offset.sharding.spec[1] == "tensor"
    tokens = _tokens(cfg)
    np.testing.assert_allclose(_logits(placed, placed_cfg, tokens), _logits(params, cfg, tokens),
                               atol=1e-5, rtol=0)
    odd = quantize_params(init_params(cfg, seed=2), "int8-g32")  # wo: two groups per row
    with pytest.raises(ConfigError, match="split a quantization group"):
        param_shardings(odd, cfg, mesh)
