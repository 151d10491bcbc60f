"""Sampling parameters (host side, never imports jax) and their packing into arrays.

`SamplingParams` follows vLLM's names and meanings; invalid values are refused when the
object is built, with the valid range in the message.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from collections.abc import Sequence

import numpy as np

from jaxinfer.errors import InputError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens and when to stop.

    Attributes:
      temperature: 0 means greedy; otherwise logits are divided by it.
      top_k: keep the k most likely tokens (0 or -1: all).
      top_p: keep the smallest set of tokens whose probability reaches top_p (1: all).
      min_p: drop tokens less likely than min_p times the most likely one (0: none).
      seed: per-request seed; the same seed gives the same tokens. None draws one.
      max_tokens: most new tokens to generate.
      stop: strings that end generation (not included in the output).
      stop_token_ids: extra token ids that end generation.
      ignore_eos: keep generating past end-of-sequence tokens (benchmarks).
      skip_special_tokens: drop special tokens from the text.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        # numpy scalars (np.int64(5), np.float32(0.5)) are numbers too: store plain Python.
        for name, kind in (("temperature", float), ("top_p", float), ("min_p", float),
                           ("top_k", int), ("max_tokens", int), ("seed", int)):
            value = getattr(self, name)
            if _is_number(value, integral=kind is int):
                object.__setattr__(self, name, kind(value))
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, rule: str) -> InputError:
            return InputError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {rule}")

        if not _finite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0 (0 means greedy)")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be an integer >= 1, or 0 / -1 to disable")
        if not _finite(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not _finite(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise bad("max_tokens", "must be an integer >= 1")
        if self.seed is not None and not isinstance(self.seed, int):
            raise bad("seed", "must be an integer or None")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise bad("stop", "must be non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_number(x: object, integral: bool = False) -> bool:
    if isinstance(x, (bool, np.bool_)):
        return False
    return isinstance(x, numbers.Integral if integral else numbers.Real)


def _finite(x: object) -> bool:
    return _is_number(x) and math.isfinite(float(x))  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class SamplingArrays:
    """Per-sequence sampling parameters packed for the device, [S] each."""

    temperature: np.ndarray  # float32
    top_k: np.ndarray  # int32, 0 = off
    top_p: np.ndarray  # float32
    min_p: np.ndarray  # float32
    seed: np.ndarray  # uint32
    step: np.ndarray  # int32: tokens generated so far (folds into the key)
    all_greedy: bool


def resolve_seed(params: SamplingParams) -> int:
    """The request's seed, drawn at random when it has none."""
    return params.seed if params.seed is not None else secrets.randbits(32)


def pack_sampling(
    params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int], num_slots: int,
    slots: Sequence[int] | np.ndarray | None = None,
) -> SamplingArrays:
    """Pack the parameters of `len(params)` sequences into arrays of length `num_slots`.

    Args:
      params, seeds, steps: one entry per sequence.
      num_slots: the step's sequence bucket S.
      slots: each sequence's slot in the step (`StepBatch.seq_index`); default 0..n-1.
        Padding slots are greedy.
    """
    n = len(params)
    index = np.arange(n) if slots is None else np.asarray(slots, np.int64)

    def put(values: Sequence[float], fill: float, dtype: type) -> np.ndarray:
        out = np.full(num_slots, fill, dtype)
        out[index] = np.asarray(values, dtype) if n else out[index]
        return out

    temps = put([p.temperature for p in params], 0.0, np.float32)
    return SamplingArrays(
        temperature=temps,
        top_k=put([max(p.top_k, 0) for p in params], 0, np.int32),
        top_p=put([p.top_p for p in params], 1.0, np.float32),
        min_p=put([p.min_p for p in params], 0.0, np.float32),
        seed=put([s % 2**32 for s in seeds], 0, np.uint32),
        step=put(list(steps), 0, np.int32),
        all_greedy=bool(np.all(temps == 0)),
    )
