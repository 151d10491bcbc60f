"""The roofline's cost model reproduces BENCHMARKS.md's SmolLM2 figures and the expected
regimes (decode memory bound, big prefill compute bound), caps KV traffic by sliding windows
and GQA, and `jaxinfer roofline` prints a table or JSON lines. No timing here."""

from __future__ import annotations

import dataclasses
import json

import pytest

from jaxinfer import bench, roofline
from jaxinfer.cli import main
from jaxinfer.config import ModelConfig
from jaxinfer.errors import InputError

SMOLLM2 = roofline.MODEL_SHAPES["smollm2-135m"]
LLAMA_8B = roofline.MODEL_SHAPES["llama-3-8b"]
# BENCHMARKS.md, this CPU idle: ~28 GB/s streaming, ~175 GFLOP/s f32 matmul.
CPU = roofline.Hardware("cpu-2core", {"f32": 175e9}, 28e9, 8e9, "measured")


def _tiny(**changes) -> ModelConfig:
    cfg = ModelConfig(family="llama", vocab_size=1000, hidden_size=256, intermediate_size=512,
                      num_layers=4, num_heads=8, num_kv_heads=8, head_dim=32,
                      max_position_embeddings=8192)
    return dataclasses.replace(cfg, **changes)


def test_smollm2_figures_match_benchmarks_md():
    prefill = roofline.step_cost(SMOLLM2, phase="prefill", batch=1, prompt_len=128, dtype="f32")
    projections = sum(prefill.parts[p].flops for p in ("qkv", "o", "mlp")) / prefill.tokens
    assert projections / 1e9 == pytest.approx(0.213, rel=0.01)  # per prompt token, no head
    assert (prefill.flops - prefill.parts["lm_head"].flops) / 128 / 1e9 == \
        pytest.approx(0.213, rel=0.03)  # with attention over a 128-token prompt
    assert prefill.parts["lm_head"].flops == roofline.head_flops(SMOLLM2)  # last token only
    assert prefill.parts["embedding"].flops == 0  # a gather, although the head is tied

    decode = roofline.step_cost(SMOLLM2, phase="decode", batch=1, context=192, dtype="f32")
    assert (decode.flops - decode.parts["attention"].flops) / 1e9 == \
        pytest.approx(0.27, rel=0.01)  # per generated token
    assert decode.weight_bytes / 1e6 == pytest.approx(540, rel=0.01)
    assert decode.weight_bytes == pytest.approx(SMOLLM2.num_params() * 4, rel=1e-3)


def test_bench_roofline_matches_benchmarks_md_cpu_limits():
    single = roofline.bench_roofline(SMOLLM2, CPU, prompt_lens=[128], new_tokens=128, flops=0,
                                     dtype="float32")
    assert single["roofline_ttft_s"] == pytest.approx(0.16, rel=0.03)  # TTFT >= ~0.16 s
    assert single["roofline_decode_tok_s"] == pytest.approx(52, rel=0.03)  # <= ~52 tok/s
    prompts, new = bench.workload_inputs("batch")
    batch = roofline.bench_roofline(SMOLLM2, CPU, prompt_lens=[len(p) for p in prompts],
                                    new_tokens=new, dtype="float32",
                                    flops=bench.workload_flops(SMOLLM2, prompts, new))
    # ~165 tok/s counting matmuls only; attention adds a few percent of work.
    assert batch["roofline_gen_tok_s"] == pytest.approx(165, rel=0.05)


def test_decode_is_memory_bound_and_big_prefill_compute_bound_on_h100():
    h100 = roofline.HARDWARE["h100"]
    for cfg in (SMOLLM2, LLAMA_8B):
        decode = roofline.roofline_bound(
            roofline.step_cost(cfg, phase="decode", batch=1, context=1024), h100)
        assert decode.bound == "memory" and decode.arithmetic_intensity < decode.ridge_point
        prefill = roofline.roofline_bound(
            roofline.step_cost(cfg, phase="prefill", batch=64, prompt_len=512), h100)
        assert prefill.bound == "compute" and prefill.arithmetic_intensity > prefill.ridge_point
    # Llama 3 8B, batch 1: 16 GB of bf16 weights, 15 of them read (the embedding is gathered),
    # at 3.35 TB/s: about 220 tok/s.
    cost = roofline.step_cost(LLAMA_8B, phase="decode", batch=1, context=1024)
    bound = roofline.roofline_bound(cost, h100)
    assert cost.weight_bytes / 1e9 == pytest.approx(16.06 - 1.05, rel=0.01)
    assert bound.bound_time_s == max(bound.compute_time_s, bound.memory_time_s)
    assert bound.tokens_per_s == pytest.approx(1 / bound.bound_time_s)
    assert bound.ridge_point == pytest.approx(989.4e12 / 3.35e12)
    assert 200 < bound.tokens_per_s < 225 and bound.fits_memory
    big = roofline.step_cost(roofline.MODEL_SHAPES["llama-3-70b"], phase="decode", batch=1,
                             context=1024)
    assert not roofline.roofline_bound(big, h100).fits_memory  # 141 GB of bf16 weights


def test_sliding_window_layers_cap_kv_reads():
    full = _tiny()
    sliding = _tiny(layer_types=("sliding", "full") * 2, sliding_window=512)
    for context in (100, 4096):
        a = roofline.step_cost(full, phase="decode", batch=2, context=context)
        b = roofline.step_cost(sliding, phase="decode", batch=2, context=context)
        per_layer = 2 * 2 * 8 * 32 * 2  # batch x K and V x K heads x E x bf16 bytes
        assert a.kv_read_bytes == per_layer * 4 * (context + 1)
        capped = min(context + 1, 512)  # the window counts the new token itself
        assert b.kv_read_bytes == per_layer * 2 * (context + 1 + capped)
        assert b.kv_write_bytes == a.kv_write_bytes
        assert b.parts["attention"].flops == pytest.approx(
            a.parts["attention"].flops * (context + 1 + capped) / (2 * (context + 1)))


@pytest.mark.parametrize(("context", "new", "window"),
                         [(0, 7, 3), (5, 9, 4), (0, 50, 100), (20, 5, 10), (9, 1, 10), (0, 1, 1)])
def test_attended_keys_sum_matches_counting(context, new, window):
    counted = sum(min(p + 1, window) for p in range(context, context + new))
    assert roofline._attended_keys(context, new, window) == counted
    cfg = _tiny(layer_types=("sliding",) * 4, sliding_window=window)
    cost = roofline.step_cost(cfg, phase="prefill", batch=1, context=context, prompt_len=new)
    assert cost.parts["attention"].flops == 4 * 8 * 32 * 4 * counted


def test_grouped_query_attention_divides_kv_bytes():
    mha = roofline.step_cost(_tiny(), phase="decode", batch=4, context=1000)
    gqa = roofline.step_cost(_tiny(num_kv_heads=2), phase="decode", batch=4, context=1000)
    assert mha.kv_read_bytes == 4 * gqa.kv_read_bytes  # H / K = 8 / 2
    assert mha.kv_write_bytes == 4 * gqa.kv_write_bytes
    assert mha.parts["attention"].flops == gqa.parts["attention"].flops
    int8 = roofline.step_cost(_tiny(), phase="decode", batch=4, context=1000, kv_dtype="int8")
    assert mha.kv_read_bytes == 2 * int8.kv_read_bytes


def test_untied_head_reads_its_matrix_and_gathers_embedding_rows():
    tied = roofline.step_cost(_tiny(tie_word_embeddings=True), phase="decode", batch=1,
                              context=10, dtype="f32")
    untied = roofline.step_cost(_tiny(), phase="decode", batch=1, context=10, dtype="f32")
    assert tied.weight_bytes == untied.weight_bytes  # the head reads V x D either way
    assert untied.resident_bytes - tied.resident_bytes == 1000 * 256 * 4


def test_bad_arguments_raise_input_errors():
    with pytest.raises(InputError, match="prompt_len"):
        roofline.step_cost(SMOLLM2, phase="prefill", batch=1)
    with pytest.raises(InputError, match="phase"):
        roofline.step_cost(SMOLLM2, phase="train", batch=1)
    with pytest.raises(InputError, match="dtype"):
        roofline.step_cost(SMOLLM2, phase="decode", batch=1, dtype="fp4")
    cost = roofline.step_cost(SMOLLM2, phase="decode", batch=1, dtype="f32")
    with pytest.raises(InputError, match="no f32 peak"):
        roofline.roofline_bound(cost, roofline.HARDWARE["tpu-v5e"])
    with pytest.raises(InputError, match="--batch"):
        roofline.parse_sizes("1,x", "--batch", 1)


def test_cli_prints_a_table(capsys):
    assert main(["roofline", "--model", "llama-3-8b", "--hardware", "h100,tpu-v6e",
                 "--batch", "1,16", "--context", "1024", "--prompt-len", "256"]) == 0
    out = capsys.readouterr().out
    assert "llama-3-8b" in out and "H100 SXM" in out and "TPU v6e" in out
    assert "vendor datasheet" in out and out.count("time ms") == 2
    rows = [line.split() for line in out.splitlines() if line.startswith(("prefill", "decode"))]
    assert len(rows) == 2 * (2 + 2)  # per chip: prefill per batch, decode per batch x context
    assert rows[0][:4] == ["prefill", "1", "256", "0"] and rows[2][:4] == ["decode", "1", "1",
                                                                           "1024"]


def test_cli_json_lines_parse(capsys):
    assert main(["roofline", "--hardware", "all", "--batch", "1,64", "--context", "512,2048",
                 "--prompt-len", "128", "--json"]) == 0
    captured = capsys.readouterr()
    records = [json.loads(line) for line in captured.out.splitlines()]
    assert len(records) == len(roofline.HARDWARE) * (2 + 4)
    assert {r["hardware"] for r in records} == set(roofline.HARDWARE)
    first = records[0]
    assert first["model"] == "smollm2-135m" and first["phase"] == "prefill"
    for key in ("flops", "total_bytes", "arithmetic_intensity", "bound", "bound_time_s",
                "tokens_per_s", "ridge_point", "source", "parts"):
        assert key in first
    assert set(first["parts"]) >= {"qkv", "o", "mlp", "attention", "lm_head", "embedding"}


def test_cli_cpu_uses_the_measured_peaks(capsys, monkeypatch):
    monkeypatch.setattr(roofline, "measure_peaks",
                        lambda: {"peak_bw_gbs": 28.0, "peak_gflops": 175.0})
    assert main(["roofline", "--hardware", "cpu", "--dtype", "f32", "--batch", "1",
                 "--context", "192", "--prompt-len", "128", "--json"]) == 0
    prefill, decode = (json.loads(line) for line in capsys.readouterr().out.splitlines())
    assert prefill["source"].startswith("measured") and prefill["hardware"] == "cpu"
    assert prefill["hardware_name"] == bench.device_name()
    assert prefill["bound"] == "compute" and prefill["bound_time_s"] == pytest.approx(0.16, 0.03)
    assert decode["bound"] == "memory" and decode["tokens_per_s"] == pytest.approx(52, 0.03)
    # The CPU knows only its f32 peak: bf16 is refused with one error line.
    assert main(["roofline", "--hardware", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "skipping cpu: no bf16 peak" in err and "error: " in err


def test_cli_reads_a_hugging_face_config_and_refuses_unknown_models(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "llama", "vocab_size": 1000, "hidden_size": 256,
        "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 2, "max_position_embeddings": 2048}))
    assert roofline.model_shape(str(tmp_path)) == _tiny(
        num_kv_heads=2, max_position_embeddings=2048, rms_norm_eps=SMOLLM2.rms_norm_eps,
        rope=roofline.model_shape(str(tmp_path)).rope)
    assert main(["roofline", "--model", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "error: " in err and "llama-3-8b" in err
    assert main(["roofline", "--batch", "0"]) == 2
