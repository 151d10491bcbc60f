"""Conversion between Hugging Face safetensors, GGUF and our Orbax format, and `inspect`.

* Tiny random models of every family (as in tests/model/test_hf_parity.py): HF -> ours -> HF
  gives bitwise the same tensors and config, transformers' logits from the export equal the
  original model's exactly, and ours (loaded from our folder) match them within 1e-4.
* SmolLM2-135M Q4_1 GGUF -> ours: logits within 1e-3 of transformers on the same GGUF, the
  same tokenizer, `jaxinfer generate` answers; ours -> HF loads in transformers with logits
  equal to transformers' own GGUF load.
* A LoRA-adapted model (jaxinfer.train.lora.merge_lora) exports to HF: transformers' logits
  equal ours within 1e-4.
* Restoring onto an 8-device tensor-parallel mesh is bitwise equal; corrupt, truncated and
  mismatched folders fail with CheckpointError naming the tensor.
"""

from __future__ import annotations

import json
import shutil

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.cli import main as cli_main
from jaxinfer.config import ModelConfig, RopeConfig, from_hf_config
from jaxinfer.convert import convert, inspect_checkpoint
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model.params import init_params
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.parallel.sharding import ShardingRules, make_mesh
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.weights.hf_export import export_hf, to_hf_config
from jaxinfer.weights.loader import load_config, load_model, load_params
from jaxinfer.weights.orbax_io import (
    MANIFEST_NAME,
    config_from_dict,
    config_to_dict,
    load_model_dir,
    save_model_dir,
)
from jaxinfer.weights.safetensors_io import SafetensorsCheckpoint
from tests.model.test_hf_parity import BASE, FAMILIES, _randomize
from tests.models import bible_text, smollm2_path

TOL = 1e-4
GGUF_TOL = 1e-3
PROMPT = np.random.default_rng(1).integers(0, BASE["vocab_size"], 12).tolist()
_forward = jax.jit(forward, static_argnums=1, static_argnames="all_logits")


def _our_logits(params, cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """Prefill logits [T, V] of one prompt."""
    page = 16
    cache = init_cache(cfg, num_pages=-(-len(ids) // page), page_size=page)
    step = build_step_batch([SequenceChunk(ids, 0, list(range(cache.num_pages)))],
                            page_size=page, num_slots=cache.num_slots)
    logits, _ = _forward(params, cfg, Batch.from_step(step), cache, all_logits=True)
    return np.asarray(logits)[:len(ids)]


def _hf_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _write_tiny_tokenizer(folder) -> None:
    """A word-level tokenizer over the tiny vocabulary, with BOS and a chat template."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, BASE["vocab_size"])}}
    backend = Backend(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(["<s>", "</s>"])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 1)])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>"}))
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """{family: (transformers model, HF folder with tokenizer)} for every parity family."""
    out = {}
    for name, (config_cls, extra) in sorted(FAMILIES.items()):
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(
            config_cls(**{**BASE, **extra}), dtype=torch.float32)
        _randomize(model, norm_center=0.0 if name == "gemma3" else 1.0)
        model.eval()
        folder = tmp_path_factory.mktemp(name)
        model.save_pretrained(folder, safe_serialization=True)
        _write_tiny_tokenizer(folder)
        out[name] = (model, folder)
    return out


# ----------------------------------------------------------------------------- HF round trip
@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_hf_to_ours_to_hf(tiny_models, family, tmp_path):
    model, src = tiny_models[family]
    ours, back = tmp_path / "ours", tmp_path / "hf"
    assert convert(src, ours, progress=False).dst_format == "orbax"
    assert convert(ours, back, progress=False).dst_format == "hf"

    # Bitwise the same tensors (a tied lm_head is written by neither) and config.
    original = load_file(src / "model.safetensors")
    exported = SafetensorsCheckpoint(back)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    assert set(exported.names()) == set(original) - tied
    for name in exported.names():
        np.testing.assert_array_equal(exported.read(name), original[name], err_msg=name)
    assert load_config(back) == load_config(src) == load_config(ours)

    # transformers on the export: exactly the original's logits.
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32).eval()
    expected = _hf_logits(model, PROMPT)
    hf_err = float(np.max(np.abs(_hf_logits(reloaded, PROMPT) - expected)))
    print(f"{family}: HF -> ours -> HF transformers logits max |diff| = {hf_err:.1e}")
    assert hf_err == 0.0

    # Ours, loaded from our folder: transformers' logits within TOL.
    params, cfg = load_model_dir(ours)
    err = float(np.max(np.abs(_our_logits(params, cfg, PROMPT) - expected)))
    print(f"{family}: ours-from-orbax vs transformers max |logit diff| = {err:.1e}")
    assert err < TOL

    # The tokenizer files travel through both conversions.
    text = "w5 w17 w99"
    assert Tokenizer.from_hf_dir(back).encode(text) == Tokenizer.from_hf_dir(src).encode(text)
    assert load_model(ours, progress=False).tokenizer.encode(text) == [1, 5, 17, 99]


def test_bfloat16_conversion(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    ours, back = tmp_path / "ours", tmp_path / "hf"
    convert(src, ours, dtype="bfloat16", progress=False)
    convert(ours, back, progress=False)
    assert json.loads((back / "config.json").read_text())["dtype"] == "bfloat16"
    original, exported = load_file(src / "model.safetensors"), SafetensorsCheckpoint(back)
    for name in exported.names():
        np.testing.assert_array_equal(exported.read(name),
                                      original[name].astype(ml_dtypes.bfloat16))


def test_sharded_export_equals_single_file(tiny_models, tmp_path):
    _, src = tiny_models["qwen3"]
    cfg = load_config(src)
    params = load_params(src, cfg, progress=False)
    export_hf(tmp_path / "sharded", params, cfg, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    original = load_file(src / "model.safetensors")
    exported = SafetensorsCheckpoint(tmp_path / "sharded")
    assert sorted(exported.names()) == sorted(original)
    for name in exported.names():
        np.testing.assert_array_equal(exported.read(name), original[name])


# ----------------------------------------------------------------------------- configs
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_config_round_trips(tiny_models, family):
    cfg = load_config(tiny_models[family][1])
    assert from_hf_config(to_hf_config(cfg)) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg
    with_factors = cfg.replace(rope=RopeConfig(theta=5e5, freq_factors=(1.0, 2.0) * 4))
    assert config_from_dict(json.loads(json.dumps(config_to_dict(with_factors)))) == with_factors


@pytest.mark.parametrize("change, message", [
    (dict(family="mistral", qkv_bias=True, o_bias=True), "Mistral has no attention biases"),
    (dict(layer_types=("sliding", "full", "full"), sliding_window=4), "Llama has no sliding"),
    (dict(rope=RopeConfig(freq_factors=(1.0,) * 8)), "rope_freqs"),
    (dict(qkv_bias=True), "cannot be written as a Hugging Face config"),
])
def test_unexpressible_configs_are_refused(tiny_models, change, message):
    cfg = load_config(tiny_models["llama"][1]).replace(**change)
    with pytest.raises(ConfigError, match=message):
        to_hf_config(cfg)


# ----------------------------------------------------------------------------- GGUF
@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(our folder converted from the SmolLM2 GGUF, transformers' model of the GGUF)."""
    path = smollm2_path()
    ours = tmp_path_factory.mktemp("smollm2") / "ours"
    assert cli_main(["convert", str(path), str(ours), "--quiet"]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return ours, hf


@pytest.mark.slow
def test_gguf_to_ours_matches_transformers(smollm2):
    ours, hf = smollm2
    loaded = load_model(ours, progress=False)
    from jaxinfer.weights.gguf_io import GGUFFile

    gguf_tokenizer = Tokenizer.from_gguf_metadata(GGUFFile(smollm2_path()).metadata)
    text = bible_text(0, 12)
    assert loaded.tokenizer.encode(text) == gguf_tokenizer.encode(text)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    assert loaded.tokenizer.encode_chat(chat) == gguf_tokenizer.encode_chat(chat)
    assert loaded.tokenizer.stop_token_ids == gguf_tokenizer.stop_token_ids
    assert loaded.tokenizer.special_ids == gguf_tokenizer.special_ids

    ids = gguf_tokenizer.encode(text)[:64]
    expected = _hf_logits(hf, ids)
    err = float(np.max(np.abs(_our_logits(loaded.params, loaded.cfg, ids) - expected)))
    print(f"smollm2: GGUF -> ours vs transformers(GGUF) max |logit diff| over 64 = {err:.1e}")
    assert err < GGUF_TOL


@pytest.mark.slow
def test_gguf_origin_exports_to_transformers(smollm2, tmp_path):
    """ours (from GGUF) -> HF: transformers' load of the export equals its load of the GGUF,
    and the exported tokenizer encodes as the GGUF's."""
    ours, hf = smollm2
    back = tmp_path / "hf"
    assert cli_main(["convert", str(ours), str(back), "--quiet"]) == 0
    text = bible_text(0, 12)
    ids = Tokenizer.from_hf_dir(ours).encode(text)[:64]
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, dtype=torch.float32)
    err = float(np.max(np.abs(_hf_logits(reloaded.eval(), ids) - _hf_logits(hf, ids))))
    print(f"smollm2: GGUF -> ours -> HF vs transformers(GGUF) max |logit diff| = {err:.1e}")
    assert err < 1e-5
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(back)
    assert hf_tokenizer(text)["input_ids"] == Tokenizer.from_hf_dir(ours).encode(text)


@pytest.mark.slow
def test_generate_from_ours(smollm2, capsys):
    ours, _ = smollm2
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(ours), "--chat", "--quiet", "--max-tokens",
                     "16", "What is the capital of France?"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_weights_only_gguf_converts(tiny_gguf, tiny_hf_model, tmp_path):
    """The test GGUF (no vocabulary) converts without a tokenizer; same weights as HF."""
    convert(tiny_gguf, tmp_path / "ours", progress=False)
    params, cfg = load_model_dir(tmp_path / "ours")
    folder, _ = tiny_hf_model
    expected = load_params(folder, load_config(folder), progress=False)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- inspect
def test_inspect_totals(tiny_models, tiny_gguf, tmp_path, capsys):
    _, src = tiny_models["gemma3"]
    ours = tmp_path / "ours"
    convert(src, ours, progress=False)
    params, cfg = load_model_dir(ours)
    n = sum(x.size for x in jax.tree.leaves(params))
    report = inspect_checkpoint(ours)
    assert report["total"] == {"tensors": len(jax.tree.leaves(params)), "params": n,
                               "bytes": 4 * n}
    assert report["config"]["family"] == "gemma3"

    hf_report = inspect_checkpoint(src)
    assert hf_report["total"]["params"] == n  # tied: no lm_head in either
    assert hf_report["total"]["bytes"] == (src / "model.safetensors").stat().st_size - 8 - int(
        np.frombuffer((src / "model.safetensors").read_bytes()[:8], "<u8")[0])

    gguf_report = inspect_checkpoint(tiny_gguf)
    assert gguf_report["format"] == "gguf" and gguf_report["total"]["tensors"] == 2 + 2 * 9 + 1

    capsys.readouterr()
    assert cli_main(["inspect", str(ours)]) == 0
    out = capsys.readouterr().out
    assert f"total: {len(jax.tree.leaves(params))} tensors, {n:,} parameters" in out
    assert "layers.wqkv" in out and "family" in out
    assert cli_main(["inspect", str(ours), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"]["params"] == n


# ----------------------------------------------------------------------------- sharding
def test_restore_onto_tensor_parallel_mesh_is_bitwise(tiny_models, tmp_path):
    _, src = tiny_models["llama"]
    ours = tmp_path / "ours"
    convert(src, ours, progress=False)
    single, cfg = load_model_dir(ours)
    mesh = make_mesh(1, 8)
    shardings = ShardingRules().param_shardings(cfg, mesh)
    sharded, _ = load_model_dir(ours, shardings=shardings)
    for got, want, where in zip(jax.tree.leaves(sharded), jax.tree.leaves(single),
                                jax.tree.leaves(shardings), strict=True):
        assert got.sharding == where
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert any(not s.is_fully_replicated for s in jax.tree.leaves(shardings))

    # Saved from the 8-device layout, restored on one device: the same bits again.
    save_model_dir(tmp_path / "from_sharded", sharded, cfg)
    again, _ = load_model_dir(tmp_path / "from_sharded")
    for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(single), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ----------------------------------------------------------------------------- LoRA export
@pytest.mark.slow
def test_lora_merged_model_exports_to_transformers(tiny_models, tmp_path):
    from jaxinfer.train.lora import LoraConfig, init_lora, merge_lora

    base_model, src = tiny_models["llama"]
    cfg = load_config(src)
    base = load_params(src, cfg, progress=False)
    lora_cfg = LoraConfig(rank=4, alpha=8.0)
    lora = init_lora(cfg, lora_cfg, seed=0)
    # "Trained" adapters: B away from its zero init.
    rng = np.random.default_rng(2)
    lora = jax.tree.map(lambda x: x + 0.05 * rng.standard_normal(x.shape, np.float32), lora)
    merged = merge_lora(base, lora, lora_cfg)
    export_hf(tmp_path / "hf", merged, cfg, tokenizer_source=src)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    got = _hf_logits(hf.eval(), PROMPT)
    err = float(np.max(np.abs(got - _our_logits(merged, cfg, PROMPT))))
    print(f"LoRA merged -> HF: transformers vs ours max |logit diff| = {err:.1e}")
    assert err < TOL
    assert np.max(np.abs(got - _hf_logits(base_model, PROMPT))) > 0.1, "adapters were lost"


# ----------------------------------------------------------------------------- bad folders
@pytest.fixture(scope="module")
def tiny_ours(tmp_path_factory):
    cfg = ModelConfig(family="llama", vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                      max_position_embeddings=64)
    path = tmp_path_factory.mktemp("bad") / "ours"
    save_model_dir(path, init_params(cfg), cfg)
    return path


def _truncate_chunk(path):
    chunk = path / "params" / "layers.wqkv" / "0.0.0"
    chunk.write_bytes(chunk.read_bytes()[:100])


def _flip_a_bit(path):
    chunk = path / "params" / "layers.w_down" / "0.0.0"
    data = bytearray(chunk.read_bytes())
    data[1234] ^= 0x10
    chunk.write_bytes(bytes(data))


def _drop_tensor(path):
    shutil.rmtree(path / "params" / "final_norm")


def _edit_manifest(change):
    def edit(path):
        manifest = json.loads((path / MANIFEST_NAME).read_text())
        change(manifest)
        (path / MANIFEST_NAME).write_text(json.dumps(manifest))
    return edit


def _bad_shape(m):
    m["tensors"]["embed"]["shape"] = [64, 16]


def _newer_version(m):
    m["version"] = 99


def _unknown_field(m):
    m["config"]["num_experts"] = 8


@pytest.mark.parametrize("damage, message", [
    (_truncate_chunk, r"tensor 'layers.wqkv'.*0\.0\.0 has 100 bytes.*truncated"),
    (_flip_a_bit, r"tensor 'layers.w_down'.*fails its checksum"),
    (_drop_tensor, r"tensor 'final_norm'.*\.zarray is missing"),
    (_edit_manifest(_bad_shape), r"tensor 'embed' has shape \[64, 16\].*needs \[64, 32\]"),
    (_edit_manifest(_newer_version), r"format version 99"),
    (_edit_manifest(_unknown_field), r"unknown fields \['num_experts'\]"),
    (lambda path: (path / MANIFEST_NAME).unlink(), r"no jaxinfer_model.json"),
])
def test_damaged_folder_names_the_problem(tiny_ours, tmp_path, damage, message):
    path = tmp_path / "ours"
    shutil.copytree(tiny_ours, path)
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_model_dir(path)


def test_overwrite_rules(tiny_ours, tiny_models, tmp_path, capsys):
    _, src = tiny_models["llama"]
    dst = tmp_path / "dst"
    shutil.copytree(tiny_ours, dst)
    assert cli_main(["convert", str(src), str(dst), "--quiet"]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert cli_main(["convert", str(src), str(dst), "--quiet", "--overwrite"]) == 0
    assert load_config(dst) == load_config(src)
    assert not [p for p in tmp_path.iterdir() if ".partial-" in p.name]

    unrelated = tmp_path / "documents"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a model folder.*refusing to delete"):
        convert(src, unrelated, overwrite=True, progress=False)
    assert (unrelated / "notes.txt").read_text() == "keep me"
