"""Placement planning (pure): layer ranges, expert groups, GPU shares, node-pool resources."""

from __future__ import annotations

import pytest

from expertmesh.orchestrator.placement import demand, plan_cluster, shortfall, unpacked
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


def test_a_gpu_share_above_one_is_whole_gpus():
    with pytest.raises(ValueError, match="^gpus_per_group above 1 must be a whole number"):
        plan_cluster(MIXTRAL, 1, 8, device="cuda", gpus_per_group=1.5)
    assert plan_cluster(MIXTRAL, 1, 2, device="cuda", gpus_per_group=2).groups[0].num_gpus == 2


def test_a_component_that_no_single_node_can_hold():
    # 2 GPUs per group: the cluster has 8 GPUs in all, but on nodes of one GPU each.
    plan = plan_cluster(MIXTRAL, 1, 2, device="cuda", gpus_per_shard=1, gpus_per_group=2)
    nodes = [{"GPU": 1.0, "CPU": 4.0}] * 8
    assert shortfall(plan, {"GPU": 8.0, "CPU": 32.0}) is None  # the totals alone would allow it
    problem = shortfall(plan, {"GPU": 8.0, "CPU": 32.0}, nodes)
    assert problem.startswith("Ray cannot place every component: no single node has what experts-0 (GPU 2), "
                              "experts-1 (GPU 2) asks for")
    assert "--gpus-per-shard and --gpus-per-group" in problem
    assert shortfall(plan, {"GPU": 8.0, "CPU": 32.0}, [{"GPU": 2.0}] * 4) is None


def test_a_node_pool_without_the_gpus_its_components_ask_for():
    # The attention pool's node has no GPU; the expert node has eight.
    plan = plan_cluster(MIXTRAL, 2, 2, device="cuda", gpus_per_shard=0.5, gpus_per_group=1,
                        attention_resource="attention", expert_resource="expert")
    nodes = [{"CPU": 2.0, "attention": 1.0}, {"CPU": 2.0, "GPU": 8.0, "expert": 1.0}]
    problem = shortfall(plan, {"CPU": 4.0, "GPU": 8.0, "attention": 1.0, "expert": 1.0}, nodes)
    assert "attention-0 (GPU 0.5, attention 0.001), attention-1 (GPU 0.5, attention 0.001)" in problem
    assert "--gpus-per-shard" in problem and "--attention-resource / --expert-resource" in problem
    assert unpacked(plan, nodes + [{"GPU": 1.0, "attention": 1.0}]) is None  # both halves on the new GPU


def test_fractional_shares_are_packed_inside_single_gpus():
    nodes = [{"GPU": 2.0, "CPU": 8.0}]
    # Three groups of 0.6: 1.8 of 2 GPUs in all, but no GPU holds two of them.
    plan = plan_cluster(MIXTRAL, 1, 2, device="cuda", gpus_per_shard=0.6, gpus_per_group=0.6)
    assert shortfall(plan, {"GPU": 2.0, "CPU": 8.0}, nodes) is None
    hint = unpacked(plan, nodes)
    assert hint.startswith("Ray will most likely not place every component on its 1 node(s): with 2 placed, ")
    assert "(GPU 0.6) fits on none (GPU shares left per node: [[0.4, 0.4]])" in hint
    # 0.5 + 0.25 + 0.25 fill one GPU exactly; the other GPU takes the rest.
    plan = plan_cluster(MIXTRAL, 2, 4, device="cuda", gpus_per_shard=0.5, gpus_per_group=0.25)
    assert unpacked(plan, nodes) is None
    assert unpacked(plan, [{"GPU": 1.0}]) is not None  # 2 in all on one GPU
    # Whole GPUs go first, each on free GPUs of one node; the fraction takes what is left.
    plan = plan_cluster(MIXTRAL, 1, 2, device="cuda", gpus_per_shard=0.5, gpus_per_group=2)
    assert unpacked(plan, [{"GPU": 4.0}, {"GPU": 1.0}]) is None
    assert "experts-1 (GPU 2) fits on none" in unpacked(plan, [{"GPU": 3.0}, {"GPU": 1.0}])
    # On CPU nothing is reserved, so nothing can be short.
    assert unpacked(plan_cluster(MIXTRAL, 2, 4), [{"CPU": 2.0}]) is None
