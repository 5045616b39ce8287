"""ExpertService: one expert group served over gRPC, and the router's client for it.

The server wraps a local `ExpertGroup`. One message carries every row of one layer that this group
owns, for the whole step; a router keeps one `ForwardStream` open per group and sends one message
per layer and step over it (`ExpertStream`). The unary `Forward` is the same computation for tools.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
import torch

from expertmesh.model.moe import ExpertGroup
from expertmesh.services import codec
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, Connection, start_internal_server
from expertmesh.services.metrics import ExpertMetrics
from expertmesh.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Protobuf in -> checked tensors -> the group -> protobuf out. Computes on the server's loop
    thread: a group serves one message at a time, and its torch threads do the work."""

    def __init__(self, group: ExpertGroup, hidden_size: int, dtype: torch.dtype, device: str = "cpu",
                 metrics: ExpertMetrics | None = None, name: str = "0"):
        self.group, self.hidden_size, self.dtype, self.device = group, hidden_size, dtype, device
        self.metrics, self.name = metrics, name

    async def Forward(self, request, context):
        return self.forward(request)

    async def ForwardStream(self, request_iterator, context):
        async for request in request_iterator:
            yield self.forward(request)

    async def Describe(self, request, context):
        return expert_pb2.DescribeExpertsResponse(experts=self.group.experts, layers=self.group.layers)

    def forward(self, request: expert_pb2.ExpertForwardRequest) -> expert_pb2.ExpertForwardResponse:
        start = time.perf_counter()
        x = codec.decode(request.hidden, "hidden", self.dtype, (None, self.hidden_size), self.device)
        ids = codec.decode(request.expert_ids, "expert_ids", torch.int64, (x.shape[0],), self.device)
        with torch.inference_mode():
            y = self.group(request.layer, x, ids)
        reply = expert_pb2.ExpertForwardResponse(hidden=codec.encode(y))
        if self.metrics is not None:
            self.metrics.forward.labels(self.name).observe(time.perf_counter() - start)
            self.metrics.rows.labels(self.name).observe(x.shape[0])
        return reply


async def serve_experts(servicer: ExpertServicer, address: str = "127.0.0.1:0",
                        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.aio.Server, int]:
    """Start a server for one expert group on the running loop; returns it and the port it bound."""
    return await start_internal_server(servicer, expert_pb2_grpc.add_ExpertServiceServicer_to_server, address,
                                       max_message_bytes)


class ExpertStream:
    """A remote expert group as the router sees it: `await forward(layer, x, expert_ids)` sends one
    message on a long-lived ForwardStream and returns the group's rows. Used on one event loop.
    With `resolve`, a message that finds the group gone is sent again to the restarted group
    (`internal.Connection`); `timeout_s` bounds every message's round trip."""

    def __init__(self, address: str, experts: tuple[int, ...], timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, device: str = "cpu",
                 resolve: Callable[[], str] | None = None):
        self.experts, self.device = tuple(experts), device
        self.connection = Connection(address, lambda c: expert_pb2_grpc.ExpertServiceStub(c).ForwardStream,
                                     "expert group", timeout_s, max_message_bytes, resolve)

    async def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        reply = await self.connection(expert_pb2.ExpertForwardRequest(layer=layer, hidden=codec.encode(x),
                                                                      expert_ids=codec.encode(expert_ids)))
        return codec.decode(reply.hidden, "hidden", x.dtype, tuple(x.shape), self.device)

    async def close(self) -> None:
        await self.connection.close()
