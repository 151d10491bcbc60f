#!/usr/bin/env python3
"""Predicted prefill step time of adaptive sequence parallelism against static (every prompt
split over all devices) and no-split (every prompt whole, longest first onto the least loaded
device), on mixed-length batches, by the planner's cost model (no device runs anything).

One JSON object per line: a row per (hardware, batch size, seed) with lengths drawn
log-uniformly from 128..32768, a row per hardware for one 32k prompt among 31 short ones,
and a summary per (hardware, batch size): geometric-mean step time ratios, mean imbalances.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxinfer.parallel.adaptive import (  # noqa: E402
    SPCostModel,
    lower_bound_step_time,
    plan_adaptive,
    plan_no_split,
    plan_static,
)

LLAMA_3_8B = dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8,
                  head_dim=128)
# Sustained figures, not datasheet peaks: about 70% of bf16 dense peak; memory left for KV
# and activations once bf16 weights are loaded.
HARDWARE: dict[str, dict[str, float]] = {
    # H100 SXM: 989 TFLOP/s bf16, NVLink 450 GB/s each way, 80 GB less 16 GB of weights.
    "h100": dict(device_flops=700e12, link_bytes_per_s=450e9, device_memory_bytes=60e9,
                 ring_step_latency_s=10e-6),
    # A CPU socket with bf16 matrix units, 100 Gb/s Ethernet between sockets, 256 GB RAM.
    "cpu": dict(device_flops=2e12, link_bytes_per_s=12.5e9, device_memory_bytes=200e9,
                ring_step_latency_s=30e-6),
}


def _row(lengths: list[int], num_devices: int, cost: SPCostModel) -> dict[str, Any]:
    start = time.perf_counter()
    adaptive = plan_adaptive(lengths, num_devices, cost)
    plan_ms = (time.perf_counter() - start) * 1e3
    row: dict[str, Any] = {"num_sequences": len(lengths), "tokens": sum(lengths),
                           "max_length": max(lengths)}
    plans = {"adaptive": adaptive, "static": plan_static(lengths, num_devices, cost),
             "no_split": plan_no_split(lengths, num_devices, cost)}
    for name, plan in plans.items():
        summary = plan.summary()
        row[name] = {key: summary[key] for key in (
            "step_time_s", "token_imbalance", "time_imbalance", "num_split", "within_capacity")}
    step = adaptive.step_time()
    row["static_over_adaptive"] = plans["static"].step_time() / step
    row["no_split_over_adaptive"] = plans["no_split"].step_time() / step
    row["adaptive_over_lower_bound"] = step / lower_bound_step_time(lengths, num_devices, cost)
    row["plan_ms"] = plan_ms
    return row


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=8)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--hardware", nargs="+", choices=sorted(HARDWARE),
                        default=list(HARDWARE))
    args = parser.parse_args(argv)
    wall = time.perf_counter()
    for hardware in args.hardware:
        cost = SPCostModel.from_model_dims(**LLAMA_3_8B, **HARDWARE[hardware])
        for batch_size in args.batch_sizes:
            rows = []
            for seed in range(args.seeds):
                rng = np.random.default_rng(seed)
                lengths = np.exp(rng.uniform(math.log(128), math.log(32768), batch_size))
                row = _row(lengths.astype(int).tolist(), args.devices, cost)
                rows.append(row)
                print(json.dumps({"kind": "batch", "hardware": hardware,
                                  "batch_size": batch_size, "seed": seed, **row}))
            print(json.dumps({
                "kind": "summary", "hardware": hardware, "batch_size": batch_size,
                "seeds": args.seeds, "devices": args.devices,
                **{f"geomean_{key}": _geomean([r[key] for r in rows]) for key in (
                    "static_over_adaptive", "no_split_over_adaptive",
                    "adaptive_over_lower_bound")},
                **{f"mean_{name}_{key}": statistics.fmean(r[name][key] for r in rows)
                   for name in ("adaptive", "static", "no_split")
                   for key in ("token_imbalance", "time_imbalance")},
                "max_plan_ms": max(r["plan_ms"] for r in rows)}))
        rng = np.random.default_rng(0)
        lengths = [32768, *rng.integers(256, 1025, 31).tolist()]
        print(json.dumps({"kind": "one_long_among_short", "hardware": hardware,
                          **_row(lengths, args.devices, cost)}))
    print(json.dumps({"kind": "wall", "seconds": time.perf_counter() - wall}))


if __name__ == "__main__":
    main()
