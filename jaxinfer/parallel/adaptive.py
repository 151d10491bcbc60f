"""Heterogeneity-adaptive sequence parallelism (the FlexSP idea): each prefill step, split a
long prompt over a ring of devices just wide enough for it, keep short prompts whole on one
device, and balance the predicted step time. Host side: numpy and the standard library only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from jaxinfer.errors import CapacityError, InputError

# A group is (first device, number of devices): a contiguous range of the `sequence` axis.
Group = tuple[int, int]


# ------------------------------------------------------------------ cost model
@dataclasses.dataclass(frozen=True)
class SPCostModel:
    """Predicted seconds and bytes of prefilling one sequence over a ring of g devices.

    Figures are per layer and multiplied by `num_layers`: the layers are identical, so the sum
    of per-layer maxima (compute against communication) is the maximum of the sums.
    """

    linear_flops_per_token: float  # projections and MLP of one token, one layer
    attention_flops_per_pair: float  # one (query, key) pair, one layer: QK^T and PV
    kv_bytes_per_token: float  # K and V of one token, one layer
    activation_bytes_per_token: float  # working set of one token while one layer runs
    num_layers: int
    device_flops: float  # sustained FLOP/s of one device
    link_bytes_per_s: float  # one ring hop, one direction
    device_memory_bytes: float  # per device, for KV and activations (weights excluded)
    ring_step_latency_s: float = 0.0  # fixed cost of one ring hop in one layer

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not math.isfinite(value) or value < 0:
                raise InputError(f"SPCostModel.{field.name} must be finite and >= 0, got {value}")
        for name in ("num_layers", "device_flops", "link_bytes_per_s", "device_memory_bytes"):
            if getattr(self, name) <= 0:
                raise InputError(f"SPCostModel.{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def from_model_dims(
        cls, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
        head_dim: int, *, device_flops: float, link_bytes_per_s: float,
        device_memory_bytes: float, ring_step_latency_s: float = 0.0, dtype_bytes: float = 2,
    ) -> SPCostModel:
        """Cost model of a gated-MLP decoder (D hidden, F intermediate, L layers, H query
        heads, K KV heads, E head dim) on the given hardware figures."""
        d, f, h, k, e = hidden, intermediate, heads, kv_heads, head_dim
        # q, k, v and o projections, then gate, up and down: 2 FLOPs per multiply-add.
        linear = 2 * d * (h + 2 * k) * e + 2 * h * e * d + 2 * 3 * d * f
        # Residual and normed input, q/k/v, attention output, gate and up.
        activation = dtype_bytes * (2 * d + (2 * h + 2 * k) * e + 2 * f)
        return cls(
            linear_flops_per_token=linear, attention_flops_per_pair=4 * h * e,
            kv_bytes_per_token=2 * k * e * dtype_bytes, activation_bytes_per_token=activation,
            num_layers=layers, device_flops=device_flops, link_bytes_per_s=link_bytes_per_s,
            device_memory_bytes=device_memory_bytes, ring_step_latency_s=ring_step_latency_s)

    @classmethod
    def from_config(cls, config: Any, **hardware: float) -> SPCostModel:
        """From anything shaped like `jaxinfer.ModelConfig` (read by attribute name)."""
        return cls.from_model_dims(
            config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads,
            config.num_kv_heads, config.head_dim, **hardware)

    def memory_bytes(self, tokens: float) -> float:
        """Bytes one device holds for `tokens` prefilled tokens: all layers' KV, activations."""
        return tokens * (self.kv_bytes_per_token * self.num_layers
                         + self.activation_bytes_per_token)

    def ring_buffer_bytes(self, length: int, group_size: int) -> float:
        """Send and receive buffers of one layer's K/V block while the ring turns."""
        if group_size == 1:
            return 0.0
        return 2 * self.kv_bytes_per_token * math.ceil(length / group_size)

    def fits(self, length: int, group_size: int) -> bool:
        """Whether one device of the group has room for its share of the sequence alone."""
        share = self.memory_bytes(math.ceil(length / group_size))
        return share + self.ring_buffer_bytes(length, group_size) <= self.device_memory_bytes

    def sequence_time(self, length: int, group_size: int) -> float:
        """Seconds each device of a group of `group_size` spends on the sequence."""
        g = group_size
        linear = length / g * self.linear_flops_per_token / self.device_flops
        # Causal attention scores length * (length + 1) / 2 pairs.
        attention = length * (length + 1) / 2 * self.attention_flops_per_pair / self.device_flops
        if g > 1:
            # Zigzag ring attention: g steps of equal causal work; every step after the first
            # waits for the next K/V block, whose transfer overlaps the current block's work.
            block = attention / (g * g)
            transfer = (self.kv_bytes_per_token * length / g / self.link_bytes_per_s
                        + self.ring_step_latency_s)
            attention = block + (g - 1) * max(block, transfer)
        return (linear + attention) * self.num_layers


# ------------------------------------------------------------------ plans
class SequencePlacement(NamedTuple):
    """Where one sequence runs: whole on one device, or split over a ring of devices."""

    sequence: int  # position in the planned batch
    length: int
    first_device: int
    num_devices: int

    @property
    def devices(self) -> range:
        return range(self.first_device, self.first_device + self.num_devices)

    @property
    def is_split(self) -> bool:
        return self.num_devices > 1


class Imbalance(NamedTuple):
    """Max over mean of the per-device figures (1.0 is perfect balance)."""

    tokens: float
    time: float


def _max_over_mean(values: np.ndarray) -> float:
    mean = float(values.mean()) if values.size else 0.0
    return float(values.max()) / mean if mean > 0 else 1.0


@dataclasses.dataclass(frozen=True)
class SPPlan:
    """One prefill step's placement and its predicted per-device tokens, seconds and bytes."""

    strategy: str
    placements: tuple[SequencePlacement, ...]  # in batch order
    device_token_counts: tuple[int, ...]
    device_seconds: tuple[float, ...]
    device_memory: tuple[float, ...]
    memory_capacity: float

    @property
    def num_devices(self) -> int:
        return len(self.device_token_counts)

    def device_tokens(self) -> np.ndarray:
        """Tokens each device prefills, int64 [num_devices]."""
        return np.asarray(self.device_token_counts, np.int64)

    def device_times(self) -> np.ndarray:
        """Predicted seconds of each device, float64 [num_devices]."""
        return np.asarray(self.device_seconds, np.float64)

    def step_time(self) -> float:
        """Predicted step seconds: the slowest device (every ring waits for its members)."""
        return max(self.device_seconds, default=0.0)

    def imbalance(self) -> Imbalance:
        return Imbalance(_max_over_mean(self.device_tokens()), _max_over_mean(self.device_times()))

    def within_capacity(self) -> bool:
        return max(self.device_memory, default=0.0) <= self.memory_capacity

    def split_indices(self) -> tuple[int, ...]:
        """Batch positions of the sequences split over more than one device."""
        return tuple(p.sequence for p in self.placements if p.is_split)

    def summary(self) -> dict[str, Any]:
        """Plain figures for logs and benchmark lines."""
        imbalance = self.imbalance()
        return {"strategy": self.strategy, "step_time_s": self.step_time(),
                "token_imbalance": imbalance.tokens, "time_imbalance": imbalance.time,
                "num_split": len(self.split_indices()),
                "within_capacity": self.within_capacity()}


def group_sizes(num_devices: int) -> tuple[int, ...]:
    """Ring sizes the planner uses: powers of two below `num_devices`, and `num_devices`."""
    sizes = [1 << i for i in range(num_devices.bit_length()) if 1 << i < num_devices]
    return (*sizes, num_devices)


def _group_starts(num_devices: int, size: int) -> range:
    # Aligned ranges are nested or disjoint, so running the rings of each layer widest first
    # lets every member of a ring arrive having done the same earlier rings: no device waits
    # inside a layer, and the step time is the largest per-device sum.
    return range(0, num_devices - size + 1, size)


def _validate(lengths: Sequence[int], num_devices: int) -> tuple[int, ...]:
    if num_devices < 1:
        raise InputError(f"num_devices must be >= 1, got {num_devices}")
    out = tuple(int(n) for n in lengths)
    if any(n < 1 for n in out):
        raise InputError(f"sequence lengths must be >= 1, got {min(out)}")
    return out


def build_plan(lengths: Sequence[int], groups: Sequence[Group], num_devices: int,
               cost: SPCostModel, strategy: str = "custom") -> SPPlan:
    """Evaluate a placement: `groups[i]` = (first device, number of devices) of sequence i."""
    lengths = _validate(lengths, num_devices)
    if len(groups) != len(lengths):
        raise InputError(f"{len(groups)} groups for {len(lengths)} sequences")
    tokens = np.zeros(num_devices, np.int64)
    seconds = np.zeros(num_devices)
    memory = np.zeros(num_devices)
    ring_buffer = np.zeros(num_devices)
    placements = []
    for index, (length, (first, size)) in enumerate(zip(lengths, groups, strict=True)):
        if size < 1 or first < 0 or first + size > num_devices:
            raise InputError(f"group ({first}, {size}) of sequence {index} is outside "
                             f"devices 0..{num_devices - 1}")
        members = slice(first, first + size)
        share = np.full(size, length // size, np.int64)
        # The remainder goes to the members holding the fewest tokens so far.
        share[np.argsort(tokens[members], kind="stable")[: length % size]] += 1
        tokens[members] += share
        seconds[members] += cost.sequence_time(length, size)
        memory[members] += [cost.memory_bytes(int(s)) for s in share]
        ring_buffer[members] = np.maximum(ring_buffer[members],
                                          cost.ring_buffer_bytes(length, size))
        placements.append(SequencePlacement(index, length, first, size))
    return SPPlan(strategy, tuple(placements), tuple(int(t) for t in tokens),
                  tuple(float(s) for s in seconds), tuple(float(m) for m in memory + ring_buffer),
                  cost.device_memory_bytes)


def plan_static(lengths: Sequence[int], num_devices: int, cost: SPCostModel) -> SPPlan:
    """Classic static sequence parallelism: every sequence split over all devices."""
    lengths = _validate(lengths, num_devices)
    return build_plan(lengths, [(0, num_devices)] * len(lengths), num_devices, cost, "static")


def plan_no_split(lengths: Sequence[int], num_devices: int, cost: SPCostModel) -> SPPlan:
    """Every sequence whole on one device, longest first onto the least loaded device with
    room; a sequence no device has room for still goes to the least loaded one, and the plan
    reports `within_capacity() == False`."""
    lengths = _validate(lengths, num_devices)
    state = _Loads(num_devices, cost)
    groups: list[Group] = [(0, 1)] * len(lengths)
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        seconds = cost.sequence_time(lengths[i], 1)
        room = state.room(lengths[i], 1, range(num_devices))
        candidates = np.flatnonzero(room) if room.any() else np.arange(num_devices)
        device = int(candidates[np.argmin(state.seconds[candidates])])
        state.add(lengths[i], (device, 1), seconds)
        groups[i] = (device, 1)
    return build_plan(lengths, groups, num_devices, cost, "no_split")


# ------------------------------------------------------------------ adaptive planner
class _Loads:
    """Running per-device seconds and bytes while a plan is built (each share's memory
    rounded up, so a placement that has room here has room in the exact plan)."""

    def __init__(self, num_devices: int, cost: SPCostModel) -> None:
        self.cost = cost
        self.seconds = np.zeros(num_devices)
        self.memory = np.zeros(num_devices)
        self.ring_buffer = np.zeros(num_devices)

    def room(self, length: int, size: int, starts: range) -> np.ndarray:
        """bool [len(starts)]: whether every member of each group has room for a share."""
        count = len(starts)
        share = self.cost.memory_bytes(math.ceil(length / size))
        ring_buffer = self.cost.ring_buffer_bytes(length, size)
        span = slice(starts[0], starts[0] + count * size) if count else slice(0, 0)
        need = (self.memory[span] + share
                + np.maximum(self.ring_buffer[span], ring_buffer)).reshape(count, size)
        return need.max(axis=1) <= self.cost.device_memory_bytes

    def add(self, length: int, group: Group, seconds: float) -> None:
        members = slice(group[0], group[0] + group[1])
        self.seconds[members] += seconds
        self.memory[members] += self.cost.memory_bytes(math.ceil(length / group[1]))
        self.ring_buffer[members] = np.maximum(self.ring_buffer[members],
                                               self.cost.ring_buffer_bytes(length, group[1]))


class _Batch:
    """The batch as the planner sees it: seconds[i, k] of sequence i on a ring of sizes[k]."""

    def __init__(self, lengths: tuple[int, ...], num_devices: int, cost: SPCostModel) -> None:
        self.lengths, self.num_devices, self.cost = lengths, num_devices, cost
        self.sizes = group_sizes(num_devices)
        self.seconds = np.array([[cost.sequence_time(n, g) for g in self.sizes]
                                 for n in lengths]).reshape(len(lengths), len(self.sizes))
        self.fits = np.array([[cost.fits(n, g) for g in self.sizes]
                              for n in lengths], bool).reshape(self.seconds.shape)
        too_long = np.flatnonzero(~self.fits.any(axis=1))
        if too_long.size:
            i = int(too_long[0])
            raise CapacityError(
                f"sequence {i} ({lengths[i]} tokens) does not fit even split over all "
                f"{num_devices} devices of {cost.device_memory_bytes:.3g} bytes; prefill it "
                "in chunks or add devices")
        self.best_seconds = np.where(self.fits, self.seconds, np.inf).min(axis=1)

    def lower_bound(self) -> float:
        """No plan beats the least total device-seconds spread evenly, nor the longest
        sequence on its fastest ring."""
        work = np.where(self.fits, self.seconds * np.array(self.sizes), np.inf).min(axis=1)
        return float(max(work.sum() / self.num_devices, self.best_seconds.max(initial=0.0)))

    def place(self, target: float) -> list[Group] | None:
        """Longest first, each onto the narrowest ring whose busiest member still finishes
        within `target` seconds (ring overhead buys nothing once the step meets the target),
        on the least loaded range of that size; where no ring meets it, onto the ring that
        finishes first. None: some sequence finds no device range with room."""
        state = _Loads(self.num_devices, self.cost)
        groups: list[Group] = [(0, 1)] * len(self.lengths)
        for i in np.argsort(-np.asarray(self.lengths), kind="stable"):
            # (finish, group, size index): sizes before the one that meets the target all
            # finish later than it, so the earliest finish so far is the one to take.
            chosen: tuple[float, Group, int] | None = None
            for k, size in enumerate(self.sizes):
                if not self.fits[i, k]:
                    continue
                starts = _group_starts(self.num_devices, size)
                room = state.room(self.lengths[i], size, starts)
                if not room.any():
                    continue
                busy = state.seconds[: len(starts) * size].reshape(len(starts), size)
                finish = np.where(room, busy.max(axis=1), np.inf) + self.seconds[i, k]
                best = int(np.argmin(finish))
                if chosen is None or finish[best] < chosen[0]:
                    chosen = (float(finish[best]), (starts[best], size), k)
                if finish[best] <= target:
                    break
            if chosen is None:
                return None
            _, groups[i], k = chosen
            state.add(self.lengths[i], groups[i], self.seconds[i, k])
        return groups

    def device_seconds(self, groups: list[Group]) -> np.ndarray:
        seconds = np.zeros(self.num_devices)
        size_index = {g: k for k, g in enumerate(self.sizes)}
        for i, (start, size) in enumerate(groups):
            seconds[start: start + size] += self.seconds[i, size_index[size]]
        return seconds


def lower_bound_step_time(lengths: Sequence[int], num_devices: int, cost: SPCostModel) -> float:
    """A step time no placement over the planner's ring sizes can beat."""
    return _Batch(_validate(lengths, num_devices), num_devices, cost).lower_bound()


def plan_adaptive(lengths: Sequence[int], num_devices: int, cost: SPCostModel,
                  tolerance: float = 0.01, max_targets: int = 16) -> SPPlan:
    """Split each sequence over a ring of 1, 2, 4, ... or `num_devices` devices and place the
    rings to minimize the predicted step time.

    Sweeps a target step time from a lower bound up to the better baseline: at each target,
    longest first, a sequence goes to the narrowest ring (that its memory allows) whose
    busiest member still finishes within the target, on the least loaded aligned device
    range, or to the ring that finishes first where none does. The placements of all targets
    and the static and no-split plans that fit in memory are the candidates. (A local search
    moving one sequence at a time found nothing better on the benchmark batches: dropped.)

    Plans predicted within `tolerance` (relative) of the fastest count as equal, and the one
    with the least total device time wins: the cost model is not that exact, and rings of
    small blocks run below the modelled throughput, so a prompt is not split for a sliver.
    The plan is never predicted slower than either baseline that fits in memory.

    Raises:
        CapacityError: a sequence does not fit even split over all devices, or the batch
            does not fit the devices' memory together.
    """
    lengths = _validate(lengths, num_devices)
    if not lengths:
        return build_plan(lengths, [], num_devices, cost, "adaptive")
    if tolerance < 0:
        raise InputError(f"tolerance must be >= 0, got {tolerance}")
    batch = _Batch(lengths, num_devices, cost)
    baselines = (plan_static(lengths, num_devices, cost),
                 plan_no_split(lengths, num_devices, cost))
    lower_bound = batch.lower_bound()
    ceiling = min((p.step_time() for p in baselines if p.within_capacity()), default=math.inf)
    # Up to the better baseline, and at least 10% above the bound, so that plans with fewer
    # rings can turn up where a baseline sits near the bound.
    highest = max(ceiling if ceiling < math.inf else 2 * lower_bound, 1.1 * lower_bound)
    candidates = [[(p.first_device, p.num_devices) for p in baseline.placements]
                  for baseline in baselines if baseline.within_capacity()]
    targets = (np.geomspace(lower_bound, highest, max_targets)
               if lower_bound > 0 else [0.0])
    for target in targets:
        groups = batch.place(float(target))
        if groups is not None:
            candidates.append(groups)
    if not candidates:
        raise CapacityError(
            f"the batch ({sum(lengths)} tokens) does not fit {num_devices} devices of "
            f"{cost.device_memory_bytes:.3g} bytes together; plan fewer sequences per step")
    seconds = [batch.device_seconds(groups) for groups in candidates]
    # Baselines that fit are candidates themselves, so some step time is within the ceiling.
    limit = min(min(s.max() for s in seconds) * (1 + tolerance), ceiling * (1 + 1e-12))
    best = min((i for i, s in enumerate(seconds) if s.max() <= limit),
               key=lambda i: (seconds[i].sum(), seconds[i].max()))
    return build_plan(lengths, candidates[best], num_devices, cost, "adaptive")
