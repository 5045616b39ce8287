"""`y = x @ W.T` with the fastest kernel we have measured for the device.

On CPU in fp32, oneDNN's linear with the weight reordered once into its blocked layout runs 1.5-3.5x
faster than the default (MKL) matmul for the shapes of decoding (a few rows against wide weights:
the LM head, fused QKV, expert projections); see benchmarks/. Everywhere else (CUDA, bf16/fp16) it is
plain `F.linear`. The reordered weight is opaque, so the original is kept only when asked for.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


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
        self.packed = None
        if weight.device.type == "cpu" and weight.dtype == torch.float32 and _onednn_works():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous())
        self.weight = weight if keep_weight or self.packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight)
        if x.shape[0] == 0:
            return x.new_empty(0, self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, None, "none", [], "")
