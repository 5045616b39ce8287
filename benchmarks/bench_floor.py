"""The floor under one layer's remote expert call on this machine, measured apart from the cluster.

1. Message round trips between two processes on loopback (2 KiB, one row of the small preset's hidden
   state), back to back and with an idle gap after each, as an expert group sees at concurrency 1, with
   the CPU time each costs the client and the server process (what bounds a busy machine):
   grpc.aio bidirectional stream (what the cluster uses, with and without the GRPC_EXPERIMENTS its
   components run with), grpc sync stream and unary, raw TCP.
2. One expert of the small preset on one row, one thread: back to back, after sleeping, and after
   spinning for the same gap (is the cost the idle core, or the weights leaving the caches?).

    python benchmarks/bench_floor.py --model DIR [--gap-ms 8] [--rounds 250]

Without --model it writes the `small` preset to a temporary directory first.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import queue
import socket
import statistics
import tempfile
import time
from concurrent import futures

import grpc
import torch
from bench_cpu import process_cpu

MESSAGE = b"x" * 2048
SERVICE = "floor.Echo"


WARM_UP = 20
"""Round trips left out of every figure: the first open the connection and warm up."""


def _p50_p90(seconds: list[float]) -> str:
    s = sorted(seconds[WARM_UP:])
    return f"{s[len(s) // 2] * 1e6:.0f} / {s[int(0.9 * len(s))] * 1e6:.0f}"


def _handlers(is_async: bool):
    if is_async:
        async def unary(m, ctx):
            return m

        async def stream(it, ctx):
            async for m in it:
                yield m
    else:
        def unary(m, ctx):
            return m

        def stream(it, ctx):
            yield from it
    return grpc.method_handlers_generic_handler(SERVICE, {"U": grpc.unary_unary_rpc_method_handler(unary),
                                                          "S": grpc.stream_stream_rpc_method_handler(stream)})


def _serve(kind: str, port: int, ready) -> None:
    if kind == "tcp":
        s = socket.create_server(("127.0.0.1", port))
        ready.set()
        conn, _ = s.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(65536):
            conn.sendall(data)
    elif kind == "aio":
        async def main():
            server = grpc.aio.server()
            server.add_generic_rpc_handlers((_handlers(True),))
            server.add_insecure_port(f"127.0.0.1:{port}")
            await server.start()
            ready.set()
            await server.wait_for_termination()

        asyncio.run(main())
    else:
        server = grpc.server(futures.ThreadPoolExecutor(4))
        server.add_generic_rpc_handlers((_handlers(False),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        server.start()
        ready.set()
        server.wait_for_termination()


def _client(kind: str, port: int, rounds: int, gap: float, server_pid: int) -> str:
    times = []
    cpu: list[tuple[float, float]] = []  # (this process, the server) after the warm-up and at the end

    def mark() -> None:
        if len(times) in (WARM_UP, rounds):
            cpu.append((time.process_time(), process_cpu(server_pid)))

    def timed(call) -> None:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
        mark()
        time.sleep(gap)  # the thread blocks, as a component waiting for the rest of the step

    if kind == "raw TCP":
        c = socket.create_connection(("127.0.0.1", port))
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        def echo():
            c.sendall(MESSAGE)
            got = 0
            while got < len(MESSAGE):
                got += len(c.recv(65536))

        for _ in range(rounds):
            timed(echo)
    elif kind == "grpc.aio stream":
        async def main():
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
            call = channel.stream_stream(f"/{SERVICE}/S")()
            for _ in range(rounds):
                start = time.perf_counter()
                await call.write(MESSAGE)
                await call.read()
                times.append(time.perf_counter() - start)
                mark()
                time.sleep(gap)
            await channel.close()

        asyncio.run(main())
    elif kind == "grpc sync stream":
        requests: queue.SimpleQueue = queue.SimpleQueue()
        replies = grpc.insecure_channel(f"127.0.0.1:{port}").stream_stream(f"/{SERVICE}/S")(iter(requests.get, None))
        for _ in range(rounds):
            timed(lambda: (requests.put(MESSAGE), next(replies)))
        requests.put(None)
    else:
        call = grpc.insecure_channel(f"127.0.0.1:{port}").unary_unary(f"/{SERVICE}/U")
        for _ in range(rounds):
            timed(lambda: call(MESSAGE, timeout=10))
    n = rounds - WARM_UP
    return f"{_p50_p90(times)} | {(cpu[1][0] - cpu[0][0]) / n * 1e6:.0f} + {(cpu[1][1] - cpu[0][1]) / n * 1e6:.0f}"


def transport(rounds: int, gaps: list[float]) -> None:
    ctx = multiprocessing.get_context("spawn")  # grpc does not survive fork
    print("| path | " + " | ".join(f"gap {g * 1e3:.0f} ms: round trip p50 / p90 us | CPU per round trip, client + "
                                  "server us" for g in gaps) + " |")
    print("|---|" + "---|---|" * len(gaps))
    from expertmesh.services.internal import INTERNAL_GRPC_EXPERIMENTS

    legacy = {"GRPC_EXPERIMENTS": INTERNAL_GRPC_EXPERIMENTS}  # what the cluster's components run with
    sides = [("grpc.aio stream", "grpc.aio stream", "aio", {}),
             (f"grpc.aio stream, GRPC_EXPERIMENTS={INTERNAL_GRPC_EXPERIMENTS}", "grpc.aio stream", "aio", legacy),
             ("grpc sync stream", "grpc sync stream", "sync", {}), ("grpc sync unary", "grpc sync unary", "sync", {}),
             ("raw TCP", "raw TCP", "tcp", {})]
    for name, client_kind, server_kind, env in sides:
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # spawned processes start with it, before grpc loads
        cells = []
        for gap in gaps:
            with socket.socket() as s:  # a free port for this pair
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            ready = ctx.Event()
            server = ctx.Process(target=_serve, args=(server_kind, port, ready), daemon=True)
            server.start()
            ready.wait(30)
            with ctx.Pool(1) as pool:
                cells.append(pool.apply(_client, (client_kind, port, rounds, gap, server.pid)))
            server.kill()
            server.join()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


def expert(model: str, rounds: int, gap: float) -> None:
    from expertmesh.checkpoint import CheckpointReader
    from expertmesh.model.load import load_expert_group

    torch.set_num_threads(1)
    group = load_expert_group(CheckpointReader(model), [2], torch.float32)
    x, ids = torch.randn(1, group.w13[0][0].in_features), torch.tensor([2])

    def spin():
        end = time.perf_counter() + gap
        while time.perf_counter() < end:
            pass

    print(f"\n| one expert, 1 row, 1 thread, layer 3 | p50 / p90 us |\n|---|---|")
    for name, wait in (("back to back", lambda: None), (f"after sleeping {gap * 1e3:.0f} ms", lambda: time.sleep(gap)),
                       (f"after spinning {gap * 1e3:.0f} ms", spin)):
        times = []
        with torch.inference_mode():
            for _ in range(rounds):
                wait()
                start = time.perf_counter()
                group(3, x, ids)
                times.append(time.perf_counter() - start)
        print(f"| {name} | {_p50_p90(times)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--gap-ms", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=250)
    args = parser.parse_args()
    model = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        from expertmesh.presets import write_preset

        write_preset("small", model)
    print(f"torch {torch.__version__}, grpcio {grpc.__version__}, {multiprocessing.cpu_count()} cores\n")
    transport(args.rounds, [0.0, args.gap_ms / 1e3])
    expert(model, min(args.rounds, 150), args.gap_ms / 1e3)


if __name__ == "__main__":
    main()
