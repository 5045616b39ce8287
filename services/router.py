"""RouterService: every layer's gate, fanning a step's tokens out to the expert groups.

The server wraps a `Router` whose groups are `ExpertClient`s: per call (one layer of one step) it
routes every token to its top-k experts, sends each group that has rows one batched Forward (all
groups in flight at once), and returns the weighted combination. The client implements the `MoE`
protocol, so an attention shard cannot tell the remote router from local experts.
"""

from __future__ import annotations

import grpc
import torch

from expertmesh.model.moe import Router
from expertmesh.services import codec
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, channel_options, start_internal_server
from expertmesh.services.metrics import RouterMetrics
from expertmesh.v1 import router_pb2, router_pb2_grpc


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, router: Router, hidden_size: int, dtype: torch.dtype, device: str = "cpu",
                 metrics: RouterMetrics | None = None):
        self.router, self.hidden_size, self.dtype, self.device = router, hidden_size, dtype, device
        self.moe = metrics.metered(router) if metrics is not None else router

    def Route(self, request, context):
        if request.layer not in self.router.gates:
            raise ValueError(f"layer: {request.layer} has no gate in this router")
        x = codec.decode(request.hidden, "hidden", self.dtype, (None, self.hidden_size), self.device)
        with torch.inference_mode():
            y = self.moe(request.layer, x)
        return router_pb2.RouteResponse(hidden=codec.encode(y))


def serve_router(servicer: RouterServicer, address: str = "127.0.0.1:0", workers: int = 8,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """Start a router server; returns it and the port it bound."""
    return start_internal_server(servicer, router_pb2_grpc.add_RouterServiceServicer_to_server, address, workers,
                                 max_message_bytes)


class RouterClient:
    """The remote router as an attention shard sees it (`MoE` protocol): one call per layer per step."""

    def __init__(self, address: str, timeout_s: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 device: str = "cpu"):
        self.address, self.timeout_s, self.device = address, timeout_s, device
        self.channel = grpc.insecure_channel(address, options=channel_options(max_message_bytes))
        self.stub = router_pb2_grpc.RouterServiceStub(self.channel)

    def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        reply = self.stub.Route(router_pb2.RouteRequest(layer=layer, hidden=codec.encode(x)), timeout=self.timeout_s)
        return codec.decode(reply.hidden, "hidden", x.dtype, tuple(x.shape), self.device)

    def close(self) -> None:
        self.channel.close()
