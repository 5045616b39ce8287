"""The attention side of a Mixtral layer: RMSNorm, rotary embeddings, grouped-query attention, KV cache.

Conventions follow Hugging Face checkpoints (and `transformers.MixtralForCausalLM` bit for bit where it
matters): RMSNorm computed in fp32 and cast back before the weight; RoPE on the "rotate half" layout
with inv_freq = 1 / theta^(2i/hd) computed in fp32; attention scaled by hd^-0.5.

Legend: T = tokens in the step, B = sequences, D = hidden size, H = query heads, KVH = key/value heads,
hd = head dim, S = cache slots, L = cache length per slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from expertmesh.model.batch import StepBatch
from expertmesh.model.config import ModelConfig
from expertmesh.model.linear import Linear


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, with the statistics in fp32 whatever the compute dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """Rotary position embedding tables for one model (cos/sin computed per step, shared by layers)."""

    def __init__(self, cfg: ModelConfig, device: str | torch.device = "cpu"):
        hd = cfg.head_dim
        self.inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float, device=device) / hd))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """[T] positions -> cos, sin of shape [T, 1, hd] (broadcast over heads)."""
        freqs = positions[:, None].float() * self.inv_freq[None, :]  # [T, hd/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, hd]
        return emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, hd]; the Hugging Face "rotate half" layout (not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class KVCache:
    """Keys and values of every slot for a range of layers: [S, L, KVH, hd] per layer.

    Zero-initialised: masked positions still enter the attention product with weight 0, and stale or
    uninitialised memory there could hold NaN (0 * NaN = NaN).
    """

    def __init__(self, layers, num_slots: int, max_len: int, cfg: ModelConfig, dtype: torch.dtype,
                 device: str | torch.device = "cpu"):
        shape = (num_slots, max_len, cfg.num_key_value_heads, cfg.head_dim)
        self.num_slots, self.max_len = num_slots, max_len
        self.k = {n: torch.zeros(shape, dtype=dtype, device=device) for n in layers}
        self.v = {n: torch.zeros(shape, dtype=dtype, device=device) for n in layers}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k.values(), *self.v.values()))


@dataclass
class AttentionWeights:
    """One layer's attention side. q, k and v projections are fused into one matmul."""

    input_norm: torch.Tensor  # [D]
    wqkv: Linear  # [H*hd + 2*KVH*hd, D]: checkpoint q_proj, k_proj, v_proj stacked
    wo: Linear  # [D, H*hd]
    post_norm: torch.Tensor  # [D]

    @classmethod
    def from_checkpoint(cls, t: dict[str, torch.Tensor]) -> AttentionWeights:
        """From the tensors of `checkpoint.attention_names` roles (input_norm, wq, wk, wv, wo, post_norm)."""
        wqkv = torch.cat((t["wq"], t["wk"], t["wv"]), dim=0)
        return cls(t["input_norm"], Linear(wqkv), Linear(t["wo"]), t["post_norm"])


def attention(x: torch.Tensor, w: AttentionWeights, batch: StepBatch, cos: torch.Tensor, sin: torch.Tensor,
              cache_k: torch.Tensor, cache_v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Self-attention of the step's tokens over their sequences' caches. x: [T, D] -> [T, D].

    Writes this step's keys and values into the cache first, then attends over the padded batch with
    one SDPA call for all sequences (prefill and decode alike).
    """
    t, hd, h, kvh = x.shape[0], cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    q, k, v = w.wqkv(x).split([h * hd, kvh * hd, kvh * hd], dim=-1)
    q, k, v = q.reshape(t, h, hd), k.reshape(t, kvh, hd), v.reshape(t, kvh, hd)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    cache_k[batch.token_slots, batch.positions] = k
    cache_v[batch.token_slots, batch.positions] = v

    if batch.contiguous_slots:  # a view, no copy
        keys = cache_k[: len(batch.q_lens), : batch.kv_max]
        values = cache_v[: len(batch.q_lens), : batch.kv_max]
    else:
        keys = cache_k[batch.slots, : batch.kv_max]  # [B, Kmax, KVH, hd]
        values = cache_v[batch.slots, : batch.kv_max]
    queries = q[batch.pad_index]  # [B, Qmax, H, hd]
    out = F.scaled_dot_product_attention(
        queries.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
        attn_mask=batch.mask, scale=hd**-0.5, enable_gqa=True,
    )  # [B, H, Qmax, hd]
    out = out.transpose(1, 2).reshape(-1, h * hd)[batch.unpad_index]  # [T, H*hd]
    return w.wo(out)
