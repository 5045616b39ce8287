"""`y = x @ W.T` with the fastest kernel we have measured for the device.

On CPU in fp32, oneDNN's linear with the weight reordered once into its blocked layout runs 1.5-3.5x
faster than the default (MKL) matmul for the shapes of decoding (a few rows against wide weights:
the LM head, fused QKV, expert projections); see benchmarks/. Everywhere else (CUDA, bf16/fp16) it is
plain `F.linear`. The reordered weight is opaque, so the original is kept only when asked for.

For one row, and for two on one thread, a plain matrix-vector product beats it: one thread streams
a weight up to twice as fast as through oneDNN's blocked layout (small preset, 1 thread, one row
against weights colder than the cache, two runs: LM head [32000, 512] 3.9-4.8 vs 8.2-9.0 ms, an
expert's w1|w3 [2816, 512] 0.47 vs 0.71-1.01 ms, its w2 [512, 1408] 0.26-0.29 vs 0.46 ms). From 3
rows on one thread, or 2 rows on two, oneDNN is as fast or faster (`benchmarks/bench_linear.py`,
results in benchmarks/results/linear_kernels.md). The product streams the weight along its rows, so
the weight is kept in whichever layout reads fastest: [in, out] for a wide output, the checkpoint's
[out, in] for a narrow one. That is a second copy of every fp32 CPU weight, the price of the speed.

oneDNN compiles a kernel for every row count it sees (about 15 ms each, here) and keeps it, and the
allocator keeps the memory its scratch buffers used. A server sees every row count a prompt length or
a batch can make: 599 row counts through one expert's two projections grew a process from 251 to 1734
MiB. So row counts above 32 are padded up to one of 8 sizes per power of two (`padded_rows`, at most
12.5% extra rows): 88 sizes up to 4096 rows, and the same sweep ends at 362 MiB.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


GEMV_ROWS = 2
"""Inputs of at most this many rows take the matrix-vector path on CPU in fp32 (more than one only on
a single torch thread)."""


def padded_rows(m: int) -> int:
    """The row count a [m, in] input is computed at: m itself up to 32 (decode batches, where a padded
    row costs most), above that m rounded up to a multiple of 1/8 of its power of two."""
    if m <= 32:
        return m
    step = 1 << (m.bit_length() - 4)
    return -(-m // step) * step


@functools.cache
def _onednn_works() -> bool:
    """oneDNN's packed linear is a private op: use it only if this torch build has it and it is exact."""
    try:
        w, x = torch.randn(8, 4), torch.randn(3, 4)
        packed = torch.ops.mkldnn._reorder_linear_weight(w)
        y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return torch.allclose(y, x @ w.T, atol=1e-5)
    except (AttributeError, RuntimeError):
        return False


class Linear:
    """A bias-free linear layer over a checkpoint weight [out, in]."""

    def __init__(self, weight: torch.Tensor, keep_weight: bool = False):
        self.out_features, self.in_features = weight.shape
        self.packed = self.gemv = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_works():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
            # [in, out] (x @ gemv) when the output is at least as wide as the input, else [out, in]
            self.gemv_transposed = self.out_features >= self.in_features
            self.gemv = weight.t().contiguous() if self.gemv_transposed else weight.contiguous()
        self.weight = weight if keep_weight or self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        m = x.shape[0]
        if m == 0:
            return x.new_empty(0, self.out_features)
        if m == 1 or (m <= GEMV_ROWS and torch.get_num_threads() == 1):
            return x @ self.gemv if self.gemv_transposed else F.linear(x, self.gemv)
        rows = padded_rows(m)
        x = F.pad(x, (0, 0, 0, rows - m)) if rows != m else x.contiguous()
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")
        return y[:m] if rows != m else y
