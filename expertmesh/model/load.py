"""Build each component of the model from a checkpoint, reading only the tensors it owns.

`load_decoder_stack` (an attention shard), `load_expert_group` (an expert group), `load_gates`
(a router), and `load_local_model`, which assembles all of them in one process.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from expertmesh.checkpoint import CheckpointReader, Ownership, attention_names, expert_names, gate_name, split_range
from expertmesh.model.attention import AttentionWeights, KVCache
from expertmesh.model.decoder import DecoderStack
from expertmesh.model.linear import Linear
from expertmesh.model.moe import ExpertGroup, MoE, Router


def load_decoder_stack(reader: CheckpointReader, layers: Sequence[int], moe: MoE, num_slots: int,
                       max_len: int, dtype: torch.dtype, device: str | torch.device = "cpu") -> DecoderStack:
    """Read the attention side of `layers` (plus embedding / head at the ends) and allocate its cache."""
    cfg = reader.config
    layers = list(layers)
    own = Ownership(layers=tuple(layers), embed=layers[0] == 0, head=layers[-1] == cfg.num_hidden_layers - 1)
    t = reader.read(own.names(cfg), dtype=dtype, device=device)
    weights = {n: AttentionWeights.from_checkpoint({role: t.pop(name) for role, name in attention_names(n).items()})
               for n in layers}
    cache = KVCache(layers, num_slots, max_len, cfg, dtype, device)
    embed = t.get("model.embed_tokens.weight") if own.embed else None
    lm_head = None
    if own.head:
        lm_head = Linear(t["model.embed_tokens.weight"] if cfg.tie_word_embeddings else t["lm_head.weight"])
    return DecoderStack(cfg, weights, moe, cache, embed=embed, norm=t.get("model.norm.weight"), lm_head=lm_head)


def load_expert_group(reader: CheckpointReader, experts: Sequence[int], dtype: torch.dtype,
                      device: str | torch.device = "cpu", layers: Sequence[int] | None = None) -> ExpertGroup:
    """Read experts `experts` of every layer (or of `layers`) and stack them per layer."""
    cfg = reader.config
    layers = tuple(range(cfg.num_hidden_layers)) if layers is None else tuple(layers)
    own = Ownership(experts=tuple(experts), expert_layers=layers)
    t = reader.read(own.names(cfg), dtype=dtype, device=device)
    w13, w2 = {}, {}
    for n in layers:
        names = [expert_names(n, e) for e in experts]  # (w1, w2, w3) per expert
        w13[n] = [Linear(torch.cat((t.pop(a), t.pop(c)), dim=0)) for a, _, c in names]  # [2I, D] each
        w2[n] = [Linear(t.pop(b)) for _, b, _ in names]  # [D, I] each
    return ExpertGroup(experts, w13, w2)


def load_gates(reader: CheckpointReader, layers: Sequence[int], dtype: torch.dtype,
               device: str | torch.device = "cpu") -> dict[int, torch.Tensor]:
    """The router gate [E, D] of each layer in `layers`."""
    t = reader.read([gate_name(n) for n in layers], dtype=dtype, device=device)
    return {n: t[gate_name(n)] for n in layers}


def load_local_model(reader: CheckpointReader, num_slots: int, max_len: int, dtype: torch.dtype,
                     device: str | torch.device = "cpu", num_groups: int = 1) -> DecoderStack:
    """The whole model in this process: all layers, a router over `num_groups` local expert groups."""
    cfg = reader.config
    every = range(cfg.num_hidden_layers)
    groups = [load_expert_group(reader, experts, dtype, device)
              for experts in split_range(cfg.num_local_experts, num_groups, "expert_groups")]
    router = Router(load_gates(reader, every, dtype, device), cfg.num_experts_per_tok, groups,
                    cfg.num_local_experts)
    return load_decoder_stack(reader, every, router, num_slots, max_len, dtype, device)

