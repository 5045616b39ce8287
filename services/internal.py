"""What the internal services (expert groups, routers, attention shards) share: the event loop they
run on, server start-up and channel options. Message limits are set deliberately for the largest
prefill, on both ends.

Every internal server and client is grpc.aio on one event loop per process, and the hot calls are
long-lived bidirectional streams (one message per layer and step): on these 2-core machines a stream
message costs well under half a unary call, and one loop thread means no thread hand-offs inside a
component (see MEASUREMENTS and benchmarks/results/cluster_vs_engine.md).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import grpc

from expertmesh.services.access import INTERNAL_SERVER_NAME, InternalTLS
from expertmesh.services.errors import ErrorMappingInterceptor

INTERNAL_GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"
"""`GRPC_EXPERIMENTS` of every component process: gRPC's own poller instead of the EventEngine for
channels and servers, which hands each message through fewer threads. A 2 KiB stream round trip on
2 cores: 237 instead of 352 us back to back, 983 instead of 1235 us after an 8 ms idle gap
(`benchmarks/bench_floor.py`). The cluster at concurrency 32, with two more EventEngine experiments
off as well: 129.7 instead of 111.5 tokens/s (benchmarks/results/cluster_vs_engine.md)."""

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # largest prefill: 4096 tokens x top-2 rows x 4096 x fp32 = 128 MiB

T = TypeVar("T")
log = logging.getLogger(__name__)


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


class EventLoopThread:
    """An asyncio loop on a daemon thread: where a component's server and its clients live, so the
    component's own (synchronous) code, e.g. a Ray actor's methods, can start and stop them."""

    def __init__(self, name: str = "expertmesh-loop"):
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float | None = None) -> T:
        """Run `coro` on the loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)


def internal_channel(address: str, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                     tls: InternalTLS | None = None) -> grpc.aio.Channel:
    """A channel to an internal service: plaintext, or mutual TLS checking the internal name."""
    options = channel_options(max_message_bytes)
    if tls is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   options=[*options, ("grpc.ssl_target_name_override", INTERNAL_SERVER_NAME)])


async def start_internal_server(servicer, add_to_server: Callable[[object, grpc.aio.Server], None], address: str,
                                max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                                tls: InternalTLS | None = None) -> tuple[grpc.aio.Server, int]:
    """A grpc.aio server for one servicer on the running loop, errors mapped in one place, plaintext
    or mutual TLS; returns it and its port."""
    server = grpc.aio.server(interceptors=[ErrorMappingInterceptor()], options=channel_options(max_message_bytes))
    add_to_server(servicer, server)
    port = server.add_secure_port(address, tls.server_credentials()) if tls else server.add_insecure_port(address)
    await server.start()
    return server, port


if sys.version_info >= (3, 11):
    async def _read_within(call: grpc.aio.StreamStreamCall, seconds: float):
        async with asyncio.timeout(seconds):  # no task per message, unlike wait_for
            return await call.read()
else:  # Python 3.10
    async def _read_within(call: grpc.aio.StreamStreamCall, seconds: float):
        return await asyncio.wait_for(call.read(), seconds)


class StreamExchange:
    """Request -> reply over long-lived bidirectional streams. A stream carries one message at a
    time and is answered in order; up to `lanes` streams carry the messages of concurrent callers.
    Streams open on first use and are dropped after any failure (a failed stream cannot be trusted to
    be in step). `timeout_s` bounds each round trip."""

    def __init__(self, open_stream: Callable[[], grpc.aio.StreamStreamCall], peer: str, timeout_s: float,
                 lanes: int = 2):
        self.open_stream, self.peer, self.timeout_s = open_stream, peer, timeout_s
        self._idle: list[grpc.aio.StreamStreamCall] = []
        self._lanes = asyncio.Semaphore(lanes)

    async def __call__(self, request):
        async with self._lanes:
            call = await self._write(request)
            try:
                reply = await _read_within(call, self.timeout_s)
            except asyncio.TimeoutError:
                call.cancel()
                raise TimeoutError(f"{self.peer}: no reply within {self.timeout_s} s") from None
            except BaseException:
                call.cancel()
                raise
            if reply is grpc.aio.EOF:
                call.cancel()
                raise ConnectionError(f"{self.peer} closed its stream")
            self._idle.append(call)
            return reply

    async def _write(self, request) -> grpc.aio.StreamStreamCall:
        """Send on an idle stream if one is alive, else on a new one; returns the stream."""
        while self._idle:
            call = self._idle.pop()
            if call.done():
                continue
            try:
                await call.write(request)
                return call
            except (grpc.RpcError, asyncio.InvalidStateError):
                # It ended while idle (e.g. the peer died; grpc then reports INTERNAL "RPC already
                # finished"): a new stream says why, or carries the message.
                call.cancel()
        call = self.open_stream()
        try:
            await call.write(request)
        except BaseException:
            call.cancel()
            raise
        return call

    def reset(self) -> None:
        """Close every idle stream."""
        for call in self._idle:
            call.cancel()
        self._idle.clear()


class ServiceRestartedError(ConnectionError):
    """The service came back as a new process: whatever state it held is gone."""


class ServiceGoneError(ConnectionError):
    """Raised by a `resolve`: the service will never come back (its actor is dead for good)."""


class Connection:
    """One internal service as its caller sees it: a channel and a `StreamExchange` on one of its
    streaming methods. With `resolve` (blocking: it may wait for Ray to restart the service and
    returns its current address), a message that finds the service gone (UNAVAILABLE) reconnects, then
    is sent again once (`resend`: for calls that are pure functions of their input, an expert group's
    or a router's, so a retry cannot duplicate anything) or raises `ServiceRestartedError` (a stateful
    service: its caller decides how to rebuild the state)."""

    def __init__(self, address: str, open_stream: Callable[[grpc.aio.Channel], Callable], kind: str,
                 timeout_s: float, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
                 resolve: Callable[[], str] | None = None, resend: bool = True, tls: InternalTLS | None = None):
        self.open_stream, self.kind, self.timeout_s = open_stream, kind, timeout_s
        self.resolve, self.resend, self.tls = resolve, resend, tls
        self.max_message_bytes = max_message_bytes
        self._reconnecting = asyncio.Lock()
        self._connect(address)

    def _connect(self, address: str) -> None:
        self.address = address
        self.channel = internal_channel(address, self.max_message_bytes, self.tls)
        self._exchange = StreamExchange(self.open_stream(self.channel), f"{self.kind} at {address}", self.timeout_s)

    async def __call__(self, request):
        channel, address = self.channel, self.address
        try:
            return await self._exchange(request)
        except grpc.RpcError as exc:
            if self.resolve is None or exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            log.warning("%s at %s unavailable (%s); waiting for it to come back", self.kind, address, exc.details())
        await self.reconnect(channel)
        if not self.resend:
            raise ServiceRestartedError(f"{self.kind} at {address} was restarted (now at {self.address})")
        return await self._exchange(request)

    async def send_once(self, request):
        """Send without any retry: a gone service raises UNAVAILABLE (see `reconnect`)."""
        return await self._exchange(request)

    async def reconnect(self, stale: grpc.aio.Channel) -> None:
        """Wait for the service to be back (`resolve`) and connect to it, unless a message that failed
        together with this one already did (the channel is no longer `stale`)."""
        async with self._reconnecting:
            if self.channel is stale:
                self._connect(await asyncio.get_running_loop().run_in_executor(None, self.resolve))
                await stale.close()
                log.info("%s back at %s", self.kind, self.address)

    async def close(self) -> None:
        self._exchange.reset()
        await self.channel.close()
