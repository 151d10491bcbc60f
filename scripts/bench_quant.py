"""Decode speed of SmolLM2-135M under weight-only quantization, all schemes in one process.

The `single` workload of `jaxinfer bench` (batch 1, 128-token prompt, 128 new tokens, greedy)
for f32, int8, int4 (g128 and g32) and the GGUF file kept quantized; one JSON line per scheme
with decode tokens/s, time to first token and the ratio to f32. Timings drift on shared
machines: compare the ratios of one run, on an idle machine.

    python scripts/bench_quant.py [--repeats 3] [--schemes f32,int8,...] [--output FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics

import jaxinfer
from jaxinfer.bench import SINGLE_NEW, BenchOptions, JaxinferSystem, single_prompts
from jaxinfer.model.params import param_bytes
from jaxinfer.roofline import device_name

SCHEMES = ("f32", "int8", "int4", "int4-g32", "gguf")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M)")
    parser.add_argument("--schemes", default=",".join(SCHEMES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default=None, help="also append the JSON lines here")
    args = parser.parse_args()

    prompts = single_prompts()
    dense = jaxinfer.load(args.model, progress=False)
    base: dict[str, float] = {}
    for scheme in args.schemes.split(","):
        quantize = None if scheme == "f32" else scheme
        llm = dense if quantize is None else jaxinfer.load(args.model, progress=False,
                                                           quantize=quantize)
        system = JaxinferSystem(BenchOptions(model=args.model), llm=llm, name=scheme)
        system.run(prompts, SINGLE_NEW)  # warm-up: compilation
        runs = [system.run(prompts, SINGLE_NEW) for _ in range(args.repeats)]
        decode_s = statistics.median(r["decode_s"] for r in runs)
        ttft_s = statistics.median(r["ttft_s"] for r in runs)
        record = {"workload": "single", "scheme": scheme, "device": device_name(),
                  "matmul_impl": llm.cfg.matmul_impl,
                  "weights_mib": round(param_bytes(llm.params) / 2**20, 1),
                  "decode_tok_s": round((SINGLE_NEW - 1) / decode_s, 2),
                  "ttft_s": round(ttft_s, 4)}
        if scheme == "f32":
            base = record
        elif base:
            record["decode_vs_f32"] = round(record["decode_tok_s"] / base["decode_tok_s"], 3)
            record["ttft_vs_f32"] = round(base["ttft_s"] / record["ttft_s"], 3)
        line = json.dumps(record)
        print(line, flush=True)
        if args.output:
            with open(args.output, "a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
