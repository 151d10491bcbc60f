"""Write `Params` as a Hugging Face model folder: safetensors, config.json, tokenizer files.

The inverse of the loader's name map (`jaxinfer.weights.names`): the fused `wqkv` splits per
KV head into q/k/v, `w_gate_up` de-interleaves into gate/up. Our parameters already follow
Hugging Face's conventions (rotate-half q/k rows, Gemma norms stored as w), so no per-tensor
transform is needed; GGUF-only transforms were undone when the GGUF was loaded.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import FAMILY_SWITCHES, ModelConfig, RopeConfig, from_hf_config
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model.params import Params, ParamSpec, param_specs
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.weights.names import CheckpointTensor, checkpoint_tensors, split_parts

MANIFEST_NAME = "jaxinfer_model.json"  # marks our Orbax model folder (see orbax_io)
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
# Files of a Hugging Face tokenizer, copied as they are between model folders.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                  "gemma3": "Gemma3ForCausalLM"}
_HF_ACTIVATIONS = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh"}
# Fields that describe how to run a model, not the model: not part of a checkpoint's config.
RUNTIME_FIELDS = ("dtype", "attention_impl", "matmul_impl")


# ----------------------------------------------------------------------------- params
def param_fields(params: Params) -> dict[str, Any]:
    """The leaves of a `Params` (or `param_specs`) tree by dotted field name, Nones left out:
    {"embed": ..., "layers.wqkv": ..., ...}."""
    out: dict[str, Any] = {}
    for name, value in vars(params).items():
        if name == "layers":
            out.update({f"layers.{k}": v for k, v in vars(value).items() if v is not None})
        elif value is not None:
            out[name] = value
    return out


def check_params(params: Params, cfg: ModelConfig) -> None:
    """Raise CheckpointError unless `params` has exactly the fields and shapes of `cfg`."""
    expected = {k: s.shape for k, s in param_fields(param_specs(cfg)).items()
                if isinstance(s, ParamSpec)}
    got = {k: tuple(v.shape) for k, v in param_fields(params).items()}
    missing, extra = sorted(expected.keys() - got.keys()), sorted(got.keys() - expected.keys())
    if missing or extra:
        raise CheckpointError(
            f"parameters do not match the {cfg.family} configuration: missing {missing}, "
            f"unexpected {extra}")
    for name, shape in expected.items():
        if got[name] != shape:
            raise CheckpointError(
                f"parameter {name!r} has shape {got[name]}, the configuration needs {shape}")


# ----------------------------------------------------------------------------- config.json
def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type in ("linear", "llama3", "yarn"):
        out["factor"] = rope.factor
    if rope.rope_type == "llama3":
        out.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.rope_type == "yarn":
        out.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        if rope.attention_factor is not None:
            out["attention_factor"] = rope.attention_factor
    if rope.rope_type in ("llama3", "yarn") and rope.original_max_position_embeddings:
        out["original_max_position_embeddings"] = rope.original_max_position_embeddings
    return out


def _model_type(family: str) -> str:
    return next(t for t, s in FAMILY_SWITCHES.items() if s["family"] == family)


def to_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """The Hugging Face `config.json` (transformers v5 layout) of `cfg`: the inverse of
    `from_hf_config`, checked by converting back.

    Raises:
      ConfigError: `cfg` uses a setting transformers' class for its family cannot express
        (e.g. biases on Mistral, sliding windows on Llama, llama.cpp rope_freqs factors).
    """
    family = cfg.family
    names = {"full": "full_attention", "sliding": "sliding_attention"}
    sliding = cfg.has_sliding_layers
    out: dict[str, Any] = dict(
        architectures=[_ARCHITECTURES[family]], model_type=_model_type(family),
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
        eos_token_id=(list(cfg.eos_token_ids) if len(cfg.eos_token_ids) > 1
                      else cfg.eos_token_ids[0] if cfg.eos_token_ids else None),
        rope_parameters=_rope_to_hf(cfg.rope), dtype=cfg.dtype,
    )
    act = _HF_ACTIVATIONS[cfg.hidden_act]
    if family == "gemma3":
        out.update(
            hidden_activation=act, sliding_window=cfg.sliding_window or cfg.max_position_embeddings,
            layer_types=[names[t] for t in cfg.layer_types],
            query_pre_attn_scalar=_query_pre_attn_scalar(cfg.attention_scale),
            attn_logit_softcapping=cfg.attn_logit_softcap,
            final_logit_softcapping=cfg.final_logit_softcap,
            rope_parameters={"full_attention": _rope_to_hf(cfg.rope),
                             "sliding_attention": _rope_to_hf(cfg.local_rope or RopeConfig())})
    else:
        out["hidden_act"] = act
    if family in ("qwen2", "qwen3"):
        first = next((i for i, t in enumerate(cfg.layer_types) if t == "sliding"), cfg.num_layers)
        out.update(use_sliding_window=sliding, sliding_window=cfg.sliding_window,
                   max_window_layers=first, layer_types=[names[t] for t in cfg.layer_types])
    if family == "mistral":
        if sliding and not all(t == "sliding" for t in cfg.layer_types):
            raise ConfigError("transformers' Mistral slides the window on every layer or none; "
                              f"this model mixes layer types {cfg.layer_types}")
        out["sliding_window"] = cfg.sliding_window if sliding else None
    if family == "llama" and sliding:
        raise ConfigError("transformers' Llama has no sliding-window layers; export this model "
                          "as family 'mistral' or keep it in our format")
    if family in ("llama", "qwen3", "gemma3"):
        out["attention_bias"] = cfg.qkv_bias
    elif family == "mistral" and (cfg.qkv_bias or cfg.o_bias):
        raise ConfigError("transformers' Mistral has no attention biases; keep this model in "
                          "our format")
    if family != "gemma3" and (cfg.attn_logit_softcap or cfg.final_logit_softcap):
        raise ConfigError(f"transformers' {family} has no logit soft-capping")
    if cfg.rope.freq_factors is not None:
        raise ConfigError(
            "this model's RoPE uses llama.cpp rope_freqs factors, which a Hugging Face "
            "config.json cannot express; keep it in our format (jaxinfer convert --to orbax)")
    back = from_hf_config(out, **{k: getattr(cfg, k) for k in RUNTIME_FIELDS})
    if back != cfg:
        diff = [f for f in cfg.__dataclass_fields__ if getattr(back, f) != getattr(cfg, f)]
        raise ConfigError(
            f"this {family} configuration cannot be written as a Hugging Face config.json: "
            f"{', '.join(f'{f}={getattr(cfg, f)!r}' for f in diff)} would not survive; keep "
            "the model in our format")
    return out


def _query_pre_attn_scalar(scale: float) -> float | int:
    """Gemma's query_pre_attn_scalar from the attention scale (an int when it is one)."""
    value = scale**-2.0
    return round(value) if abs(value - round(value)) < 1e-6 * value else value


# ----------------------------------------------------------------------------- folders
def check_destination(dst: str | os.PathLike[str], overwrite: bool = False) -> None:
    """Raise CheckpointError unless a model may be written at `dst`: it does not exist, is an
    empty folder, or (with `overwrite`) is a model folder, ours or Hugging Face's."""
    dst = Path(dst)
    if dst.is_symlink() or dst.is_file():
        raise CheckpointError(f"{dst} exists and is a file; choose a folder as destination")
    existing = dst.is_dir() and any(dst.iterdir())
    if existing and not overwrite:
        raise CheckpointError(
            f"{dst} already exists; pass --overwrite (overwrite=True) to replace it, or choose "
            "another destination")
    if existing and not ((dst / MANIFEST_NAME).is_file() or (dst / "config.json").is_file()):
        raise CheckpointError(
            f"{dst} is not a model folder (no {MANIFEST_NAME} or config.json); refusing to "
            "delete it with --overwrite: remove it yourself or choose another destination")


@contextlib.contextmanager
def output_folder(dst: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """A staging folder beside `dst` that replaces `dst` when the block succeeds.

    A failed or interrupted conversion leaves `dst` as it was. An existing `dst` is replaced
    only with `overwrite`, and only when it is an empty folder or a model folder (never an
    unrelated directory or a file).
    """
    dst = Path(dst)
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    staging = dst.parent / f".{dst.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if dst.is_dir():
        shutil.rmtree(dst)
    staging.rename(dst)


def _tokenizer_files(tokenizer: Tokenizer) -> dict[str, str]:
    """Hugging Face tokenizer files (name -> text) that `Tokenizer.from_hf_dir` and
    transformers load back as `tokenizer` (same ids, specials, chat template, stops)."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import processors

    # The backend has no public accessor; a GGUF-built one carries no post-processor
    # (its BOS/EOS are added by `Tokenizer.encode`), so write them as one.
    backend = Backend.from_str(tokenizer._backend.to_str())
    plain = tokenizer.encode("a", add_special_tokens=False)
    full = tokenizer.encode("a")
    start = next(i for i in range(len(full)) if full[i:i + len(plain)] == plain)
    prefix, suffix = full[:start], full[start + len(plain):]
    if prefix or suffix:
        tok = backend.id_to_token
        backend.post_processor = processors.TemplateProcessing(
            single=[tok(i) for i in prefix] + ["$A"] + [tok(i) for i in suffix],
            pair=[tok(i) for i in prefix] + ["$A"] + [tok(i) for i in suffix] + ["$B:1"],
            special_tokens=[(tok(i), i) for i in dict.fromkeys(prefix + suffix)])
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "clean_up_tokenization_spaces": False}
    stops = sorted(tokenizer.stop_token_ids)
    generation = {"bos_token_id": tokenizer.bos_token_id,
                  "eos_token_id": stops[0] if len(stops) == 1 else stops}
    files = {"tokenizer.json": backend.to_str(),
             "tokenizer_config.json": json.dumps(config, indent=2),
             "generation_config.json": json.dumps(generation, indent=2)}
    if tokenizer.chat_template:
        files["chat_template.jinja"] = tokenizer.chat_template
    return files


def write_tokenizer_files(folder: Path, source: Tokenizer | str | os.PathLike[str] | None
                          ) -> list[str]:
    """Write the tokenizer of `source` into `folder` as Hugging Face tokenizer files.

    Args:
      folder: the destination folder.
      source: a `Tokenizer` (serialised), a folder holding tokenizer files (ours or Hugging
        Face: copied as they are), a .gguf file (its tokenizer, serialised), or None.

    Returns:
      The names of the files written.
    """
    if source is None:
        return []
    if not isinstance(source, Tokenizer):
        path = Path(source)
        if path.is_dir():
            names = [n for n in TOKENIZER_FILES if (path / n).is_file()]
            for name in names:
                shutil.copyfile(path / name, folder / name)
            return names
        from jaxinfer.weights.gguf_io import GGUFFile

        source = Tokenizer.from_gguf_metadata(GGUFFile(path).metadata)
    files = _tokenizer_files(source)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    return list(files)


# ----------------------------------------------------------------------------- safetensors
def _safetensors_header(tensors: list[CheckpointTensor], dtype: str) -> bytes:
    itemsize = jnp.dtype(dtype).itemsize
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        size = int(np.prod(t.shape)) * itemsize
        header[t.name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw


class _PartReader:
    """Host copies of checkpoint tensors, one parameter field on the host at a time."""

    def __init__(self, params: Params, cfg: ModelConfig):
        self.fields, self.cfg = param_fields(params), cfg
        self._field: str | None = None
        self._layer: int | None = None
        self._value: np.ndarray | None = None
        self._parts: list[np.ndarray] = []

    def read(self, t: CheckpointTensor) -> np.ndarray:
        if t.entry.field != self._field:
            self._field, self._layer = t.entry.field, -1
            self._value = np.asarray(jax.device_get(self.fields[t.entry.field]))
        if t.layer != self._layer:
            assert self._value is not None
            self._layer = t.layer
            value = self._value if t.layer is None else self._value[t.layer]
            self._parts = split_parts(t.entry, value, self.cfg)
        part = np.ascontiguousarray(self._parts[t.part])
        assert part.shape == t.shape, (t.name, part.shape, t.shape)
        return part


def _plan_shards(tensors: list[CheckpointTensor], itemsize: int,
                 max_shard_bytes: int) -> list[list[CheckpointTensor]]:
    shards: list[list[CheckpointTensor]] = [[]]
    size = 0
    for t in tensors:
        nbytes = int(np.prod(t.shape)) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    return shards


def write_safetensors(folder: Path, params: Params, cfg: ModelConfig, *,
                      max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      progress: bool = False) -> list[str]:
    """Write `params` under Hugging Face tensor names: `model.safetensors`, or shards
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json` when the
    tensors exceed `max_shard_bytes`. Returns the file names written."""
    dtype = str(np.dtype(param_fields(params)["embed"].dtype))
    if dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"cannot write {dtype} parameters as safetensors")
    tensors = list(checkpoint_tensors(cfg, "hf"))
    itemsize = jnp.dtype(dtype).itemsize
    shards = _plan_shards(tensors, itemsize, max_shard_bytes)
    n = len(shards)
    names = (["model.safetensors"] if n == 1 else
             [f"model-{k + 1:05d}-of-{n:05d}.safetensors" for k in range(n)])
    reader = _PartReader(params, cfg)
    with tqdm(total=len(tensors), desc=f"writing {folder.name or 'safetensors'}", unit="tensor",
              disable=not progress, leave=False) as bar:
        for fname, shard in zip(names, shards, strict=True):
            with open(folder / fname, "wb") as f:
                f.write(_safetensors_header(shard, dtype))
                for t in shard:
                    part = reader.read(t)
                    if str(part.dtype) != dtype:
                        raise CheckpointError(f"parameter {t.entry.field!r} is {part.dtype}, "
                                              f"the others {dtype}: cast them to one dtype")
                    f.write(part.tobytes())
                    bar.update()
    if n > 1:
        total = sum(int(np.prod(t.shape)) for t in tensors) * itemsize
        index = {"metadata": {"total_size": total},
                 "weight_map": {t.name: fname for fname, shard in zip(names, shards, strict=True)
                                for t in shard}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        names.append("model.safetensors.index.json")
    return names


def export_hf(path: str | os.PathLike[str], params: Params, cfg: ModelConfig, *,
              tokenizer_source: Tokenizer | str | os.PathLike[str] | None = None,
              overwrite: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
              progress: bool = False) -> Path:
    """Write a Hugging Face model folder that transformers and `load_model` load.

    Args:
      path: the folder to create.
      params: the weights (any dtype of float32, bfloat16, float16; written as they are).
      cfg: their configuration.
      tokenizer_source: see `write_tokenizer_files`.
      overwrite: replace an existing model folder at `path`.
      max_shard_bytes: split the weights into shards of at most this size.
      progress: show a progress bar.

    Raises:
      ConfigError: the configuration has no Hugging Face equivalent (see `to_hf_config`).
      CheckpointError: `path` exists (without `overwrite`) or `params` do not match `cfg`.
    """
    check_params(params, cfg)
    hf_config = to_hf_config(cfg)
    with output_folder(path, overwrite) as folder:
        write_safetensors(folder, params, cfg, max_shard_bytes=max_shard_bytes,
                          progress=progress)
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
        write_tokenizer_files(folder, tokenizer_source)
        if not (folder / "generation_config.json").is_file():
            generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id",
                                                    "pad_token_id") if hf_config[k] is not None}
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return Path(path)

