"""`jaxinfer eval-kv`: quality and memory of each KV policy against the full cache.

Three measurements on a real model, every policy on the same captured prefill:
  text      perplexity, mean KL(full || policy) and top-1 agreement of the next-token
            distribution over the last `text_decode` tokens of `context`-token windows of
            the King James Bible, decoded one token at a time after the compressed prefill;
  passkey   retrieval of a 5-digit key hidden at several depths of filler text;
  agreement greedy continuations of Bible prompts, token by token against the full cache.
Budgets are fractions of each prompt's length. One JSON object per result line.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import ConfigError
from jaxinfer.kvcompress.model import capture_prefill, compress, decode_step
from jaxinfer.kvcompress.razor import find_retrieval_heads
from jaxinfer.kvcompress.registry import BUDGETED, POLICY_NAMES, make_policy
from jaxinfer.kvcompress.slots import nbytes


@dataclasses.dataclass(frozen=True)
class EvalKVConfig:
    """What `eval-kv` runs. The defaults take ~21 minutes on a 2-core CPU (2026-11-28); `FULL_SWEEP`
    is the complete grid."""

    model: str | None = None
    policies: tuple[str, ...] = POLICY_NAMES
    budgets: tuple[float, ...] = (0.5, 0.25, 0.125)
    extra: tuple[tuple[str, float], ...] = (("tokenselect", 0.1),)
    context: int = 4096
    text_windows: int = 1
    text_batch: int = 4  # text windows prefilled and decoded together
    # 128 made the default run 30 min 51 s on the idle 2-core CPU (2026-11-28); 112 trims
    # an eighth of the text part's decoding, its largest cost.
    text_decode: int = 112
    passkey_contexts: tuple[int, ...] = (1024, 2048, 4096)
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_trials: int = 1
    agreement_prompts: int = 50
    agreement_prompt_len: int = 256
    agreement_new_tokens: int = 16
    agreement_batch: int = 25
    parts: tuple[str, ...] = ("text", "passkey", "agreement")
    seed: int = 0

    def validate(self) -> None:
        """Refuse unknown policies / parts and budgets outside (0, 1] before loading."""
        bad = [p for p in self.policies if p not in POLICY_NAMES]
        if bad:
            raise ConfigError(f"unknown KV policies {bad}; choose from {', '.join(POLICY_NAMES)}")
        bad_parts = [p for p in self.parts if p not in ("text", "passkey", "agreement")]
        if bad_parts:
            raise ConfigError(f"unknown parts {bad_parts}; choose from text, passkey, agreement")
        if any(not 0 < b <= 1 for b in self.budgets):
            raise ConfigError(f"budgets are fractions of the prompt in (0, 1]; got "
                              f"{self.budgets}")
        if self.text_decode >= self.context:
            raise ConfigError(f"text_decode {self.text_decode} must be below the context "
                              f"{self.context}")


FULL_SWEEP = dict(text_windows=8, text_decode=256, passkey_contexts=(1024, 2048, 4096, 8192),
                  passkey_depths=(0.0, 0.25, 0.5, 0.75, 1.0), passkey_trials=2,
                  agreement_new_tokens=32)


def run_configs(cfg: EvalKVConfig) -> list[tuple[str, float | None]]:
    """(policy, budget fraction or None) pairs, the full cache first."""
    out: list[tuple[str, float | None]] = [("full", None)]
    for name in cfg.policies:
        if name == "full":
            continue
        if name in BUDGETED:
            out += [(name, b) for b in cfg.budgets]
        else:
            out.append((name, None))
    out += [e for e in cfg.extra if e[0] in cfg.policies and e not in out]
    return out


def _policy(name: str, frac: float | None, prompt_len: int, max_len: int,
            heads: tuple = ()) -> Any:
    budget = None if frac is None else max(8, int(round(frac * prompt_len)))
    return make_policy(name, max_len=max_len, budget=budget, retrieval_heads=heads)


def _label(name: str, frac: float | None) -> str:
    return name if frac is None else f"{name}@{frac:g}"


def _generate(params, mcfg, policy, captured, lengths, first_logits, steps: int,
              forced: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """Decode `steps` tokens after a compressed prefill: teacher-forced with `forced`
    [S, steps] (returns every step's logits) or greedy (returns the tokens)."""
    state = compress(policy, captured, lengths)
    kv_bytes = nbytes(state.cache)
    logits = [np.asarray(first_logits)]
    tokens = [np.argmax(logits[0], axis=-1)]
    for i in range(steps - 1):
        feed = forced[:, i] if forced is not None else tokens[-1]
        lg, state = decode_step(params, mcfg, policy, jnp.asarray(feed, jnp.int32), state,
                                use_native=False)
        logits.append(np.asarray(lg))
        tokens.append(np.argmax(logits[-1], axis=-1))
    return np.stack(logits, 1), np.stack(tokens, 1), kv_bytes


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _bible_ids(tokenizer: Any, count: int, start: int) -> list[int]:
    from jaxinfer.train.data import read_bible
    ids: list[int] = []
    for doc in read_bible()[start:]:
        ids += tokenizer.encode(doc + "\n", add_special_tokens=False)
        if len(ids) >= count:
            break
    return ids[:count]


def score_windows(params, mcfg, ids: np.ndarray, decode: int,
                  policies: dict[str, Any], batch: int = 4,
                  capture_for: Callable[[str, tuple, np.ndarray], tuple] | None = None
                  ) -> dict[str, dict[str, list[float]]]:
    """Teacher-force the last `decode` tokens of each window ids [W, ctx] with every policy
    (label -> policy; the first is the reference) after one shared captured prefill per
    batch of windows. `capture_for(label, captured, windows)` may substitute a policy's
    capture (the probes in scripts/kv_probe.py). Per label: per-token nll, KL(reference ||
    policy) and top-1 agreement, and KV bytes per sequence."""
    P = ids.shape[1] - decode
    results: dict[str, dict[str, list[float]]] = {}
    for w0 in range(0, ids.shape[0], batch):
        # Windows decode together as one ragged batch (equal lengths here): a step over B
        # sequences costs far less than B steps, since every step reads all the weights.
        win = ids[w0:w0 + batch]
        prompt, cont = win[:, :P], win[:, P:]
        nb = prompt.shape[0]
        lengths = jnp.full((nb,), P, jnp.int32)
        t0 = time.perf_counter()
        first, captured = capture_prefill(params, mcfg, jnp.asarray(prompt, jnp.int32), lengths)
        jax.block_until_ready(first)
        prefill_s = time.perf_counter() - t0
        ref_lp = None
        for label, policy in policies.items():
            cap = captured if capture_for is None else capture_for(label, captured, win)
            logits, _, kv_bytes = _generate(params, mcfg, policy, cap, lengths, first, decode,
                                            forced=cont)
            lp = _log_softmax(logits.astype(np.float64))  # [nb, D, V]
            if ref_lp is None:
                ref_lp = lp
            r = results.setdefault(label, {"nll": [], "kl": [], "top1": [], "kv_bytes": []})
            for b in range(nb):
                r["nll"] += list(-lp[b, np.arange(decode), cont[b]])
                r["kl"] += list((np.exp(ref_lp[b]) * (ref_lp[b] - lp[b])).sum(-1))
                r["top1"] += list((lp[b].argmax(-1) == ref_lp[b].argmax(-1)).astype(float))
            r["kv_bytes"].append(kv_bytes / nb)  # per sequence
        del captured
        print(f"[eval-kv] text windows {w0 + 1}-{w0 + nb}/{ids.shape[0]} "
              f"(prefill {prefill_s:.1f} s)", file=sys.stderr)
    return results


def text_rows(results: dict[str, dict[str, list[float]]]) -> list[dict[str, Any]]:
    """One row per label of `score_windows`' results, perplexity relative to the first."""
    ref = next(iter(results.values()))
    base = float(np.exp(np.mean(ref["nll"])))
    ref_bytes = float(np.mean(ref["kv_bytes"]))
    rows = []
    for label, r in results.items():
        ppl = float(np.exp(np.mean(r["nll"])))
        rows.append({"policy": label, "tokens": len(r["nll"]), "ppl": ppl,
                     "ppl_delta_pct": 100 * (ppl / base - 1), "kl": float(np.mean(r["kl"])),
                     "top1": float(np.mean(r["top1"])), "kv_bytes": int(np.mean(r["kv_bytes"])),
                     "kv_ratio": float(np.mean(r["kv_bytes"])) / ref_bytes})
    return rows


def eval_text(params, mcfg, tokenizer, cfg: EvalKVConfig, emit: Callable,
              heads: tuple = ()) -> None:
    ctx = cfg.context
    ids = np.asarray(_bible_ids(tokenizer, ctx * cfg.text_windows, 0)).reshape(-1, ctx)
    policies = {_label(name, frac): _policy(name, frac, ctx, ctx, heads)
                for name, frac in run_configs(cfg)}
    results = score_windows(params, mcfg, ids, cfg.text_decode, policies,
                            batch=max(1, min(cfg.text_batch, ids.shape[0])))
    for row in text_rows(results):
        emit({"part": "text", "policy": row.pop("policy"), "context": ctx, **row})


_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
           "There and back again. ")


def passkey_prompt(tokenizer: Any, length: int, depth: float, key: int) -> list[int]:
    """About `length` tokens of filler with the key sentence at `depth` (0: start)."""
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    head = enc("There is an important pass key hidden inside a lot of irrelevant text. "
               "Find it and memorize it. I will quiz you about the pass key.\n")
    needle = enc(f"The pass key is {key}. Remember it. {key} is the pass key.\n")
    tail = enc("\nWhat is the pass key? The pass key is")
    unit = enc(_FILLER)
    n = max(0, (length - len(head) - len(needle) - len(tail)) // len(unit))
    at = int(round(depth * n))
    return head + unit * at + needle + unit * (n - at) + tail


def eval_passkey(params, mcfg, tokenizer, cfg: EvalKVConfig, emit: Callable,
              heads: tuple = ()) -> None:
    rng = random.Random(cfg.seed)
    steps = 7
    for ctx in cfg.passkey_contexts:
        cells = [(d, rng.randrange(10000, 100000)) for d in cfg.passkey_depths
                 for _ in range(cfg.passkey_trials)]
        prompts = [passkey_prompt(tokenizer, ctx, d, key) for d, key in cells]
        T = max(map(len, prompts))
        toks = np.zeros((len(prompts), T), np.int32)
        for i, p in enumerate(prompts):
            toks[i, :len(p)] = p
        lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
        first, captured = capture_prefill(params, mcfg, jnp.asarray(toks), lengths)
        for name, frac in run_configs(cfg):
            policy = _policy(name, frac, T, T + steps, heads)
            _, out, _ = _generate(params, mcfg, policy, captured, lengths, first, steps)
            for (depth, key), row in zip(cells, out, strict=True):
                text = tokenizer.decode([int(t) for t in row])
                emit({"part": "passkey", "policy": _label(name, frac), "context": ctx,
                      "depth": depth, "correct": str(key) in re.sub(r"\s", "", text),
                      "output": text})
        del captured
        print(f"[eval-kv] passkey context {ctx} done", file=sys.stderr)


def eval_agreement(params, mcfg, tokenizer, cfg: EvalKVConfig, emit: Callable,
              heads: tuple = ()) -> None:
    L, new = cfg.agreement_prompt_len, cfg.agreement_new_tokens
    ids = np.asarray(_bible_ids(tokenizer, L * cfg.agreement_prompts, 300)).reshape(-1, L)
    scores: dict[str, list[float]] = {}
    exact: dict[str, list[float]] = {}
    for b in range(0, len(ids), cfg.agreement_batch):
        toks = jnp.asarray(ids[b:b + cfg.agreement_batch], jnp.int32)
        lengths = jnp.full((toks.shape[0],), L, jnp.int32)
        first, captured = capture_prefill(params, mcfg, toks, lengths)
        ref = None
        for name, frac in run_configs(cfg):
            policy = _policy(name, frac, L, L + new, heads)
            _, out, _ = _generate(params, mcfg, policy, captured, lengths, first, new)
            ref = out if ref is None else ref
            scores.setdefault(_label(name, frac), []).extend((out == ref).mean(1))
            exact.setdefault(_label(name, frac), []).extend((out == ref).all(1))
        del captured
    for label in scores:
        emit({"part": "agreement", "policy": label, "prompts": len(scores[label]),
              "token_agreement": float(np.mean(scores[label])),
              "exact_match": float(np.mean(exact[label]))})


def summarize(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown table of a run's JSON lines."""
    text = {r["policy"]: r for r in rows if r["part"] == "text"}
    agree = {r["policy"]: r for r in rows if r["part"] == "agreement"}
    keys = list(dict.fromkeys([r["policy"] for r in rows]))
    pk: dict[str, dict[tuple, list[bool]]] = {}
    for r in rows:
        if r["part"] == "passkey":
            pk.setdefault(r["policy"], {}).setdefault((r["context"], r["depth"]), []).append(
                r["correct"])
    full_cells = {c for c, v in pk.get("full", {}).items() if np.mean(v) >= 0.9}
    lines = ["| policy | KV bytes vs full | ppl | ppl Δ% | KL | top-1 | passkey (cells full ≥90%) "
             "| greedy agreement |", "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        t, a = text.get(k), agree.get(k)
        cells = [np.mean(pk[k][c]) for c in sorted(full_cells) if c in pk.get(k, {})]
        pks = f"{100 * np.mean(cells):.0f}% of {len(cells)}" if cells else "n/a"
        tcols = (f"{t['kv_ratio']:.3f} | {t['ppl']:.3f} | {t['ppl_delta_pct']:+.2f} | "
                 f"{t['kl']:.4f} | {t['top1']:.3f}" if t else " | | | | ")
        acol = f"{a['token_agreement']:.3f}" if a else ""
        lines.append(f"| {k} | {tcols} | {pks} | {acol} |")
    return "\n".join(lines)


def run(cfg: EvalKVConfig, emit: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """Load the model and run the configured parts; returns every result row."""
    from jaxinfer.weights.loader import load_model

    loaded = load_model(cfg.model, attention_impl="xla", matmul_impl="cpu")
    rows: list[dict[str, Any]] = []

    def keep(row: dict[str, Any]) -> None:
        row = {"model": cfg.model or "smollm2-135m", **row}
        rows.append(row)
        emit(row)

    heads: tuple = ()
    if "razor" in cfg.policies:
        heads = find_retrieval_heads(loaded.params, loaded.cfg)
        print(f"[eval-kv] RazorAttention retrieval heads per layer: {heads}", file=sys.stderr)
    parts = {"text": eval_text, "passkey": eval_passkey, "agreement": eval_agreement}
    for part in cfg.parts:
        parts[part](loaded.params, loaded.cfg, loaded.tokenizer, cfg, keep, heads)
    return rows


def main_json(cfg: EvalKVConfig, output: str | None) -> None:
    """CLI body: JSON lines to stdout (and `output`), then the table to stderr."""
    out = open(output, "a") if output else None  # noqa: SIM115

    def emit(row: dict[str, Any]) -> None:
        line = json.dumps(row)
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    rows = run(cfg, emit)
    print(summarize(rows), file=sys.stderr)
    if out:
        out.close()
