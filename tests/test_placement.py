"""Placement planning (pure): layer ranges, expert groups, GPU shares, node-pool resources."""

from __future__ import annotations

import pytest

from expertmesh.orchestrator.placement import demand, plan_cluster, shortfall
from expertmesh.model.config import ModelConfig

MIXTRAL = ModelConfig()  # the defaults are Mixtral 8x7B: 32 layers, 8 experts


def test_two_shards_four_groups_cover_everything_once():
    plan = plan_cluster(MIXTRAL, attention_shards=2, expert_groups=4)
    assert [s.layers for s in plan.shards] == [tuple(range(16)), tuple(range(16, 32))]
    assert [g.experts for g in plan.groups] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert all(c.num_gpus == 0 for c in (*plan.shards, *plan.groups))  # CPU asks for no GPU


def test_cuda_asks_for_gpu_shares_and_node_pools():
    plan = plan_cluster(MIXTRAL, 1, 8, device="cuda", gpus_per_group=0.5, attention_resource="attention",
                        expert_resource="expert")
    assert [g.experts for g in plan.groups] == [(e,) for e in range(8)]
    assert all(g.num_gpus == 0.5 and "expert" in g.resources for g in plan.groups)
    assert plan.shards[0].num_gpus == 1.0 and "attention" in plan.shards[0].resources


@pytest.mark.parametrize("kwargs, field", [
    (dict(attention_shards=33), "attention_shards"), (dict(expert_groups=0), "expert_groups"),
    (dict(device="tpu"), "device"), (dict(device="cuda", gpus_per_group=0), "gpus_per_group"),
])
def test_bad_plans_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        plan_cluster(MIXTRAL, **kwargs)


def test_demand_and_what_a_cluster_cannot_place():
    plan = plan_cluster(MIXTRAL, 2, 4, device="cuda", gpus_per_shard=0.5, expert_resource="expert")
    assert demand(plan) == {"GPU": 5.0, "expert": 0.004}
    assert shortfall(plan, {"GPU": 8.0, "CPU": 2.0, "expert": 1.0}) is None
    problem = shortfall(plan, {"GPU": 1.0, "CPU": 16.0})
    assert problem.startswith("Ray cannot place every component")
    assert "GPU 5 (the cluster has 1; set by --gpus-per-shard and --gpus-per-group" in problem
    assert "expert 0.004 (the cluster has 0; set by --attention-resource / --expert-resource" in problem
    assert shortfall(plan_cluster(MIXTRAL, 2, 4), {}) is None  # on CPU, by default, nothing is reserved
