"""Benchmark `TrainCheckpointer` on a ~1 GiB state: the synchronous save time, how long an
asynchronous save blocks the loop, and how much training steps slow down while it writes,
without and with zstd compression. Prints one JSON line per measurement.

    .venv/bin/python scripts/bench_checkpoint.py [--gib 1] [--dir /tmp/bench_ckpt]

The state is `--gib` GiB of float32 [W, W] matrices on one CPU device; a training step is a
jitted forward/backward through the first two matrices (donating the state), so it reads
and writes part of the state the way an optimizer step does.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import psutil

from jaxinfer.train.checkpoint import TrainCheckpointer

BATCH, TRAINED = 64, 2  # rows of the step's input; matrices the step updates


def make_state(gib: float, width: int) -> dict[str, Any]:
    count = max(TRAINED, round(gib * 2**30 / (width * width * 4)))
    keys = jax.random.split(jax.random.key(0), count)
    make = jax.jit(lambda k: jax.random.normal(k, (width, width), jnp.float32) * 0.01)
    return {"step": jnp.int32(0), "layers": [make(k) for k in keys]}


def _loss(trained: list[jax.Array], x: jax.Array) -> jax.Array:
    for w in trained:
        x = jnp.tanh(x @ w)
    return jnp.mean(x * x)


@jax.jit
def _step(state: dict[str, Any], x: jax.Array) -> dict[str, Any]:
    trained = state["layers"][:TRAINED]
    grads = jax.grad(_loss)(trained, x)
    updated = [w - 0.1 * g for w, g in zip(trained, grads, strict=True)]
    return {"step": state["step"] + 1, "layers": updated + state["layers"][TRAINED:]}


train_step = jax.jit(_step, donate_argnums=0)


def _timed_step(state: dict[str, Any], x: jax.Array) -> tuple[dict[str, Any], float]:
    start = time.perf_counter()
    state = train_step(state, x)
    jax.block_until_ready(state)
    return state, time.perf_counter() - start


class _PeakRss:
    """Peak resident memory of this process while in the `with` block (polled)."""

    def __enter__(self) -> _PeakRss:
        self.base = self.peak = psutil.Process().memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, psutil.Process().memory_info().rss)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra_gib(self) -> float:
        return round((self.peak - self.base) / 2**30, 2)


def _dir_gib(path: Path) -> float:
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**30, 3)


def bench(state: dict[str, Any], x: jax.Array, directory: Path, compress: bool,
          steps: int, repeats: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One compression setting: its measurements (medians over `repeats` saves), and the
    advanced state."""
    baseline = []
    for _ in range(steps):
        state, seconds = _timed_step(state, x)
        baseline.append(seconds)
    sync, blocked, commit, during = [], [], [], []
    with TrainCheckpointer(directory, save_every=10**9, keep=2, compress=compress,
                           handle_sigterm=False) as ckpt:
        ckpt.maybe_save(int(state["step"]), state, force=True)  # warm-up
        ckpt.wait()
        with _PeakRss() as sync_rss:
            for _ in range(repeats):
                state, _ = _timed_step(state, x)
                start = time.perf_counter()
                ckpt.maybe_save(int(state["step"]), state, force=True)
                ckpt.wait()
                sync.append(time.perf_counter() - start)
        with _PeakRss() as async_rss:
            for _ in range(repeats):
                state, _ = _timed_step(state, x)
                step = int(state["step"])
                # As with save_every >> the write time: the previous save, including Orbax's
                # deletion of steps past `keep` after its commit, has finished.
                ckpt.wait()
                start = time.perf_counter()
                ckpt.maybe_save(step, state, force=True)
                blocked.append(time.perf_counter() - start)
                while ckpt.latest_step() != step:  # train while it writes
                    state, seconds = _timed_step(state, x)
                    during.append(seconds)
                commit.append(time.perf_counter() - start)
        size = _dir_gib(directory / str(step))
    base, median = statistics.median(baseline), statistics.median
    return {
        "compress": compress, "state_gib": round(_gib(state), 3), "files_gib": size,
        "saves": repeats, "sync_save_s": round(median(sync), 3),
        "async_blocked_s": round(median(blocked), 4),
        "async_blocked_max_s": round(max(blocked), 4),
        "blocked_over_sync": round(median(blocked) / median(sync), 4),
        "async_commit_s": round(median(commit), 3), "steps_during_saves": len(during),
        "step_s": round(base, 4),
        "step_s_during_save": round(median(during), 4) if during else None,
        "step_slowdown": round(median(during) / base - 1, 3) if during else None,
        "sync_extra_rss_gib": sync_rss.extra_gib, "async_extra_rss_gib": async_rss.extra_gib,
    }, state


def _gib(state: Any) -> float:
    return sum(x.nbytes for x in jax.tree.leaves(state)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=1.0, help="state size")
    parser.add_argument("--width", type=int, default=4096, help="matrix side")
    parser.add_argument("--steps", type=int, default=8, help="baseline steps per setting")
    parser.add_argument("--repeats", type=int, default=3, help="saves of each kind (median)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory")
    args = parser.parse_args()
    scratch = args.dir or Path(tempfile.mkdtemp(prefix="bench_ckpt_"))
    state = make_state(args.gib, args.width)
    x = jax.random.normal(jax.random.key(1), (BATCH, args.width), jnp.float32)
    state, _ = _timed_step(state, x)  # compile
    start = time.perf_counter()  # what the commit thread spends on the checksums
    for leaf in jax.tree.leaves(state):
        zlib.crc32(np.asarray(leaf).reshape(-1).view(np.uint8))
    print(json.dumps({"devices": str(jax.devices()), "cpus": psutil.cpu_count(),
                      "load_average": [round(v, 1) for v in psutil.getloadavg()],
                      "state_gib": round(_gib(state), 3),
                      "crc32_pass_s": round(time.perf_counter() - start, 3)}), flush=True)
    try:
        for compress in (False, True):
            result, state = bench(state, x, scratch / f"zstd_{compress}", compress, args.steps,
                                  args.repeats)
            print(json.dumps(result), flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
