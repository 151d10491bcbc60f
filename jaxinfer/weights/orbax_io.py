"""Our model format: a folder with a JSON manifest, the parameters saved by Orbax, and the
tokenizer as Hugging Face tokenizer files.

    MODEL/jaxinfer_model.json   format + version, ModelConfig, dtype, source, per-tensor
                                shape / dtype / crc32, parameter count
    MODEL/params/<field>/       one Orbax (zarr, uncompressed) array per parameter field
    MODEL/tokenizer.json ...    tokenizer files (`Tokenizer.from_hf_dir` reads them)

Restoring takes target shardings (any mesh: "universal"); every failure is a CheckpointError
naming the file or tensor.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from jaxinfer.config import ModelConfig, RopeConfig
from jaxinfer.errors import CheckpointError, ConfigError
from jaxinfer.model.params import LayerParams, Params, ParamSpec, param_specs
from jaxinfer.quant.format import QuantizedWeight, check_quantized, is_quantized
from jaxinfer.quant.sharding import check_group_sharding
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.weights.hf_export import (
    MANIFEST_NAME,
    check_params,
    output_folder,
    param_fields,
    write_tokenizer_files,
)

FORMAT_NAME = "jaxinfer-model"
FORMAT_VERSION = 1
PARAMS_DIR = "params"
_ZARR_DTYPES = {"float32": "<f4", "float16": "<f2", "bfloat16": "bfloat16", "int8": "|i1",
                "uint8": "|u1"}


# ----------------------------------------------------------------------------- config
def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    """`cfg` as JSON-ready values (RoPE configs nested, tuples as lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value

    return plain(dataclasses.asdict(cfg))


def _known(cls: type, data: dict[str, Any], what: str) -> None:
    unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"{what} has unknown fields {unknown}: written by a newer jaxinfer?")


def config_from_dict(data: dict[str, Any]) -> ModelConfig:
    """Inverse of `config_to_dict`."""
    _known(ModelConfig, data, "the model config")
    fields = dict(data)
    for key in ("rope", "local_rope"):
        if fields.get(key) is not None:
            rope = dict(fields[key])
            _known(RopeConfig, rope, f"config {key}")
            if rope.get("freq_factors") is not None:
                rope["freq_factors"] = tuple(rope["freq_factors"])
            fields[key] = RopeConfig(**rope)
    for key in ("layer_types", "eos_token_ids"):
        if key in fields:
            fields[key] = tuple(fields[key])
    return ModelConfig(**fields)


# ----------------------------------------------------------------------------- manifest
def is_model_dir(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a folder in our format (it holds the manifest file)."""
    return (Path(path) / MANIFEST_NAME).is_file()


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of our model folder, checked for format and version."""
    file = Path(path) / MANIFEST_NAME
    if not file.is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST_NAME}: not a jaxinfer model folder (convert a model "
            "with `jaxinfer convert SRC DST`)")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); re-convert the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{file} is not a {FORMAT_NAME} manifest")
    if manifest.get("version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{file} has format version {manifest.get('version')}; this jaxinfer reads "
            f"version {FORMAT_VERSION}: upgrade jaxinfer or re-convert the model")
    for key in ("config", "tensors", "dtype"):
        if key not in manifest:
            raise CheckpointError(f"{file} lacks {key!r}; re-convert the model")
    return manifest


def manifest_config(path: str | os.PathLike[str], manifest: dict[str, Any] | None = None,
                    **overrides: Any) -> ModelConfig:
    """The `ModelConfig` stored in our model folder, with `overrides` applied."""
    manifest = manifest or read_manifest(path)
    try:
        cfg = config_from_dict(manifest["config"])
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{Path(path) / MANIFEST_NAME}: bad config ({e})") from None
    return cfg.replace(**overrides) if overrides else cfg


def _nest(fields: dict[str, Any]) -> dict[str, Any]:
    """{"embed": a, "layers.wqkv.q": b} -> {"embed": a, "layers": {"wqkv": {"q": b}}}: the
    tree Orbax saves (one folder per leaf, named by its dotted path)."""
    tree: dict[str, Any] = {"layers": {}}
    for name, value in fields.items():
        *parents, leaf = name.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


def _get(tree: dict[str, Any], name: str) -> Any:
    for part in name.split("."):
        tree = tree[part]
    return tree


# ----------------------------------------------------------------------------- quantized
# A quantized field "layers.wqkv" is stored as the arrays "layers.wqkv.q", ".scale" and
# ".offset" (jaxinfer.quant.format), each with its own dtype record; the manifest's
# "quantization" lists the fields with their bits and group size.
_QUANT_PARTS = ("q", "scale", "offset")


def _stored_arrays(params: Params, dtype: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The arrays to save by stored name (dense ones cast to `dtype`), and the quantized
    fields' formats."""
    arrays: dict[str, Any] = {}
    quantized: dict[str, Any] = {}
    for name, value in param_fields(params).items():
        if is_quantized(value):
            quantized[name] = {"bits": value.bits, "group_size": value.group_size,
                               "offset": value.offset is not None}
            for part in _QUANT_PARTS:
                if getattr(value, part) is not None:
                    arrays[f"{name}.{part}"] = getattr(value, part)
        else:
            arrays[name] = value if value.dtype == dtype else jnp.asarray(value).astype(dtype)
    return arrays, quantized


def _expected_arrays(cfg: ModelConfig, quantized: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Stored name -> shape of every array a model of `cfg` with these quantized fields has."""
    out: dict[str, tuple[int, ...]] = {}
    for name, spec in param_fields(param_specs(cfg)).items():
        if not isinstance(spec, ParamSpec):
            continue
        if name not in quantized:
            out[name] = spec.shape
            continue
        fmt = quantized[name]
        *lead, K = spec.shape
        out[f"{name}.q"] = (*lead, K * fmt["bits"] // 8)
        out[f"{name}.scale"] = (*lead, K // fmt["group_size"])
        if fmt["offset"]:
            out[f"{name}.offset"] = (*lead, K // fmt["group_size"])
    return out


def _assemble_fields(values: dict[str, Any], quantized: dict[str, Any]) -> dict[str, Any]:
    """Stored arrays back to parameter fields (QuantizedWeight for the quantized ones)."""
    fields = {k: v for k, v in values.items() if k.rsplit(".", 1)[0] not in quantized}
    for name, fmt in quantized.items():
        fields[name] = QuantizedWeight(
            q=values[f"{name}.q"], scale=values[f"{name}.scale"],
            offset=values.get(f"{name}.offset"), bits=fmt["bits"], group_size=fmt["group_size"])
        check_quantized(fields[name], name)
    return fields


@contextlib.contextmanager
def _quiet_orbax() -> Iterator[None]:
    """Silence Orbax's informational absl warnings (e.g. about OCDBT, which we do not use)."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def crc32(array: np.ndarray) -> int:
    """CRC32 of an array's bytes (C order): the checksum of our model and train checkpoints."""
    return zlib.crc32(memoryview(np.ascontiguousarray(array).view(np.uint8).reshape(-1)))


def _created_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"jaxinfer {version('jaxinfer')}"
    except PackageNotFoundError:
        return "jaxinfer"


# ----------------------------------------------------------------------------- save
def save_model_dir(
    path: str | os.PathLike[str], params: Params, cfg: ModelConfig, *,
    tokenizer_source: Tokenizer | str | os.PathLike[str] | None = None,
    source: str | None = None, overwrite: bool = False, progress: bool = False,
    quantization: str | None = None,
) -> Path:
    """Save a model in our format (synchronously; single process).

    Args:
      path: the folder to create.
      params: the weights, on any devices or shardings; cast to `cfg.dtype`.
      cfg: their configuration (stored in the manifest).
      tokenizer_source: a `Tokenizer`, a folder with tokenizer files, a .gguf file, or None
        (see `jaxinfer.weights.hf_export.write_tokenizer_files`).
      source: where the weights came from, recorded in the manifest.
      overwrite: replace an existing model folder at `path`.
      progress: show progress bars.
      quantization: the scheme name of quantized `params` ("int4-g128-sym", "gguf"),
        recorded in the manifest; quantized fields are stored packed (docs/quantization.md).

    Raises:
      CheckpointError: `path` exists (without `overwrite`) or `params` do not match `cfg`.
    """
    import orbax.checkpoint as ocp

    check_params(params, cfg)
    dtype = jnp.dtype(cfg.dtype)
    fields, quantized = _stored_arrays(params, dtype)
    tensors: dict[str, dict[str, Any]] = {}
    for name, value in tqdm(fields.items(), desc="checksums", unit="tensor",
                            disable=not progress, leave=False):
        record: dict[str, Any] = {"shape": list(value.shape), "dtype": str(value.dtype),
                                  "bytes": int(value.size) * jnp.dtype(value.dtype).itemsize}
        if getattr(value, "is_fully_addressable", True):
            record["crc32"] = crc32(np.asarray(jax.device_get(value)))
        tensors[name] = record
    tree = _nest(fields)
    with output_folder(path, overwrite) as folder:
        with tqdm(total=1, desc=f"saving {Path(path).name}", unit="checkpoint",
                  disable=not progress, leave=False) as bar:
            checkpointer = ocp.Checkpointer(
                ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False))
            with _quiet_orbax():
                checkpointer.save((folder / PARAMS_DIR).absolute(),
                                  args=ocp.args.PyTreeSave(tree))
            bar.update()
        tokenizer_files = write_tokenizer_files(folder, tokenizer_source)
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "created_by": _created_by(),
            "config": config_to_dict(cfg), "dtype": cfg.dtype, "source": source,
            "param_count": sum(int(math.prod(t["shape"])) for t in tensors.values()),
            "param_bytes": sum(t["bytes"] for t in tensors.values()),
            "checksum": "crc32 of each tensor's C-order bytes in its stored dtype",
            "params": PARAMS_DIR, "tensors": tensors, "tokenizer_files": tokenizer_files,
        }
        if quantized:
            manifest["quantization"] = {"scheme": quantization, "fields": quantized}
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    return Path(path)


# ----------------------------------------------------------------------------- load
class ModelDir(NamedTuple):
    """What `load_model_dir` returns."""

    params: Params
    cfg: ModelConfig


def _check_stored_array(folder: Path, name: str, shape: tuple[int, ...], dtype: str) -> None:
    """The array's zarr metadata and chunk files agree with the manifest (catches missing,
    truncated and swapped files before TensorStore reports them without the tensor's name)."""
    array_dir = folder / name
    meta_file = array_dir / ".zarray"
    if not meta_file.is_file():
        raise CheckpointError(
            f"tensor {name!r}: {meta_file} is missing; the model folder is incomplete, "
            "re-convert it")
    try:
        meta = json.loads(meta_file.read_text())
        stored_shape, chunks = tuple(meta["shape"]), tuple(meta["chunks"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"tensor {name!r}: {meta_file} is corrupt ({e})") from None
    if stored_shape != shape or meta.get("dtype") != _ZARR_DTYPES.get(dtype):
        raise CheckpointError(
            f"tensor {name!r} is stored as {meta.get('dtype')} {list(stored_shape)} in "
            f"{array_dir}, the manifest says {dtype} {list(shape)}; re-convert the model")
    chunk_bytes = math.prod(chunks) * jnp.dtype(dtype).itemsize
    grid = [range(math.ceil(s / c)) for s, c in zip(shape, chunks, strict=True)]
    sep = meta.get("dimension_separator", ".")
    for index in np.ndindex(*(len(g) for g in grid)) if shape else [()]:
        chunk = array_dir / (sep.join(map(str, index)) or "0")
        if not chunk.is_file():
            raise CheckpointError(
                f"tensor {name!r}: chunk file {chunk} is missing; re-convert the model")
        size = chunk.stat().st_size
        if meta.get("compressor") is None and size != chunk_bytes:
            raise CheckpointError(
                f"tensor {name!r}: {chunk} has {size} bytes, expected {chunk_bytes}; the file "
                "is truncated or corrupt, re-convert the model")


def load_model_dir(
    path: str | os.PathLike[str], *, dtype: str | None = None, shardings: Any = None,
    verify: bool = True, progress: bool = False, **overrides: Any,
) -> ModelDir:
    """Load a model saved by `save_model_dir`.

    Args:
      path: our model folder.
      dtype: cast the weights to this dtype (default: as stored).
      shardings: where to put the weights: a `Params` tree of shardings (e.g.
        `ShardingRules().param_shardings(cfg, mesh)`), one sharding for every leaf, or
        None for the default device. Any mesh works, whatever the saving one was.
      verify: check each tensor's crc32 against the manifest.
      progress: show progress bars.
      **overrides: `ModelConfig` fields to change (e.g. attention_impl).

    Raises:
      CheckpointError: the manifest is missing or bad, a tensor is missing, mis-shaped,
        truncated or fails its checksum (the message names it).
    """
    import orbax.checkpoint as ocp

    path = Path(path)
    manifest = read_manifest(path)
    stored_dtype = manifest["dtype"]
    saved_cfg = manifest_config(path, manifest)
    quantized = (manifest.get("quantization") or {}).get("fields", {})
    expected = _expected_arrays(saved_cfg, quantized)
    records: dict[str, Any] = manifest["tensors"]
    missing = sorted(expected.keys() - records.keys())
    extra = sorted(records.keys() - expected.keys())
    if missing or extra:
        raise CheckpointError(
            f"{path / MANIFEST_NAME} lists tensors that do not match its {saved_cfg.family} "
            f"config (missing {missing}, unexpected {extra}); re-convert the model")
    folder = path / manifest.get("params", PARAMS_DIR)
    for name, shape in expected.items():
        if tuple(records[name]["shape"]) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {records[name]['shape']} in the manifest, its "
                f"config needs {list(shape)}; re-convert the model")
        _check_stored_array(folder, name, shape, records[name].get("dtype", stored_dtype))

    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        where = dict.fromkeys(expected, shardings or default)
    else:
        by_field = param_fields(shardings)
        fields = {n.rsplit(".", 1)[0] if n.rsplit(".", 1)[0] in quantized else n
                  for n in expected}
        if by_field.keys() != fields:
            raise ConfigError(
                f"the shardings tree has fields {sorted(by_field)}, the model {sorted(fields)}; "
                f"build it for this model's config (ShardingRules().param_shardings(cfg, mesh))")
        where = {}
        for name, shape in expected.items():
            field = name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in quantized else name
            where[name] = by_field[field]
            if field != name:  # a packed array takes its weight's sharding, whole groups only
                check_group_sharding(by_field[field], shape, name)
    abstract = _nest({name: jax.ShapeDtypeStruct(
        shape, jnp.dtype(records[name].get("dtype", stored_dtype)), sharding=where[name])
        for name, shape in expected.items()})
    checkpointer = ocp.Checkpointer(
        ocp.PyTreeCheckpointHandler(use_ocdbt=False, use_compression=False))
    try:
        with tqdm(total=1, desc=f"restoring {path.name}", unit="checkpoint",
                  disable=not progress, leave=False) as bar:
            with _quiet_orbax():
                tree = checkpointer.restore(folder.absolute(), args=ocp.args.PyTreeRestore(
                    item=abstract,
                    restore_args=ocp.checkpoint_utils.construct_restore_args(abstract)))
            bar.update()
    except Exception as e:  # TensorStore and Orbax raise bare Exceptions
        text = str(e)
        named = [n for n in expected if f"/{n}/" in text or f"/{n}." in text]
        raise CheckpointError(
            f"{folder}: cannot restore {'tensor ' + repr(named[0]) if named else 'the weights'}"
            f" ({type(e).__name__}: {text.splitlines()[0][:300]}); re-convert the model"
        ) from None

    values: dict[str, Any] = {}
    for name in tqdm(expected, desc="verifying", unit="tensor", disable=not (progress and verify),
                     leave=False):
        value = _get(tree, name)
        want = records[name].get("crc32")
        if verify and want is not None and value.is_fully_addressable:
            got = crc32(np.asarray(jax.device_get(value)))
            if got != want:
                raise CheckpointError(
                    f"tensor {name!r} in {folder / name} fails its checksum (crc32 {got:#010x}, "
                    f"manifest {want:#010x}): the file is corrupt, re-convert the model")
        dense = name.rsplit(".", 1)[0] not in quantized
        values[name] = value if dtype in (None, stored_dtype) or not dense else value.astype(
            dtype)
    cfg = saved_cfg.replace(dtype=dtype or stored_dtype, **overrides)
    values = _assemble_fields(values, quantized)
    layers = LayerParams(**{k.split(".", 1)[1]: v for k, v in values.items()
                            if k.startswith("layers.")})
    params = Params(embed=values["embed"], layers=layers, final_norm=values["final_norm"],
                    lm_head=values.get("lm_head"))
    return ModelDir(params, cfg)
