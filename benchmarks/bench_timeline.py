"""Where one layer's MoE goes in the cluster: a per-layer timeline, every component's clock at once.

Probes wrap three calls in every component process (installed through Ray's worker setup hook, so the
cluster's code runs unchanged): the router's whole layer (`RemoteRouter.__call__`), each group
message as the router sees it (`ExpertStream.forward`: encode, send, wait, decode) and each group's
handler (`ExpertServicer._forward`: decode, the experts, encode). All on this host's monotonic clock,
so the stamps of different processes line up. Per decode layer the script splits the router's time
into: routing (start to the first send), the sends (first to last), delivery (a send to its group's
handler starting), the handler, the reply (handler end to the router having the rows back) and the
tail (last reply to the combined output), plus how long one / two groups computed at once and the
time between layers (the shard's attention, and the hop between shards). The single-process engine's
MoE per layer is timed in the same run for scale.

    python benchmarks/bench_timeline.py --model DIR [--concurrency 1 8 32] [--seconds 15]
        [--router inline|service]

Without --model it writes the `small` preset to a temporary directory first.
"""

from __future__ import annotations

import argparse
import bisect
import glob
import os
import statistics
import tempfile
import time
from collections import defaultdict

import torch
from bench_cluster import make_requests, measure

from expertmesh.engine import Engine
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.presets import write_preset
from expertmesh.scheduler import Scheduler

FLUSH_EVERY = 512  # records a process keeps before appending them to its file


def install_probes(out_dir: str):
    """The worker setup hook: wraps the three calls in this process; records go to out_dir/<pid>.txt."""

    def hook() -> None:
        from expertmesh.services import expert, router

        records: list[str] = []

        def record(line: str) -> None:
            records.append(line)
            if len(records) >= FLUSH_EVERY:
                with open(os.path.join(out_dir, f"{os.getpid()}.txt"), "a") as f:
                    f.write("\n".join(records) + "\n")
                records.clear()

        handler = expert.ExpertServicer._forward

        def timed_handler(self, request):
            start = time.perf_counter()
            reply = handler(self, request)
            record(f"handler {self.group.experts[0]} {request.layer} {start:.7f} {time.perf_counter():.7f} {reply[1]}")
            return reply

        send = expert.ExpertStream.forward

        async def timed_send(self, layer, x, expert_ids, retry=True):
            start = time.perf_counter()
            y = await send(self, layer, x, expert_ids, retry)
            record(f"send {self.experts[0]} {layer} {start:.7f} {time.perf_counter():.7f} {x.shape[0]}")
            return y

        call = router.RemoteRouter.__call__

        async def timed_layer(self, layer, x):
            start = time.perf_counter()
            y = await call(self, layer, x)
            record(f"layer {os.getpid()} {layer} {start:.7f} {time.perf_counter():.7f} {x.shape[0]}")
            return y

        expert.ExpertServicer._forward = timed_handler
        expert.ExpertStream.forward = timed_send
        router.RemoteRouter.__call__ = timed_layer

    return hook


def load(out_dir: str) -> dict[str, list[tuple]]:
    """Every record, by kind: (key, layer, start, end, rows); key = the group's first expert or the
    router's pid."""
    kinds = defaultdict(list)
    for path in glob.glob(os.path.join(out_dir, "*.txt")):
        with open(path) as f:
            for line in f:
                kind, key, layer, start, end, rows = line.split()
                kinds[kind].append((int(key), int(layer), float(start), float(end), int(rows)))
    for records in kinds.values():
        records.sort(key=lambda r: r[2])
    return kinds


def layer_phases(kinds: dict[str, list[tuple]], tokens: int) -> dict[str, list[float]]:
    """Per decode layer of `tokens` tokens whose every group message was recorded end to end: its
    phases in seconds."""
    sends, handlers = defaultdict(list), defaultdict(list)
    for key, layer, start, end, rows in kinds["send"]:
        sends[key].append((start, end, layer))
    for key, layer, start, end, rows in kinds["handler"]:
        handlers[key].append((start, end, layer))
    starts = {k: [h[0] for h in hs] for k, hs in handlers.items()}
    send_starts = {k: [s[0] for s in ss] for k, ss in sends.items()}
    phases = defaultdict(list)
    by_router = defaultdict(list)
    for key, layer, start, end, rows in kinds["layer"]:
        if rows == tokens:
            by_router[key].append((start, end, layer))
    for layers in by_router.values():
        for i, (start, end, layer) in enumerate(layers):
            msgs = []  # (send start, send end, handler start, handler end) of each group with rows
            for k in sends:
                j = bisect.bisect_left(send_starts[k], start)
                if j == len(sends[k]) or sends[k][j][0] > end or sends[k][j][2] != layer:
                    continue
                s0, s1, _ = sends[k][j]
                h = bisect.bisect_left(starts[k], s0)
                if h == len(handlers[k]) or handlers[k][h][0] > s1 or handlers[k][h][2] != layer:
                    msgs = None  # this group's handler is not in the records (not yet flushed)
                    break
                msgs.append((s0, s1, *handlers[k][h][:2]))
            if not msgs:
                continue
            first_send, last_send = min(m[0] for m in msgs), max(m[0] for m in msgs)
            phases["routing (layer start to first send)"].append(first_send - start)
            phases["the sends (first to last)"].append(last_send - first_send)
            for s0, s1, h0, h1 in msgs:
                phases["delivery (send to handler start)"].append(h0 - s0)
                phases["group handler"].append(h1 - h0)
                phases["reply (handler end to rows back)"].append(s1 - h1)
            phases["tail (last reply to output)"].append(end - max(m[1] for m in msgs))
            phases["the layer's MoE, whole"].append(end - start)
            one, two = _overlap([(m[2], m[3]) for m in msgs])
            phases["  at least one group computing"].append(one)
            phases["  two or more groups computing"].append(two)
            phases["  handlers' sum"].append(sum(m[3] - m[2] for m in msgs))
            if i + 1 < len(layers) and layers[i + 1][2] == layer + 1:
                phases["between layers (attention)"].append(layers[i + 1][0] - end)
    return phases


def _overlap(spans: list[tuple[float, float]]) -> tuple[float, float]:
    """Time covered by at least one of the spans, and by at least two."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    one = two = 0.0
    running, prev = 0, events[0][0]
    for t, step in events:
        one += (t - prev) * (running >= 1)
        two += (t - prev) * (running >= 2)
        running, prev = running + step, t
    return one, two


def engine_moe_seconds(engine: Engine, concurrency: int, seconds: float) -> list[float]:
    """The engine's MoE call per layer of `concurrency` tokens, decoding for about `seconds`."""
    stack = engine.runner.stack
    moe, times = stack.moe, []

    def timed(layer, x):
        start = time.perf_counter()
        y = moe(layer, x)
        if x.shape[0] == concurrency:
            times.append(time.perf_counter() - start)
        return y

    stack.moe = timed
    try:
        _drive(engine, concurrency, seconds)
    finally:
        stack.moe = moe
    return times


def _drive(engine: Engine, concurrency: int, seconds: float) -> float:
    """Decode batches of `concurrency` requests for about `seconds`; the last batch's decode tokens/s."""
    deadline, tps = time.monotonic() + seconds, float("nan")
    for _ in range(1000):  # bounded whatever the clock says
        tps = measure(engine, make_requests(concurrency, 32, 64))["decode_tps"]
        if time.monotonic() > deadline:
            break
    return tps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=15.0, help="decoding per concurrency and side")
    parser.add_argument("--router", choices=["service", "inline"], default="inline")
    args = parser.parse_args()

    import ray

    model = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        write_preset("small", model)
    slots = max(args.concurrency)
    local = Engine.from_checkpoint(model, dtype=torch.float32, max_batch_size=slots, max_seq_len=96)
    out_dir = tempfile.mkdtemp(prefix="expertmesh-timeline-")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"worker_process_setup_hook": install_probes(out_dir)})
    plan = plan_cluster(local.cfg, attention_shards=2, expert_groups=4, device="cpu")
    cluster = Cluster(model, plan, RuntimeOptions(device="cpu", dtype="float32", threads=1), slots, 96,
                      router=args.router).start()
    remote = Engine(cluster.runner(), local.tokenizer, local.cfg, Scheduler(slots, 96))
    print(f"torch {torch.__version__}, {os.cpu_count()} cores; cluster: 2 attention shards x 4 expert groups, "
          f"router {args.router}; prompt 32, 64 new tokens, greedy float32; {args.seconds:.0f} s per concurrency "
          "and side; milliseconds per decode layer\n")
    for c in args.concurrency:
        for path in glob.glob(os.path.join(out_dir, "*.txt")):
            os.remove(path)
        measure(remote, make_requests(c, 32, 4))  # warm-up
        cluster_tps = _drive(remote, c, args.seconds)
        phases = layer_phases(load(out_dir), c)
        engine_moe = engine_moe_seconds(local, c, args.seconds / 3)
        n = len(phases["the layer's MoE, whole"])
        print(f"concurrency {c}: {n} layers recorded; decode tok/s of the last batch: cluster {cluster_tps:.1f}\n")
        print("| phase | p50 ms | mean ms |\n|---|---|---|")
        for name, values in phases.items():
            print(f"| {name} | {statistics.median(values) * 1e3:.3f} | {statistics.fmean(values) * 1e3:.3f} |")
        print(f"| engine: the layer's MoE, whole (2 threads, one process) | {statistics.median(engine_moe) * 1e3:.3f} "
              f"| {statistics.fmean(engine_moe) * 1e3:.3f} |\n", flush=True)
    cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
