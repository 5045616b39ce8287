"""The cluster against the single-process engine, side by side, on the same checkpoint.

Both are driven by the same engine loop (schedule -> run -> postprocess); only the step runner differs:
the whole model in this process, or the attention shards -> routers -> expert groups on a local Ray
cluster. At each concurrency C, C requests (random 32-token prompts, 64 new tokens, greedy) start
together. Reported per side: decode tokens/s (generated tokens after each request's first, over the
time from the last first-token to the end), time to first token (median), and p50/p99 inter-token
latency; plus the bytes the cluster moves per generated token per layer.

    python benchmarks/bench_cluster.py --model DIR [--shards 2 --groups 4] [--concurrency 1 8 32]
        [--router service inline] [--device cuda --dtype bfloat16]

On CUDA every component asks Ray for an equal share of the machine's GPUs (the engine uses GPU 0).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.presets import DTYPES, write_preset
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler


def make_requests(n: int, prompt_len: int, new_tokens: int, seed: int = 0) -> list[GenerationRequest]:
    rng = random.Random(seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    return [GenerationRequest(prompt_token_ids=tuple([1] + [rng.randrange(3, 32000) for _ in range(prompt_len - 1)]),
                              params=params) for _ in range(n)]


def measure(engine: Engine, reqs: list[GenerationRequest]) -> dict:
    start = time.perf_counter()
    ids = [engine.add(r) for r in reqs]
    stamps: dict[str, list[float]] = {i: [] for i in ids}
    while engine.scheduler.has_work():
        for out in engine.step():
            stamps[out.request_id].append(time.perf_counter())
    end = time.perf_counter()
    firsts = [s[0] for s in stamps.values()]
    gaps = sorted(b - a for s in stamps.values() for a, b in zip(s, s[1:]))
    decode_tokens = sum(len(s) - 1 for s in stamps.values())
    return {"decode_tps": decode_tokens / (end - max(firsts)) if end > max(firsts) else float("nan"),
            "ttft": statistics.median(f - start for f in firsts),
            "itl_p50": gaps[len(gaps) // 2], "itl_p99": gaps[min(len(gaps) - 1, int(len(gaps) * 0.99))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per cluster actor")
    parser.add_argument("--attention-threads", type=int, nargs="+", default=[None],
                        help="torch threads of an attention shard for steps of 32+ tokens (default: --threads); "
                             "several: one cluster each, side by side")
    parser.add_argument("--router", choices=["service", "inline"], nargs="+", default=["service", "inline"],
                        help="where each cluster's router runs; several: one cluster each, measured side by side")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()

    import ray

    model = args.model or tempfile.mkdtemp(prefix="expertmesh-small-")
    if not args.model:
        write_preset("small", model)
    slots, max_len = max(args.concurrency), args.prompt_len + args.new_tokens
    local = Engine.from_checkpoint(model, dtype=DTYPES[args.dtype], device=args.device, max_batch_size=slots,
                                   max_seq_len=max_len)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    share = None
    if args.device == "cuda":  # Ray takes shares to 4 decimals: round down so that they all fit
        components = (args.shards + args.groups) * len(args.router) * len(args.attention_threads)
        share = min(1.0, int(1e4 * torch.cuda.device_count() / components) / 1e4)
    plan = plan_cluster(local.cfg, attention_shards=args.shards, expert_groups=args.groups, device=args.device,
                        gpus_per_shard=share, gpus_per_group=share)
    clusters = {}
    for r in args.router:
        for at in args.attention_threads:
            name = f"cluster, router {r}" + (f", {at} attention threads" if len(args.attention_threads) > 1 else "")
            options = RuntimeOptions(device=args.device, dtype=args.dtype, threads=args.threads,
                                     attention_threads=at)
            clusters[name] = Cluster(model, plan, options, slots, max_len, router=r).start()
    sides = {"engine": local, **{name: Engine(cl.runner(), local.tokenizer, local.cfg, Scheduler(slots, max_len))
                                 for name, cl in clusters.items()}}
    gpu = f", {torch.cuda.get_device_name()} (GPU share per component {share})" if args.device == "cuda" else ""
    print(f"torch {torch.__version__}, {os.cpu_count()} cores{gpu}; cluster: {args.shards} attention shards x "
          f"{args.groups} expert groups; prompt {args.prompt_len}, {args.new_tokens} new tokens, "
          f"greedy {args.dtype}, median of {args.rounds} rounds, sides interleaved in each round, in rotating order\n")
    print("| concurrency | side | decode tok/s | TTFT ms | ITL p50 ms | ITL p99 ms | vs engine "
          "| vs engine per round: min / median / max |")
    print("|---|---|---|---|---|---|---|---|")
    for c in args.concurrency:
        for engine in sides.values():  # warm-up
            measure(engine, make_requests(c, args.prompt_len, 4))
        results: dict[str, list[dict]] = {side: [] for side in sides}
        order = list(sides)
        for r in range(args.rounds):
            # Each round starts one side later, so every side takes every position: of two nearly equal
            # clusters, the one measured second ran 6-8% slower at concurrency 1, whichever it was.
            for side in order[r % len(order):] + order[:r % len(order)]:
                results[side].append(measure(sides[side], make_requests(c, args.prompt_len, args.new_tokens)))
        med = {side: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for side, rs in results.items()}
        for side, m in med.items():
            ratio = paired = ""
            if side != "engine":
                # Also each round's ratio against the engine of the same round: the machine drifts
                # between rounds more than within one, and this shows how far.
                ratio = f"{m['decode_tps'] / med['engine']['decode_tps']:.2f}x"
                rounds = sorted(s["decode_tps"] / e["decode_tps"] for s, e in zip(results[side], results["engine"]))
                paired = f"{rounds[0]:.2f} / {statistics.median(rounds):.2f} / {rounds[-1]:.2f}"
            print(f"| {c} | {side} | {m['decode_tps']:.1f} | {m['ttft'] * 1e3:.0f} | {m['itl_p50'] * 1e3:.1f} | "
                  f"{m['itl_p99'] * 1e3:.1f} | {ratio} | {paired} |", flush=True)
    d, k = local.cfg.hidden_size, local.cfg.num_experts_per_tok
    itemsize = DTYPES[args.dtype].itemsize
    # per token and layer: shard -> router (D), router -> groups (k rows), groups -> router (k), router -> shard (D)
    print(f"\nbytes per generated token per layer on the wire: {(2 + 2 * k) * d * itemsize} "
          f"(hidden {d} x {args.dtype}; shard<->router 2 x D, router<->groups 2 x top-{k} x D), "
          f"plus {d * itemsize * 2 // local.cfg.num_hidden_layers} per layer amortised between shards")
    for cl in clusters.values():
        cl.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
