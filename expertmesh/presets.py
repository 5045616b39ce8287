"""Random-weight Mixtral checkpoints in exactly the Hugging Face format, for tests and benchmarks.

`tiny` runs in seconds on a CPU; `small` is the benchmark model (dim 512, 8 layers, 8 experts, top-2).
Both use Mixtral 8x7B's real tokenizer (Mistral's v1 sentencepiece model, shipped in mistral-common),
so the vocabulary is the real 32000 pieces.

Weights are drawn with a seeded generator in a fixed tensor order, so a preset and seed always give
the same bytes. Scales are chosen so activations keep unit size through the layers and logits are
spread out (O(1)): a model whose greedy choices are near-ties would make token-for-token parity tests
hinge on the last bit of floating-point rounding.
"""

from __future__ import annotations

import math
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from expertmesh.checkpoint import expected_shapes, write_checkpoint
from expertmesh.model.config import ModelConfig

PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                        max_position_embeddings=4096),
    "small": ModelConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=4, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                         max_position_embeddings=32768),
}

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixtral_tokenizer_path() -> Path:
    """Mistral's v1 sentencepiece model, the tokenizer of Mixtral 8x7B."""
    return Path(str(resources.files("mistral_common") / "data" / "tokenizer.model.v1"))


def random_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """fp32 random weights for every tensor of `cfg`, reproducible from `seed`."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(expected_shapes(cfg).items()):
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name == "model.embed_tokens.weight":
            out[name] = torch.randn(shape, generator=gen)
        else:  # [out, in]: unit-variance outputs for unit-variance inputs; logits spread O(1)
            out[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
    return out


def write_preset(preset: str, out_dir: str | os.PathLike, seed: int = 0, dtype: str = "float32",
                 max_shard_bytes: int = 512 << 20) -> list[str]:
    """Write `config.json`, safetensors and `tokenizer.model` of a preset to `out_dir`."""
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    cfg = PRESETS[preset]
    tensors = {k: v.to(DTYPES[dtype]) for k, v in random_weights(cfg, seed).items()}
    files = write_checkpoint(out_dir, cfg, tensors, max_shard_bytes=max_shard_bytes)
    shutil.copyfile(mixtral_tokenizer_path(), Path(out_dir) / "tokenizer.model")
    return [*files, "tokenizer.model"]
