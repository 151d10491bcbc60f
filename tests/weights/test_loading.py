"""Weight loading: formats agree with each other, bad files fail with named causes."""

from __future__ import annotations

import json
import shutil

import chex
import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.weights.loader import load_config, load_params, resolve_model_path
from tests.weights.conftest import write_tiny_gguf


def _copy(folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_gguf_equals_safetensors(tiny_hf_model, tiny_gguf):
    """Same weights through GGUF (q/k permuted by llama.cpp's rule) and safetensors."""
    folder, _ = tiny_hf_model
    cfg_hf = load_config(folder)
    cfg_gguf = load_config(tiny_gguf)
    # GGUF stores eps as float32 and carries the tokenizer's special ids; the rest is equal.
    assert cfg_gguf.rms_norm_eps == pytest.approx(cfg_hf.rms_norm_eps, rel=1e-6)
    neutral = dict(eos_token_ids=(), bos_token_id=None, pad_token_id=None, rms_norm_eps=1e-5)
    assert cfg_gguf.replace(**neutral) == cfg_hf.replace(**neutral)
    chex.assert_trees_all_close(load_params(tiny_gguf, cfg_gguf, progress=False),
                                load_params(folder, cfg_hf, progress=False), atol=0, rtol=0)


def test_sharded_index_equals_single_file(tiny_hf_model, tmp_path):
    folder, _ = tiny_hf_model
    tensors = load_file(folder / "model.safetensors")
    names = sorted(tensors)
    half = len(names) // 2
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(folder / "config.json", sharded)
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fname = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, sharded / fname)
        weight_map.update({n: fname for n in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    cfg = load_config(folder)
    chex.assert_trees_all_equal(load_params(sharded, cfg, progress=False),
                                load_params(folder, cfg, progress=False))


def test_bfloat16_load(tiny_hf_model):
    folder, _ = tiny_hf_model
    cfg = load_config(folder, dtype="bfloat16")
    params = load_params(folder, cfg, progress=False)
    assert all(x.dtype == ml_dtypes.bfloat16 for x in jax.tree.leaves(params))
    ref = load_params(folder, load_config(folder), progress=False)
    expected = np.asarray(ref.layers.wqkv).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(params.layers.wqkv), expected)


# ----------------------------------------------------------------------------- bad files
def test_truncated_safetensors(tiny_hf_model, tmp_path):
    folder = _copy(tiny_hf_model[0], tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors is truncated: tensor"):
        load_params(folder, load_config(folder), progress=False)


def test_corrupt_safetensors_header(tiny_hf_model, tmp_path):
    folder = _copy(tiny_hf_model[0], tmp_path)
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:24] = b"#" * 16
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt header"):
        load_params(folder, load_config(folder), progress=False)


def _drop_up_proj(tensors: dict) -> None:
    del tensors["model.layers.1.mlp.up_proj.weight"]


def _add_layer_2(tensors: dict) -> None:
    tensors["model.layers.2.mlp.up_proj.weight"] = tensors["model.layers.1.mlp.up_proj.weight"]


def _shrink_k_proj(tensors: dict) -> None:
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((8, 32), np.float32)


@pytest.mark.parametrize("edit, message", [
    (_drop_up_proj, r"missing tensors \['model.layers.1.mlp.up_proj"),
    (_add_layer_2, r"unexpected tensors \['model.layers.2"),
    (_shrink_k_proj, r"'model.layers.0.self_attn.k_proj.weight'.*shape \(8, 32\), "
                     r"expected \(16, 32\)"),
])
def test_tensor_set_mismatch_is_named(tiny_hf_model, tmp_path, edit, message):
    """A missing, an extra and a mis-shaped tensor: each named in the error."""
    folder = _copy(tiny_hf_model[0], tmp_path)
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=message):
        load_params(folder, load_config(folder), progress=False)


def test_missing_shard(tiny_hf_model, tmp_path):
    folder = _copy(tiny_hf_model[0], tmp_path)
    names = load_file(folder / "model.safetensors").keys()
    index = {"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="shard 'model-00002-of-00002.safetensors'.*missing"):
        load_params(folder, load_config(folder), progress=False)


def test_no_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path)


def test_unknown_architecture_folder(tiny_hf_model, tmp_path):
    folder = _copy(tiny_hf_model[0], tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "bloom"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="unknown architecture: model_type 'bloom'"):
        load_config(folder)


def test_truncated_gguf(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) - 64, len(data) // 2, 40):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated"):
            load_params(path, load_config(tiny_gguf), progress=False)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not GGUF" * 10)
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        load_config(path)


def test_gguf_with_nan_values(tiny_hf_model, tmp_path):
    path = tmp_path / "nan.gguf"
    write_tiny_gguf(path, tiny_hf_model[1], nan_in="blk.1.attn_v.weight")
    with pytest.raises(CheckpointError, match="'blk.1.attn_v.weight' contains NaN"):
        load_params(path, load_config(path), progress=False)


def test_model_not_found():
    with pytest.raises(CheckpointError, match="not found"):
        resolve_model_path("no-such-model-anywhere")
