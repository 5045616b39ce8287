"""The public gateway as a real grpc.aio server on loopback, called with ordinary sync stubs.

Greedy output equals `Engine.generate` on a second engine; streams arrive token by token and add up to
the unary result; bad requests get INVALID_ARGUMENT naming the field and the server keeps serving;
cancelled and timed-out calls free their KV-cache slot; a full queue gives RESOURCE_EXHAUSTED; a failed
step gives UNAVAILABLE and the loop lives on; health, reflection and the reflection-only smoke client.
"""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler
from expertmesh.services.gateway import REPLY_FLUSH_S, SERVICE_NAME, ModelInfo, start_gateway
from expertmesh.services.gateway_loop import STEP_SLACK_S, EngineLoop
from expertmesh.services.metrics import GatewayMetrics
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

SMOKE = Path(__file__).resolve().parents[2] / "shared" / "tools" / "api_smoke.py"
STEP_DELAY_S = 0.01  # the slow engine's extra time per step, standing in for remote attention shards


class SlowRunner:
    """Wraps a step runner: a fixed delay per step, a step counter, and a switch that makes steps fail."""

    def __init__(self, runner, delay_s: float):
        self.runner, self.delay_s, self.steps, self.fail = runner, delay_s, 0, False

    def run(self, plan):
        time.sleep(self.delay_s)
        self.steps += 1
        if self.fail:
            raise RuntimeError("attention shard 0 is unreachable")
        return self.runner.run(plan)

    def release(self, request_id):
        self.runner.release(request_id)


class AioThread:
    """An asyncio event loop on its own thread, where the servers under test run."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="aio", daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 30.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def slow_engine(ckpt, num_slots: int = 1, max_waiting: int = 1, delay_s: float = STEP_DELAY_S) -> Engine:
    base = Engine.from_checkpoint(ckpt, max_batch_size=num_slots, max_seq_len=128)
    return Engine(SlowRunner(base.runner, delay_s), base.tokenizer, base.cfg,
                  Scheduler(num_slots=num_slots, max_len=base.max_len, max_waiting=max_waiting))


def wait_idle(engine: Engine, timeout_s: float = 5.0) -> bool:
    """Poll until the engine holds no sequence (bounded in time)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not engine.scheduler.running and not engine.scheduler.waiting:
            return True
        time.sleep(0.01)
    return False


def greedy(max_new_tokens: int, **kw) -> generate_pb2.SamplingParams:
    """Greedy (temperature 0) unless `kw` says otherwise."""
    return generate_pb2.SamplingParams(max_new_tokens=max_new_tokens, **kw)


@pytest.fixture(scope="module")
def aio():
    loop = AioThread()
    yield loop
    loop.close()


class Served:
    """A gateway under test: its address, stub, engine and the Gateway handle."""

    def __init__(self, aio: AioThread, engine: Engine, ready: bool = True):
        self.aio, self.engine = aio, engine
        self.gateway, port = aio.run(start_gateway(engine, ModelInfo.local(engine, "tiny"), ready=ready))
        self.address = f"127.0.0.1:{port}"
        self.channel = grpc.insecure_channel(self.address)
        self.stub = generate_pb2_grpc.GenerateServiceStub(self.channel)

    def close(self, grace_s: float = 1.0):
        self.channel.close()
        self.aio.run(self.gateway.stop(grace_s))


@pytest.fixture(scope="module")
def served(aio, tiny_ckpt):
    s = Served(aio, Engine.from_checkpoint(tiny_ckpt, max_batch_size=4, max_seq_len=128))
    yield s
    s.close()


@pytest.fixture(scope="module")
def slow(aio, tiny_ckpt):
    """One slot, one waiting place, and slow steps: for cancellation, deadlines and the queue limit."""
    s = Served(aio, slow_engine(tiny_ckpt))
    yield s
    s.close()


def test_concurrent_greedy_equals_engine_generate(served, tiny_ckpt):
    words = "the quick brown fox jumps over the lazy dog again and again".split()
    cases = [(" ".join(words[: 1 + 2 * i]), 4 + 3 * i) for i in range(6)]
    cases += [([1, 415, 11725, 460], 20), ([1] + list(range(300, 340)), 9)]
    requests = [generate_pb2.GenerateRequest(
        **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}),
        sampling=greedy(n, ignore_eos=i % 2 == 0)) for i, (p, n) in enumerate(cases)]
    with ThreadPoolExecutor(len(requests)) as pool:
        responses = list(pool.map(lambda r: served.stub.Generate(r, timeout=30), requests))
    reference = Engine.from_checkpoint(tiny_ckpt, max_batch_size=4, max_seq_len=128)
    expected = reference.generate([GenerationRequest(
        prompt=p if isinstance(p, str) else None, prompt_token_ids=None if isinstance(p, str) else tuple(p),
        params=SamplingParams(max_new_tokens=n, ignore_eos=i % 2 == 0)) for i, (p, n) in enumerate(cases)])
    for response, result in zip(responses, expected):
        assert list(response.token_ids) == result.token_ids
        assert response.text == result.text
        assert response.finish_reason == {"length": 1, "eos": 2, "stop": 3}[result.finish_reason]
        assert response.usage.prompt_tokens == len(result.prompt_token_ids)
        assert response.usage.completion_tokens == len(result.token_ids)
        assert len(response.request_id) == 32  # assigned uuid hex


def test_stream_adds_up_to_the_unary_result(served):
    request = generate_pb2.GenerateRequest(request_id="s1", prompt="Once upon a time", sampling=greedy(20, ignore_eos=True))
    unary = served.stub.Generate(request, timeout=30)
    chunks = list(served.stub.GenerateStream(request, timeout=30))
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert "".join(c.text for c in chunks) == unary.text
    assert {c.request_id for c in chunks} == {"s1"} and unary.request_id == "s1"
    assert all(len(c.token_ids) == 1 for c in chunks)
    assert [c.finish_reason for c in chunks[:-1]] == [0] * (len(chunks) - 1)
    assert not any(c.HasField("usage") for c in chunks[:-1])
    assert chunks[-1].finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (unary.usage.prompt_tokens, 20)


def test_stream_delivers_tokens_as_they_are_generated(slow):
    steps_before = slow.engine.runner.steps
    steps_seen = []  # engine steps run when each message arrived
    for chunk in slow.stub.GenerateStream(generate_pb2.GenerateRequest(
            prompt="Streaming", sampling=greedy(16, ignore_eos=True)), timeout=30):
        steps_seen.append(slow.engine.runner.steps - steps_before)
    assert len(steps_seen) == 16
    assert steps_seen[0] < 16  # the first token arrived while later ones were still to be generated
    assert steps_seen[-1] - steps_seen[0] >= 8  # and the stream spread over the steps that made them



def test_seeded_sampling_is_reproducible_and_top_p_zero_is_off(served, tiny_ckpt):
    def sampled(**kw):
        request = generate_pb2.GenerateRequest(prompt="Random words:", sampling=greedy(
            12, temperature=0.9, seed=7, ignore_eos=True, **kw))
        return list(served.stub.Generate(request, timeout=10).token_ids)

    first = sampled()
    assert sampled() == first and sampled(top_p=0.0) == first and sampled(top_p=1.0) == first
    reference = Engine.from_checkpoint(tiny_ckpt, max_batch_size=4, max_seq_len=128)
    [expected] = reference.generate([GenerationRequest(prompt="Random words:", params=SamplingParams(
        temperature=0.9, seed=7, max_new_tokens=12, ignore_eos=True))])
    assert first == expected.token_ids

BAD_REQUESTS = {
    "both prompt and ids": (dict(prompt="hi", prompt_token_ids=[1, 2]), "prompt"),
    "neither prompt nor ids": (dict(), "prompt"),
    "empty prompt, no ids": (dict(prompt=""), "prompt"),
    "id beyond the vocabulary": (dict(prompt_token_ids=[1, 32000]), "prompt_token_ids"),
    "beyond the context": (dict(prompt_token_ids=[1] * 100, sampling=greedy(50)), "max_new_tokens"),
    "max_new_tokens 0": (dict(prompt="hi", sampling=greedy(0)), "max_new_tokens"),
    "temperature -1": (dict(prompt="hi", sampling=greedy(4, temperature=-1.0)), "temperature"),
    "temperature NaN": (dict(prompt="hi", sampling=greedy(4, temperature=float("nan"))), "temperature"),
    "top_p 1.5": (dict(prompt="hi", sampling=greedy(4, top_p=1.5)), "top_p"),
    "top_p -0.1": (dict(prompt="hi", sampling=greedy(4, top_p=-0.1)), "top_p"),
    "a 1 MB stop string": (dict(prompt="hi", sampling=greedy(4, stop=["x" * 2**20])), "stop"),
    "33 stop strings": (dict(prompt="hi", sampling=greedy(4, stop=[f"s{i}" for i in range(33)])), "stop"),
    "a 257-character request_id": (dict(request_id="r" * 257, prompt="hi"), "request_id"),
    "more ids than the context": (dict(prompt_token_ids=[1] * 1000), "prompt_token_ids"),
    "a 10 MB prompt": (dict(prompt="word " * 2 * 2**20), "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_requests_are_invalid_argument_naming_the_field(served, case):
    fields, field = BAD_REQUESTS[case]
    request = generate_pb2.GenerateRequest(**{"sampling": greedy(4), **fields})
    for call in (served.stub.Generate, lambda r, timeout: list(served.stub.GenerateStream(r, timeout=timeout))):
        with pytest.raises(grpc.RpcError) as err:
            call(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(field), err.value.details()
    ok = served.stub.Generate(generate_pb2.GenerateRequest(prompt="hi", sampling=greedy(3, ignore_eos=True)), timeout=10)
    assert len(ok.token_ids) == 3


def test_a_prompt_being_tokenized_holds_up_no_running_request(served, monkeypatch):
    entered, release = threading.Event(), threading.Event()
    encode = served.engine.tokenizer.encode

    def held_encode(text, *args, **kwargs):
        if text == "held up":
            entered.set()
            release.wait(20)
        return encode(text, *args, **kwargs)

    monkeypatch.setattr(served.engine.tokenizer, "encode", held_encode)
    running = served.stub.GenerateStream(generate_pb2.GenerateRequest(
        prompt="A long story", sampling=greedy(40, ignore_eos=True)), timeout=10)
    first = next(running)
    held = served.stub.Generate.future(generate_pb2.GenerateRequest(prompt="held up", sampling=greedy(2)), timeout=30)
    try:
        assert entered.wait(10)
        rest = list(running)  # the whole completion while the other prompt is still being tokenized
        assert len(first.token_ids) + sum(len(m.token_ids) for m in rest) == 40
        assert not held.done()
    finally:
        release.set()
    assert held.result().token_ids


@pytest.mark.parametrize("method, streams, raw", [
    ("Generate", False, bytes([0x12, 2, 0xFF, 0xFE])),  # prompt (field 2): two bytes that are not UTF-8
    ("GenerateStream", True, bytes([0x0A, 1, 0xC3])),  # request_id (field 1): half a character
    ("Tokenize", False, bytes([0x0A, 5, 0x61])),  # text (field 1): 5 bytes announced, 1 sent
])
def test_a_message_that_does_not_parse_is_invalid_argument(served, method, streams, raw):
    path = f"/{SERVICE_NAME}/{method}"
    with pytest.raises(grpc.RpcError) as err:
        if streams:
            list(served.channel.unary_stream(path)(raw, timeout=10))
        else:
            served.channel.unary_unary(path)(raw, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: not a valid message"), err.value.details()
    ok = served.stub.Generate(generate_pb2.GenerateRequest(prompt="hi", sampling=greedy(2, ignore_eos=True)),
                              timeout=10)
    assert len(ok.token_ids) == 2


def test_duplicate_running_request_id_is_invalid_argument(slow):
    request = generate_pb2.GenerateRequest(request_id="dup", prompt="hi", sampling=greedy(30, ignore_eos=True))
    first = slow.stub.GenerateStream(request, timeout=30)
    next(first)  # running now
    with pytest.raises(grpc.RpcError) as err:
        slow.stub.Generate(request, timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request_id")
    assert len(list(first)) == 29  # the original is untouched by the rejected duplicate
    assert wait_idle(slow.engine)


def test_cancelled_stream_frees_its_slot(slow):
    steps_before = slow.engine.runner.steps
    stream = slow.stub.GenerateStream(generate_pb2.GenerateRequest(
        prompt="A long story", sampling=greedy(100, ignore_eos=True)), timeout=30)
    next(stream)
    stream.cancel()
    assert wait_idle(slow.engine, timeout_s=5.0)
    assert slow.engine.runner.steps - steps_before < 100  # aborted, not run to the end


def test_deadline_exceeded_frees_its_slot(slow):
    steps_before = slow.engine.runner.steps
    with pytest.raises(grpc.RpcError) as err:
        slow.stub.Generate(generate_pb2.GenerateRequest(
            prompt="A long story", sampling=greedy(100, ignore_eos=True)), timeout=0.2)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_idle(slow.engine, timeout_s=5.0)
    assert 0 < slow.engine.runner.steps - steps_before < 100


def test_scheduler_gauges_read_idle_after_a_cancel(aio, tiny_ckpt):
    """A cancel can empty the scheduler with no step after it; the gauges must say so all the same."""
    registry, engine = CollectorRegistry(), slow_engine(tiny_ckpt)
    gateway, port = aio.run(start_gateway(EngineLoop(engine, metrics=GatewayMetrics(registry)),
                                          ModelInfo.local(engine, "tiny"), ready=True))
    gauges = ("expertmesh_scheduler_running_requests", "expertmesh_scheduler_kv_cache_used_ratio")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stream = generate_pb2_grpc.GenerateServiceStub(channel).GenerateStream(generate_pb2.GenerateRequest(
                prompt="A long story", sampling=greedy(100, ignore_eos=True)), timeout=30)
            next(stream)
            assert registry.get_sample_value(gauges[0]) == 1
            stream.cancel()
            assert wait_idle(engine)
            deadline = time.monotonic() + 5
            while any(registry.get_sample_value(g) for g in gauges) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert [registry.get_sample_value(g) for g in gauges] == [0, 0]
    finally:
        aio.run(gateway.stop(1.0))


def test_every_refused_request_is_counted_by_its_code(aio, tiny_ckpt):
    registry, engine = CollectorRegistry(), slow_engine(tiny_ckpt)
    gateway, port = aio.run(start_gateway(EngineLoop(engine, metrics=GatewayMetrics(registry)),
                                          ModelInfo.local(engine, "tiny"), ready=True))
    bad = [dict(prompt="hi", sampling=greedy(4, top_p=1.5)),  # refused while converting the message
           dict(prompt="hi", sampling=greedy(4, temperature=-1.0)),  # while validating, off the engine thread
           dict(prompt_token_ids=[1, 32000], sampling=greedy(4))]
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            for fields in bad:
                with pytest.raises(grpc.RpcError):
                    stub.Generate(generate_pb2.GenerateRequest(**fields), timeout=10)
        count = registry.get_sample_value("expertmesh_gateway_requests_total", {"code": "INVALID_ARGUMENT"})
        assert count == len(bad)
    finally:
        aio.run(gateway.stop(1.0))


def test_expert_group_processes_are_counted_and_logged_as_they_change(caplog):
    registry = CollectorRegistry()
    metrics = GatewayMetrics(registry)

    def restarts() -> float:
        return registry.get_sample_value("expertmesh_expert_group_restarts_total", {"group": "1", "replica": "0"})

    with caplog.at_level(logging.INFO, logger="expertmesh.services.metrics"):
        metrics.observe_groups({(1, 0): 100})
        metrics.observe_groups({(1, 0): None})
        metrics.observe_groups({(1, 0): None})  # still down: said once
        metrics.observe_groups({(1, 0): 101})
        metrics.observe_groups({(1, 0): 101})
    assert [r.getMessage() for r in caplog.records] == [
        "expert group 1 replica 0 is not answering (restarting, or gone)",
        "expert group 1 replica 0 restarted (process 100, now 101)"]
    assert restarts() == 1
    assert registry.get_sample_value("expertmesh_expert_group_up", {"group": "1", "replica": "0"}) == 1


def test_burst_beyond_the_queue_is_resource_exhausted(slow):
    barrier = threading.Barrier(6, timeout=10)

    def call(_):
        barrier.wait()
        try:
            return len(slow.stub.Generate(generate_pb2.GenerateRequest(
                prompt="burst", sampling=greedy(20, ignore_eos=True)), timeout=30).token_ids)
        except grpc.RpcError as err:
            return err.code()

    with ThreadPoolExecutor(6) as pool:
        outcomes = list(pool.map(call, range(6)))
    assert set(outcomes) == {20, grpc.StatusCode.RESOURCE_EXHAUSTED}, outcomes
    assert wait_idle(slow.engine)


def test_failed_step_is_unavailable_and_the_loop_lives_on(slow):
    stream = slow.stub.GenerateStream(generate_pb2.GenerateRequest(
        prompt="fragile", sampling=greedy(50, ignore_eos=True)), timeout=30)
    next(stream)
    slow.engine.runner.fail = True
    try:
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
    finally:
        slow.engine.runner.fail = False
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "attention shard 0 is unreachable" in err.value.details()
    assert wait_idle(slow.engine)
    assert check_health(slow.address) == health_pb2.HealthCheckResponse.SERVING  # nothing is gone for good
    again = slow.stub.Generate(generate_pb2.GenerateRequest(prompt="fragile", sampling=greedy(5, ignore_eos=True)),
                               timeout=10)
    assert len(again.token_ids) == 5


def test_a_component_gone_for_good_fails_requests_saying_so_and_reports_not_serving(aio, tiny_ckpt):
    engine, gone = slow_engine(tiny_ckpt, num_slots=2, max_waiting=2), []
    gateway, port = aio.run(start_gateway(EngineLoop(engine, diagnose=lambda: list(gone)),
                                          ModelInfo.local(engine, "tiny"), ready=True))
    address, request = f"127.0.0.1:{port}", generate_pb2.GenerateRequest(prompt="fragile", sampling=greedy(
        50, ignore_eos=True))
    try:
        with grpc.insecure_channel(address) as channel:
            stub = generate_pb2_grpc.GenerateServiceStub(channel)
            stream = stub.GenerateStream(request, timeout=30)
            next(stream)
            gone.append("expert group 3 (experts 6, 7)")
            engine.runner.fail = True
            with pytest.raises(grpc.RpcError) as err:
                list(stream)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            reason = err.value.details()
            assert reason.startswith("the cluster cannot serve: expert group 3 (experts 6, 7) gone for good"), reason
            engine.runner.fail = False  # what is gone stays gone: the server says so from now on
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(request, timeout=10)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, reason)
        deadline = time.monotonic() + 10
        while check_health(address) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check_health(address) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert check_health(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        aio.run(gateway.stop(1.0))


def test_a_failed_steps_error_reaches_clients_in_one_short_line():
    from expertmesh.services.gateway_loop import _describe

    report = "The actor died unexpectedly.\nMemory on the node (top 10 processes):\n  pid=1 /usr/bin/secret"
    assert _describe(RuntimeError(report)) == "The actor died unexpectedly."
    assert _describe(RuntimeError("x" * 1000)) == "x" * 297 + "..."
    assert _describe(ConnectionError()) == "ConnectionError"


def test_the_cluster_watch_reports_a_component_gone_for_good_without_any_request(aio, tiny_ckpt):
    """`serve`'s watch: with no traffic at all, a component gone for good turns health NOT_SERVING."""
    from expertmesh.orchestrator.serve import watch_cluster

    class Cluster:  # what the watch asks of the real one (Cluster.lost is tested on Ray in test_faults)
        gone: list[str] = []

        def metrics_targets(self):
            return [], {(0, 0): None if self.gone else 7}

        def lost(self):
            return list(self.gone)

    engine, cluster = slow_engine(tiny_ckpt), Cluster()
    engine_loop = EngineLoop(engine)
    gateway, port = aio.run(start_gateway(engine_loop, ModelInfo.local(engine, "tiny"), ready=True))
    watch = asyncio.run_coroutine_threadsafe(watch_cluster(cluster, GatewayMetrics(CollectorRegistry()),
                                                           engine_loop, every_s=0.05), aio.loop)
    address = f"127.0.0.1:{port}"
    try:
        time.sleep(0.3)
        assert check_health(address) == health_pb2.HealthCheckResponse.SERVING  # everything alive
        cluster.gone = ["expert group 0 (experts 0, 1)"]
        deadline = time.monotonic() + 10
        while check_health(address) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert check_health(address, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as err:
            generate_pb2_grpc.GenerateServiceStub(channel).Generate(
                generate_pb2.GenerateRequest(prompt="hi", sampling=greedy(2)), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert err.value.details().startswith("the cluster cannot serve: expert group 0 (experts 0, 1) gone for good")
    finally:
        watch.cancel()
        aio.run(gateway.stop(1.0))


def test_a_stream_whose_client_is_gone_is_not_logged_as_an_error(caplog):
    """grpc's own ERROR for a message sent after the call ended becomes one DEBUG line of ours."""
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("grpc._cython.cygrpc").error(
            "ExecuteBatchError raised in core by servicer method [/expertmesh.v1.GenerateService/GenerateStream]")
    assert [r.levelname for r in caplog.records] == ["DEBUG"]
    assert "client was gone" in caplog.records[0].getMessage()


def test_tokenize_refuses_text_longer_than_any_prompt(served):
    limit = served.engine.max_prompt_chars
    assert len(served.stub.Tokenize(generate_pb2.TokenizeRequest(text="x" * limit), timeout=30).token_ids) > 1
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Tokenize(generate_pb2.TokenizeRequest(text="x" * (limit + 1)), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"text: {limit + 1} characters"), err.value.details()


def test_tokenize_and_model_info(served):
    text = "The experts are routed, 2 per token."
    assert list(served.stub.Tokenize(generate_pb2.TokenizeRequest(text=text), timeout=10).token_ids) == \
        served.engine.tokenizer.encode(text)
    info = served.stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10)
    cfg = served.engine.cfg
    assert (info.model_name, info.vocab_size, info.context_length) == \
        ("tiny", cfg.vocab_size, served.engine.max_len)  # the name `Served` gave ModelInfo
    assert served.engine.max_len == 128  # the fixture's max_seq_len, below the model's context
    assert (info.num_layers, info.num_experts, info.experts_per_token, info.attention_shards) == \
        (cfg.num_hidden_layers, cfg.num_local_experts, cfg.num_experts_per_tok, 1)
    [group] = info.expert_groups
    assert (group.group, list(group.experts), group.node_id, list(group.gpu_ids)) == \
        (0, list(range(cfg.num_local_experts)), "local", [])


def check_health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                         timeout=10).status


def test_health_follows_set_serving(served):
    for service in ("", SERVICE_NAME):
        assert check_health(served.address, service) == health_pb2.HealthCheckResponse.SERVING
    served.aio.run(served.gateway.set_serving(False))
    try:
        assert check_health(served.address, SERVICE_NAME) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        served.aio.run(served.gateway.set_serving(True))
    assert check_health(served.address) == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(served):
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel)
    [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    names = {s.name for s in reply.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_reflection_only_client_passes(served):
    if not SMOKE.is_file():
        pytest.skip(f"{SMOKE} is absent (the shared/ tools live beside the repository checkout)")
    done = subprocess.run([sys.executable, str(SMOKE), served.address], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_graceful_stop(aio, tiny_ckpt):
    # Steps of >= 20 ms: the long request needs >= 2.4 s, far past the 1 s grace; the short one ~0.2 s.
    s = Served(aio, slow_engine(tiny_ckpt, num_slots=2, max_waiting=2, delay_s=0.02), ready=False)
    stopping = None
    try:
        assert check_health(s.address) == health_pb2.HealthCheckResponse.NOT_SERVING
        aio.run(s.gateway.set_serving(True))
        assert check_health(s.address) == health_pb2.HealthCheckResponse.SERVING
        short = s.stub.GenerateStream(generate_pb2.GenerateRequest(
            prompt="short", sampling=greedy(8, ignore_eos=True)), timeout=30)
        long = s.stub.GenerateStream(generate_pb2.GenerateRequest(
            prompt="long", sampling=greedy(120, ignore_eos=True)), timeout=30)
        next(short), next(long)
        stopping = asyncio.run_coroutine_threadsafe(s.gateway.stop(1.0), aio.loop)
        assert len(list(short)) == 7  # finished within the grace period
        with pytest.raises(grpc.RpcError) as err:
            list(long)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # no new work once stopping
            s.stub.Generate(generate_pb2.GenerateRequest(prompt="late", sampling=greedy(2)), timeout=10)
        stopping.result(10)
        assert not s.gateway.engine_loop.running
        assert wait_idle(s.engine, timeout_s=0.1)
    finally:
        if stopping is None or not stopping.done():
            s.close(grace_s=0.1)  # stop() is idempotent
        s.channel.close()


class HungRunner(SlowRunner):
    """A runner whose steps hang (until released) once `hang` is set: a component that stopped answering."""

    def __init__(self, runner):
        super().__init__(runner, 0.0)
        self.hang, self.release_hang, self.hung = threading.Event(), threading.Event(), threading.Event()

    def run(self, plan):
        if self.hang.is_set():
            self.hung.set()
            self.release_hang.wait(120)
        return super().run(plan)


def test_stop_ends_within_its_bound_when_a_step_hangs(aio, tiny_ckpt):
    base = Engine.from_checkpoint(tiny_ckpt, max_batch_size=1, max_seq_len=128)
    runner = HungRunner(base.runner)
    s = Served(aio, Engine(runner, base.tokenizer, base.cfg, Scheduler(num_slots=1, max_len=base.max_len)))
    try:
        stream = s.stub.GenerateStream(generate_pb2.GenerateRequest(
            prompt="hang", sampling=greedy(50, ignore_eos=True)), timeout=60)
        next(stream)
        runner.hang.set()
        assert runner.hung.wait(10)
        started = time.monotonic()
        s.aio.run(s.gateway.stop(0.2), timeout=60)
        # The step hangs for 120 s; the stop waits for it STEP_SLACK_S past the grace, then REPLY_FLUSH_S.
        assert time.monotonic() - started < 0.2 + STEP_SLACK_S + REPLY_FLUSH_S + 5
        with pytest.raises(grpc.RpcError) as err:
            list(stream)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        runner.release_hang.set()
        s.channel.close()
