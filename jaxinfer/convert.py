"""`jaxinfer convert` and `jaxinfer inspect`: move a model between Hugging Face safetensors,
GGUF (read only) and our Orbax format, and describe a checkpoint's tensors.

Every conversion loads the weights into `Params` with the loader's name map and writes them
with the exporter's inverse (`jaxinfer.weights.hf_export`, `jaxinfer.weights.orbax_io`).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Literal

from jaxinfer.errors import CheckpointError, ConfigError, JaxinferError
from jaxinfer.quant.format import KEEP_GGUF, scheme_label
from jaxinfer.quant.quantize import dequantize_params, quantize_params
from jaxinfer.weights.hf_export import check_destination, export_hf
from jaxinfer.weights.loader import (
    config_from_gguf,
    is_gguf,
    load_config,
    load_params,
)
from jaxinfer.weights.orbax_io import (
    config_to_dict,
    is_model_dir,
    load_model_dir,
    read_manifest,
    save_model_dir,
)

Format = Literal["orbax", "hf", "gguf"]
FORMATS = ("orbax", "hf")  # what convert can write


def checkpoint_format(path: str | os.PathLike[str]) -> Format:
    """Which kind of checkpoint `path` is: our folder, a GGUF file or a Hugging Face folder."""
    path = Path(path)
    if is_model_dir(path):
        return "orbax"
    if is_gguf(path):
        return "gguf"
    if path.is_dir() and (path / "config.json").is_file():
        return "hf"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    raise CheckpointError(
        f"{path} is not a model: expected a .gguf file, a Hugging Face folder (config.json + "
        "*.safetensors) or a folder made by `jaxinfer convert` (jaxinfer_model.json)")


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    src: Path
    dst: Path
    src_format: Format
    dst_format: Format
    dtype: str
    param_count: int
    seconds: float
    quantization: str | None = None

    def summary(self) -> str:
        kind = self.dtype + (f", {self.quantization}" if self.quantization else "")
        return (f"wrote {self.dst} ({self.dst_format}, {kind}) from {self.src_format} "
                f"{self.src}: {self.param_count / 1e6:.1f} M parameters in {self.seconds:.1f} s")


def _hf_dtype(path: Path) -> str:
    """The dtype a Hugging Face folder declares, as we run it (bfloat16 stays, else float32)."""
    try:
        config = json.loads((path / "config.json").read_text())
    except ValueError:
        return "float32"
    declared = config.get("dtype") or config.get("torch_dtype")
    return "bfloat16" if declared == "bfloat16" else "float32"


def convert(
    src: str | os.PathLike[str], dst: str | os.PathLike[str], *, to: Format | None = None,
    dtype: str | None = None, overwrite: bool = False, progress: bool = True,
    quantize: str | None = None, keep_quantized: bool = False,
) -> ConvertResult:
    """Convert the model at `src` into a new folder `dst`.

    Args:
      src: a Hugging Face folder, a .gguf file (dequantized), or our folder.
      dst: the folder to write.
      to: "orbax" (our format) or "hf"; default: "hf" for our folders, "orbax" otherwise.
      dtype: "float32" or "bfloat16"; default: the source's (float32 for GGUF).
      overwrite: replace an existing model folder at `dst`.
      progress: show progress bars.
      quantize: a scheme ("int8", "int4-g64-asym", ...; docs/quantization.md): write the
        projection weights, embedding and LM head packed (our format only).
      keep_quantized: a GGUF source's quantized tensors are repacked as they are instead of
        dequantized (our format only).

    Raises:
      CheckpointError: unreadable source, or `dst` exists without `overwrite`.
      ConfigError: the model cannot be expressed in the target format, a bad scheme, or
        `keep_quantized` for a source that is not GGUF.
    """
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    kind = checkpoint_format(src)
    to = to or ("hf" if kind == "orbax" else "orbax")
    if to not in FORMATS:
        raise ConfigError(f"cannot write {to!r}; choose one of {FORMATS}")
    if quantize is not None and keep_quantized:
        raise ConfigError("--quantize and --keep-quantized exclude each other: keep the GGUF "
                          "quantization, or requantize the weights with a scheme")
    if keep_quantized and kind != "gguf":
        raise ConfigError(f"--keep-quantized keeps a GGUF file's quantization, but {src} is "
                          f"{kind}; use --quantize SCHEME instead")
    label = KEEP_GGUF if keep_quantized else scheme_label(quantize)
    if label is not None and to != "orbax":
        raise ConfigError(f"quantized weights are written in our Orbax format only, not "
                          f"{to!r}; drop --to {to} or the quantization")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise CheckpointError(f"destination {dst} is, or is inside, the source {src}")
    check_destination(dst, overwrite)  # before minutes of loading

    tokenizer_source: Any = src
    if kind == "orbax":
        params, cfg = load_model_dir(src, dtype=dtype, progress=progress)
    elif kind == "gguf":
        from jaxinfer.tokenizer import Tokenizer
        from jaxinfer.weights.gguf_io import GGUFFile

        gguf_file = GGUFFile(src)
        cfg = config_from_gguf(gguf_file, dtype=dtype or "float32")
        # A weights-only GGUF (no vocabulary) converts without a tokenizer.
        has_vocab = "tokenizer.ggml.tokens" in gguf_file.metadata
        tokenizer_source = Tokenizer.from_gguf_metadata(gguf_file.metadata) if has_vocab else None
        params = load_params(gguf_file, cfg, progress=progress, quantize=label)
    else:
        cfg = load_config(src, dtype=dtype or _hf_dtype(src))
        params = load_params(src, cfg, progress=progress)
    if kind != "gguf" and label is not None:
        params = quantize_params(params, label)
    if to == "hf":
        params = dequantize_params(params, cfg.dtype)  # safetensors hold dense weights
        export_hf(dst, params, cfg, tokenizer_source=tokenizer_source, overwrite=overwrite,
                  progress=progress)
    else:
        label = label or _stored_scheme(src, kind)
        save_model_dir(dst, params, cfg, tokenizer_source=tokenizer_source,
                       source=f"{kind}:{src.resolve()}", overwrite=overwrite, progress=progress,
                       quantization=label)
    return ConvertResult(src, dst, kind, to, cfg.dtype, _param_count(params),
                         time.perf_counter() - start, label if to == "orbax" else None)


def _stored_scheme(src: Path, kind: str) -> str | None:
    """The quantization recorded in our source folder (kept through orbax -> orbax)."""
    if kind != "orbax":
        return None
    return (read_manifest(src).get("quantization") or {}).get("scheme")


def _param_count(params: Any) -> int:
    import jax

    from jaxinfer.quant import QuantizedWeight

    return sum(int(math.prod(x.shape)) for x in jax.tree.leaves(
        params, is_leaf=lambda v: isinstance(v, QuantizedWeight)))


# ----------------------------------------------------------------------------- inspect
def inspect_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a checkpoint without loading its weights.

    Returns:
      {"path", "format", "tensors": [{"name", "shape", "dtype", "bytes"}],
       "total": {"tensors", "params", "bytes"}, "config": ModelConfig as a dict (or the raw
       config.json with "error" when jaxinfer cannot run it), "extra": format details}.
    """
    path = Path(path)
    kind = checkpoint_format(path)
    extra: dict[str, Any] = {}
    config: dict[str, Any]
    if kind == "orbax":
        manifest = read_manifest(path)
        tensors = [{"name": n, "shape": r["shape"], "dtype": r["dtype"], "bytes": r["bytes"]}
                   for n, r in manifest["tensors"].items()]
        config = manifest["config"]
        extra = {"source": manifest.get("source"), "created_by": manifest.get("created_by"),
                 "tokenizer_files": manifest.get("tokenizer_files", [])}
        if manifest.get("quantization"):
            extra["quantization"] = manifest["quantization"]
    elif kind == "gguf":
        from jaxinfer.weights.gguf_io import GGUFFile

        gguf_file = GGUFFile(path)
        tensors = [{"name": n, "shape": list(gguf_file.tensor_shape(n)),
                    "dtype": gguf_file.tensor_type_name(n), "bytes": int(t.n_bytes)}
                   for n, t in gguf_file.tensors.items()]
        config = _config_or_error(lambda: config_from_gguf(gguf_file), {})
        extra = {"architecture": gguf_file.metadata.get("general.architecture"),
                 "name": gguf_file.metadata.get("general.name")}
    else:
        from jaxinfer.weights.safetensors_io import SafetensorsCheckpoint

        checkpoint = SafetensorsCheckpoint(path)
        tensors = []
        for name in checkpoint.names():
            dtype, shape, begin, end = checkpoint.files[checkpoint.where[name]].entries[name]
            tensors.append({"name": name, "shape": list(shape), "dtype": _dtype_name(dtype),
                            "bytes": end - begin})
        raw = json.loads((path / "config.json").read_text())
        config = _config_or_error(lambda: load_config(path), raw)
        extra = {"files": sorted(checkpoint.files)}
    total = {"tensors": len(tensors),
             "params": sum(int(math.prod(t["shape"])) for t in tensors),
             "bytes": sum(t["bytes"] for t in tensors)}
    return {"path": str(path), "format": kind, "tensors": tensors, "total": total,
            "config": config, "extra": extra}


def _dtype_name(dtype: Any) -> str:
    import numpy as np

    return str(np.dtype(dtype))


def _config_or_error(build: Any, raw: dict[str, Any]) -> dict[str, Any]:
    try:
        return config_to_dict(build())
    except JaxinferError as e:
        return {**raw, "error": str(e)}


def _human(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    raise AssertionError


def _compact(value: Any) -> str:
    """JSON, with long lists (per-layer types) as runs: `30 x "full"`."""
    if isinstance(value, list) and len(value) > 8:
        runs = [f"{len(list(group))} x {json.dumps(v)}" for v, group in itertools.groupby(value)]
        return f"[{', '.join(runs)}]"
    return json.dumps(value)


def format_inspection(report: dict[str, Any]) -> str:
    """`inspect_checkpoint`'s report as a table of tensors, totals and the config."""
    rows = [(t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"],
             f"{t['bytes']:,}") for t in report["tensors"]]
    header = ("tensor", "shape", "dtype", "bytes")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    lines = [f"{report['path']} ({report['format']})", ""]
    for i, row in enumerate([header, *rows]):
        lines.append(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  "
                     f"{row[3]:>{widths[3]}}")
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    total = report["total"]
    lines += ["", f"total: {total['tensors']} tensors, {total['params']:,} parameters "
                  f"({total['params'] / 1e6:.1f} M), {total['bytes']:,} bytes "
                  f"({_human(total['bytes'])})", "", "config:"]
    lines += [f"  {k}: {_compact(v)}" for k, v in report["config"].items()]
    for k, v in report["extra"].items():
        lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI
def add_subparsers(sub: argparse._SubParsersAction) -> None:
    """The `convert` and `inspect` commands."""
    conv = sub.add_parser(
        "convert", help="convert a model between Hugging Face, GGUF and our Orbax format",
        description="Convert SRC (a Hugging Face folder, a .gguf file, or a folder in our "
                    "Orbax format) into a new folder DST: our format by default, or a Hugging "
                    "Face folder (safetensors + config.json + tokenizer) with --to hf. GGUF "
                    "weights are dequantized unless --keep-quantized; --quantize SCHEME "
                    "writes packed int8/int4 weights.")
    conv.add_argument("src", metavar="SRC", help="model to read")
    conv.add_argument("dst", metavar="DST", help="folder to write")
    conv.add_argument("--to", choices=FORMATS, default=None,
                      help="output format (default: orbax from HF/GGUF, hf from ours)")
    conv.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                      help="weights dtype (default: the source's; float32 for GGUF)")
    conv.add_argument("--overwrite", action="store_true",
                      help="replace DST if it is an existing model folder")
    conv.add_argument("--quantize", default=None, metavar="SCHEME",
                      help="write the projection weights, embedding and LM head quantized: "
                           "int8, int4, or with a group size and kind (int4-g64-asym); see "
                           "docs/quantization.md")
    conv.add_argument("--keep-quantized", action="store_true",
                      help="GGUF source: keep its quantized tensors (repacked, not expanded)")
    conv.add_argument("--quiet", action="store_true", help="no progress bars")

    insp = sub.add_parser(
        "inspect", help="list a checkpoint's tensors, shapes, dtypes and bytes",
        description="Print the tensors of CKPT (our folder, a Hugging Face folder or a .gguf "
                    "file) with shape, dtype and bytes, the totals, and the model config. No "
                    "weights are loaded.")
    insp.add_argument("ckpt", metavar="CKPT", help="checkpoint to describe")
    insp.add_argument("--json", action="store_true", help="print one JSON object")


def run_convert(args: argparse.Namespace) -> int:
    result = convert(args.src, args.dst, to=args.to, dtype=args.dtype,
                     overwrite=args.overwrite, progress=not args.quiet,
                     quantize=args.quantize, keep_quantized=args.keep_quantized)
    print(result.summary(), file=sys.stderr)
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    report = inspect_checkpoint(args.ckpt)
    print(json.dumps(report, indent=2) if args.json else format_inspection(report))
    return 0
