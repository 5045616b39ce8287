"""One place where domain errors become gRPC status codes, for every servicer.

`ValueError` (bad input a caller can fix) -> INVALID_ARGUMENT; `QueueFullError` -> RESOURCE_EXHAUSTED.
Anything else is a bug: logged with its traceback and returned as INTERNAL, and the server keeps
serving. Servicer methods therefore raise, they never build status codes themselves.
"""

from __future__ import annotations

import logging

import grpc

from expertmesh.scheduler import QueueFullError

log = logging.getLogger(__name__)


def status_for(exc: Exception) -> grpc.StatusCode:
    if isinstance(exc, QueueFullError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Wraps the unary-unary handlers of a synchronous server (internal services)."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        behavior = handler.unary_unary

        def guarded(request, context):
            try:
                return behavior(request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, and logged when unexpected
                code = status_for(exc)
                if code == grpc.StatusCode.INTERNAL:
                    log.exception("internal error in %s", handler_call_details.method)
                context.abort(code, str(exc))

        return handler._replace(unary_unary=guarded)
