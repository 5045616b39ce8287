"""Checkpoint format, strict loading, and reading only owned tensors."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import expertmesh.checkpoint as checkpoint
from expertmesh.checkpoint import CheckpointError, CheckpointReader, expected_shapes
from expertmesh.model.config import ModelConfig
from expertmesh.checkpoint import split_range
from expertmesh.model.load import load_expert_group, load_local_model
from expertmesh.presets import PRESETS, random_weights


class SpyingSafeOpen:
    """Wraps safetensors' `safe_open`, recording every tensor whose data is requested."""

    def __init__(self):
        self.read: list[str] = []

    def __call__(self, path, framework):
        handle = safe_open(path, framework=framework)
        spy = self

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def keys(self):
                return handle.keys()

            def get_tensor(self, name):
                spy.read.append(name)
                return handle.get_tensor(name)

            def get_slice(self, name):
                spy.read.append(name)
                return handle.get_slice(name)

        return Handle()


@pytest.mark.parametrize("ckpt_name", ["tiny_ckpt", "sharded_ckpt"])
def test_expert_group_reads_only_its_experts(ckpt_name, request, monkeypatch):
    ckpt = request.getfixturevalue(ckpt_name)
    cfg = ModelConfig.from_checkpoint(ckpt)
    spy = SpyingSafeOpen()
    monkeypatch.setattr(checkpoint, "safe_open", spy)
    group = load_expert_group(CheckpointReader(ckpt), experts=(2, 5), dtype=torch.float32)
    owned = {f"model.layers.{n}.block_sparse_moe.experts.{e}.w{w}.weight"
             for n in range(cfg.num_hidden_layers) for e in (2, 5) for w in (1, 2, 3)}
    assert set(spy.read) == owned
    assert len(spy.read) == len(owned), "a tensor was read twice"
    # and what was read is what the file holds: the group computes w2(silu(w1 x) * w3 x) with it
    full = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            full.update({k: h.get_tensor(k) for k in h.keys()})
    x = torch.randn(3, cfg.hidden_size)
    ids = torch.tensor([2, 5, 5])
    got = group(1, x, ids)
    for row, e in enumerate(ids.tolist()):
        w1, w2, w3 = (full[f"model.layers.1.block_sparse_moe.experts.{e}.w{w}.weight"] for w in (1, 2, 3))
        want = w2 @ (torch.nn.functional.silu(w1 @ x[row]) * (w3 @ x[row]))
        assert torch.allclose(got[row], want, atol=1e-5)
    with pytest.raises(ValueError, match="expert 3 is not owned"):
        group(0, x[:1], torch.tensor([3]))


def test_sharded_checkpoint_has_index_and_several_files(sharded_ckpt):
    index = json.loads((sharded_ckpt / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert set(index["weight_map"]) == set(expected_shapes(ModelConfig.from_checkpoint(sharded_ckpt)))


def test_weight_files_are_readable_as_their_directory_is(tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    out.chmod(0o750)
    files = checkpoint.write_checkpoint(out, PRESETS["tiny"], random_weights(PRESETS["tiny"], 0),
                                         max_shard_bytes=4 << 20)
    weights = [f for f in files if f.endswith(".safetensors")]
    assert len(weights) > 1
    assert {oct(stat.S_IMODE((out / f).stat().st_mode)) for f in weights} == {oct(0o640)}


def test_init_model_is_reproducible(tmp_path):
    a = random_weights(PRESETS["tiny"], seed=4)
    b = random_weights(PRESETS["tiny"], seed=4)
    c = random_weights(PRESETS["tiny"], seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.norm.weight"], c["model.norm.weight"])


def test_hub_and_rope_parameters_configs(hf_ckpt, tiny_ckpt):
    hub = json.loads((tiny_ckpt / "config.json").read_text())
    assert hub["rope_theta"] == 1e6 and "rope_parameters" not in hub
    assert ModelConfig.from_checkpoint(tiny_ckpt).rope_theta == 1e6
    new_style = json.loads((hf_ckpt / "config.json").read_text())
    assert "rope_parameters" in new_style
    cfg = ModelConfig.from_checkpoint(hf_ckpt)
    assert cfg.rope_theta == 10000.0 and cfg.sliding_window == 12 and cfg.head_dim == 8


def copy_ckpt(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_unexpected_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys()}
    tensors["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = torch.zeros(2, 2)
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"experts\.9\.w1\.weight"):
        CheckpointReader(ckpt)


def test_missing_tensor_is_named(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    with safe_open(str(ckpt / "model.safetensors"), framework="pt") as h:
        tensors = {k: h.get_tensor(k) for k in h.keys() if k != "model.layers.1.self_attn.k_proj.weight"}
    save_file(tensors, str(ckpt / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight"):
        CheckpointReader(ckpt)


def test_wrong_shape_names_file_and_tensor(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["intermediate_size"] = 96  # config no longer matches the weights
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe"):
        load_local_model(CheckpointReader(ckpt), num_slots=1, max_len=8, dtype=torch.float32)


def test_truncated_file_is_an_error_naming_the_file(tiny_ckpt, tmp_path):
    ckpt = copy_ckpt(tiny_ckpt, tmp_path / "c")
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_local_model(CheckpointReader(ckpt), num_slots=1, max_len=8, dtype=torch.float32)


def test_split_range():
    assert split_range(8, 3, "expert_groups") == [(0, 1, 2), (3, 4, 5), (6, 7)]
    assert split_range(8, 8, "expert_groups") == [(e,) for e in range(8)]
    with pytest.raises(ValueError, match="expert_groups"):
        split_range(8, 9, "expert_groups")
