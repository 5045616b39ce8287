"""Routing plans (the host-side plan for a decode step's few rows is the tensor plan, row for row) and
the combine of the groups' outputs."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from expertmesh.model.linear import Linear
from expertmesh.model.moe import (HOST_PLAN_ROWS, HOST_RUN_ROWS, ExpertGroup, combine, plan_dispatch,
                                  plan_dispatch_small, returns, route)


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


@pytest.mark.parametrize("ids", [[5], [4, 4, 4], [4, 5, 5, 7, 7, 7], [4] * 30 + [5] * 20 + [7] * 30],
                         ids=["one row", "one run", "three runs", "more rows than HOST_RUN_ROWS"])
def test_an_expert_group_sends_each_run_of_rows_through_its_expert(ids):
    torch.manual_seed(2)
    d, i = 16, 24
    experts = (4, 5, 7)
    w13 = {3: [Linear(torch.randn(2 * i, d)) for _ in experts]}
    w2 = {3: [Linear(torch.randn(d, i)) for _ in experts]}
    group = ExpertGroup(experts, w13, w2)
    x = torch.randn(len(ids), d)
    want, begin = [], 0
    for expert, run in itertools.groupby(ids):
        n = len(list(run))
        gate, up = w13[3][experts.index(expert)](x[begin:begin + n]).chunk(2, dim=-1)
        want.append(w2[3][experts.index(expert)](F.silu(gate) * up))
        begin += n
    assert (len(ids) > HOST_RUN_ROWS) == (len(ids) == 80)
    assert torch.equal(group(3, x, torch.tensor(ids)), torch.cat(want))
    with pytest.raises(ValueError, match="expert 6 is not owned"):
        group(3, x, torch.tensor(ids[:-1] + [6]))
