"""Perplexity of SmolLM2-135M on the King James Bible under weight-only quantization.

The baseline is the model's Q4_1 GGUF dequantized to float32; every scheme requantizes those
weights (projections, embedding / tied LM head), and "gguf" keeps the file's own Q4_1 / Q8_0
blocks (repacked, not expanded). A scheme suffixed "+act" is quantized activation-aware:
each weight's error weighted by its input feature's mean squared activation, measured on
`--calibrate` windows of Bible text after its first 40 chapters (disjoint from the
evaluated text, which is its start): windows starting at chapters spread over the rest of
the book, or with `--calibration-text end` consecutive windows from its last 40 chapters. A
scheme suffixed "+gptq" is quantized by GPTQ (`jaxinfer.quant.gptq`) from the input Gram
matrices E[x x^T] of each projection on the same calibration windows, the scheme's method
(mse / rtn) choosing each group's grid; "+gptq-ao" sweeps in act order (static groups),
"-refitN" adds N rounds of least-squares grid refitting, "-dampX" sets the dampening, "-seq"
calibrates each projection on the partly quantized model's own inputs
(`jaxinfer.quant.sequential`), "-tuneN" then trains the grids (codes fixed) for N steps by
distillation from the dense model on the calibration windows (`jaxinfer.quant.tune`).
Prints one JSON line per scheme, then a markdown table.

    python scripts/eval_quant.py [--windows 8] [--window-len 512] [--calibrate 8]
        [--calibration-text spread|end]
        [--schemes int8,int4,int4-rtn,int4+act,int4-g128-asym+gptq-ao-refit2,...]
        [--calibration-cache grams.npz]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import numpy as np

from jaxinfer.batch import SequenceChunk, build_step_batch
from jaxinfer.cache import init_cache
from jaxinfer.model.params import param_bytes
from jaxinfer.model.transformer import Batch, forward
from jaxinfer.quant import quantize_params
from jaxinfer.quant.calibrate import activation_grams, activation_stats
from jaxinfer.quant.sequential import sequential_gptq
from jaxinfer.quant.tune import tune_grids
from jaxinfer.tokenizer import Tokenizer
from jaxinfer.train.data import read_bible
from jaxinfer.weights.gguf_io import GGUFFile
from jaxinfer.weights.loader import config_from_gguf, default_model_path, load_params

SCHEMES = ("f32", "int8", "int8-g32", "int4-rtn", "int4", "int4+act", "int4-g128-asym-rtn",
           "int4-g128-asym", "int4-g128-asym+act", "int4-g64-rtn", "int4-g64", "int4-g64+act",
           "int4-g64-asym-rtn", "int4-g64-asym", "int4-g64-asym+act", "int4-g32-rtn", "int4-g32",
           "int4-g32+act", "int4-g32-asym-rtn", "int4-g32-asym", "int4+gptq",
           "int4-g128-asym+gptq", "int4-g64-asym+gptq", "gguf")
ACTIVATION_AWARE = "+act"
GPTQ = "+gptq"
PAGE = 16


# The evaluated text is drawn from the first EVALUATED_CHAPTERS chapters; calibration text
# never comes from them.
EVALUATED_CHAPTERS = 40
CALIBRATION_TEXTS = ("end", "spread")


def bible_windows(tokenizer: Tokenizer, count: int, length: int, *, from_end: bool = False
                  ) -> list[list[int]]:
    """`count` consecutive windows of `length` tokens from the start of the Bible text (or
    from its last 40 chapters)."""
    documents = read_bible()
    chapters = documents[-EVALUATED_CHAPTERS:] if from_end else documents[:EVALUATED_CHAPTERS]
    ids = tokenizer.encode(" ".join(chapters))
    if len(ids) < count * length:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {count} x {length}")
    return [ids[i * length:(i + 1) * length] for i in range(count)]


def spread_windows(tokenizer: Tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens starting at chapters spread evenly over the Bible
    after its first 40 (each window runs on through the following chapters as needed), so
    calibration sees every part of the text but the evaluated one."""
    documents = read_bible()[EVALUATED_CHAPTERS:]
    windows = []
    for i in range(count):
        first = i * len(documents) // count
        ids: list[int] = []
        for chapter in documents[first:]:
            ids += tokenizer.encode((" " if ids else "") + chapter)
            if len(ids) >= length:
                break
        if len(ids) < length:
            raise SystemExit(f"the Bible after chapter {first + EVALUATED_CHAPTERS} has fewer "
                             f"than {length} tokens; use fewer --calibrate windows")
        windows.append(ids[:length])
    return windows


def parse_gptq_suffix(suffix: str) -> dict[str, int | bool | float]:
    """The options of a "+gptq[-ao][-refitN][-dampX][-seq][-tuneN]" suffix (the part after
    "+gptq")."""
    options: dict[str, int | bool | float] = {"act_order": False, "refit": 0}
    for part in filter(None, suffix.split("-")):
        if part == "ao":
            options["act_order"] = True
        elif part.startswith("refit") and part[5:].isdigit():
            options["refit"] = int(part[5:])
        elif part.startswith("tune") and part[4:].isdigit():
            options["tune_steps"] = int(part[4:])
        elif part == "seq":
            options["sequential"] = True
        elif part.startswith("damp"):
            try:
                options["damp"] = float(part[4:])
            except ValueError:
                raise SystemExit(f"bad GPTQ damp {part!r}; use e.g. -damp0.05") from None
        else:
            raise SystemExit(f"unknown GPTQ option {part!r} in +gptq{suffix}; use "
                             "+gptq[-ao][-refitN][-dampX][-seq][-tuneN]")
    return options


def window_logits(params, cfg, tokens: list[int], run) -> np.ndarray:
    cache = init_cache(cfg, len(tokens) // PAGE + 1, PAGE)
    step = build_step_batch([SequenceChunk(tokens, 0, list(range(len(tokens) // PAGE + 1)))],
                            page_size=PAGE, num_slots=cache.num_slots)
    logits, _ = run(params, cfg, Batch.from_step(step), cache, all_logits=True)
    return np.asarray(logits)[:len(tokens)]


def nll_sum(logits: np.ndarray, tokens: list[int]) -> float:
    """Summed negative log-likelihood of tokens[1:] given their prefixes (float64)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(tokens) - 1), tokens[1:]].sum())


def mean_kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    """Mean KL(p || q) over the rows of two logit arrays [T, V] (float64)."""
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))
    log_p, log_q = log_softmax(p_logits), log_softmax(q_logits)
    return float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))


def load_grams(path: str | None, key: list[int]) -> dict[str, np.ndarray] | None:
    """The Gram matrices cached at `path` by an earlier run with the same calibration
    windows (`key`: count, length, text), else None."""
    try:
        with np.load(path) as data:
            if data["_windows"].tolist() != key:
                return None
            return {k: data[k] for k in data.files if k != "_windows"}
    except (OSError, KeyError, TypeError, ValueError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--calibrate", type=int, default=8,
                        help="calibration windows (of --window-len tokens) for +act and "
                             "+gptq schemes")
    parser.add_argument("--calibration-text", choices=CALIBRATION_TEXTS, default="spread",
                        help="calibration windows from the Bible's last 40 chapters (end) or "
                             "from chapters spread over everything after the first 40 "
                             "(spread, the default); never from the evaluated text")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help="comma-separated schemes; suffix +act (activation-aware search) "
                             "or +gptq[-ao][-refitN] (GPTQ, optionally in act order with "
                             "static groups, with N rounds of least-squares grid refitting)")
    parser.add_argument("--calibration-cache", default=None,
                        help="an .npz holding the +gptq Gram matrices: loaded when it was made "
                             "with the same --calibrate / --window-len, else written")
    args = parser.parse_args()

    path = default_model_path()
    gguf_file = GGUFFile(path)
    cfg = config_from_gguf(gguf_file, attention_impl="xla", matmul_impl="xla")
    tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
    windows = bible_windows(tokenizer, args.windows, args.window_len)
    run = jax.jit(forward, static_argnums=1, static_argnames="all_logits")
    dense = load_params(gguf_file, cfg, progress=False)
    baseline_logits: np.ndarray | None = None
    importance = grams = None
    schemes = args.schemes.split(",")
    if any(s.endswith(ACTIVATION_AWARE) or GPTQ in s for s in schemes):
        start = time.perf_counter()
        if args.calibration_text == "end":
            calibration = bible_windows(tokenizer, args.calibrate, args.window_len,
                                        from_end=True)
        else:
            calibration = spread_windows(tokenizer, args.calibrate, args.window_len)
        if any(GPTQ in s and "-seq" not in s.split(GPTQ, 1)[1] for s in schemes):
            key = [args.calibrate, args.window_len,
                   CALIBRATION_TEXTS.index(args.calibration_text)]
            grams = load_grams(args.calibration_cache, key)
            if grams is None:
                grams = activation_grams(dense, cfg, calibration, page_size=PAGE)
                if args.calibration_cache:
                    np.savez(args.calibration_cache, **grams, _windows=np.array(key))
            # E[x_k^2] is the Gram matrices' diagonal.
            importance = {k: np.diagonal(v, axis1=-2, axis2=-1).copy()
                          for k, v in grams.items()}
        elif any(s.endswith(ACTIVATION_AWARE) for s in schemes):
            importance = activation_stats(dense, cfg, calibration, page_size=PAGE)
        print(json.dumps({"calibration_windows": args.calibrate,
                          "calibration_text": args.calibration_text, "grams": grams is not None,
                          "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    rows = []
    for scheme in schemes:
        start = time.perf_counter()
        if scheme == "f32":
            params = dense
        elif scheme == "gguf":
            params = load_params(gguf_file, cfg, quantize="gguf", progress=False)
        elif scheme.endswith(ACTIVATION_AWARE):
            params = quantize_params(dense, scheme[:-len(ACTIVATION_AWARE)], importance)
        elif GPTQ in scheme:
            base, suffix = scheme.split(GPTQ, 1)
            options = parse_gptq_suffix(suffix)
            tune_steps = options.pop("tune_steps", 0)
            if options.pop("sequential", False):
                params = sequential_gptq(dense, cfg, calibration, base, page_size=PAGE,
                                         progress=True, **options)
            else:
                params = quantize_params(dense, base, grams=grams, **options)
            if tune_steps:
                params, history = tune_grids(params, dense, cfg, calibration,
                                             steps=tune_steps, progress=True)
                print(json.dumps({"scheme": scheme, "tune_kl_first": round(history[0], 5),
                                  "tune_kl_last10": round(float(np.mean(history[-10:])), 5)}),
                      flush=True)
        else:
            params = quantize_params(dense, scheme)
        quantize_seconds = time.perf_counter() - start
        total, count, first = 0.0, 0, None
        for tokens in windows:
            logits = window_logits(params, cfg, tokens, run)
            first = logits if first is None else first
            total += nll_sum(logits, tokens)
            count += len(tokens) - 1
        if scheme == "f32":
            baseline_logits = first
        row = {"scheme": scheme, "ppl": round(math.exp(total / count), 4),
               "weights_mib": round(param_bytes(params) / 2**20, 1),
               "tokens": count, "quantize_seconds": round(quantize_seconds, 1),
               "seconds": round(time.perf_counter() - start, 1)}
        if baseline_logits is not None and scheme != "f32":
            row["max_logit_diff_vs_f32"] = float(np.abs(first - baseline_logits).max())
            row["kl_vs_f32_window0"] = round(mean_kl(baseline_logits, first), 5)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = next((r["ppl"] for r in rows if r["scheme"] == "f32"), None)
    print("\n| scheme | weights (MiB) | perplexity | vs f32 |\n|---|---:|---:|---:|")
    for r in rows:
        delta = f"{100 * (r['ppl'] / base - 1):+.2f}%" if base else "n/a"
        print(f"| {r['scheme']} | {r['weights_mib']} | {r['ppl']:.3f} | {delta} |")


if __name__ == "__main__":
    main()
