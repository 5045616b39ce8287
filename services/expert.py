"""ExpertService: one expert group served over gRPC, and the router's client for it.

The server wraps a local `ExpertGroup`. One message carries every row of one layer that this group
owns, for the whole step; a router keeps one `ForwardStream` open per group and sends one message
per layer and step over it (`ExpertStream`). The unary `Forward` is the same computation for tools.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc
import torch

from expertmesh.model.moe import ExpertGroup
from expertmesh.services import codec
from expertmesh.services.access import InternalTLS
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, Connection, ServiceGoneError, start_internal_server
from expertmesh.services.metrics import ExpertMetrics
from expertmesh.v1 import expert_pb2, expert_pb2_grpc

log = logging.getLogger(__name__)


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    """Protobuf in -> checked tensors -> the group -> protobuf out. Computes on the server's loop
    thread: a group serves one message at a time, and its torch threads do the work."""

    def __init__(self, group: ExpertGroup, hidden_size: int, dtype: torch.dtype, device: str = "cpu",
                 metrics: ExpertMetrics | None = None, name: str = "0", replica: str = "0"):
        self.group, self.hidden_size, self.dtype, self.device = group, hidden_size, dtype, device
        self._series = None  # this group's metric series, looked up once instead of per message
        if metrics is not None:
            self._series = (metrics.forward.labels(name, replica), metrics.rows.labels(name, replica))

    async def Forward(self, request, context):
        return self.forward(request)

    async def ForwardStream(self, request_iterator, context):
        async for request in request_iterator:
            start = time.perf_counter()
            reply, rows = self._forward(request)
            elapsed = time.perf_counter() - start
            yield reply
            self._observe(elapsed, rows)  # once the reply is on its way: off the router's critical path

    async def Describe(self, request, context):
        return expert_pb2.DescribeExpertsResponse(experts=self.group.experts, layers=self.group.layers)

    def forward(self, request: expert_pb2.ExpertForwardRequest) -> expert_pb2.ExpertForwardResponse:
        start = time.perf_counter()
        reply, rows = self._forward(request)
        self._observe(time.perf_counter() - start, rows)
        return reply

    def _forward(self, request: expert_pb2.ExpertForwardRequest) -> tuple[expert_pb2.ExpertForwardResponse, int]:
        x = codec.decode(request.hidden, "hidden", self.dtype, (None, self.hidden_size), self.device)
        ids = codec.decode(request.expert_ids, "expert_ids", torch.int64, (x.shape[0],), self.device)
        with torch.inference_mode():
            y = self.group(request.layer, x, ids)
        return expert_pb2.ExpertForwardResponse(hidden=codec.encode(y)), x.shape[0]

    def _observe(self, seconds: float, rows: int) -> None:
        if self._series is not None:
            self._series[0].observe(seconds)
            self._series[1].observe(rows)


async def serve_experts(servicer: ExpertServicer, address: str = "127.0.0.1:0",
                        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                        tls: InternalTLS | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a server for one expert group on the running loop; returns it and the port it bound."""
    return await start_internal_server(servicer, expert_pb2_grpc.add_ExpertServiceServicer_to_server, address,
                                       max_message_bytes, tls)


class ExpertStream:
    """A remote expert group as the router sees it: `await forward(layer, x, expert_ids)` sends one
    message on a long-lived ForwardStream and returns the group's rows. Used on one event loop.
    With `resolve`, a message that finds the group gone is sent again to the restarted group
    (`internal.Connection`); `timeout_s` bounds every message's round trip."""

    def __init__(self, address: str, experts: tuple[int, ...], timeout_s: float = 30.0,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, device: str = "cpu",
                 resolve: Callable[[], str] | None = None, tls: InternalTLS | None = None):
        self.experts, self.device = tuple(experts), device
        self.connection = Connection(address, lambda c: expert_pb2_grpc.ExpertServiceStub(c).ForwardStream,
                                     "expert group", timeout_s, max_message_bytes, resolve, tls=tls)

    async def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor, retry: bool = True) -> torch.Tensor:
        """`retry=False`: no waiting for a restart; a gone group raises UNAVAILABLE."""
        request = expert_pb2.ExpertForwardRequest(layer=layer, hidden=codec.encode(x),
                                                  expert_ids=codec.encode(expert_ids))
        reply = await (self.connection(request) if retry else self.connection.send_once(request))
        return codec.decode(reply.hidden, "hidden", x.dtype, tuple(x.shape), self.device)

    async def close(self) -> None:
        await self.connection.close()


class ExpertReplicas:
    """One expert group as the router sees it, served by one or more replicas (same experts, separate
    processes). Each message goes to the healthy replica with the fewest messages in flight, taking
    turns among equals (one caller sending one message at a time still spreads its load). One that
    finds its replica gone (UNAVAILABLE) goes to another healthy replica at once, while the gone one is
    reconnected in the background after Ray restarts it. With no healthy replica left, the message
    waits for the first replica to come back, whichever it is. A replica not back within the restart
    wait is given up for now and tried again every RETRY_S (a slow restart still rejoins); one that
    will never come back (`ServiceGoneError`: its restarts used up) is given up for good. Once every
    replica is given up, messages fail until one is back. A group without replicas waits for its
    restart in `Connection`."""

    RETRY_S = 30.0

    def __init__(self, replicas: list[ExpertStream]):
        if not replicas:
            raise ValueError("an expert group needs at least one replica")
        self.replicas, self.experts = list(replicas), replicas[0].experts
        self._in_flight = [0] * len(replicas)
        self._turn = 0
        self._down: set[int] = set()  # gone, and being reconnected
        self._lost: set[int] = set()  # given up: reconnecting failed (retried later unless gone for good)
        self._changed = asyncio.Event()  # a reconnection ended, either way
        self._revivals: set[asyncio.Task] = set()

    async def forward(self, layer: int, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        if len(self.replicas) == 1:
            return await self.replicas[0].forward(layer, x, expert_ids)
        while True:
            healthy = [i for i in range(len(self.replicas)) if i not in self._down and i not in self._lost]
            if not healthy:
                await self._wait_for_a_replica()
                continue
            self._turn = (self._turn + 1) % len(self.replicas)
            i = min(healthy, key=lambda k: (self._in_flight[k], (k - self._turn) % len(self.replicas)))
            replica, stale = self.replicas[i], self.replicas[i].connection.channel
            self._in_flight[i] += 1
            try:
                return await replica.forward(layer, x, expert_ids, retry=False)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                log.warning("replica %d of experts %s gone; failing over", i, self.experts)
                self._mark_down(i, stale)
            finally:
                self._in_flight[i] -= 1

    async def _wait_for_a_replica(self) -> None:
        """Until a reconnection ends (each is bounded by the restart timeout); raise if every replica
        is lost."""
        if len(self._lost) == len(self.replicas):
            raise ConnectionError(f"expert group {list(self.experts)}: every replica is gone and none could be "
                                  "restarted (yet)")
        self._changed.clear()
        await self._changed.wait()

    def _mark_down(self, i: int, stale) -> None:
        if i in self._down:
            return
        self._down.add(i)

        async def revive():
            again = False
            try:
                await self.replicas[i].connection.reconnect(stale)
                self._lost.discard(i)
            except ServiceGoneError as exc:
                log.error("replica %d of experts %s is gone for good: %s", i, self.experts, exc)
                self._lost.add(i)
            except Exception as exc:  # noqa: BLE001 - given up for now; messages use the others
                log.warning("replica %d of experts %s is not back (%s); trying again in %.0f s", i, self.experts,
                            exc, self.RETRY_S)
                self._lost.add(i)
                again = True
            finally:
                self._down.discard(i)
                self._changed.set()
            if again:
                await asyncio.sleep(self.RETRY_S)
                self._mark_down(i, stale)

        task = asyncio.get_running_loop().create_task(revive())
        self._revivals.add(task)
        task.add_done_callback(self._revivals.discard)

    async def close(self) -> None:
        for task in self._revivals:
            task.cancel()
        await asyncio.gather(*(r.close() for r in self.replicas))
