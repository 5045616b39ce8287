"""Property-based bad input: arbitrary GenerateRequests get OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED,
never INTERNAL or a dropped connection, and the server serves a normal request afterwards."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from expertmesh.engine import Engine
from expertmesh.services.gateway import ModelInfo, start_gateway
from expertmesh.v1 import generate_pb2, generate_pb2_grpc
from test_gateway import AioThread

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}

floats = st.floats(allow_nan=True, allow_infinity=True, width=32)
u32 = st.integers(min_value=0, max_value=2**32 - 1)
sampling = st.builds(
    generate_pb2.SamplingParams,
    temperature=floats, top_k=u32, top_p=floats,
    seed=st.one_of(st.none(), st.integers(min_value=0, max_value=2**64 - 1)),
    max_new_tokens=st.one_of(st.integers(min_value=0, max_value=8), u32),
    stop=st.lists(st.text(max_size=4), max_size=3),
    stop_token_ids=st.lists(u32, max_size=3),
    ignore_eos=st.booleans(),
)
requests = st.builds(
    generate_pb2.GenerateRequest,
    request_id=st.text(max_size=8),
    prompt=st.text(max_size=40),
    prompt_token_ids=st.lists(st.one_of(st.integers(min_value=0, max_value=40000), u32), max_size=40),
    sampling=st.one_of(st.none(), sampling),
)


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    aio = AioThread()
    engine = Engine.from_checkpoint(tiny_ckpt, max_batch_size=2, max_seq_len=64)
    info = ModelInfo.local(engine, "tiny")
    gateway, port = aio.run(start_gateway(engine, info, "127.0.0.1:0", ready=True))
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield generate_pb2_grpc.GenerateServiceStub(channel)
    channel.close()
    aio.run(gateway.stop(1.0))
    aio.close()


def code_of(call) -> grpc.StatusCode:
    try:
        call()
        return grpc.StatusCode.OK
    except grpc.RpcError as exc:
        return exc.code()


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(request=requests, stream=st.booleans())
@example(request=generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(
    temperature=1.0, top_k=2**32 - 1, top_p=1e-30, seed=2**63 - 1, max_new_tokens=3)), stream=True)
@example(request=generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(
    temperature=3e38, max_new_tokens=2, stop=["", "a"])), stream=False)
@example(request=generate_pb2.GenerateRequest(prompt="x", sampling=generate_pb2.SamplingParams(
    temperature=1e-45, max_new_tokens=2)), stream=True)
@example(request=generate_pb2.GenerateRequest(prompt_token_ids=[1] * 60, sampling=generate_pb2.SamplingParams(
    max_new_tokens=2**32 - 1)), stream=False)
def test_arbitrary_requests_get_a_deliberate_status(server, request, stream):
    if stream:
        code = code_of(lambda: list(server.GenerateStream(request, timeout=30)))
    else:
        code = code_of(lambda: server.Generate(request, timeout=30))
    assert code in ALLOWED, f"{code} for {request}"
    still = server.Generate(generate_pb2.GenerateRequest(prompt="still serving", sampling=generate_pb2.SamplingParams(
        max_new_tokens=1, ignore_eos=True)), timeout=30)  # and the next normal request is served
    assert len(still.token_ids) == 1


def test_normal_request_after_the_fuzzing(server):
    greedy = generate_pb2.SamplingParams(max_new_tokens=4, ignore_eos=True)
    reply = server.Generate(generate_pb2.GenerateRequest(prompt="still serving", sampling=greedy), timeout=30)
    assert len(reply.token_ids) == 4
