"""Policies by name, with the budget conventions the evaluation uses."""

from __future__ import annotations

from typing import Any

from jaxinfer.errors import ConfigError
from jaxinfer.kvcompress import policies as P
from jaxinfer.kvcompress import quant as Q
from jaxinfer.kvcompress.razor import RazorAttention
from jaxinfer.kvcompress.select import TokenSelect

# Eviction / selection policies take a token budget; the quantized caches keep every token.
BUDGETED = ("streaming", "h2o", "scissorhands", "snapkv", "actqkv", "d2o", "tokenselect",
            "mikv", "razor")
UNBUDGETED = ("full", "int8", "kivi4", "kivi2")
POLICY_NAMES = UNBUDGETED + BUDGETED


def make_policy(name: str, *, max_len: int, budget: int | None = None,
                retrieval_heads: tuple[tuple[int, ...], ...] = ()) -> Any:
    """The policy `name` for sequences of at most `max_len` tokens.

    Args:
      name: one of `POLICY_NAMES`.
      max_len: longest sequence (prompt + generated) the cache must hold.
      budget: kept tokens per (layer, sequence, KV head) for eviction policies, selected
        tokens for TokenSelect, full-precision tokens for MiKV, sinks + window of
        RazorAttention's non-retrieval heads. Ignored by the others.
      retrieval_heads: RazorAttention's per-layer retrieval KV heads
        (`razor.find_retrieval_heads`); other policies ignore it.
    """
    if name not in POLICY_NAMES:
        raise ConfigError(f"unknown KV policy {name!r}; choose one of {', '.join(POLICY_NAMES)}")
    if name in BUDGETED:
        if budget is None or budget < 8:
            raise ConfigError(f"KV policy {name!r} needs a budget of at least 8 tokens "
                              f"(got {budget})")
        budget = min(budget, max_len)
    kivi_len = -(-max_len // 32) * 32
    return {
        "full": lambda: P.FullCache(budget=max_len),
        "int8": lambda: Q.QuantizedKV(max_len=max_len, bits=8),
        "kivi4": lambda: Q.KIVI(max_len=kivi_len, bits=4),
        "kivi2": lambda: Q.KIVI(max_len=kivi_len, bits=2),
        "streaming": lambda: P.StreamingLLM(budget=budget, sink=4),
        "h2o": lambda: P.H2O(budget=budget, recent=budget // 2),
        "scissorhands": lambda: P.Scissorhands(budget=budget, recent=budget // 4),
        "snapkv": lambda: P.SnapKV(budget=budget, recent=32, decode_recent=budget // 2),
        "actqkv": lambda: P.ActQKV(budget=budget, recent=32, decode_recent=budget // 2),
        "d2o": lambda: P.D2O(budget=budget, recent=budget // 2),
        "tokenselect": lambda: TokenSelect(max_len=max_len, select=budget),
        "razor": lambda: RazorAttention(max_len=max_len, window=budget - 4, sink=4,
                                        retrieval_heads=retrieval_heads),
        "mikv": lambda: Q.MiKV(budget=budget, max_len=max_len, low_bits=4, recent=budget // 4),
    }[name]()
