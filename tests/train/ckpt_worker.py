"""Subprocess program of the checkpoint fault tests: a tiny deterministic optax loop that
resumes from the latest committed step and starts an asynchronous save after every step.

Log lines (flushed, so they survive SIGKILL): `resumed S`, `saving S` (after `maybe_save`
started a save), `committed S FINGERPRINT` (once S is on disk), `done S`. tests/train/
test_checkpoint.py kills it at chosen points and recomputes the states with `run_steps`.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROWS, COLS, BATCH = 256, 2048, 8  # w: 2 MiB; with b and Adam's moments ~6 MiB of state
OPTIMIZER = optax.adam(1e-2)


def init_state() -> dict[str, Any]:
    """The state at step 0 (a TrainState-like dict of plain arrays)."""
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((ROWS, COLS), np.float32) * 0.05),
              "b": jnp.zeros((COLS,), jnp.float32)}
    return {"step": jnp.int32(0), "params": params, "opt_state": OPTIMIZER.init(params),
            "rng": jax.random.key_data(jax.random.key(0)), "data_position": jnp.int32(0)}


def abstract_state() -> Any:
    return jax.eval_shape(init_state)


@jax.jit
def _step(state: dict[str, Any]) -> dict[str, Any]:
    key, data_key = jax.random.split(jax.random.wrap_key_data(state["rng"]))
    x = jax.random.normal(data_key, (BATCH, ROWS), jnp.float32)
    target = jnp.tanh(x[:, :1] * jnp.linspace(-1.0, 1.0, COLS, dtype=jnp.float32)[None])

    def loss(params: dict[str, jax.Array]) -> jax.Array:
        return jnp.mean((x @ params["w"] + params["b"][None] - target) ** 2)

    grads = jax.grad(loss)(state["params"])
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float (tests: strict)
        updates, opt_state = OPTIMIZER.update(grads, state["opt_state"], state["params"])
    return {"step": state["step"] + 1, "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state, "rng": jax.random.key_data(key),
            "data_position": state["data_position"] + 1}


train_step = jax.jit(_step, donate_argnums=0)


def run_steps(steps: int) -> list[dict[str, Any]]:
    """States after 0 .. `steps` steps of the uninterrupted run, as host arrays."""
    state, out = init_state(), []
    out.append(jax.tree.map(np.array, state))
    for _ in range(steps):
        state = train_step(state)
        out.append(jax.tree.map(np.array, state))
    return out


def fingerprint(state: Any) -> str:
    digest = hashlib.sha256()
    for leaf in jax.tree.leaves(state):
        digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
    return digest.hexdigest()[:16]


def main(argv: list[str] | None = None) -> None:
    from jaxinfer.train.checkpoint import TrainCheckpointer

    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--log", required=True)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--no-close", action="store_true",
                        help="exit without close(): the atexit hook must commit the last save")
    args = parser.parse_args(argv)
    log = open(args.log, "a", buffering=1)  # noqa: SIM115 - open for the process's life
    ckpt = TrainCheckpointer(args.directory, save_every=1, keep=3)
    state = ckpt.restore_latest(abstract_state())
    state = init_state() if state is None else state
    print(f"resumed {int(state['step'])}", file=log, flush=True)
    fingerprints: dict[int, str] = {}
    for step in range(int(state["step"]) + 1, args.steps + 1):
        state = train_step(state)
        fingerprints[step] = fingerprint(state)
        if ckpt.maybe_save(step, state):
            print(f"saving {step}", file=log, flush=True)
        for done in sorted(set(ckpt.all_steps()) & set(fingerprints)):
            print(f"committed {done} {fingerprints.pop(done)}", file=log, flush=True)
        time.sleep(args.sleep)
    if not args.no_close:
        ckpt.close()
    print(f"done {args.steps}", file=log, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
