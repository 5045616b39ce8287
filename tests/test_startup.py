"""A damaged checkpoint fails `expertmesh serve` at start-up with a message naming the file and the
tensor: never a hang, never a half-started cluster.

What one process can see in config.json and the safetensors headers (a truncated file, a missing
tensor, a wrong shape, a config that does not match the weights, a shard the index names but that is
not there) fails before any actor starts. What only a component sees on its own node fails start-up
with the component's own error, and every actor started so far is killed. Both nodes of the test
cluster share one file system, so for that case the serve process's own check is switched off, and
`Cluster.start` is also tested on its own, in a driver that outlives the failure.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors import safe_open
from safetensors.torch import save_file
from conftest import ATTENTION
from serving import serve_without_ray
from test_serve import alive_components

from expertmesh.model.config import ModelConfig
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster, ComponentStartError
from expertmesh.orchestrator.placement import plan_cluster

FAIL_WITHIN_S = 120
W2 = "model.layers.1.block_sparse_moe.experts.5.w2.weight"  # [D, I]; of the 2 expert groups, only the second owns it
INDEX = "model.safetensors.index.json"


def rewrite(path: Path, change) -> None:
    """Load a safetensors file, let `change` edit its name -> tensor dict, save it back."""
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    change(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def shard_of(ckpt: Path, name: str) -> Path:
    return ckpt / json.loads((ckpt / INDEX).read_text())["weight_map"][name]


def edit_config(ckpt: Path, **changes) -> None:
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# Each damage changes a copy of a checkpoint and returns (the file the message must name, the tensor
# it must name or None, a pattern for what it must say is wrong).

def truncated(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-4096])  # the header intact, the last tensors' bytes cut
    return path, None, r"truncated to \d+ of \d+ bytes: tensor 'model\.[\w.]+' and \d+ after it lie past the end"


def missing_tensor(ckpt):
    path = ckpt / "model.safetensors"
    rewrite(path, lambda tensors: tensors.pop(W2))
    return path, W2, r"missing tensor"


def missing_from_its_shard(ckpt):
    path = shard_of(ckpt, W2)  # the index still places it there
    rewrite(path, lambda tensors: tensors.pop(W2))
    return path, W2, rf"missing tensor .*\({re.escape(INDEX)} places it in this file\)"


def wrong_shape(ckpt):
    path = ckpt / "model.safetensors"
    rewrite(path, lambda tensors: tensors.update({W2: tensors[W2].T.contiguous()}))
    return path, W2, re.escape("has shape (128, 64), config.json implies (64, 128)")


def config_hidden_size(ckpt):
    edit_config(ckpt, hidden_size=96)
    return (ckpt / "model.safetensors", "lm_head.weight",
            re.escape("has shape (32000, 64), config.json implies (32000, 96)"))


def config_fewer_experts(ckpt):
    edit_config(ckpt, num_local_experts=4)
    return (ckpt / "model.safetensors", "model.layers.0.block_sparse_moe.experts.4.w1.weight",
            r"unexpected tensor .*not part of a model with this config\.json")


def index_names_missing_shard(ckpt):
    shard = shard_of(ckpt, W2)
    shard.unlink()
    return ckpt / INDEX, None, rf"lists shard {re.escape(shard.name)} which does not exist \(for tensor 'model\."


def no_tokenizer(ckpt):
    (ckpt / "tokenizer.model").unlink()
    return ckpt / "tokenizer.model", None, "not found"


DAMAGES = {"tiny": [truncated, missing_tensor, wrong_shape, config_hidden_size, config_fewer_experts, no_tokenizer],
           "sharded": [missing_from_its_shard, index_names_missing_shard]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def component_ids() -> set[str]:
    """Ids of every Component actor the session's Ray cluster knows of, in any state."""
    from ray.util.state import list_actors

    return {a.actor_id for a in list_actors(limit=10_000, timeout=30) if a.class_name.endswith("Component")}


# `expertmesh serve` with the serve process's own header check switched off: as if its node held a good
# copy of the checkpoint and an expert node a damaged one.
UNCHECKED = ("import sys; import expertmesh.checkpoint as c; c.CheckpointReader.check = lambda self: self.config; "
             "from expertmesh.cli import main; sys.exit(main(sys.argv[1:]))")


def serve_damaged(ckpt: Path, ray_address: str, log: Path, check: bool = True) -> tuple[int, str, list[str], float]:
    """Run `expertmesh serve` on `ckpt`, probing health while it runs: exit code, output, the health
    statuses seen, seconds to exit. Fails the test if it has not exited within FAIL_WITHIN_S."""
    port = free_port()
    cmd = [sys.executable, *(["-m", "expertmesh.cli"] if check else ["-c", UNCHECKED]), "serve", "--model", str(ckpt),
           "--port", str(port), "--ray-address", ray_address, "--attention-shards", "2", "--expert-groups", "2",
           "--max-batch-size", "2", "--max-seq-len", "64", "--threads", "1"]
    seen = []
    with open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while proc.poll() is None and time.monotonic() - started < FAIL_WITHIN_S:
                try:
                    seen.append(health_pb2.HealthCheckResponse.ServingStatus.Name(
                        health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status))
                except grpc.RpcError:  # nothing listening: what a damaged checkpoint should give
                    pass
                time.sleep(0.2)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            pytest.fail(f"serve still running after {FAIL_WITHIN_S} s:\n{log.read_text()[-3000:]}")
    return proc.returncode, log.read_text(), seen, time.monotonic() - started


@pytest.mark.parametrize("base, damage", [(base, d) for base, damages in DAMAGES.items() for d in damages],
                         ids=lambda x: getattr(x, "__name__", x))
def test_damaged_checkpoint_fails_serve_before_any_actor(ray_cluster, tiny_ckpt, sharded_ckpt, base, damage,
                                                         tmp_path):
    ckpt = shutil.copytree({"tiny": tiny_ckpt, "sharded": sharded_ckpt}[base], tmp_path / "ckpt")
    file, tensor, what = damage(ckpt)
    before = component_ids()
    code, out, health, elapsed = serve_damaged(ckpt, ray_cluster.address, tmp_path / "serve.log")
    assert code == 2, out
    message = [line for line in out.splitlines() if line.startswith("expertmesh: error: ")]
    assert len(message) == 1 and "Traceback" not in out, out
    assert str(file) in message[0] and re.search(what, message[0]), message[0]
    assert tensor is None or repr(tensor) in message[0], message[0]
    assert "SERVING" not in health and "expertmesh: serving" not in out
    assert component_ids() == before, "actors started for a checkpoint the serve process could check itself"
    print(f"{damage.__name__}: exit {code} after {elapsed:.1f} s: {message[0]}")


def missing_from_its_shard_only(sharded_ckpt: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the sharded checkpoint without expert 5's w2 of layer 1 in the shard the index places
    it in: a component's reader finds out only when it reads that tensor, so with 2 expert groups only
    the second fails. Returns (checkpoint, shard)."""
    ckpt = shutil.copytree(sharded_ckpt, tmp_path / "ckpt")
    shard = shard_of(ckpt, W2)
    rewrite(shard, lambda tensors: tensors.pop(W2))
    return ckpt, shard


def start_error(shard: Path) -> str:
    return (rf"an expert group on \S+ failed to start: CheckpointError: {re.escape(str(shard))}: "
            rf"cannot read tensor {re.escape(repr(W2))}: .*")


def assert_not_retried(shard: Path) -> None:
    """The group whose constructor raised died once: Ray restarts components that crash, not these."""
    from ray.util.state import list_actors

    failed = [a for a in list_actors(filters=[("class_name", "=", "ExpertGroupComponent"), ("state", "=", "DEAD")],
                                     detail=True, limit=10_000, timeout=30) if str(shard) in str(a.death_cause)]
    assert [a.num_restarts for a in failed] == [0], "a constructor that raised was retried"


def assert_none_left(alive_before: set[str]) -> None:
    """No Component actor alive that was not before (a killed actor takes a moment to be marked dead)."""
    deadline = time.monotonic() + 30
    while {a.actor_id for a in alive_components()} - alive_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert {a.actor_id for a in alive_components()} - alive_before == set(), "a half-started cluster is left"


def test_component_error_fails_serve_with_its_message(ray_cluster, sharded_ckpt, tmp_path):
    ckpt, shard = missing_from_its_shard_only(sharded_ckpt, tmp_path)
    alive_before = {a.actor_id for a in alive_components()}
    code, out, health, elapsed = serve_damaged(ckpt, ray_cluster.address, tmp_path / "serve.log", check=False)
    assert code == 1, out
    message = [line for line in out.splitlines() if line.startswith("expertmesh serve: ")]
    assert len(message) == 1 and "Traceback" not in out, out
    assert re.fullmatch(start_error(shard), message[0].removeprefix("expertmesh serve: ")), message[0]
    assert "SERVING" not in health and "expertmesh: serving" not in out
    assert_none_left(alive_before)
    assert_not_retried(shard)
    print(f"component error: exit {code} after {elapsed:.1f} s: {message[0]}")


def test_cluster_start_kills_what_it_started(ray_cluster, sharded_ckpt, tmp_path):
    """`Cluster.start` itself, in a driver that lives on: the first expert group, already loading or
    up, is killed when the second fails."""
    ckpt, shard = missing_from_its_shard_only(sharded_ckpt, tmp_path)
    cfg = ModelConfig.from_checkpoint(ckpt)
    alive_before = {a.actor_id for a in alive_components()}
    cluster = Cluster(str(ckpt), plan_cluster(cfg, 1, 2), RuntimeOptions(threads=1, metrics=False), 2, 32,
                      start_timeout_s=FAIL_WITHIN_S)
    with pytest.raises(ComponentStartError, match=start_error(shard)):
        cluster.start()
    assert_none_left(alive_before)
    assert_not_retried(shard)


def test_a_component_ray_cannot_place_fails_start_with_why(ray_cluster, tiny_ckpt):
    """Expert groups pinned to a node pool that no node advertises: start fails at its timeout saying
    which resource is missing and which flag asked for it, and leaves no actor behind."""
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    alive_before = {a.actor_id for a in alive_components()}
    cluster = Cluster(str(tiny_ckpt), plan_cluster(cfg, 1, 2, expert_resource="no-such-pool"),
                      RuntimeOptions(threads=1, metrics=False), 2, 32, start_timeout_s=3)
    with pytest.raises(ComponentStartError, match=r"^the cluster was not up within 3 s \(still waiting for an expert group\): Ray cannot place "
                                                  r"every component: they ask for no-such-pool 0\.002 \(the cluster "
                                                  r"has 0; set by --attention-resource / --expert-resource"):
        cluster.start()
    assert_none_left(alive_before)


def test_serve_gives_up_at_its_start_timeout(ray_cluster, tiny_ckpt):
    """`--start-timeout` is the wait for the components (300 s by default; longer where an autoscaler
    adds GPU nodes): serve gives up after it with the reason, and leaves no actor behind."""
    alive_before = {a.actor_id for a in alive_components()}
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(tiny_ckpt), "--port", str(free_port()),
           "--ray-address", ray_cluster.address, "--expert-resource", "no-such-pool", "--start-timeout", "4",
           "--max-batch-size", "2", "--max-seq-len", "32"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert ("expertmesh serve: the cluster was not up within 4 s (still waiting for an expert group): Ray cannot "
            "place every component") in done.stderr
    assert "Traceback" not in done.stderr
    assert_none_left(alive_before)


def test_a_component_no_single_node_can_hold_fails_start_with_why(ray_cluster, tiny_ckpt):
    """Attention shards asking for half a GPU on the attention pool, whose node has none (the GPUs are
    on the expert node): the totals would allow it, but no node can hold a shard. Start fails at its
    timeout naming the shards and the flags, and leaves no actor behind. (The groups, routers and shards
    share the 3 s: whichever phase is waiting when they run out, the reason names the shards.)"""
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    alive_before = {a.actor_id for a in alive_components()}
    plan = plan_cluster(cfg, 1, 2, gpus_per_shard=0.5, attention_resource=ATTENTION)
    cluster = Cluster(str(tiny_ckpt), plan, RuntimeOptions(threads=1, metrics=False), 2, 32, start_timeout_s=3)
    why = (r"Ray cannot place every component: no single node has what attention-0 \(GPU 0\.5, attention "
           r"0\.001\) asks for \(set by --gpus-per-shard")
    with pytest.raises(ComponentStartError, match=rf"^the cluster was not up within 3 s \(still waiting for (an expert group|a router|an attention shard)\): {why}"):
        cluster.start()
    assert_none_left(alive_before)


@pytest.mark.parametrize("flags, message", [
    (("--gpus-per-group", "1.5"), "gpus_per_group above 1 must be a whole number of GPUs, got 1.5"),
    (("--attention-shards", "99"), "attention_shards"),  # more shards than layers
])
def test_a_plan_that_cannot_work_is_refused_before_ray_starts(tiny_ckpt, flags, message, tmp_path):
    """Flags that no cluster could serve fail in a second, before an embedded Ray is started."""
    done = serve_without_ray(tmp_path, "--model", str(tiny_ckpt), "--port", str(free_port()), *flags)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("expertmesh: error: ")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("flag", ["--port", "--metrics-port"])
def test_a_port_in_use_is_refused_before_ray_starts(tiny_ckpt, flag, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--port", str(port)] if flag == "--port" else ["--port", str(free_port()), flag, str(port)]
        done = serve_without_ray(tmp_path, "--model", str(tiny_ckpt), *flags)
    assert done.returncode == 2, done.stderr
    assert f"expertmesh: error: {flag}: cannot listen on 127.0.0.1:{port}: Address already in use" in done.stderr
    assert "Traceback" not in done.stderr


def test_step_budget_below_the_batch_size_is_refused_before_start(tiny_ckpt, tmp_path):
    """Every running sequence decodes one token per step, so the budget must hold a full batch."""
    done = serve_without_ray(tmp_path, "--model", str(tiny_ckpt), "--port", str(free_port()), "--max-batch-size",
                             "8", "--max-tokens-per-step", "4")
    assert done.returncode == 2, done.stderr
    assert "--max-tokens-per-step (4) must be at least --max-batch-size (8)" in done.stderr
    assert "Traceback" not in done.stderr
