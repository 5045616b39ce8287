"""Expert groups as real gRPC servers on loopback: same output as local experts, batched calls,
malformed calls rejected with INVALID_ARGUMENT while the server keeps serving.

The servers and the streams to them live on an `EventLoopThread`, as in a cluster component; the
decoder stacks here call them synchronously through `on_loop`."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
import torch

from expertmesh.checkpoint import CheckpointReader
from expertmesh.checkpoint import split_range
from expertmesh.model.linear import Linear
from expertmesh.model.load import load_decoder_stack, load_expert_group, load_local_model
from expertmesh.model.moe import ExpertGroup, Router
from expertmesh.services import codec
from expertmesh.services.expert import ExpertReplicas, ExpertServicer, ExpertStream, serve_experts
from expertmesh.services.internal import EventLoopThread, ServiceGoneError
from expertmesh.services.router import RemoteRouter
from expertmesh.v1 import expert_pb2, expert_pb2_grpc, router_pb2, router_pb2_grpc, tensor_pb2
from test_parity import make_prompts, our_greedy


class CountingServicer(ExpertServicer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[int, int]] = []  # (layer, rows)

    def _forward(self, request):  # every message, unary or on the stream, goes through here
        self.calls.append((request.layer, request.hidden.shape[0]))
        return super()._forward(request)


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread("test-services")
    yield thread
    thread.close()


def on_loop(loop, moe):
    """An async MoE as the synchronous `MoE` a DecoderStack calls."""
    return lambda layer, x: loop.run(moe(layer, x), timeout_s=60)


@pytest.fixture(scope="module")
def expert_servers(tiny_ckpt, loop):
    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    servers = []
    for experts in split_range(cfg.num_local_experts, 4, "expert_groups"):
        servicer = CountingServicer(load_expert_group(reader, experts, torch.float32), cfg.hidden_size, torch.float32)
        server, port = loop.run(serve_experts(servicer))
        servers.append((experts, servicer, server, port))
    yield servers
    for _, _, server, _ in servers:
        loop.run(server.stop(grace=None))


def router_to(expert_servers, reader, loop):
    """Gates of every layer fanning out to the servers, built as the cluster's router actors build it."""
    from expertmesh.orchestrator.actors import Endpoint, RuntimeOptions, remote_router

    groups = [[Endpoint(f"127.0.0.1:{port}", experts=experts)] for experts, _, _, port in expert_servers]

    async def build():
        return remote_router(reader, tuple(range(reader.config.num_hidden_layers)), groups, RuntimeOptions())

    return loop.run(build())


def test_remote_expert_groups_give_the_local_output(tiny_ckpt, expert_servers, loop):
    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    router = router_to(expert_servers, reader, loop)
    remote = load_decoder_stack(reader, range(cfg.num_hidden_layers), on_loop(loop, router), 4, 64, torch.float32)
    local = load_local_model(reader, 4, 64, torch.float32)
    prompts = make_prompts([9, 2, 14, 5], seed=21)
    for _, servicer, _, _ in expert_servers:
        servicer.calls.clear()
    remote_tokens, remote_logits = our_greedy(remote, prompts, 8)
    local_tokens, local_logits = our_greedy(local, prompts, 8)
    assert remote_tokens == local_tokens
    assert torch.equal(remote_logits, local_logits)  # the wire is lossless
    # one message per group per layer per step (8 steps x 2 layers), never one per token
    for _, servicer, _, _ in expert_servers:
        per_layer_step = len(servicer.calls)
        assert 0 < per_layer_step <= 8 * cfg.num_hidden_layers
        assert max(rows for _, rows in servicer.calls) > 1  # rows of several tokens travel together
    loop.run(router.close())


class Delayed:
    """A local expert group behind an async `forward` that answers after `delay_s`: the test decides
    the order in which the replies arrive."""

    def __init__(self, group: ExpertGroup, delay_s: float):
        self.group, self.experts, self.delay_s = group, group.experts, delay_s

    async def forward(self, layer, x, expert_ids):
        await asyncio.sleep(self.delay_s)
        return self.group(layer, x, expert_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("top_k", [2, 3])
def test_the_remote_combine_has_the_local_bits_whichever_reply_arrives_first(top_k, dtype):
    """With top-2 the router adds each group's rows as they arrive; with more experts per token it
    waits for every reply. Either way the output is the local router's, bit for bit, with the replies
    arriving in group order or in reverse."""
    torch.manual_seed(3)
    d, i, num_experts, layer = 32, 48, 8, 0
    groups = [ExpertGroup(experts, {layer: [Linear(torch.randn(2 * i, d).to(dtype)) for _ in experts]},
                          {layer: [Linear(torch.randn(d, i).to(dtype)) for _ in experts]})
              for experts in split_range(num_experts, 4, "expert_groups")]
    gates = {layer: torch.randn(num_experts, d).to(dtype)}
    x = torch.randn(40, d).to(dtype)
    want = Router(gates, top_k, groups, num_experts)(layer, x)
    for delays in ([0.0, 0.01, 0.02, 0.03], [0.03, 0.02, 0.01, 0.0]):
        remote = RemoteRouter(Router(gates, top_k, [Delayed(g, s) for g, s in zip(groups, delays)], num_experts))
        assert torch.equal(asyncio.run(remote(layer, x)), want), delays


def forward(stub, layer, hidden, ids):
    return stub.Forward(expert_pb2.ExpertForwardRequest(layer=layer, hidden=hidden, expert_ids=ids), timeout=10)


def test_malformed_calls_are_invalid_argument_and_the_server_keeps_serving(expert_servers, loop):
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

    # The same on the stream a router keeps open: a bad message ends that stream with
    # INVALID_ARGUMENT; the next message opens a new one and is answered.
    async def over_stream():
        stream = ExpertStream(f"127.0.0.1:{port}", experts, timeout_s=10)
        try:
            with pytest.raises(grpc.RpcError) as err:
                await stream.forward(0, x, torch.tensor([0, 2, 3]))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not owned" in err.value.details()
            with pytest.raises(grpc.RpcError) as err:
                await stream.forward(0, x.half(), ids)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "dtype" in err.value.details()
            return await stream.forward(1, x, ids)
        finally:
            await stream.close()

    assert torch.equal(loop.run(over_stream(), timeout_s=60), out)


def test_codec_round_trips_every_dtype():
    for dtype in codec.DTYPES.values():
        t = (torch.randn(4, 3) * 100).to(dtype)
        assert torch.equal(codec.decode(codec.encode(t), "t", dtype, (4, None)), t)
        for view in (t.t(), t[:, 1:]):  # strided views travel as their elements in C order
            assert not view.is_contiguous()
            assert torch.equal(codec.decode(codec.encode(view), "t", dtype, tuple(view.shape)), view)
    grad = torch.randn(2, 3, requires_grad=True)
    assert torch.equal(codec.decode(codec.encode(grad), "t", torch.float32, (2, 3)), grad.detach())
    assert codec.decode(codec.encode(torch.empty(0, 5)), "t").shape == (0, 5)


def test_attention_to_router_service_to_expert_services(tiny_ckpt, expert_servers, loop):
    """The full data path across processes' interfaces: attention -> RouterService -> ExpertServices."""
    from expertmesh.services.router import RouterServicer, RouterStream, serve_router

    reader = CheckpointReader(tiny_ckpt)
    cfg = reader.config
    router = router_to(expert_servers, reader, loop)
    layers = range(cfg.num_hidden_layers)
    server, port = loop.run(serve_router(RouterServicer(router, layers, cfg.hidden_size, torch.float32)))

    async def connect():
        return RouterStream(f"127.0.0.1:{port}")

    try:
        stream = loop.run(connect())
        moe = on_loop(loop, stream)
        remote = load_decoder_stack(reader, layers, moe, 3, 64, torch.float32)
        local = load_local_model(reader, 3, 64, torch.float32)
        prompts = make_prompts([4, 11, 7], seed=5)
        remote_tokens, remote_logits = our_greedy(remote, prompts, 6)
        local_tokens, local_logits = our_greedy(local, prompts, 6)
        assert remote_tokens == local_tokens and torch.equal(remote_logits, local_logits)
        with pytest.raises(grpc.RpcError) as err:
            moe(9, torch.zeros(2, cfg.hidden_size))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert moe(0, torch.zeros(2, cfg.hidden_size)).shape == (2, cfg.hidden_size)  # still serving
        unary = router_pb2_grpc.RouterServiceStub(grpc.insecure_channel(f"127.0.0.1:{port}"))
        reply = unary.Route(router_pb2.RouteRequest(layer=1, hidden=codec.encode(torch.ones(2, cfg.hidden_size))),
                            timeout=30)
        assert torch.equal(codec.decode(reply.hidden, "hidden"), moe(1, torch.ones(2, cfg.hidden_size)))
        loop.run(stream.close())
    finally:
        loop.run(server.stop(grace=None))
        loop.run(router.close())


@pytest.mark.parametrize("metrics", [True, False])
def test_component_without_ray_serves_with_or_without_metrics(tiny_ckpt, metrics):
    """The actor classes are plain classes: build one here, call it over gRPC, scrape it (when on)."""
    import urllib.request

    from expertmesh.orchestrator.actors import ExpertGroupComponent, RuntimeOptions

    threads = torch.get_num_threads()  # the component sets its process's torch threads; put them back
    component = ExpertGroupComponent(str(tiny_ckpt), (0, 1), RuntimeOptions(host="127.0.0.1", metrics=metrics), "3")
    try:
        stub = expert_pb2_grpc.ExpertServiceStub(grpc.insecure_channel(component.address()))
        y = forward(stub, 0, codec.encode(torch.randn(2, 64)), codec.encode(torch.tensor([0, 1])))
        assert codec.decode(y.hidden, "hidden").shape == (2, 64)
        address = component.info()["metrics"]
        if not metrics:
            assert address is None
            return
        text = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
        assert 'expertmesh_expert_forward_seconds_count{group="3",replica="0"} 1.0' in text
        assert 'expertmesh_expert_rows_sum{group="3",replica="0"} 2.0' in text
    finally:
        component.loop.run(component.server.stop(grace=None))
        component.loop.close()
        torch.set_num_threads(threads)


def test_attention_shard_takes_more_threads_for_large_steps_and_the_head(tiny_ckpt, loop):
    """Its layers run while the expert groups wait: in steps of PARALLEL_STEP_TOKENS tokens or more
    they get `parallel_threads`, in smaller ones `threads`. The MoE calls between them, while which the
    groups compute, always get `threads`. The LM head, which runs while every other component waits,
    gets `head_threads` at every step size."""
    from expertmesh.services.attention import PARALLEL_STEP_TOKENS, AttentionServicer
    from expertmesh.v1 import attention_pb2

    stack = load_local_model(CheckpointReader(tiny_ckpt), 2, 64, torch.float32)
    local_moe, seen, attention_seen, head_seen = stack.moe, [], [], []
    head = stack.lm_head

    async def moe(layer, x):
        seen.append(torch.get_num_threads())
        return local_moe(layer, x)

    def recorded(linear):
        def qkv(x):
            attention_seen.append((x.shape[0], torch.get_num_threads()))
            return linear(x)
        return qkv

    for weights in stack.layers.values():
        weights.wqkv = recorded(weights.wqkv)

    def lm_head(x):
        head_seen.append(torch.get_num_threads())
        return head(x)

    stack.lm_head = lm_head
    threads = torch.get_num_threads()
    servicer = AttentionServicer(stack, moe, threads=1, parallel_threads=2, head_threads=3)
    try:
        for slot, q_len in ((0, PARALLEL_STEP_TOKENS), (1, 3), (0, 1), (1, PARALLEL_STEP_TOKENS + 5)):
            start = 0 if q_len > 1 else PARALLEL_STEP_TOKENS
            seq = attention_pb2.SequenceStep(request_id=str(slot), slot=slot, start=start, q_len=q_len, sample=True)
            request = attention_pb2.StepRequest(seqs=[seq], token_ids=[5] * q_len)
            assert len(loop.run(servicer.step(request)).next_token_ids) == 1
    finally:
        torch.set_num_threads(threads)
    expected = {PARALLEL_STEP_TOKENS: 2, 3: 1, 1: 1, PARALLEL_STEP_TOKENS + 5: 2}
    assert len(attention_seen) == 4 * len(stack.layers)
    assert all(n == expected[rows] for rows, n in attention_seen), attention_seen
    assert seen == [1] * 4 * len(stack.layers)
    assert head_seen == [3] * 4


def group_servers(ckpt, loop):
    """Experts 0-3 of `ckpt`: (experts, hidden size, the local group, `start()` of another server of
    them -> (server, port))."""
    reader = CheckpointReader(ckpt)
    experts, hidden = (0, 1, 2, 3), reader.config.hidden_size
    group = load_expert_group(reader, experts, torch.float32)

    def start() -> tuple[grpc.aio.Server, int]:
        return loop.run(serve_experts(ExpertServicer(group, hidden, torch.float32)))

    return experts, hidden, group, start


def test_a_group_whose_replicas_all_died_waits_for_the_one_that_comes_back(tiny_ckpt, loop):
    """Both replicas of a group die. Replica 0 cannot come back (its restarts are used up); replica 1
    does, at a new address, a moment later: the message waits for it and is answered. Once neither can
    come back, the message fails at once instead of waiting."""
    experts, hidden, group, start = group_servers(tiny_ckpt, loop)

    servers = [start(), start()]
    restarts = []

    def restart_cannot() -> str:
        raise ServiceGoneError("the actor died and will not be restarted")

    def restart_once() -> str:  # called off the loop, as a resolver asking Ray is
        if restarts:
            restart_cannot()
        time.sleep(0.5)
        restarts.append(start())
        return f"127.0.0.1:{restarts[-1][1]}"

    async def build():
        return ExpertReplicas([ExpertStream(f"127.0.0.1:{servers[0][1]}", experts, 10, resolve=restart_cannot),
                               ExpertStream(f"127.0.0.1:{servers[1][1]}", experts, 10, resolve=restart_once)])

    replicas = loop.run(build())
    x, ids = torch.randn(3, hidden), torch.tensor([0, 1, 3])
    expected = group(0, x, ids)
    try:
        assert torch.equal(loop.run(replicas.forward(0, x, ids), timeout_s=30), expected)
        for server, _ in servers:
            loop.run(server.stop(grace=None))
        assert torch.equal(loop.run(replicas.forward(0, x, ids), timeout_s=30), expected)
        assert len(restarts) == 1
        loop.run(restarts[0][0].stop(grace=None))
        with pytest.raises(ConnectionError, match="every replica is gone"):
            loop.run(replicas.forward(0, x, ids), timeout_s=30)
    finally:
        loop.run(replicas.close())
        for server, _ in restarts:
            loop.run(server.stop(grace=None))


def test_a_replica_slower_to_restart_than_the_wait_rejoins_later(tiny_ckpt, loop):
    """Both replicas die; replica 1 is not back within the restart wait (its resolve times out), so
    the message fails. It is tried again later, and once it is back it serves again."""
    experts, hidden, group, start = group_servers(tiny_ckpt, loop)

    servers, attempts, restarted = [start(), start()], [], []

    def gone() -> str:
        raise ServiceGoneError("the actor died and will not be restarted")

    def slow_restart() -> str:  # the first wait runs out; by the second the process is back
        attempts.append(time.monotonic())
        if len(attempts) == 1:
            raise TimeoutError("not back within the restart wait")
        restarted.append(start())
        return f"127.0.0.1:{restarted[-1][1]}"

    async def build():
        replicas = ExpertReplicas([ExpertStream(f"127.0.0.1:{servers[0][1]}", experts, 10, resolve=gone),
                                   ExpertStream(f"127.0.0.1:{servers[1][1]}", experts, 10, resolve=slow_restart)])
        replicas.RETRY_S = 0.5
        return replicas

    replicas = loop.run(build())
    x, ids = torch.randn(3, hidden), torch.tensor([0, 1, 3])
    expected = group(0, x, ids)
    try:
        assert torch.equal(loop.run(replicas.forward(0, x, ids), timeout_s=30), expected)
        for server, _ in servers:
            loop.run(server.stop(grace=None))
        with pytest.raises(ConnectionError, match="every replica is gone"):
            loop.run(replicas.forward(0, x, ids), timeout_s=30)
        deadline = time.monotonic() + 20
        while not restarted and time.monotonic() < deadline:  # the retry, RETRY_S later
            time.sleep(0.1)
        reply = None
        while reply is None and time.monotonic() < deadline:
            try:
                reply = loop.run(replicas.forward(0, x, ids), timeout_s=30)
            except ConnectionError:  # the reconnection is still finishing
                time.sleep(0.1)
        assert reply is not None and torch.equal(reply, expected)
        assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.5
    finally:
        loop.run(replicas.close())
        for server, _ in restarted:
            loop.run(server.stop(grace=None))
