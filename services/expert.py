"""ExpertService: one expert group served over gRPC, and the router's client for it.

The server wraps a local `ExpertGroup`; the client implements the same `Experts` protocol, so the
router cannot tell a remote group from a local one. One Forward call carries every row of one layer
that this group owns, for the whole step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures

import grpc
import torch

from expertmesh.model.moe import ExpertGroup
from expertmesh.services import codec
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, channel_options, start_internal_server
from expertmesh.services.metrics import ExpertMetrics
from expertmesh.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)

class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Protobuf in -> checked tensors -> the group -> protobuf out."""

    def __init__(self, group: ExpertGroup, hidden_size: int, dtype: torch.dtype, device: str = "cpu",
                 metrics: ExpertMetrics | None = None, name: str = "0"):
        self.group, self.hidden_size, self.dtype, self.device = group, hidden_size, dtype, device
        self.metrics, self.name = metrics, name

    def Forward(self, request, context):
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

    def Describe(self, request, context):
        return expert_pb2.DescribeExpertsResponse(experts=self.group.experts, layers=self.group.layers)


def serve_experts(servicer: ExpertServicer, address: str = "127.0.0.1:0", workers: int = 4,
                  max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """Start a server for one expert group; returns it and the port it bound."""
    return start_internal_server(servicer, expert_pb2_grpc.add_ExpertServiceServicer_to_server, address, workers,
                                 max_message_bytes)


class _PendingCall:
    def __init__(self, future: futures.Future, device):
        self.future, self.device = future, device

    def result(self) -> torch.Tensor:
        return codec.decode(self.future.result().hidden, "hidden", device=self.device)


class ExpertClient:
    """A remote expert group, as the router sees it (`Experts` protocol)."""

    def __init__(self, address: str, experts: tuple[int, ...], timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, device: str = "cpu",
                 resolve: Callable[[], str] | None = None):
        """`resolve`, if given, returns the group's current address: a call that finds the group gone
        (UNAVAILABLE) asks it, reconnects and is sent again once. Expert calls are pure functions of
        their input, so a retry cannot duplicate anything."""
        self.experts, self.timeout_s, self.device, self.resolve = tuple(experts), timeout_s, device, resolve
        self._options = channel_options(max_message_bytes)
        self._connect(address)
        # Blocking calls on a long-lived thread, not grpc's `.future()`: that starts a new polling
        # thread whenever the channel goes from no call in flight to one, i.e. on every call here
        # (about 1 ms per call, measured).
        self._caller = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"experts-{address}")

    def _connect(self, address: str) -> None:
        self.address = address
        self.channel = grpc.insecure_channel(address, options=self._options)
        self.stub = expert_pb2_grpc.ExpertServiceStub(self.channel)

    def submit(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> _PendingCall:
        request = expert_pb2.ExpertForwardRequest(layer=layer, hidden=codec.encode(x),
                                                  expert_ids=codec.encode(expert_ids))
        return _PendingCall(self._caller.submit(self._forward, request), self.device)

    def _forward(self, request: expert_pb2.ExpertForwardRequest) -> expert_pb2.ExpertForwardResponse:
        try:
            return self.stub.Forward(request, timeout=self.timeout_s)
        except grpc.RpcError as exc:
            if self.resolve is None or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("expert group at %s unavailable (%s); waiting for it to come back", self.address,
                        exc.details())
        old = self.channel
        self._connect(self.resolve())
        old.close()
        log.info("expert group back at %s; retrying the call", self.address)
        return self.stub.Forward(request, timeout=self.timeout_s)

    def close(self) -> None:
        self._caller.shutdown(wait=False)
        self.channel.close()
