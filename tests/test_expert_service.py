"""Expert groups as real gRPC servers on loopback: same output as local experts, batched calls,
malformed calls rejected with INVALID_ARGUMENT while the server keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from expertmesh.checkpoint import CheckpointReader
from expertmesh.checkpoint import split_range
from expertmesh.model.load import load_decoder_stack, load_expert_group, load_local_model
from expertmesh.model.moe import Router
from expertmesh.services import codec
from expertmesh.services.expert import ExpertClient, ExpertServicer, serve_experts
from expertmesh.v1 import expert_pb2, expert_pb2_grpc, tensor_pb2
from test_parity import make_prompts, our_greedy


class CountingServicer(ExpertServicer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int]] = []  # (layer, rows)

    def Forward(self, request, context):
        self.calls.append((request.layer, request.hidden.shape[0]))
        return super().Forward(request, context)


@pytest.fixture(scope="module")
def expert_servers(tiny_ckpt):
    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    servers = []
    for experts in split_range(cfg.num_local_experts, 4, "expert_groups"):
        servicer = CountingServicer(load_expert_group(reader, experts, torch.float32), cfg.hidden_size, torch.float32)
        server, port = serve_experts(servicer)
        servers.append((experts, servicer, server, port))
    yield servers
    for _, _, server, _ in servers:
        server.stop(grace=None)


def router_to(expert_servers, reader) -> Router:
    """Gates of every layer fanning out to the servers, built as the cluster's router actors build it."""
    from expertmesh.orchestrator.actors import GroupEndpoint, RuntimeOptions, remote_router

    groups = [GroupEndpoint(f"127.0.0.1:{port}", experts) for experts, _, _, port in expert_servers]
    return remote_router(reader, tuple(range(reader.config.num_hidden_layers)), groups, RuntimeOptions())


def test_remote_expert_groups_give_the_local_output(tiny_ckpt, expert_servers):
    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    router = router_to(expert_servers, reader)
    remote = load_decoder_stack(reader, range(cfg.num_hidden_layers), router, 4, 64, torch.float32)
    local = load_local_model(reader, 4, 64, torch.float32)
    prompts = make_prompts([9, 2, 14, 5], seed=21)
    for _, servicer, _, _ in expert_servers:
        servicer.calls.clear()
    remote_tokens, remote_logits = our_greedy(remote, prompts, 8)
    local_tokens, local_logits = our_greedy(local, prompts, 8)
    assert remote_tokens == local_tokens
    assert torch.equal(remote_logits, local_logits)  # the wire is lossless
    # one call per group per layer per step (8 steps x 2 layers), never one per token
    for _, servicer, _, _ in expert_servers:
        per_layer_step = len(servicer.calls)
        assert 0 < per_layer_step <= 8 * cfg.num_hidden_layers
        assert max(rows for _, rows in servicer.calls) > 1  # rows of several tokens travel together
    for c in router.groups:
        c.close()


def forward(stub, layer, hidden, ids):
    return stub.Forward(expert_pb2.ExpertForwardRequest(layer=layer, hidden=hidden, expert_ids=ids), timeout=10)


def test_malformed_calls_are_invalid_argument_and_the_server_keeps_serving(expert_servers):
    experts, _, _, port = expert_servers[1]  # owns experts (2, 3)
    stub = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
    x = torch.randn(3, 64)
    ids = torch.tensor([experts[0], experts[0], experts[1]])
    good = (codec.encode(x), codec.encode(ids))
    bad = {
        "wrong dtype": (codec.encode(x.double().float().half()), good[1]),
        "wrong width": (codec.encode(torch.randn(3, 32)), good[1]),
        "byte count": (tensor_pb2.Tensor(dtype="float32", shape=[3, 64], data=b"\0" * 10), good[1]),
        "unknown dtype": (tensor_pb2.Tensor(dtype="complex64", shape=[3, 64], data=b""), good[1]),
        "ids length": (good[0], codec.encode(ids[:2])),
        "ids dtype": (good[0], codec.encode(ids.float())),
        "not our expert": (good[0], codec.encode(torch.tensor([0, 2, 3]))),
    }
    for name, (hidden, expert_ids) in bad.items():
        with pytest.raises(grpc.RpcError) as err:
            forward(stub, 0, hidden, expert_ids)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
    with pytest.raises(grpc.RpcError) as err:
        forward(stub, 7, *good)  # a layer the group does not serve
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "layer" in err.value.details()
    out = codec.decode(forward(stub, 1, *good).hidden, "hidden", torch.float32, (3, 64))
    assert torch.isfinite(out).all()
    info = stub.Describe(expert_pb2.DescribeExpertsRequest(), timeout=10)
    assert tuple(info.experts) == experts and tuple(info.layers) == (0, 1)


def test_codec_round_trips_every_dtype():
    for dtype in codec.DTYPES.values():
        t = (torch.randn(4, 3) * 100).to(dtype)
        assert torch.equal(codec.decode(codec.encode(t), "t", dtype, (4, None)), t)
    assert codec.decode(codec.encode(torch.empty(0, 5)), "t").shape == (0, 5)


def test_attention_to_router_service_to_expert_services(tiny_ckpt, expert_servers):
    """The full data path across processes' interfaces: attention -> RouterService -> ExpertServices."""
    from expertmesh.services.router import RouterClient, RouterServicer, serve_router

    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    router = router_to(expert_servers, reader)
    server, port = serve_router(RouterServicer(router, cfg.hidden_size, torch.float32))
    try:
        moe = RouterClient(f"127.0.0.1:{port}")
        remote = load_decoder_stack(reader, range(cfg.num_hidden_layers), moe, 3, 64, torch.float32)
        local = load_local_model(reader, 3, 64, torch.float32)
        prompts = make_prompts([4, 11, 7], seed=5)
        remote_tokens, remote_logits = our_greedy(remote, prompts, 6)
        local_tokens, local_logits = our_greedy(local, prompts, 6)
        assert remote_tokens == local_tokens and torch.equal(remote_logits, local_logits)
        with pytest.raises(grpc.RpcError) as err:
            moe(9, torch.zeros(2, cfg.hidden_size))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert moe(0, torch.zeros(2, cfg.hidden_size)).shape == (2, cfg.hidden_size)  # still serving
        moe.close()
    finally:
        server.stop(grace=None)
        for c in router.groups:
            c.close()


@pytest.mark.parametrize("metrics", [True, False])
def test_component_without_ray_serves_with_or_without_metrics(tiny_ckpt, metrics):
    """The actor classes are plain classes: build one here, call it over gRPC, scrape it (when on)."""
    import urllib.request

    from expertmesh.orchestrator.actors import ExpertGroupComponent, RuntimeOptions

    threads = torch.get_num_threads()  # the component sets its process's torch threads; put them back
    component = ExpertGroupComponent(str(tiny_ckpt), (0, 1), RuntimeOptions(host="127.0.0.1", metrics=metrics), "3")
    try:
        client = ExpertClient(component.address(), (0, 1))
        y = client.submit(0, torch.randn(2, 64), torch.tensor([0, 1])).result()
        assert y.shape == (2, 64)
        client.close()
        address = component.info()["metrics"]
        if not metrics:
            assert address is None
            return
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        assert 'expertmesh_expert_forward_seconds_count{group="3"} 1.0' in text
        assert 'expertmesh_expert_rows_sum{group="3"} 2.0' in text
    finally:
        component.server.stop(grace=None)
        torch.set_num_threads(threads)
