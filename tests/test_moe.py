"""Routing plans: the host-side plan for a decode step's few rows is the tensor plan, row for row."""

from __future__ import annotations

import pytest
import torch

from expertmesh.model.moe import HOST_PLAN_ROWS, plan_dispatch, plan_dispatch_small, route


@pytest.mark.parametrize("group_of_expert", [[0, 0, 1, 1, 2, 2, 3, 3], [0] * 8, [1, 0, 1, 0, 2, 2, 0, 1],
                                             list(range(8))], ids=["pairs", "one group", "mixed", "one each"])
def test_the_host_plan_for_a_few_rows_is_the_tensor_plan(group_of_expert):
    torch.manual_seed(0)
    num_groups = max(group_of_expert) + 1
    gate = torch.randn(8, 16)
    for tokens in range(1, HOST_PLAN_ROWS // 2 + 1):
        x = torch.randn(tokens, 16)
        x[-1] = x[0]  # two tokens with the same experts: ties in the sort keep token order
        weights, experts = route(x, gate, 2)
        want = plan_dispatch(weights, experts, torch.tensor(group_of_expert), num_groups)
        got = plan_dispatch_small(weights, experts, group_of_expert, num_groups)
        assert len(got.rows) == num_groups
        for g in range(num_groups):
            assert got.rows[g].tolist() == want.rows[g].tolist(), (tokens, g)
        assert torch.equal(got.tokens, want.tokens) and torch.equal(got.experts, want.experts)
        assert torch.equal(got.weights, want.weights)
