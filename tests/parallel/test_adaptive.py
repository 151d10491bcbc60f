"""Adaptive sequence parallelism planner: cost model by hand, plan validity, memory limits,
never slower than static or no-split sequence parallelism, imbalance figures by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from jaxinfer.errors import CapacityError, InputError
from jaxinfer.parallel.adaptive import (
    SPCostModel,
    SPPlan,
    build_plan,
    group_sizes,
    lower_bound_step_time,
    plan_adaptive,
    plan_no_split,
    plan_static,
)

# Llama-3-8B on H100-like figures (bf16, NVLink, 60 GB left for KV and activations).
LLAMA_H100 = SPCostModel.from_model_dims(
    4096, 14336, 32, 32, 8, 128, device_flops=700e12, link_bytes_per_s=450e9,
    device_memory_bytes=60e9, ring_step_latency_s=10e-6)

# Numbers small enough to check by hand: one FLOP/s, one layer, one byte/s links.
TOY = SPCostModel(linear_flops_per_token=1, attention_flops_per_pair=2, kv_bytes_per_token=1,
                  activation_bytes_per_token=0, num_layers=1, device_flops=1,
                  link_bytes_per_s=1, device_memory_bytes=1e12)

# 8 bytes per token; a ring adds 2 bytes per token of its share: one device holds 1000 tokens
# whole, 1600 split over 2, 3200 over 4, 6400 over 8.
TIGHT = SPCostModel(linear_flops_per_token=1e6, attention_flops_per_pair=1e3,
                    kv_bytes_per_token=1, activation_bytes_per_token=0, num_layers=8,
                    device_flops=1e12, link_bytes_per_s=1e9, device_memory_bytes=8000,
                    ring_step_latency_s=1e-6)


def _check_valid(plan: SPPlan, lengths: list[int], num_devices: int, cost: SPCostModel) -> None:
    assert [p.sequence for p in plan.placements] == list(range(len(lengths)))
    assert [p.length for p in plan.placements] == lengths
    assert plan.num_devices == num_devices
    tokens = np.zeros(num_devices, np.int64)
    for p in plan.placements:
        assert p.first_device >= 0 and p.first_device + p.num_devices <= num_devices
        assert p.num_devices in group_sizes(num_devices)
        assert p.first_device % p.num_devices == 0 or p.num_devices == num_devices
        tokens[list(p.devices)] += p.length // p.num_devices  # remainders: at most +1 each
        if cost.memory_bytes(p.length) > cost.device_memory_bytes:
            assert p.is_split
    assert plan.device_tokens().sum() == sum(lengths)
    assert (plan.device_tokens() >= tokens).all()
    assert plan.within_capacity()


# ------------------------------------------------------------------ cost model
def test_from_model_dims_counts_llama_3_8b() -> None:
    d, f, h, k, e = 4096, 14336, 32, 8, 128
    assert LLAMA_H100.linear_flops_per_token == 2 * d * (h + 2 * k) * e + 2 * h * e * d + 6 * d * f
    assert LLAMA_H100.attention_flops_per_pair == 4 * h * e
    assert LLAMA_H100.kv_bytes_per_token == 2 * k * e * 2
    config = SimpleNamespace(hidden_size=d, intermediate_size=f, num_layers=32, num_heads=h,
                             num_kv_heads=k, head_dim=e)
    hardware = dict(device_flops=700e12, link_bytes_per_s=450e9, device_memory_bytes=60e9,
                    ring_step_latency_s=10e-6)
    assert SPCostModel.from_config(config, **hardware) == LLAMA_H100


def test_sequence_time_by_hand() -> None:
    # 4 tokens: linear 4 FLOPs, causal attention 4 * 5 / 2 pairs * 2 = 20 FLOPs.
    assert TOY.sequence_time(4, 1) == 24
    # Ring of 2: 2 linear; 2 steps of 20 / 4 = 5 each, the K/V transfer (2 tokens, 2 s) hidden.
    assert TOY.sequence_time(4, 2) == 2 + 5 + 5
    # Ring of 4: 1 linear; 4 steps of 1.25, transfers of 1 s hidden.
    assert TOY.sequence_time(4, 4) == 1 + 4 * 1.25
    # A 1/4-speed link: each of the later steps waits 8 s for its 2-token block.
    slow = SPCostModel(**{**vars(TOY), "link_bytes_per_s": 0.25, "ring_step_latency_s": 1})
    assert slow.sequence_time(4, 2) == 2 + 5 + (8 + 1)


def test_memory_and_fit() -> None:
    assert TIGHT.memory_bytes(1000) == 8000 and TIGHT.fits(1000, 1)
    assert not TIGHT.fits(1001, 1)
    assert TIGHT.ring_buffer_bytes(1600, 2) == 1600 and TIGHT.fits(1600, 2)
    assert not TIGHT.fits(1602, 2) and TIGHT.fits(6400, 8) and not TIGHT.fits(6408, 8)


def test_invalid_inputs_raise() -> None:
    with pytest.raises(InputError):
        SPCostModel(**{**vars(TOY), "device_flops": 0})
    with pytest.raises(InputError):
        SPCostModel(**{**vars(TOY), "link_bytes_per_s": math.nan})
    with pytest.raises(InputError):
        plan_adaptive([10, 0], 2, TOY)
    with pytest.raises(InputError):
        plan_static([10], 0, TOY)
    with pytest.raises(InputError):
        build_plan([10, 20], [(0, 1), (1, 2)], 2, TOY)


def test_group_sizes() -> None:
    assert group_sizes(1) == (1,)
    assert group_sizes(8) == (1, 2, 4, 8)
    assert group_sizes(6) == (1, 2, 4, 6)


# ------------------------------------------------------------------ imbalance by hand
def test_imbalance_of_a_hand_checked_plan() -> None:
    plan = build_plan([3, 1, 1], [(0, 1), (1, 1), (1, 1)], 2, TOY)
    assert plan.device_tokens().tolist() == [3, 2]
    # Device 0: 3 + 3 * 4 / 2 * 2 = 15 s; device 1: twice 1 + 2 = 3 s.
    assert plan.device_times().tolist() == [15, 6]
    assert plan.step_time() == 15
    assert plan.imbalance().tokens == pytest.approx(3 / 2.5)
    assert plan.imbalance().time == pytest.approx(15 / 10.5)
    assert plan.split_indices() == ()
    # Longest first onto the least loaded device gives the same plan.
    assert plan_no_split([3, 1, 1], 2, TOY).device_tokens().tolist() == [3, 2]


def test_static_plan_splits_everything_evenly() -> None:
    plan = plan_static([5, 3], 2, TOY)
    # 5 -> [3, 2]; the remainder of 3 goes to the device holding fewer tokens.
    assert plan.device_tokens().tolist() == [4, 4]
    assert plan.imbalance() == (1.0, 1.0)
    assert plan.split_indices() == (0, 1)
    assert plan.step_time() == TOY.sequence_time(5, 2) + TOY.sequence_time(3, 2)


def test_empty_batch_and_one_device() -> None:
    empty = plan_adaptive([], 4, TOY)
    assert empty.placements == () and empty.step_time() == 0 and empty.imbalance() == (1, 1)
    lengths = [30, 5, 12]
    one = [plan(lengths, 1, TOY) for plan in (plan_adaptive, plan_static, plan_no_split)]
    assert {p.step_time() for p in one} == {sum(TOY.sequence_time(n, 1) for n in lengths)}


# ------------------------------------------------------------------ planner behaviour
def test_long_prompt_is_split_and_short_ones_stay_whole() -> None:
    rng = np.random.default_rng(0)
    lengths = [32768, *rng.integers(256, 1025, 40).tolist()]
    adaptive = plan_adaptive(lengths, 8, LLAMA_H100)
    _check_valid(adaptive, lengths, 8, LLAMA_H100)
    assert adaptive.split_indices() == (0,)
    assert adaptive.placements[0].num_devices == 8
    assert adaptive.step_time() < 0.9 * plan_static(lengths, 8, LLAMA_H100).step_time()
    assert adaptive.step_time() < 0.5 * plan_no_split(lengths, 8, LLAMA_H100).step_time()
    assert adaptive.imbalance().time < 1.05


def test_mixed_batch_beats_both_baselines() -> None:
    rng = np.random.default_rng(1)
    lengths = np.exp(rng.uniform(math.log(128), math.log(32768), 32)).astype(int).tolist()
    adaptive = plan_adaptive(lengths, 8, LLAMA_H100)
    assert 0 < len(adaptive.split_indices()) < len(lengths)
    assert adaptive.step_time() < 0.97 * plan_static(lengths, 8, LLAMA_H100).step_time()
    assert adaptive.step_time() < 0.9 * plan_no_split(lengths, 8, LLAMA_H100).step_time()
    assert adaptive.step_time() < 1.02 * lower_bound_step_time(lengths, 8, LLAMA_H100)


def test_sequences_over_one_device_are_split() -> None:
    lengths = [3000, 100, 1200, 400]
    plan = plan_adaptive(lengths, 8, TIGHT)
    _check_valid(plan, lengths, 8, TIGHT)
    assert plan.placements[0].num_devices >= 4  # a device holds 1000 tokens whole
    assert plan.placements[2].num_devices >= 2
    assert plan_adaptive([5000], 8, TIGHT).placements[0].num_devices == 8
    assert not plan_no_split(lengths, 8, TIGHT).within_capacity()


def test_what_fits_nowhere_raises_capacity_error() -> None:
    with pytest.raises(CapacityError, match="does not fit even split"):
        plan_adaptive([7000], 8, TIGHT)
    with pytest.raises(CapacityError, match="together"):
        plan_adaptive([900] * 20, 2, TIGHT)


@pytest.mark.parametrize(("num_sequences", "length"), [(16, 4096), (8, 2048), (24, 1000)])
def test_uniform_lengths_balance_like_static(num_sequences: int, length: int) -> None:
    lengths = [length] * num_sequences
    adaptive = plan_adaptive(lengths, 8, LLAMA_H100)
    static = plan_static(lengths, 8, LLAMA_H100)
    assert static.imbalance() == (1.0, 1.0)
    assert adaptive.imbalance().tokens == pytest.approx(static.imbalance().tokens)
    assert adaptive.imbalance().time == pytest.approx(1.0)
    assert adaptive.step_time() < static.step_time()  # the same balance without rings


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 40000), min_size=1, max_size=20),
       num_devices=st.sampled_from([1, 2, 3, 4, 6, 8]))
def test_adaptive_is_never_slower_than_the_baselines(lengths: list[int],
                                                     num_devices: int) -> None:
    adaptive = plan_adaptive(lengths, num_devices, LLAMA_H100)
    _check_valid(adaptive, lengths, num_devices, LLAMA_H100)
    for baseline in (plan_static(lengths, num_devices, LLAMA_H100),
                     plan_no_split(lengths, num_devices, LLAMA_H100)):
        assert baseline.device_tokens().sum() == sum(lengths)
        assert adaptive.step_time() <= baseline.step_time() * (1 + 1e-9)
    bound = lower_bound_step_time(lengths, num_devices, LLAMA_H100)
    assert bound <= adaptive.step_time() * (1 + 1e-9)
    # The tolerance trades at most its share of step time for fewer, narrower rings.
    exact = plan_adaptive(lengths, num_devices, LLAMA_H100, tolerance=0)
    assert exact.step_time() <= adaptive.step_time() <= exact.step_time() * 1.01


@settings(max_examples=30, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=3))
def test_plans_respect_memory(lengths: list[int]) -> None:
    assume(sum(lengths) <= 6000)  # 8 devices hold 8 * 1000 tokens less their ring buffers
    plan = plan_adaptive(lengths, 8, TIGHT)
    _check_valid(plan, lengths, 8, TIGHT)
    for baseline in (plan_static(lengths, 8, TIGHT), plan_no_split(lengths, 8, TIGHT)):
        if baseline.within_capacity():
            assert plan.step_time() <= baseline.step_time() * (1 + 1e-9)
