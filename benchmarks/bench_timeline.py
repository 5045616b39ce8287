"""Where a decode step goes in the cluster: a timeline of every layer, every component's clock at once.

Probes wrap calls in every component process (installed through Ray's worker setup hook, so the
cluster's code runs unchanged): the router's whole layer (`RemoteRouter.__call__`), each group
message as the router sees it (`ExpertStream.forward`: encode, send, wait, decode) and each group's
handler (`ExpertServicer._forward`: decode, the experts, encode). All on this host's monotonic clock,
so the stamps of different processes line up. Per decode layer the script splits the router's time
into: routing (start to the first send), the sends (first to last), delivery (a send to its group's
handler starting), the handler, the reply (handler end to the router having the rows back) and the
tail (last reply to the combined output), plus how long one / two groups computed at once and the
time between layers (the shard's attention). A fourth probe times each shard's whole step, and the
driver times its own, which splits a decode step into the shards' MoE, the rest of their work, and the
hops (with `--router service` a layer's MoE is timed in the router, so a shard's rest includes its
round trips to the router). The single-process engine's step and MoE are timed in the same run for scale.

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

FLUSH_EVERY = 512  # records a process keeps before appending them to its file,
FLUSH_AFTER_S = 1.0  # or for at most this long (a shard with its router as a service records once a step)


def install_probes(out_dir: str):
    """The worker setup hook: wraps the four probed calls in this process; records go to
    out_dir/<pid>.txt. Groups are told apart by their first expert (no replicas in this benchmark)."""

    def hook() -> None:
        from expertmesh.services import attention, expert, router

        records: list[str] = []
        flushed = [time.monotonic()]

        def record(line: str) -> None:
            records.append(line)
            if len(records) >= FLUSH_EVERY or time.monotonic() - flushed[0] > FLUSH_AFTER_S:
                with open(os.path.join(out_dir, f"{os.getpid()}.txt"), "a") as f:
                    f.write("\n".join(records) + "\n")
                records.clear()
                flushed[0] = time.monotonic()

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

        step = attention.AttentionServicer.step

        async def timed_step(self, request):
            start = time.perf_counter()
            reply = await step(self, request)
            tokens = sum(s.q_len for s in request.seqs)
            record(f"step {min(self.stack.layers)} 0 {start:.7f} {time.perf_counter():.7f} {tokens}")
            return reply

        expert.ExpertServicer._forward = timed_handler
        attention.AttentionServicer.step = timed_step
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


def layer_phases(kinds: dict[str, list[tuple]], tokens: int,
                 driver_steps: list[tuple[float, float]]) -> dict[str, list[float]]:
    """Per decode layer of `tokens` tokens (inside one of the driver's decode steps) whose every
    group message was recorded end to end: its phases in seconds."""
    sends, handlers = defaultdict(list), defaultdict(list)
    for key, layer, start, end, rows in kinds["send"]:
        sends[key].append((start, end, layer))
    for key, layer, start, end, rows in kinds["handler"]:
        handlers[key].append((start, end, layer))
    starts = {k: [h[0] for h in hs] for k, hs in handlers.items()}
    send_starts = {k: [s[0] for s in ss] for k, ss in sends.items()}
    phases = defaultdict(list)
    by_router = defaultdict(list)
    step_starts = [a for a, _ in driver_steps]
    for key, layer, start, end, rows in kinds["layer"]:
        i = bisect.bisect_right(step_starts, start) - 1
        if rows == tokens and i >= 0 and end <= driver_steps[i][1]:
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


def step_budget(kinds: dict[str, list[tuple]], driver_steps: list[tuple[float, float]],
                tokens: int) -> dict[str, list[float]]:
    """Per decode step of `tokens` tokens: the driver's whole step, each shard's step and the MoE
    layers inside it, and what the step spends outside the shards (the hops and the driver)."""
    shards = defaultdict(list)  # first layer -> [(start, end)] of its steps
    for first_layer, _, start, end, rows in kinds["step"]:
        if rows == tokens:
            shards[first_layer].append((start, end))
    shard_starts = {k: [a for a, _ in steps] for k, steps in shards.items()}
    layers = [(start, end) for _, _, start, end, rows in kinds["layer"] if rows == tokens]
    layer_starts = [start for start, _ in layers]
    found = []  # per driver step: [(first layer, (start, end), MoE spans inside)] of each shard's part
    for start, end in driver_steps:
        inside = []
        for k in sorted(shards):
            i = bisect.bisect_left(shard_starts[k], start)
            if i < len(shards[k]) and shards[k][i][1] <= end:
                a, b = shards[k][i]
                first, last = bisect.bisect_left(layer_starts, a), bisect.bisect_left(layer_starts, b)
                spans = [(s, e) for s, e in layers[first:last] if e <= b]
                inside.append((k, (a, b), spans))
        if inside and len(inside) == len(shards):
            found.append((start, end, inside))
    # A shard's step counts only with every one of its layers recorded (the last records of each
    # process may not have been written yet).
    layers_per_shard = defaultdict(int)
    for _, _, inside in found:
        for k, _, spans in inside:
            layers_per_shard[k] = max(layers_per_shard[k], len(spans))
    budget = defaultdict(list)
    for start, end, inside in found:
        if any(len(spans) != layers_per_shard[k] for k, _, spans in inside):
            continue
        budget["the driver's step, whole"].append(end - start)
        for k, (a, b), spans in inside:
            moe = sum(e - s for s, e in spans)
            budget[f"  shard from layer {k}: its step"].append(b - a)
            budget[f"    shard from layer {k}: its layers' MoE"].append(moe)
            budget[f"    shard from layer {k}: the rest (embedding, attention, head, sampling)"].append(b - a - moe)
        shards_time = sum(b - a for _, (a, b), _ in inside)
        budget["  outside the shards (the hops, the driver)"].append(end - start - shards_time)
    return budget


def timed_steps(engine: Engine, concurrency: int, seconds: float, parts: dict[str, list[float]] | None = None
                ) -> list[tuple[float, float]]:
    """Decode for about `seconds`; the (start, end) of every decode step of `concurrency` sequences
    (one new token each: a prefill of the same number of tokens does not count). With
    `parts` (a local engine), also each step's MoE time summed over the layers, and the time between
    one layer's MoE and the next's (that layer's attention)."""
    runner, steps = engine.runner, []
    run, stack = runner.run, getattr(runner, "stack", None)
    moe, calls = (stack.moe if stack else None), []  # (start, end) of this step's MoE calls

    def timed_moe(layer, x):
        start = time.perf_counter()
        y = moe(layer, x)
        calls.append((start, time.perf_counter()))
        return y

    def timed_run(plan):
        calls.clear()
        start = time.perf_counter()
        ids = run(plan)
        if len(plan.token_ids) == concurrency and all(q == 1 for q in plan.q_lens):
            steps.append((start, time.perf_counter()))
            if parts is not None:
                parts["  its layers' MoE"].append(sum(b - a for a, b in calls))
                parts["  its layers' MoE, one layer"].extend(b - a for a, b in calls)
                parts["  between layers (attention)"].extend(c[0] - p[1] for p, c in zip(calls, calls[1:]))
        return ids

    runner.run = timed_run
    if parts is not None:
        stack.moe = timed_moe
    try:
        _drive(engine, concurrency, seconds)
    finally:
        del runner.run
        if parts is not None:
            stack.moe = moe
    return steps


def _drive(engine: Engine, concurrency: int, seconds: float) -> None:
    """Decode batches of `concurrency` requests for about `seconds`."""
    deadline = time.monotonic() + seconds
    for _ in range(1000):  # bounded whatever the clock says
        measure(engine, make_requests(concurrency, 32, 64))
        if time.monotonic() > deadline:
            break


def _rows(values: dict[str, list[float]]) -> None:
    for name, v in values.items():
        print(f"| {name} | {statistics.median(v) * 1e3:.3f} | {statistics.fmean(v) * 1e3:.3f} |")


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
          "and side\n")
    for c in args.concurrency:
        for path in glob.glob(os.path.join(out_dir, "*.txt")):
            os.remove(path)
        measure(remote, make_requests(c, 32, 4))  # warm-up
        steps = timed_steps(remote, c, args.seconds)
        kinds = load(out_dir)
        phases, budget = layer_phases(kinds, c, steps), step_budget(kinds, steps, c)
        engine = defaultdict(list)
        engine_steps = timed_steps(local, c, args.seconds / 3, engine)
        layers, whole = len(phases["the layer's MoE, whole"]), len(budget["the driver's step, whole"])
        print(f"concurrency {c}: {layers} layers and {whole} steps recorded\n")
        print("| a decode layer's MoE | p50 ms | mean ms |\n|---|---|---|")
        _rows(phases)
        print("\n| a decode step | p50 ms | mean ms |\n|---|---|---|")
        _rows(budget)
        _rows({"engine: its step, whole (2 threads, one process)": [b - a for a, b in engine_steps], **engine})
        print(flush=True)
    cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
