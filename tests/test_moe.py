"""Routing plans (the host-side plan for a decode step's few rows is the tensor plan, row for row) and
the combine of the groups' outputs."""

from __future__ import annotations

import pytest
import torch

from expertmesh.model.moe import HOST_PLAN_ROWS, combine, plan_dispatch, plan_dispatch_small, returns, route


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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("group_of_expert", [[0, 0, 1, 1, 2, 2, 3, 3], [0] * 8, [1, 0, 1, 0, 2, 2, 0, 1],
                                             list(range(8))], ids=["pairs", "one group", "mixed", "one each"])
def test_combine_adds_each_token_s_contributions_group_by_group(group_of_expert, dtype):
    """One index_add_ over every group's rows gives, bit for bit, what adding the groups one after
    another gives: each row scaled in fp32, cast, and added in group order, then expert order."""
    torch.manual_seed(1)
    num_groups = max(group_of_expert) + 1
    gate = torch.randn(8, 32).to(dtype)
    for tokens in (1, 2, 5, 40):
        x = torch.randn(tokens, 32).to(dtype)
        weights, experts = route(x, gate, 2)
        plan = plan_dispatch(weights, experts, torch.tensor(group_of_expert), num_groups)
        outputs = [torch.randn(len(r), 32).to(dtype) if len(r) else None for r in plan.rows]
        want = torch.zeros_like(x)
        for rows, y in zip(plan.rows, outputs):
            if y is not None:
                for row, token in zip(rows.tolist(), plan.tokens[rows].tolist()):
                    want[token] += (y[rows.tolist().index(row)] * plan.weights[row]).to(dtype)
        assert torch.equal(combine(plan, outputs, x), want), tokens
        assert torch.equal(combine(plan, outputs, x, returns(plan)), want), tokens
