"""Hugging Face Mixtral checkpoints: which tensors exist, who owns them, and reading only those.

A checkpoint directory holds `config.json`, `tokenizer.model` and either one `model.safetensors` or
shards listed in `model.safetensors.index.json`. Tensor names are the Hub's:

    model.embed_tokens.weight                                   [V, D]
    model.layers.N.input_layernorm.weight                       [D]
    model.layers.N.self_attn.{q,k,v,o}_proj.weight              [H*hd, D] / [KVH*hd, D] / [D, H*hd]
    model.layers.N.post_attention_layernorm.weight              [D]
    model.layers.N.block_sparse_moe.gate.weight                 [E, D]
    model.layers.N.block_sparse_moe.experts.E.w{1,3}.weight     [I, D]
    model.layers.N.block_sparse_moe.experts.E.w2.weight         [D, I]
    model.norm.weight                                           [D]
    lm_head.weight                                              [V, D]  (absent when embeddings are tied)

Every process of the cluster reads only the tensors it owns (`Ownership`): an expert group never
touches attention weights or other experts. safetensors files are memory-mapped and each owned
tensor is copied out on its own, so a process never holds a whole file in memory.
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from expertmesh.model.config import ModelConfig

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that does not match its config or is damaged; the message names file and tensor."""


def layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


def expert_names(layer: int, expert: int) -> tuple[str, str, str]:
    """(w1, w2, w3) tensor names of one expert of one layer."""
    base = f"{layer_prefix(layer)}block_sparse_moe.experts.{expert}."
    return base + "w1.weight", base + "w2.weight", base + "w3.weight"


def gate_name(layer: int) -> str:
    return f"{layer_prefix(layer)}block_sparse_moe.gate.weight"


def attention_names(layer: int) -> dict[str, str]:
    """Short role -> tensor name for the attention side of one layer (norms included)."""
    p = layer_prefix(layer)
    return {
        "input_norm": p + "input_layernorm.weight",
        "wq": p + "self_attn.q_proj.weight",
        "wk": p + "self_attn.k_proj.weight",
        "wv": p + "self_attn.v_proj.weight",
        "wo": p + "self_attn.o_proj.weight",
        "post_norm": p + "post_attention_layernorm.weight",
    }


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint of this config must hold, with its shape."""
    d, i, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d),
                                          "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for n in range(cfg.num_hidden_layers):
        a = attention_names(n)
        shapes.update({a["input_norm"]: (d,), a["post_norm"]: (d,), a["wq"]: (q, d), a["wk"]: (kv, d),
                       a["wv"]: (kv, d), a["wo"]: (d, q), gate_name(n): (cfg.num_local_experts, d)})
        for e in range(cfg.num_local_experts):
            w1, w2, w3 = expert_names(n, e)
            shapes.update({w1: (i, d), w2: (d, i), w3: (i, d)})
    return shapes


@dataclass(frozen=True)
class Ownership:
    """Which tensors one component of the cluster owns.

    `layers` are the layers whose attention (and norms) it owns; `gate_layers` those whose router
    gate it owns; `experts` the expert ids it owns in every layer of `expert_layers`.
    """

    layers: tuple[int, ...] = ()
    gate_layers: tuple[int, ...] = ()
    experts: tuple[int, ...] = ()
    expert_layers: tuple[int, ...] = ()
    embed: bool = False
    head: bool = False  # final norm + LM head

    @classmethod
    def whole_model(cls, cfg: ModelConfig) -> Ownership:
        every = tuple(range(cfg.num_hidden_layers))
        return cls(layers=every, gate_layers=every, experts=tuple(range(cfg.num_local_experts)),
                   expert_layers=every, embed=True, head=True)

    def names(self, cfg: ModelConfig) -> set[str]:
        out: set[str] = set()
        if self.embed or (self.head and cfg.tie_word_embeddings):
            out.add("model.embed_tokens.weight")
        if self.head:
            out.add("model.norm.weight")
            if not cfg.tie_word_embeddings:
                out.add("lm_head.weight")
        for n in self.layers:
            out.update(attention_names(n).values())
        out.update(gate_name(n) for n in self.gate_layers)
        for n in self.expert_layers:
            for e in self.experts:
                out.update(expert_names(n, e))
        return out


def split_range(n: int, parts: int, what: str) -> list[tuple[int, ...]]:
    """Contiguous, near-equal ownership of range(n): 8 experts in 3 groups -> (0,1,2) (3,4,5) (6,7)."""
    if not 1 <= parts <= n:
        raise ValueError(f"{what} must be between 1 and {n}, got {parts}")
    base, extra = divmod(n, parts)
    out, start = [], 0
    for k in range(parts):
        size = base + (k < extra)
        out.append(tuple(range(start, start + size)))
        start += size
    return out


class CheckpointReader:
    """Reads named tensors from a checkpoint directory, strictly.

    Opening checks the file layout against the config: a tensor the config does not expect, or one it
    expects that no file holds, is an error naming the tensor. `read()` checks shapes as it goes;
    `check()` checks every tensor's header up front, without reading any data.
    """

    def __init__(self, checkpoint_dir: str | os.PathLike, cfg: ModelConfig | None = None):
        self.dir = Path(checkpoint_dir)
        self.config = cfg or ModelConfig.from_checkpoint(self.dir)
        self.file_of = self._locate_tensors()
        self._shapes = expected_shapes(self.config)
        unknown = sorted(set(self.file_of) - set(self._shapes), key=_natural_key)
        if unknown:
            raise CheckpointError(f"{self.dir / self.file_of[unknown[0]]}: unexpected tensor {unknown[0]!r} "
                                  f"(not part of a model with this config.json; {len(unknown)} such tensors)")
        missing = sorted(set(self._shapes) - set(self.file_of), key=_natural_key)
        if missing:
            listing = INDEX_FILE if (self.dir / INDEX_FILE).exists() else SINGLE_FILE
            raise CheckpointError(f"{self.dir / listing}: missing tensor {missing[0]!r} "
                                  f"({len(missing)} missing in all)")

    def check(self) -> ModelConfig:
        """Check every tensor's header against config.json, reading no tensor data; returns the config.

        Each tensor must be in the file the index names, with the shape the config implies and a float
        dtype. Opening a file makes safetensors check that the tensors' byte ranges tile it exactly, so
        a truncated file fails here too. Cheap (one JSON header per file), so a damaged checkpoint can
        fail before any process of the cluster starts to load it.
        """
        by_file: dict[str, list[str]] = {}
        for name, file in self.file_of.items():
            by_file.setdefault(file, []).append(name)
        for file in sorted(by_file):
            path = self.dir / file
            with _open(path) as f:
                held = set(f.keys())
                for name in sorted(by_file[file], key=_natural_key):
                    if name not in held:
                        raise CheckpointError(f"{path}: missing tensor {name!r} ({INDEX_FILE} places it in this file)")
                    header = f.get_slice(name)
                    self._check_shape(path, name, tuple(header.get_shape()))
                    if not header.get_dtype().startswith(("F", "BF")):  # F64, F32, F16, BF16, F8_*
                        raise CheckpointError(f"{path}: tensor {name!r} has non-float dtype {header.get_dtype()}")
        return self.config

    def _locate_tensors(self) -> dict[str, str]:
        index = self.dir / INDEX_FILE
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index ({exc})") from None
            for file in sorted(set(weight_map.values())):
                if not (self.dir / file).exists():
                    held = sorted((n for n, f in weight_map.items() if f == file), key=_natural_key)
                    raise CheckpointError(f"{index}: lists shard {file} which does not exist "
                                          f"(for tensor {held[0]!r} and {len(held) - 1} more)")
            return dict(weight_map)
        single = self.dir / SINGLE_FILE
        if not single.exists():
            raise CheckpointError(f"{self.dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
        with _open(single) as f:
            return {name: SINGLE_FILE for name in f.keys()}

    def read(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """Read exactly `names` (converted to `dtype` if given), one file open per shard."""
        wanted = sorted(set(names))
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            if name not in self._shapes:
                raise CheckpointError(f"{self.dir}: no tensor named {name!r} in a model with this config")
            by_file.setdefault(self.file_of[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            path = self.dir / file
            with _open(path) as f:
                for name in file_names:
                    out[name] = self._read_one(f, path, name, dtype, device)
        return out

    def _read_one(self, f, path: Path, name: str, dtype, device) -> torch.Tensor:
        try:
            tensor = f.get_tensor(name)
        except Exception as exc:  # safetensors raises its own error types for damaged data
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {exc}") from None
        self._check_shape(path, name, tuple(tensor.shape))
        if not tensor.is_floating_point():
            raise CheckpointError(f"{path}: tensor {name!r} has non-float dtype {tensor.dtype}")
        return tensor.to(device=device, dtype=dtype or tensor.dtype)

    def _check_shape(self, path: Path, name: str, shape: tuple[int, ...]) -> None:
        if shape != self._shapes[name]:
            raise CheckpointError(f"{path}: tensor {name!r} has shape {shape}, "
                                  f"config.json implies {self._shapes[name]}")

    def stored_dtype(self) -> torch.dtype:
        """The dtype the embedding table is stored in, taken as the checkpoint's dtype."""
        name = "model.embed_tokens.weight"
        path = self.dir / self.file_of[name]
        with _open(path) as f:
            code = f.get_slice(name).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def _open(path: Path):
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:
        raise CheckpointError(_truncation(path) or f"{path}: not a readable safetensors file ({exc})") from None


def _truncation(path: Path) -> str | None:
    """Which tensors a file cut short lost, from its own header; None if that header is unreadable too.

    Layout: an 8-byte little-endian header length, the JSON header (name -> dtype, shape and
    `data_offsets` [start, end) relative to the data after it), then the data.
    """
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        size = path.stat().st_size
        ends = {name: t["data_offsets"][1] for name, t in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):  # not even a header
        return None
    needed = 8 + length + max(ends.values(), default=0)
    cut = sorted((name for name, end in ends.items() if 8 + length + end > size), key=lambda name: ends[name])
    if not cut:
        return None
    return (f"{path}: truncated to {size} of {needed} bytes: tensor {cut[0]!r} and {len(cut) - 1} "
            f"after it lie past the end")


def write_checkpoint(out_dir: str | os.PathLike, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor],
                     max_shard_bytes: int = 2 << 30) -> list[str]:
    """Write `tensors` as Hub-style safetensors (sharded with an index past `max_shard_bytes`).

    Also writes `config.json`. Returns the file names written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors, key=_natural_key):
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensors[name].contiguous()
        size += nbytes
    meta = {"format": "pt"}
    dtype = next(iter(tensors.values())).dtype
    (out / "config.json").write_text(json.dumps(cfg.to_hub_dict(dtype), indent=2) + "\n")
    if len(shards) == 1:
        _save(shards[0], out / SINGLE_FILE, meta)
        return ["config.json", SINGLE_FILE]
    files, weight_map, total = [], {}, 0
    for k, shard in enumerate(shards, start=1):
        file = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        _save(shard, out / file, meta)
        files.append(file)
        for name, t in shard.items():
            weight_map[name] = file
            total += t.numel() * t.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return ["config.json", INDEX_FILE, *files]


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """`save_file`, with the file readable as its directory is (safetensors creates it 0600, unlike
    config.json and tokenizer.model beside it)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, stat.S_IMODE(path.parent.stat().st_mode) & 0o666)


def _natural_key(name: str) -> list:
    """Sort `layers.10` after `layers.9`, so shards hold contiguous layers."""
    return [int(part) if part.isdigit() else part for part in name.split(".")]
