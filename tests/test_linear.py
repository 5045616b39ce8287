"""The CPU linear kernel: exact results for every row count, from a bounded set of compiled shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expertmesh.model.linear import Linear, padded_rows


def test_row_counts_above_32_are_padded_by_at_most_an_eighth_to_88_sizes():
    sizes = {padded_rows(m) for m in range(1, 4097)}
    assert len(sizes) == 32 + 8 * 7  # 1..32, then 8 per power of two up to 4096
    for m in range(1, 4097):
        rows = padded_rows(m)
        assert rows == m if m <= 32 else m <= rows <= m * 1.125, (m, rows)


@pytest.mark.parametrize("m", [1, 7, 32, 33, 47, 100, 257, 1000])
def test_every_row_count_gives_the_plain_matmul(m):
    torch.manual_seed(m)
    weight, x = torch.randn(96, 64), torch.randn(m, 64)
    y = Linear(weight)(x)
    assert y.shape == (m, 96)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert Linear(weight)(x[:0]).shape == (0, 96)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96)], ids=["wide output", "narrow output"])
@pytest.mark.parametrize("m", [1, 2, 3])
def test_few_rows_on_one_or_two_threads_give_the_plain_matmul_in_either_weight_layout(shape, m, threads):
    torch.manual_seed(m)
    weight = torch.randn(*shape)
    linear = Linear(weight)
    if linear.packed is not None:  # the fp32 CPU path keeps the layout a matrix-vector product reads fastest
        assert linear.gemv.shape == (shape if shape[0] < shape[1] else shape[::-1])
    x = torch.randn(2 * m, shape[1])[::2]  # a strided view, as a slice of a step's rows can be
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y = linear(x)
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(y, F.linear(x, weight), rtol=1e-5, atol=1e-5)
