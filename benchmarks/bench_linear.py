"""The CPU fp32 linear kernels side by side, for the small preset's weight shapes and decode row counts.

Per shape, row count and torch thread count, the time of one `y = x @ W.T` with weights colder than the
cache (a sweep over enough copies of the weight to fill 80 MB, as a decode step sweeps its layers):
oneDNN with the weight packed once (`torch.ops.mkldnn`), MKL on the checkpoint's [out, in] layout
(`F.linear`), MKL on a contiguous [in, out] copy (`x @ W_t`), and `expertmesh.model.linear.Linear`,
which picks among them.

    python benchmarks/bench_linear.py [--rows 1 2 3 8 32] [--threads 1 2] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from expertmesh.model.linear import Linear

SHAPES = {"LM head": (32000, 512), "wq|wk|wv": (1024, 512), "wo": (512, 512), "expert w1|w3": (2816, 512),
          "expert w2": (512, 1408)}


def timed(fn, copies: int, rounds: int) -> float:
    """Median seconds per call over `rounds` sweeps of `copies` weights (the first 3 sweeps warm up)."""
    per_call = []
    for _ in range(rounds + 3):
        start = time.perf_counter()
        for k in range(copies):
            fn(k)
        per_call.append((time.perf_counter() - start) / copies)
    return statistics.median(per_call[3:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 8, 32])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}; ms per call, weights colder than the cache\n")
    print("| weight [out, in] | threads | rows | oneDNN packed | F.linear [out, in] | x @ [in, out] | Linear |")
    print("|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (out_f, in_f) in SHAPES.items():
            copies = max(2, int(80e6 / (out_f * in_f * 4)))
            weights = [torch.randn(out_f, in_f) / in_f ** 0.5 for _ in range(copies)]
            packed = [torch.ops.mkldnn._reorder_linear_weight(w) for w in weights]
            transposed = [w.t().contiguous() for w in weights]
            ours = [Linear(w) for w in weights]
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.rows:
                    x = torch.randn(m, in_f)
                    cells = [timed(lambda k: torch.ops.mkldnn._linear_pointwise(x, packed[k], None, "none", [], ""),
                                   copies, args.rounds),
                             timed(lambda k: F.linear(x, weights[k]), copies, args.rounds),
                             timed(lambda k: x @ transposed[k], copies, args.rounds),
                             timed(lambda k: ours[k](x), copies, args.rounds)]
                    print(f"| {name} [{out_f}, {in_f}] | {threads} | {m} | "
                          + " | ".join(f"{c * 1e3:.3f}" for c in cells) + " |", flush=True)


if __name__ == "__main__":
    main()
