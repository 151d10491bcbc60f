"""The native CPU small-batch matmul against numpy float64, for every row count it serves."""

from __future__ import annotations

import numpy as np
import pytest

from jaxinfer import cpu_kernels


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.available(), "the native CPU kernels failed to build (see the log)"


# Row counts cover every token-tile width (1-6), several tiles, and (200 at 576 inputs)
# more than one L2 token block.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 8, 13, 16, 32, 61, 64, 200])
@pytest.mark.parametrize("in_features", [64, 100, 576])  # multiples of the vector width, and not
def test_linear_matches_float64(rows, in_features):
    rng = np.random.default_rng(rows * 1000 + in_features)
    L, N = 3, 37
    w = rng.standard_normal((L, N, in_features)).astype(np.float32)
    x = rng.standard_normal((rows, in_features)).astype(np.float32)
    got = np.asarray(cpu_kernels.linear(x, w, 1))
    expected = x.astype(np.float64) @ w[1].astype(np.float64).T
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_layer_is_selected():
    w = np.stack([np.full((4, 16), i, np.float32) for i in range(3)])
    x = np.ones((2, 16), np.float32)
    for layer in range(3):
        np.testing.assert_array_equal(np.asarray(cpu_kernels.linear(x, w, layer)),
                                      np.full((2, 4), 16.0 * layer, np.float32))
