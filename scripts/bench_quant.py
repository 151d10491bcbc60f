"""Decode speed of SmolLM2-135M under weight-only quantization, all schemes in one process.

The `single` workload of `jaxinfer bench` (batch 1, 128-token prompt, 128 new tokens, greedy)
for f32, int8, int4 (g128 and g32), the GGUF file kept quantized and, as scheme "llamacpp",
llama.cpp on the same GGUF file (llama-cpp-python, when installed); one JSON line per scheme
with decode tokens/s, time to first token and the ratios to f32 and to llama.cpp. Timings
drift on shared machines: compare the ratios of one run, on an idle machine.

    python scripts/bench_quant.py [--repeats 3] [--schemes f32,int8,...] [--output FILE]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys

import jaxinfer
from jaxinfer.bench import (
    SINGLE_NEW,
    BenchOptions,
    JaxinferSystem,
    LlamaCppSystem,
    import_llama_cpp,
    single_prompts,
)
from jaxinfer.model.params import param_bytes
from jaxinfer.roofline import device_name
from jaxinfer.weights.loader import resolve_model_path

SCHEMES = ("f32", "int8", "int4", "int4-g32", "gguf")
# llama.cpp joins the default run when llama-cpp-python is installed.
DEFAULT_SCHEMES = SCHEMES + (("llamacpp",) if importlib.util.find_spec("llama_cpp") else ())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also append the JSON lines here")
    args = parser.parse_args()

    prompts = single_prompts()
    schemes = args.schemes.split(",")
    if "llamacpp" in schemes:
        import_llama_cpp()  # fail before anything loads
    dense = jaxinfer.load(args.model, progress=False)
    records = []
    for scheme in schemes:
        if scheme == "llamacpp":
            system = LlamaCppSystem(str(resolve_model_path(args.model)))
            extra = {"system": "llama.cpp", "llama_cpp_python": system.version,
                     "weights_mib": round(os.path.getsize(system.model.model_path) / 2**20, 1)}
        else:
            quantize = None if scheme == "f32" else scheme
            llm = dense if quantize is None else jaxinfer.load(args.model, progress=False,
                                                               quantize=quantize)
            system = JaxinferSystem(BenchOptions(model=args.model), llm=llm, name=scheme)
            extra = {"system": "jaxinfer", "matmul_impl": llm.cfg.matmul_impl,
                     "weights_mib": round(param_bytes(llm.params) / 2**20, 1)}
        system.run(prompts, SINGLE_NEW)  # warm-up: compilation
        runs = [system.run(prompts, SINGLE_NEW) for _ in range(args.repeats)]
        decode_s = statistics.median(r["decode_s"] for r in runs)
        ttft_s = statistics.median(r["ttft_s"] for r in runs)
        records.append({"workload": "single", "scheme": scheme, "device": device_name(),
                        **extra, "decode_tok_s": round((SINGLE_NEW - 1) / decode_s, 2),
                        "ttft_s": round(ttft_s, 4), "_tokens": runs[-1]["tokens"][0]})
        print(f"{scheme}: {records[-1]['decode_tok_s']} tok/s", file=sys.stderr, flush=True)
    by_scheme = {r["scheme"]: r for r in records}
    for record in records:
        for peer, label in (("f32", "vs_f32"), ("llamacpp", "vs_llamacpp")):
            other = by_scheme.get(peer)
            if other is None or other is record:
                continue
            record[f"decode_{label}"] = round(record["decode_tok_s"] / other["decode_tok_s"], 3)
            record[f"ttft_{label}"] = round(other["ttft_s"] / record["ttft_s"], 3)
            if peer == "llamacpp":  # greedy tokens shared from the start
                a, b = record["_tokens"], other["_tokens"]
                record["same_tokens_as_llamacpp"] = next(
                    (i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    for record in records:
        record.pop("_tokens")
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
