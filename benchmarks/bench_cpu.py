"""Where the machine's cores go per decode step: the single-process engine against the cluster.

Throughput on a machine whose cores are all busy is CPU time per token. This benchmark decodes full
batches (C requests, 32-token prompts, 64 new tokens, greedy) on each side in turn and, over the decode
part of every batch only (from the step that gave the last first token to the end), reads the CPU time
of every process involved from /proc and the machine's idle time from /proc/stat. It reports core-ms
per decode step (all C sequences): the driver (the engine loop, and for the engine side the whole
model), the expert groups, the attention shards, everything else on the machine, and idle cores.

    python benchmarks/bench_cpu.py --model DIR [--concurrency 32 1] [--seconds 15] [--rounds 2]

For the cluster at a ratio R of the engine's throughput on N cores, its step may take at most
(engine's core-ms per step) / R, idle included. Linux only (/proc). For a split by library (torch
kernels, the interpreter, the kernel, gRPC), run `perf record -a` while this runs; the results file
says how.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from bench_cluster import make_requests, measure

from expertmesh.engine import Engine
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.presets import write_preset
from expertmesh.scheduler import Scheduler

TICK = os.sysconf("SC_CLK_TCK")


def process_cpu(pid: int) -> float:
    """Seconds of CPU (user + system) of every thread of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def machine_cpu() -> tuple[float, float]:
    """(busy, idle) seconds of all cores so far; iowait counts as idle."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICK, idle / TICK


class Probe:
    """CPU counters of named groups of processes, read together."""

    def __init__(self, roles: dict[str, list[int]]):
        self.roles = roles

    def read(self) -> dict[str, float]:
        busy, idle = machine_cpu()
        out = {role: sum(process_cpu(p) for p in pids) for role, pids in self.roles.items()}
        out["rest of the machine"] = busy - sum(out.values())
        out["idle"] = idle
        return out


def decode_batches(engine: Engine, probe: Probe, concurrency: int, seconds: float) -> tuple[dict[str, float], int, float]:
    """Decode full batches for about `seconds`; CPU seconds per role, decode tokens and wall seconds,
    summed over the decode part of each batch."""
    total: dict[str, float] = {}
    tokens, wall, end = 0, 0.0, time.monotonic() + seconds
    while time.monotonic() < end:
        ids = {engine.add(r) for r in make_requests(concurrency, 32, 64, seed=tokens)}
        first: set[str] = set()
        before = start = None
        while engine.scheduler.has_work():
            outs = engine.step()
            if before is None:
                first.update(o.request_id for o in outs)
                if first >= ids:
                    before, start = probe.read(), time.perf_counter()
            else:
                tokens += len(outs)
        wall += time.perf_counter() - start
        after = probe.read()
        for role, v in after.items():
            total[role] = total.get(role, 0.0) + v - before[role]
    return total, tokens, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[32, 1])
    parser.add_argument("--seconds", type=float, default=15.0, help="per side, round and concurrency")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    args = parser.parse_args()

    import ray

    model = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        write_preset("small", model)
    slots, max_len = max(args.concurrency), 32 + 64
    local = Engine.from_checkpoint(model, max_batch_size=slots, max_seq_len=max_len)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    plan = plan_cluster(local.cfg, attention_shards=args.shards, expert_groups=args.groups, device="cpu")
    cluster = Cluster(model, plan, RuntimeOptions(device="cpu", dtype="float32", threads=1), slots, max_len,
                      router="inline").start()
    where = cluster.describe()
    driver = [os.getpid()]
    sides = {
        "engine": (local, Probe({"driver": driver})),
        "cluster": (Engine(cluster.runner(), local.tokenizer, local.cfg, Scheduler(slots, max_len)),
                    Probe({"driver": driver, "expert groups": [i["pid"] for i in where["groups"]],
                           "attention shards": [i["pid"] for i in where["shards"]]})),
    }
    roles = ["driver", "expert groups", "attention shards", "rest of the machine", "idle"]
    print(f"{os.cpu_count()} cores; cluster: {args.shards} attention shards x {args.groups} expert groups, router "
          f"inline; decode part of full batches (prompt 32, 64 new tokens, greedy float32); {args.seconds:.0f} s "
          f"per side and round, {args.rounds} rounds, sides in turn; medians over rounds\n")
    print("| concurrency | side | decode tok/s | core-ms per decode step: " + " | ".join(roles) + " | all |")
    print("|---|---|---|" + "---|" * (len(roles) + 1))
    for c in args.concurrency:
        for engine, _ in sides.values():  # warm-up
            measure(engine, make_requests(c, 32, 4))
        rows: dict[str, list[tuple[float, dict[str, float]]]] = {side: [] for side in sides}
        for r in range(args.rounds):
            for side in list(sides)[r % 2:] + list(sides)[:r % 2]:
                engine, probe = sides[side]
                cpu, tokens, wall = decode_batches(engine, probe, c, args.seconds)
                steps = tokens / c
                rows[side].append((tokens / wall, {k: 1e3 * v / steps for k, v in cpu.items()}))
        steps_all = {}
        for side, rs in rows.items():
            med = {k: statistics.median(r[1][k] for r in rs) for k in roles if k in rs[0][1]}
            steps_all[side] = sum(med.values())
            cells = " | ".join(f"{med[k]:.1f}" if k in med else "" for k in roles)
            print(f"| {c} | {side} | {statistics.median(r[0] for r in rs):.1f} | {cells} | {steps_all[side]:.1f} |",
                  flush=True)
        limit = f"{steps_all['engine'] / 0.75:.1f} / {steps_all['engine'] / 0.6:.1f}"
        print(f"| {c} | the cluster at 0.75x / 0.6x of the engine |" + " |" * (len(roles) + 1) + f" {limit} |",
              flush=True)
    cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
