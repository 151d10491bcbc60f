"""Probes behind docs/kv_compression.md's eviction analysis (CPU, minutes each).

  coverage  per layer, where the last 32 prompt queries put their attention (distance
            buckets) and the share the best 1,024 keys hold for those same queries;
  oracle    a bound for prefill-time selection at a 25% budget: keep the prompt tokens the
            teacher-forced continuation's own queries (full cache, every step) attend most,
            then decode as SnapKV does; prints full, oracle and snapkv on the same windows;
  obs       SnapKV scored by observation windows of several lengths (--obs 32,128,256),
            or by its own settings (--obs short,long,both).

Windows are 4,096-token Bible windows; `--first 8` starts past the eight that
`eval-kv --text-windows 8` scores (held-out text). JSON lines on stdout.

  python scripts/kv_probe.py coverage --model checkpoints/gemma-3-270m-q4_k_m.gguf --first 8
  python scripts/kv_probe.py oracle --model checkpoints/gemma-3-270m-q4_k_m.gguf --windows 8
  python scripts/kv_probe.py obs --model checkpoints/gemma-3-270m-q4_k_m.gguf --first 8 \
      --windows 4 --obs 32,128,256
"""

from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.kvcompress import evaluate as ev
from jaxinfer.kvcompress import policies as P
from jaxinfer.kvcompress.attend import OBS_WINDOW
from jaxinfer.kvcompress.model import _prefill_layers

CTX, DECODE = 4096, 256


@functools.partial(jax.jit, static_argnames=("cfg", "obs"))
def window_attention(params, cfg, tokens, lengths, obs: int) -> jax.Array:
    """[L, S, K, T] attention each key receives from each sequence's last `obs` queries."""
    _, col = _prefill_layers(params, cfg, tokens, lengths, lambda c: c.stats.col_obs, obs,
                             False, col_all=False)
    return col


def coverage(m, ids: np.ndarray) -> None:
    P_ = CTX - DECODE
    lengths = jnp.full((ids.shape[0],), P_, jnp.int32)
    col = np.asarray(window_attention(m.params, m.cfg, jnp.asarray(ids[:, :P_], jnp.int32),
                                      lengths, OBS_WINDOW))[..., :P_]  # [L, S, K, T]
    sliding = np.asarray(m.cfg.sliding_layer_mask)
    dist = P_ - 1 - np.arange(P_)
    buckets = [(0, 32), (32, 512), (512, 1024), (1024, P_ - 4), (P_ - 4, P_)]
    for layer in range(col.shape[0]):
        a = col[layer].sum(axis=(0, 1))
        a = a / a.sum()
        top = np.sort(col[layer], axis=-1)[..., ::-1][..., :CTX // 4].sum(-1)
        print(json.dumps({
            "layer": layer, "sliding": bool(sliding[layer]),
            "share_by_distance": {f"{lo}-{hi}": round(float(a[(dist >= lo) & (dist < hi)].sum()), 4)
                                  for lo, hi in buckets},
            "top1024_share": round(float((top / col[layer].sum(-1)).mean()), 4)}), flush=True)


def _emit(m, policies: dict, ids: np.ndarray, capture_for, extra: dict) -> None:
    """Teacher-forced text scores of every policy (the first is the reference), JSON lines."""
    res = ev.score_windows(m.params, m.cfg, ids, DECODE, policies, capture_for=capture_for)
    for row in ev.text_rows(res):
        print(json.dumps({**extra, **row}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("probe", choices=["coverage", "oracle", "obs"])
    ap.add_argument("--model", default=None, help="GGUF path (default: SmolLM2-135M)")
    ap.add_argument("--first", type=int, default=0, help="first Bible window (0-based)")
    ap.add_argument("--windows", type=int, default=2, help="how many 4,096-token windows")
    ap.add_argument("--obs", default="32,128,256", help="observation windows for `obs`")
    args = ap.parse_args()
    from jaxinfer.weights.loader import load_model

    m = load_model(args.model, attention_impl="xla", matmul_impl="cpu")
    n = args.first + args.windows
    ids = np.asarray(ev._bible_ids(m.tokenizer, CTX * n, 0)).reshape(-1, CTX)[args.first:n]
    extra = {"model": args.model or "smollm2-135m", "windows": f"{args.first}-{n - 1}"}
    budget = CTX // 4
    P_ = CTX - DECODE
    if args.probe == "coverage":
        coverage(m, ids)
    elif args.probe == "oracle":
        def capture_for(name: str, cap: tuple, win: np.ndarray) -> tuple:
            if name != "oracle@0.25":
                return cap
            # Attention from the continuation's own queries (positions P_..CTX-1) to the
            # prompt's keys, in a full-cache prefill of the whole window.
            fut = window_attention(m.params, m.cfg, jnp.asarray(win, jnp.int32),
                                   jnp.full((win.shape[0],), CTX, jnp.int32), DECODE)
            q, k, v, stats, window = cap
            return q, k, v, stats._replace(col_obs=fut[..., :P_]), window
        pols = {"full": ev._policy("full", None, CTX, CTX),
                "oracle@0.25": P.SnapKV(budget=budget, recent=0, kernel=1,
                                        decode_recent=DECODE + 1, observe="short"),
                "snapkv@0.25": ev._policy("snapkv", 0.25, CTX, CTX)}
        _emit(m, pols, ids, capture_for, extra)
    else:
        sizes = args.obs.split(",")  # query counts, or short / long / both (SnapKV's own)

        def capture_for(name: str, cap: tuple, win: np.ndarray) -> tuple:
            obs = name.removeprefix("snapkv-obs")
            if name == "full" or not obs.isdigit():
                return cap  # the capture holds both of SnapKV's windows
            col = window_attention(m.params, m.cfg, jnp.asarray(win[:, :P_], jnp.int32),
                                   jnp.full((win.shape[0],), P_, jnp.int32), int(obs))
            q, k, v, stats, window = cap
            return q, k, v, stats._replace(col_obs=col), window
        pols = {"full": ev._policy("full", None, CTX, CTX)}
        pols |= {f"snapkv-obs{o}": P.SnapKV(budget=budget, recent=32, decode_recent=budget // 2,
                                            observe="short" if o.isdigit() else o)
                 for o in sizes}
        _emit(m, pols, ids, capture_for, extra)

if __name__ == "__main__":
    main()
