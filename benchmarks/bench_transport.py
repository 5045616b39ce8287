"""How much of the cluster's gap to the engine is gRPC: the expert groups' messages over gRPC (the
cluster as it is) and over raw TCP, side by side with the single-process engine.

The raw variant is installed through Ray's worker setup hook in the processes of a second cluster
only, so the cluster's code runs unchanged otherwise: each expert group also listens on a plain TCP
socket (TCP_NODELAY) on its event loop and answers there with the same servicer, and the routers send
each message there instead of on the group's gRPC stream. A message is the same serialized
`ExpertForwardRequest` / `ExpertForwardResponse`, framed by a 4-byte length. No deadlines, retries
or metrics on that path: it is a floor to measure against, not a transport to ship (the design asks
for gRPC between the router and the groups).

    python benchmarks/bench_transport.py --model DIR [--concurrency 1 32] [--rounds 5]

Without --model it writes the `small` preset to a temporary directory first. Both clusters are
2 attention shards x 4 expert groups with the router inline; the sides are measured in turn within
each round, in rotating order, with bench_cluster's requests (32-token prompts, 64 new tokens, greedy).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

import torch
from bench_cluster import make_requests, measure

from expertmesh.engine import Engine
from expertmesh.orchestrator import cluster as cluster_module
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.presets import write_preset
from expertmesh.scheduler import Scheduler

RAW = "EXPERTMESH_BENCH_RAW_TCP"
"""Set in the environment of the raw cluster's processes only."""


def install_raw_tcp() -> None:
    """The worker setup hook: in a process whose environment sets RAW, expert groups also serve over
    raw TCP (and report that address) and expert streams send there."""
    if os.environ.get(RAW) != "1":
        return
    import asyncio
    import socket

    from expertmesh.orchestrator import actors
    from expertmesh.services import codec, expert
    from expertmesh.v1 import expert_pb2

    async def read_frame(reader: asyncio.StreamReader) -> bytes:
        return await reader.readexactly(int.from_bytes(await reader.readexactly(4), "little"))

    def frame(message) -> bytes:
        body = message.SerializeToString()
        return len(body).to_bytes(4, "little") + body

    serve_grpc = actors.serve_experts

    async def serve_both(servicer, address, *args, **kwargs):
        server, _ = await serve_grpc(servicer, address, *args, **kwargs)

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                while True:
                    request = expert_pb2.ExpertForwardRequest.FromString(await read_frame(reader))
                    reply, _ = servicer._forward(request)
                    writer.write(frame(reply))
            except asyncio.IncompleteReadError:  # the router closed its connection
                writer.close()

        raw = await asyncio.start_server(handle, address.rsplit(":", 1)[0], 0)
        server.raw = raw  # kept alive with the gRPC server
        return server, raw.sockets[0].getsockname()[1]

    async def forward(self, layer, x, expert_ids, retry=True):
        request = expert_pb2.ExpertForwardRequest(layer=layer, hidden=codec.encode(x),
                                                  expert_ids=codec.encode(expert_ids))
        if not hasattr(self, "raw_lock"):
            self.raw_lock, self.raw_pipe = asyncio.Lock(), None
        async with self.raw_lock:  # one message at a time per connection, as on a stream
            if self.raw_pipe is None:
                host, port = self.connection.address.rsplit(":", 1)
                self.raw_pipe = await asyncio.open_connection(host, int(port))
                self.raw_pipe[1].get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = self.raw_pipe
            writer.write(frame(request))
            reply = expert_pb2.ExpertForwardResponse.FromString(await read_frame(reader))
        return codec.decode(reply.hidden, "hidden", x.dtype, tuple(x.shape), self.device)

    actors.serve_experts = serve_both
    expert.ExpertStream.forward = forward


def start_cluster(model: str, plan, slots: int, max_len: int, raw: bool) -> Cluster:
    """An inline-router cluster whose processes start with RAW set or not."""
    plain = cluster_module.component_env

    def component_env() -> dict[str, str]:
        return {**plain(), RAW: "1" if raw else "0"}

    cluster_module.component_env = component_env
    try:
        options = RuntimeOptions(device="cpu", dtype="float32", threads=1)
        return Cluster(model, plan, options, slots, max_len, router="inline").start()
    finally:
        cluster_module.component_env = plain


def greedy_tokens(engine: Engine) -> list[list[int]]:
    """Every token of a few greedy requests: the raw path must compute exactly what gRPC does."""
    return [list(r.token_ids) for r in engine.generate(make_requests(4, 32, 8, seed=7))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import ray

    model = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        write_preset("small", model)
    slots, max_len = max(args.concurrency), 96
    local = Engine.from_checkpoint(model, dtype=torch.float32, max_batch_size=slots, max_seq_len=max_len)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": install_raw_tcp})
    plan = plan_cluster(local.cfg, attention_shards=2, expert_groups=4, device="cpu")
    clusters = {"cluster, gRPC": start_cluster(model, plan, slots, max_len, raw=False),
                "cluster, raw TCP to the groups": start_cluster(model, plan, slots, max_len, raw=True)}
    sides = {"engine": local, **{name: Engine(cl.runner(), local.tokenizer, local.cfg, Scheduler(slots, max_len))
                                 for name, cl in clusters.items()}}
    tokens = {name: greedy_tokens(engine) for name, engine in sides.items()}
    if any(len(t) != 8 for ts in tokens.values() for t in ts) or len({str(t) for t in tokens.values()}) != 1:
        raise SystemExit(f"the sides disagree on greedy tokens: {tokens}")
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; clusters: 2 attention shards x 4 expert groups, "
          f"router inline; prompt 32, 64 new tokens, greedy float32, median of {args.rounds} rounds, sides in "
          "turn in rotating order; greedy tokens identical on every side\n")
    print("| concurrency | side | decode tok/s | vs engine | vs engine per round: min / median / max |")
    print("|---|---|---|---|---|")
    for c in args.concurrency:
        for engine in sides.values():  # warm-up
            measure(engine, make_requests(c, 32, 4))
        results: dict[str, list[float]] = {side: [] for side in sides}
        order = list(sides)
        for r in range(args.rounds):
            for side in order[r % len(order):] + order[:r % len(order)]:
                results[side].append(measure(sides[side], make_requests(c, 32, 64))["decode_tps"])
        engine_tps = statistics.median(results["engine"])
        for side, tps in results.items():
            ratio = paired = ""
            if side != "engine":
                ratio = f"{statistics.median(tps) / engine_tps:.2f}x"
                rounds = sorted(s / e for s, e in zip(tps, results["engine"]))
                paired = f"{rounds[0]:.2f} / {statistics.median(rounds):.2f} / {rounds[-1]:.2f}"
            print(f"| {c} | {side} | {statistics.median(tps):.1f} | {ratio} | {paired} |", flush=True)
    for cl in clusters.values():
        cl.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
