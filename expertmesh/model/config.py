"""Model hyper-parameters, read from a Hugging Face Mixtral `config.json`.

Every size the model uses comes from here; nothing is hard-coded to Mixtral 8x7B. Both config styles
found in the wild are accepted: the Hub style (`"rope_theta": 1e6` at top level, as in
mistralai/Mixtral-8x7B-v0.1) and the newer transformers style (`"rope_parameters": {"rope_type":
"default", "rope_theta": 1e6}`).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class ModelConfig:
    """A Mixtral-style decoder. Defaults are Mixtral 8x7B's."""

    vocab_size: int = 32000
    hidden_size: int = 4096  # D
    intermediate_size: int = 14336  # I, hidden size of one SwiGLU expert
    num_hidden_layers: int = 32
    num_attention_heads: int = 32  # H
    num_key_value_heads: int = 8  # grouped-query attention: H / KVH query heads share a KV head
    head_dim: int = 128
    num_local_experts: int = 8  # E
    num_experts_per_tok: int = 2  # A, the top-k of the router
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1e6
    max_position_embeddings: int = 32768
    sliding_window: int | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int = 1
    eos_token_id: int = 2
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts",
                     "num_experts_per_tok", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"config.json: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        if self.num_experts_per_tok > self.num_local_experts:
            raise ValueError("config.json: num_experts_per_tok exceeds num_local_experts")
        if self.hidden_act != "silu":
            raise ValueError(f"config.json: hidden_act {self.hidden_act!r} is not supported (Mixtral uses silu)")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        """Build from the parsed JSON of a Hugging Face `config.json` (unknown keys are ignored)."""
        model_type = raw.get("model_type", "mixtral")
        if model_type != "mixtral":
            raise ValueError(f"config.json: model_type {model_type!r} is not a Mixtral model")
        rope = raw.get("rope_parameters") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"config.json: rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", raw.get("rope_theta", cls.rope_theta))
        hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
        eos = raw.get("eos_token_id", cls.eos_token_id)
        return cls(
            vocab_size=raw["vocab_size"],
            hidden_size=hidden,
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=raw["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            num_local_experts=raw["num_local_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            rms_norm_eps=float(raw.get("rms_norm_eps", cls.rms_norm_eps)),
            rope_theta=float(theta),
            max_position_embeddings=raw.get("max_position_embeddings", cls.max_position_embeddings),
            sliding_window=raw.get("sliding_window"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id", cls.bos_token_id),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            hidden_act=raw.get("hidden_act", "silu"),
        )

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: str | os.PathLike) -> ModelConfig:
        path = Path(checkpoint_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no config.json in the checkpoint directory") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from None
        try:
            return cls.from_dict(raw)
        except KeyError as exc:
            raise ValueError(f"{path}: missing required key {exc.args[0]!r}") from None

    def to_hub_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        """The `config.json` content in the Mixtral Hub style (top-level `rope_theta`)."""
        out = asdict(self)
        out.update(architectures=["MixtralForCausalLM"], model_type="mixtral",
                   torch_dtype=str(dtype).removeprefix("torch."),
                   attention_dropout=0.0, initializer_range=0.02, router_aux_loss_coef=0.02,
                   output_router_logits=False, use_cache=True)
        return out
