"""One place where domain errors become gRPC status codes, for every servicer.

`ValueError` (bad input a caller can fix) -> INVALID_ARGUMENT; `QueueFullError` -> RESOURCE_EXHAUSTED.
Anything else is a bug: logged with its traceback and returned as INTERNAL, and the server keeps
serving. Servicer methods therefore raise, they never build status codes themselves.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable

import grpc

from expertmesh.scheduler import QueueFullError

log = logging.getLogger(__name__)


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """Maps what a grpc.aio servicer raises to a status, for unary and streaming methods.

    `services`: the full names of the services to guard (None: all of them); others (health,
    reflection) abort with their own codes. `status`: exception -> code."""

    def __init__(self, services: tuple[str, ...] | None = None,
                 status: Callable[[Exception], grpc.StatusCode] = status_for):
        self.prefixes = None if services is None else tuple(f"/{s}/" for s in services)
        self.status = status

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or (self.prefixes is not None and not method.startswith(self.prefixes)):
            return handler
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._guard_unary(handler.unary_unary, method),
                                    request_deserializer=_tolerant(handler.request_deserializer))
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            return handler._replace(unary_stream=self._guard_stream(handler.unary_stream, method),
                                    request_deserializer=_tolerant(handler.request_deserializer))
        if handler.stream_stream is not None and inspect.isasyncgenfunction(handler.stream_stream):
            return handler._replace(stream_stream=self._guard_stream(handler.stream_stream, method))
        return handler

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
        code = self.status(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.error("internal error in %s", method, exc_info=exc)
        await context.abort(code, str(exc))

    def _guard_unary(self, behavior, method: str):
        async def guarded(request, context):
            try:
                return await behavior(_parsed(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, and logged when unexpected
                await self._abort(context, method, exc)

        return guarded

    def _guard_stream(self, behavior, method: str):
        async def guarded(request_or_iterator, context):
            try:
                async for response in behavior(_parsed(request_or_iterator), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as exc:  # noqa: BLE001 - mapped, and logged when unexpected
                await self._abort(context, method, exc)

        return guarded


class _Unparsable:
    """A request message that did not parse, kept so that the guarded method can say so."""

    def __init__(self, error: Exception):
        self.error = error


def _tolerant(deserializer):
    """`deserializer` that returns an `_Unparsable` instead of raising, which grpc would report as
    UNKNOWN (bad UTF-8 in a string field, truncated bytes)."""
    if deserializer is None:
        return None

    def deserialize(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - DecodeError, or whatever a custom deserializer raises
            return _Unparsable(exc)

    return deserialize


def _parsed(request):
    if isinstance(request, _Unparsable):
        raise ValueError(f"request: not a valid message: {request.error}")
    return request
