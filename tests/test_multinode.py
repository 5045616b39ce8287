"""Two nodes on one machine: `expertmesh serve --ray-address` against the session's two-node Ray
cluster, with `--attention-resource` and `--expert-resource` naming the nodes' custom resources, puts
every expert group on the expert node and every attention shard and router on the attention node, and
answers with the single-process engine's tokens."""

from __future__ import annotations

import grpc
from conftest import ATTENTION, DECLARED_GPUS, EXPERT
from serving import alive_components, serve_process, wait_for_line, wait_serving

from expertmesh.checkpoint import CheckpointReader
from expertmesh.engine import Engine, GenerationRequest
from expertmesh.orchestrator.placement import alive_nodes, plan_cluster, shortfall, unpacked
from expertmesh.sampling import SamplingParams
from expertmesh.v1 import generate_pb2, generate_pb2_grpc


def test_serve_places_experts_and_attention_on_their_nodes(ray_cluster, tiny_ckpt):
    assert ray_cluster.attention_node != ray_cluster.expert_node
    with serve_process(tiny_ckpt, ray_cluster.address, "--attention-resource", ATTENTION, "--expert-resource",
                       EXPERT, "--attention-shards", "2", "--expert-groups", "2", "--max-batch-size", "2",
                       "--max-seq-len", "64", "--threads", "1") as (proc, lines):
        address = wait_for_line(proc, lines, r"serving .* on (\S+:\d+)")
        wait_serving(address)
        stub = generate_pb2_grpc.GenerateServiceStub(grpc.insecure_channel(address))

        # Every Ray process of both nodes, the components' workers included, listens on loopback only.
        listeners = ray_cluster.listeners()
        assert len({pid for _, _, pid in listeners}) >= 6  # GCS, raylets, agents, the components' workers
        assert [(str(ip), port, pid) for ip, port, pid in listeners
                if not (getattr(ip, "ipv4_mapped", None) or ip).is_loopback] == []

        info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10)
        assert [(list(g.experts), g.node_id) for g in info.expert_groups] == [
            ([0, 1, 2, 3], ray_cluster.expert_node), ([4, 5, 6, 7], ray_cluster.expert_node)]
        nodes: dict[str, list[str]] = {}  # Ray's own view: actor class -> the nodes its actors run on
        for actor in alive_components():
            nodes.setdefault(actor.class_name, []).append(actor.node_id)
        assert nodes == {"ExpertGroupComponent": [ray_cluster.expert_node] * 2,
                         "RouterComponent": [ray_cluster.attention_node] * 2,
                         "AttentionShardComponent": [ray_cluster.attention_node] * 2}

        prompt, params = "Two nodes, one machine:", SamplingParams(max_new_tokens=12, ignore_eos=True)
        reply = stub.Generate(generate_pb2.GenerateRequest(
            prompt=prompt, sampling=generate_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)), timeout=60)
        expected = Engine.from_checkpoint(tiny_ckpt, max_batch_size=1, max_seq_len=64).generate(
            [GenerationRequest(prompt=prompt, params=params)])[0]
        assert list(reply.token_ids) == expected.token_ids and reply.text == expected.text


def test_placement_checks_read_each_nodes_resources(ray_cluster, tiny_ckpt):
    """The session's nodes as Ray reports them: the attention node has no GPU, the expert node
    DECLARED_GPUS. Shards that ask for GPUs on the attention pool fit on no node, though the cluster
    has GPUs enough in all; the same shards without a pool fit."""
    import ray

    cfg = CheckpointReader(tiny_ckpt).config
    nodes = alive_nodes()
    assert sorted(n.get("GPU", 0.0) for n in nodes) == [0.0, float(DECLARED_GPUS)]
    pinned = plan_cluster(cfg, 2, 2, gpus_per_shard=0.5, gpus_per_group=1.0, attention_resource=ATTENTION,
                          expert_resource=EXPERT)
    assert shortfall(pinned, ray.cluster_resources()) is None  # the totals alone allow it
    problem = shortfall(pinned, ray.cluster_resources(), nodes)
    assert problem.startswith("Ray cannot place every component: no single node has what attention-0 (GPU 0.5, "
                              f"{ATTENTION} 0.001), attention-1 (GPU 0.5, {ATTENTION} 0.001) asks for")
    free = plan_cluster(cfg, 2, 2, gpus_per_shard=0.5, gpus_per_group=1.0, expert_resource=EXPERT)
    assert shortfall(free, ray.cluster_resources(), nodes) is None and unpacked(free, nodes) is None
    crowded = plan_cluster(cfg, 1, 8, gpus_per_shard=0.6, gpus_per_group=0.6)  # 5.4 GPUs, one 0.6 per GPU
    assert shortfall(crowded, ray.cluster_resources(), nodes) is None
    assert unpacked(crowded, nodes).startswith("Ray will most likely not place every component on its 2 node(s): "
                                               "with 8 placed,")
