"""Shared fixtures: small random-weight checkpoints written once per test session."""

from __future__ import annotations

import shutil

import pytest
import torch

from expertmesh.cli import main as cli_main
from expertmesh.presets import mixtral_tokenizer_path


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """The `tiny` preset, written by the `expertmesh init-model` command (single file, fp32)."""
    out = tmp_path_factory.mktemp("tiny")
    assert cli_main(["init-model", "--preset", "tiny", "--out", str(out), "--seed", "0"]) == 0
    return out


@pytest.fixture(scope="session")
def sharded_ckpt(tmp_path_factory):
    """`tiny` with a different seed, sharded into 1 MiB files with a safetensors index."""
    out = tmp_path_factory.mktemp("sharded")
    assert cli_main(["init-model", "--preset", "tiny", "--out", str(out), "--seed", "1", "--max-shard-mb", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("bf16")
    assert cli_main(["init-model", "--preset", "tiny", "--out", str(out), "--seed", "2", "--dtype", "bfloat16"]) == 0
    return out


@pytest.fixture(scope="session")
def hf_ckpt(tmp_path_factory):
    """A checkpoint written by transformers' own `save_pretrained` (rope_parameters-style config),
    with a sliding window shorter than the test prompts so the window mask is exercised."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.MixtralConfig(
        vocab_size=32000, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, max_position_embeddings=2048,
        sliding_window=12, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(3)
    model = transformers.MixtralForCausalLM(cfg)
    with torch.no_grad():  # spread the logits so greedy choices are not near-ties
        model.lm_head.weight.mul_(20.0)
    out = tmp_path_factory.mktemp("hf")
    model.save_pretrained(out)
    shutil.copyfile(mixtral_tokenizer_path(), out / "tokenizer.model")
    return out


DECLARED_GPUS = 8


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, on loopback only, declaring GPUs that do not
    exist so placement by GPU id can be checked on a CPU machine."""
    import os

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray = pytest.importorskip("ray")
    ctx = ray.init(num_cpus=4, num_gpus=DECLARED_GPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                   _node_ip_address="127.0.0.1", log_to_driver=False, configure_logging=False)
    yield ctx
    ray.shutdown()
