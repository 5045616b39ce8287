"""What the metrics path costs: two identical clusters, one with every component recording Prometheus
metrics and one without, measured round by round in one run (alternating, so noise hits both).

    python benchmarks/bench_metrics.py --model DIR [--concurrency 32] [--rounds 3]

Reports decode tokens/s of each and the overhead. The gateway's own per-step metrics are not in this
path (the benchmark drives the engine loop directly, as bench_cluster does).
"""

from __future__ import annotations

import argparse
import os
import statistics

from bench_cluster import make_requests, measure

from expertmesh.engine import Engine
from expertmesh.model.config import ModelConfig
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.scheduler import Scheduler
from expertmesh.tokenizer import Tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--groups", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    cfg, tok = ModelConfig.from_checkpoint(args.model), Tokenizer.from_checkpoint(args.model)
    plan = plan_cluster(cfg, attention_shards=args.shards, expert_groups=args.groups)
    slots, max_len = args.concurrency, args.prompt_len + args.new_tokens
    engines, clusters = {}, []
    for on in (True, False):
        cluster = Cluster(args.model, plan, RuntimeOptions(metrics=on), slots, max_len).start()
        clusters.append(cluster)
        engines[on] = Engine(cluster.runner(), tok, cfg, Scheduler(slots, max_len))
    tps = {True: [], False: []}
    for on in (True, False):
        measure(engines[on], make_requests(args.concurrency, args.prompt_len, 4))  # warm-up
    for r in range(args.rounds):
        for on in ((True, False) if r % 2 == 0 else (False, True)):  # who goes first alternates too
            tps[on].append(measure(engines[on], make_requests(args.concurrency, args.prompt_len,
                                                              args.new_tokens))["decode_tps"])
    with_m, without = statistics.median(tps[True]), statistics.median(tps[False])
    print(f"{args.shards} attention shards x {args.groups} expert groups, concurrency {args.concurrency}, "
          f"{args.new_tokens} new tokens, median of {args.rounds} rounds (alternating, and who goes first alternates)\n")
    print("| metrics | decode tok/s (each round) | median |")
    print("|---|---|---|")
    print(f"| on | {', '.join(f'{t:.1f}' for t in tps[True])} | {with_m:.1f} |")
    print(f"| off | {', '.join(f'{t:.1f}' for t in tps[False])} | {without:.1f} |")
    print(f"\nmetrics overhead: {100 * (1 - with_m / without):.1f}% of decode throughput")
    for cluster in clusters:
        cluster.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
