"""What the internal services (expert groups, routers, attention shards) share: server start-up and
channel options. Message limits are set deliberately for the largest prefill, on both ends."""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures

import grpc

from expertmesh.services.errors import ErrorMappingInterceptor

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # largest prefill: 4096 tokens x top-2 rows x 4096 x fp32 = 128 MiB


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes)]


def start_internal_server(servicer, add_to_server: Callable[[object, grpc.Server], None], address: str,
                          workers: int, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """A synchronous gRPC server for one servicer, errors mapped in one place; returns it and its port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers),
                         interceptors=[ErrorMappingInterceptor()], options=channel_options(max_message_bytes))
    add_to_server(servicer, server)
    port = server.add_insecure_port(address)
    server.start()
    return server, port
