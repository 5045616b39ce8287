"""RouterService: every layer's gate, fanning a step's tokens out to the expert groups.

`RemoteRouter` is the MoE over remote groups: per layer of a step it routes every token to its top-k
experts, sends each group that has rows one message on that group's stream (all groups in flight at
once), and returns the weighted combination. It runs inside the RouterService, or inside an attention
shard (router "inline"). `RouterStream` is the remote router as an attention shard sees it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

import grpc
import torch

from expertmesh.model.moe import ANY_ORDER_TOP_K, Router, add_rows, combine, returns
from expertmesh.services import codec
from expertmesh.services.access import InternalTLS
from expertmesh.services.expert import ExpertStream
from expertmesh.services.internal import DEFAULT_MAX_MESSAGE_BYTES, Connection, start_internal_server
from expertmesh.v1 import router_pb2, router_pb2_grpc

AsyncMoE = Callable[[int, torch.Tensor], Awaitable[torch.Tensor]]
"""`await moe(layer, x [T, D])` -> [T, D]: the `MoE` seam, reached over the network."""


class RemoteRouter:
    """A `Router` (gates, routing, dispatch plan, combine) whose groups are `ExpertStream`s."""

    def __init__(self, router: Router):
        self.router = router

    async def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            plan, work = self.router.dispatch(layer, x)

        async def reply(k: int, group: ExpertStream, rows: torch.Tensor, ids: torch.Tensor):
            return k, await group.forward(layer, rows, ids)

        calls = [asyncio.ensure_future(reply(k, g, *w)) for k, (g, w) in enumerate(zip(self.router.groups, work)) if w]
        try:
            await asyncio.sleep(0)  # the messages go out first; the bookkeeping runs while the groups compute
            self.router.report(layer, plan)
            with torch.inference_mode():  # (never held across an await: the mode is per thread, not per task)
                back = returns(plan)
            if self.router.top_k > ANY_ORDER_TOP_K:  # every reply first, then the sum in group order
                replies = [y for _, y in await asyncio.gather(*calls)]
                with torch.inference_mode():
                    return combine(plan, replies, x, back)
            with torch.inference_mode():
                out, parts = torch.zeros_like(x), back.split(plan.sizes)
            for arrived in asyncio.as_completed(calls):  # each group's rows as soon as they are back
                k, y = await arrived
                with torch.inference_mode():
                    add_rows(out, y, parts[k])
            return out
        except BaseException:
            for call in calls:
                call.cancel()  # no message left in flight for a call that is over
            raise

    async def close(self) -> None:
        await asyncio.gather(*(g.close() for g in self.router.groups))


class RouterServicer(router_pb2_grpc.RouterServiceServicer):
    def __init__(self, moe: AsyncMoE, layers: Iterable[int], hidden_size: int, dtype: torch.dtype,
                 device: str = "cpu"):
        self.moe, self.layers, self.hidden_size, self.dtype, self.device = moe, set(layers), hidden_size, dtype, device

    async def Route(self, request, context):
        return await self.route(request)

    async def RouteStream(self, request_iterator, context):
        async for request in request_iterator:
            yield await self.route(request)

    async def route(self, request: router_pb2.RouteRequest) -> router_pb2.RouteResponse:
        if request.layer not in self.layers:
            raise ValueError(f"layer: {request.layer} has no gate in this router")
        x = codec.decode(request.hidden, "hidden", self.dtype, (None, self.hidden_size), self.device)
        return router_pb2.RouteResponse(hidden=codec.encode(await self.moe(request.layer, x)))


async def serve_router(servicer: RouterServicer, address: str = "127.0.0.1:0",
                       max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                       tls: InternalTLS | None = None) -> tuple[grpc.aio.Server, int]:
    """Start a router server on the running loop; returns it and the port it bound."""
    return await start_internal_server(servicer, router_pb2_grpc.add_RouterServiceServicer_to_server, address,
                                       max_message_bytes, tls)


class RouterStream:
    """The remote router as an attention shard sees it (`AsyncMoE`): one message per layer and step
    on a long-lived RouteStream. With `resolve`, a message that finds the router gone is sent again
    to the restarted router (`internal.Connection`)."""

    def __init__(self, address: str, timeout_s: float = 30.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 device: str = "cpu", resolve: Callable[[], str] | None = None, tls: InternalTLS | None = None):
        self.device = device
        self.connection = Connection(address, lambda c: router_pb2_grpc.RouterServiceStub(c).RouteStream, "router",
                                     timeout_s, max_message_bytes, resolve, tls=tls)

    async def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        reply = await self.connection(router_pb2.RouteRequest(layer=layer, hidden=codec.encode(x)))
        return codec.decode(reply.hidden, "hidden", x.dtype, tuple(x.shape), self.device)

    async def close(self) -> None:
        await self.connection.close()
