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
      presence_penalty: subtracted from the logit of every token already generated
        (OpenAI semantics, in [-2, 2]).
      frequency_penalty: subtracted once per earlier occurrence in the output ([-2, 2]).
      repetition_penalty: divides positive (multiplies negative) logits of tokens in the
        prompt or output (transformers semantics; 1 is off, must be > 0).
      logprobs: return the sampled token's log-probability and this many alternatives
        (0-20; None: none). Log-probabilities are of the model's raw distribution.
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
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        # numpy scalars (np.int64(5), np.float32(0.5)) are numbers too: store plain Python.
        for name, kind in (("temperature", float), ("top_p", float), ("min_p", float),
                           ("presence_penalty", float), ("frequency_penalty", float),
                           ("repetition_penalty", float), ("top_k", int), ("max_tokens", int),
                           ("seed", int), ("logprobs", int)):
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
        for name in ("presence_penalty", "frequency_penalty"):
            if not _finite(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                raise bad(name, "must be in [-2, 2]")
        if not _finite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise bad("repetition_penalty", "must be > 0 (1 disables it)")
        if self.logprobs is not None and (not isinstance(self.logprobs, int)
                                          or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}] or None")

    @property
    def uses_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or self.repetition_penalty != 1.0)

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
    presence: np.ndarray | None = None  # float32 [S]; None: no penalties in this step
    frequency: np.ndarray | None = None
    repetition: np.ndarray | None = None
    penalty_ids: np.ndarray | None = None  # int32 [S, M] distinct seen ids (padding: vocab)
    output_counts: np.ndarray | None = None  # int32 [S, M] occurrences in the output
    in_prompt: np.ndarray | None = None  # bool [S, M] id occurs in the prompt
    num_logprobs: int = 0  # static: alternatives to return (0: the sampled token's only)
    want_logprobs: bool = False


def resolve_seed(params: SamplingParams) -> int:
    """The request's seed, drawn at random when it has none."""
    return params.seed if params.seed is not None else secrets.randbits(32)


def pack_sampling(
    params: Sequence[SamplingParams], seeds: Sequence[int], steps: Sequence[int], num_slots: int,
    slots: Sequence[int] | np.ndarray | None = None,
    histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
    vocab_size: int | None = None,
) -> SamplingArrays:
    """Pack the parameters of `len(params)` sequences into arrays of length `num_slots`.

    Args:
      params, seeds, steps: one entry per sequence.
      num_slots: the step's sequence bucket S.
      slots: each sequence's slot in the step (`StepBatch.seq_index`); default 0..n-1.
        Padding slots are greedy.
      histories: each sequence's (prompt ids, output ids so far), needed when any sequence
        uses presence/frequency/repetition penalties.
      vocab_size: the model's vocabulary (padding id for penalty tables).
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
        **_pack_logprobs(params),
        **_pack_penalties(params, histories, num_slots, index, vocab_size),
    )


MAX_LOGPROBS = 20


def _pack_logprobs(params: Sequence[SamplingParams]) -> dict:
    wanted = [p.logprobs for p in params if p.logprobs is not None]
    if not wanted:
        return {}
    k = max(wanted)
    return {"want_logprobs": True,
            "num_logprobs": 0 if k == 0 else min(1 << (k - 1).bit_length(), MAX_LOGPROBS)}


def _pack_penalties(
    params: Sequence[SamplingParams],
    histories: Sequence[tuple[Sequence[int], Sequence[int]]] | None,
    num_slots: int, index: np.ndarray, vocab_size: int | None,
) -> dict:
    """Distinct seen token ids with output counts, for the sequences that use penalties."""
    users = [i for i, p in enumerate(params) if p.uses_penalties]
    if not users:
        return {}
    if histories is None or vocab_size is None:
        raise ValueError("penalties need each sequence's (prompt, output) history and the vocab")
    seen: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for i in users:
        prompt, output = (np.asarray(h, np.int64) for h in histories[i])
        ids, counts = np.unique(output, return_counts=True)
        all_ids = np.union1d(ids, np.unique(prompt)) if params[i].repetition_penalty != 1 \
            else ids
        out_counts = np.zeros(len(all_ids), np.int32)
        out_counts[np.searchsorted(all_ids, ids)] = counts
        seen[i] = (all_ids, out_counts, np.isin(all_ids, prompt))
    width = max(1, max(len(v[0]) for v in seen.values()))
    M = 1 << (width - 1).bit_length()
    penalty_ids = np.full((num_slots, M), vocab_size, np.int32)
    output_counts = np.zeros((num_slots, M), np.int32)
    in_prompt = np.zeros((num_slots, M), bool)
    presence = np.zeros(num_slots, np.float32)
    frequency = np.zeros(num_slots, np.float32)
    repetition = np.ones(num_slots, np.float32)
    for i, (ids, counts, prompt_flags) in seen.items():
        slot, n = index[i], len(ids)
        penalty_ids[slot, :n], output_counts[slot, :n], in_prompt[slot, :n] = (
            ids, counts, prompt_flags)
        presence[slot] = params[i].presence_penalty
        frequency[slot] = params[i].frequency_penalty
        repetition[slot] = params[i].repetition_penalty
    return {"presence": presence, "frequency": frequency, "repetition": repetition,
            "penalty_ids": penalty_ids, "output_counts": output_counts, "in_prompt": in_prompt}
