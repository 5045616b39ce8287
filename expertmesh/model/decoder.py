"""A contiguous range of decoder layers (the attention side), with the MoE handed in.

The same class is the whole model in one process (layers 0..L-1, with embedding and LM head) and one
attention shard of the cluster (a layer range; embedding only on the first, LM head only on the last).
Each layer is two residual lines:

    h = h + attention(rms_norm(h))
    h = h + moe(layer, rms_norm(h))        # the seam: local experts or a remote router

Legend: T = tokens in the step, B = sequences, D = hidden, V = vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from expertmesh.model.attention import AttentionWeights, KVCache, Rotary, attention, rms_norm
from expertmesh.model.batch import StepBatch
from expertmesh.model.config import ModelConfig
from expertmesh.model.linear import Linear
from expertmesh.model.moe import MoE


class DecoderStack:
    """Layers `layers` of the model; embeds tokens if it owns the embedding, ends in logits if it owns the head."""

    def __init__(self, cfg: ModelConfig, layers: dict[int, AttentionWeights], moe: MoE | None, cache: KVCache,
                 embed: torch.Tensor | None = None, norm: torch.Tensor | None = None,
                 lm_head: Linear | None = None):
        self.cfg, self.layers, self.moe, self.cache = cfg, dict(sorted(layers.items())), moe, cache
        self.embed, self.norm, self.lm_head = embed, norm, lm_head
        any_weight = next(iter(self.layers.values())).input_norm
        self.dtype, self.device = any_weight.dtype, any_weight.device
        self.rotary = Rotary(cfg, self.device)

    @property
    def first(self) -> bool:
        return self.embed is not None

    @property
    def last(self) -> bool:
        return self.lm_head is not None

    def forward(self, batch: StepBatch, inputs: torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """inputs: token ids [T] (first stack) or hidden states [T, D].

        Returns hidden states [T, D], or logits (fp32) of each sequence's last token [B, V] when this
        stack owns the head ([T, V] for every token with `all_logits`). Each layer's MoE is `self.moe`
        (a stack built without one is driven through `steps`).
        """
        steps = self.steps(batch, inputs, all_logits)
        try:
            layer, x = next(steps)
            while True:
                layer, x = steps.send(self.moe(layer, x))
        except StopIteration as done:
            return done.value

    @torch.inference_mode()
    def steps(self, batch: StepBatch, inputs: torch.Tensor, all_logits: bool = False):
        """`forward` as a generator that stops at the seam: it yields (layer, normalised hidden states
        [T, D]) and expects that layer's MoE output sent back; it returns what `forward` returns.
        Whoever drives it chooses how the MoE is reached (a call, or an awaited stream message)."""
        h = F.embedding(inputs, self.embed) if self.first else inputs.to(self.dtype)
        cos, sin = self.rotary.cos_sin(batch.positions, self.dtype)
        for n, w in self.layers.items():
            h = h + attention(rms_norm(h, w.input_norm, self.cfg.rms_norm_eps), w, batch, cos, sin,
                              self.cache.k[n], self.cache.v[n], self.cfg)
            h = h + (yield n, rms_norm(h, w.post_norm, self.cfg.rms_norm_eps))
        if not self.last:
            return h
        if not all_logits:
            h = h[batch.last_index]  # only the last token of each sequence is sampled from
        return self.lm_head(rms_norm(h, self.norm, self.cfg.rms_norm_eps)).float()
