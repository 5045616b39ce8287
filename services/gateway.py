"""GenerateService: the public gRPC gateway (`protos/expertmesh/v1/generate.proto`).

    client --GenerateRequest--> GenerateServicer --GenerationRequest--> EngineLoop --> Engine
    client <--GenerateResponse-- GenerateServicer <--StepOutput-------- EngineLoop <--

Protobuf stops at the servicer: `*_from_pb` / `*_to_pb` convert, the engine loop (`gateway_loop.py`)
sees only domain types. Servicer methods raise; `ErrorMappingInterceptor` is the one place errors
become status codes. `start_gateway` serves GenerateService next to the standard `grpc.health.v1`
service and server reflection, so generic tooling (grpcurl, `shared/tools/api_smoke.py`) can use it;
`PublicAccess` (`access.py`) adds TLS and a bearer token in front of them all, health excepted.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from expertmesh.engine import Engine, GenerationRequest, StepOutput
from expertmesh.services.access import PublicAccess
from expertmesh.services.convert import sampling_from_pb
from expertmesh.services.errors import ErrorMappingInterceptor, status_for
from expertmesh.services.gateway_loop import EngineLoop, EngineUnavailableError
from expertmesh.v1 import generate_pb2, generate_pb2_grpc

log = logging.getLogger(__name__)


class _GoneClientFilter(logging.Filter):
    """grpc logs an ERROR with a traceback whenever a stream's next message finds the call already
    over (the client cancelled, its deadline passed, it went away): an ordinary event here, logged
    once at DEBUG instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR and record.getMessage().startswith("ExecuteBatchError raised in core"):
            log.debug("a stream's client was gone before its next message: %s", record.getMessage())
            return False
        return True


logging.getLogger("grpc._cython.cygrpc").addFilter(_GoneClientFilter())

SERVICE_NAME = generate_pb2.DESCRIPTOR.services_by_name["GenerateService"].full_name
# Public requests and responses are token ids and text: a 128k-token prompt or completion is under
# 128k x (5 B varint + ~16 B text) ~ 2.7 MB. 16 MiB leaves room for longer contexts while bounding
# what one call can make the server buffer.
DEFAULT_MAX_MESSAGE_BYTES = 16 << 20

_FINISH_REASONS = {
    "length": generate_pb2.FINISH_REASON_LENGTH,
    "eos": generate_pb2.FINISH_REASON_EOS,
    "stop": generate_pb2.FINISH_REASON_STOP,
}


@dataclass(frozen=True)
class ExpertGroupPlacement:
    """Where one expert group (one replica of it) runs: its index, the expert ids it owns (in every
    layer), node, GPUs, and which replica."""

    group: int
    experts: tuple[int, ...]
    node_id: str
    gpu_ids: tuple[str, ...] = ()
    replica: int = 0


@dataclass(frozen=True)
class ModelInfo:
    """What GetModelInfo reports: the served model and how its experts are placed."""

    model_name: str
    vocab_size: int
    context_length: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    attention_shards: int
    expert_groups: tuple[ExpertGroupPlacement, ...]

    @classmethod
    def local(cls, engine: Engine, model_name: str) -> ModelInfo:
        """The single-process default: one attention shard, one group with every expert, node "local"."""
        cfg = engine.cfg
        group = ExpertGroupPlacement(0, tuple(range(cfg.num_local_experts)), "local")
        return cls(model_name, cfg.vocab_size, engine.max_len, cfg.num_hidden_layers, cfg.num_local_experts,
                   cfg.num_experts_per_tok, 1, (group,))


def request_from_pb(pb: generate_pb2.GenerateRequest) -> GenerationRequest:
    """Proto request -> engine request. Empty prompt / ids mean "not given"; the engine checks that
    exactly one is (its error names `prompt`)."""
    return GenerationRequest(prompt=pb.prompt or None, prompt_token_ids=tuple(pb.prompt_token_ids) or None,
                             params=sampling_from_pb(pb.sampling), request_id=pb.request_id)


def response_to_pb(out: StepOutput) -> generate_pb2.GenerateResponse:
    """One output (a stream step, or a whole completion) -> response; finish reason and usage at the end."""
    response = generate_pb2.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    if out.finish_reason is not None:
        response.finish_reason = _FINISH_REASONS[out.finish_reason]
        response.usage.prompt_tokens = out.prompt_tokens
        response.usage.completion_tokens = out.completion_tokens
    return response


def model_info_to_pb(info: ModelInfo) -> generate_pb2.GetModelInfoResponse:
    groups = [generate_pb2.ExpertGroupPlacement(group=g.group, experts=g.experts, node_id=g.node_id,
                                                gpu_ids=g.gpu_ids, replica=g.replica) for g in info.expert_groups]
    return generate_pb2.GetModelInfoResponse(
        model_name=info.model_name, vocab_size=info.vocab_size, context_length=info.context_length,
        num_layers=info.num_layers, num_experts=info.num_experts, experts_per_token=info.experts_per_token,
        expert_groups=groups, attention_shards=info.attention_shards)


class GenerateServicer(generate_pb2_grpc.GenerateServiceServicer):
    """Protobuf in -> domain request -> engine loop -> protobuf out. Raises; never sets status codes."""

    def __init__(self, engine_loop: EngineLoop, model_info: ModelInfo):
        self.engine_loop, self.model_info = engine_loop, model_info

    async def Generate(self, request, context):
        return response_to_pb(await self.engine_loop.complete(self._request(request)))

    async def GenerateStream(self, request, context):
        # Leaving the `async with` early (client cancel, deadline) aborts the request in the engine.
        async with self.engine_loop.generate(self._request(request)) as generation:
            async for out in generation:
                yield response_to_pb(out)

    def _request(self, pb: generate_pb2.GenerateRequest) -> GenerationRequest:
        try:
            return request_from_pb(pb)
        except ValueError as exc:  # counted like the refusals the engine loop sees
            self.engine_loop.count_rejection(exc)
            raise

    async def Tokenize(self, request, context):
        engine = self.engine_loop.engine
        if len(request.text) > engine.max_prompt_chars:  # (and its reply could pass the message size limit)
            raise ValueError(f"text: {len(request.text)} characters: more than any prompt the context of "
                             f"{engine.max_len} tokens can hold")
        # On a worker thread, so a long text does not hold up this event loop's other calls.
        ids = await asyncio.to_thread(engine.tokenizer.encode, request.text)
        return generate_pb2.TokenizeResponse(token_ids=ids)

    async def GetModelInfo(self, request, context):
        return model_info_to_pb(self.model_info)


def status_of(exc: Exception) -> grpc.StatusCode:
    """`services.errors.status_for`, plus the gateway's own EngineUnavailableError -> UNAVAILABLE."""
    if isinstance(exc, EngineUnavailableError):
        return grpc.StatusCode.UNAVAILABLE
    return status_for(exc)


REPLY_FLUSH_S = 2.0
"""How long a stopping server lets its calls send what they still hold once the engine loop has
ended: every request has its last message or its error by then, unless a step hung."""


class Gateway:
    """A running gateway: the grpc.aio server, its engine loop and its health service."""

    def __init__(self, server: grpc.aio.Server, engine_loop: EngineLoop, health_servicer: health.aio.HealthServicer):
        self.server, self.engine_loop, self.health = server, engine_loop, health_servicer

    async def set_serving(self, serving: bool) -> None:
        """Report SERVING (or NOT_SERVING) for the server overall and for GenerateService."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in (health.OVERALL_HEALTH, SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(self, grace_s: float = 5.0) -> None:
        """Graceful shutdown: health NOT_SERVING for good, let in-flight requests finish within the
        grace period (the rest fail UNAVAILABLE), then stop the server. Ends within `grace_s` +
        STEP_SLACK_S + REPLY_FLUSH_S even if a step hangs: the server then ends the calls still open
        (UNAVAILABLE, "Cancelling all calls")."""
        await self.health.enter_graceful_shutdown()
        await asyncio.to_thread(self.engine_loop.stop, grace_s)
        await self.server.stop(REPLY_FLUSH_S)

    async def wait_for_termination(self) -> None:
        await self.server.wait_for_termination()


async def start_gateway(engine_loop_or_engine: EngineLoop | Engine, model_info: ModelInfo,
                        address: str = "127.0.0.1:0", *, ready: bool = False,
                        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                        access: PublicAccess = PublicAccess()) -> tuple[Gateway, int]:
    """Start GenerateService, grpc.health.v1 and reflection on `address`; returns the gateway and the
    bound port (bind port 0 in tests). An Engine is wrapped in a new EngineLoop; the loop is started.
    Health says SERVING only once `ready` is true or `Gateway.set_serving(True)` is called. `access`
    says whether the port speaks TLS and which token calls need (default: plaintext, open)."""
    engine_loop = engine_loop_or_engine
    if isinstance(engine_loop, Engine):
        engine_loop = EngineLoop(engine_loop)
    engine_loop.start()
    metrics = engine_loop.metrics
    on_denied = (lambda reason: metrics.denied.labels(reason).inc()) if metrics is not None else None
    interceptors = [*access.interceptors(on_denied), ErrorMappingInterceptor((SERVICE_NAME,), status_of)]
    server = grpc.aio.server(interceptors=interceptors,
                             options=[("grpc.max_send_message_length", max_message_bytes),
                                      ("grpc.max_receive_message_length", max_message_bytes)])
    generate_pb2_grpc.add_GenerateServiceServicer_to_server(GenerateServicer(engine_loop, model_info), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = access.add_port(server, address)
    log.info("GenerateService on %s (port %d): %s", address, port, access.describe())
    if access.token and not access.tls:
        log.warning("a bearer token without TLS crosses the network in clear text: use --tls-cert and --tls-key "
                    "unless a TLS proxy in front of the gateway terminates the connection")
    gateway = Gateway(server, engine_loop, health_servicer)
    loop = asyncio.get_running_loop()
    # A loop that can serve no more (a component gone for good) takes the server out of rotation.
    engine_loop.on_broken = lambda reason: asyncio.run_coroutine_threadsafe(gateway.set_serving(False), loop)
    await gateway.set_serving(ready)
    await server.start()
    return gateway, port
