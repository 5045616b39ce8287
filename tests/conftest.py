"""Shared fixtures, each made once per test session: small random-weight checkpoints, and one two-node
Ray cluster on this machine."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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


def pytest_configure(config):
    """Ray reads these once, when first imported (test modules import it at collection), so they are
    set here, for this process and every Ray or `expertmesh serve` process it starts: Ray on loopback
    only, with token authentication and a token of this session's own."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))


ATTENTION, EXPERT = "attention", "expert"  # custom resources marking the two nodes of `ray_cluster`
# All declared GPUs live on the expert node: GPU ids are per node, so distinct ids are distinct GPUs
# only within one node, and expert groups are what asks for whole GPUs.
DECLARED_GPUS = 8
RAY_START_TIMEOUT_S = 120
# Ray's GCS, raylets and workers listen on loopback only when their node's address is 127.0.0.1; on
# any other, 127.0.0.2 included, they listen on every interface.
NODE_IP = "127.0.0.1"
# `ray start --address 127.0.0.1:PORT` replaces 127.0.0.1 with the machine's outward address
# (ray-project/ray#59110), where the head does not listen. The joining node runs Ray's own `ray start`
# with that replacement left out, and keeps the address as given.
_RAY_START_AS_GIVEN = ("import sys, ray._private.services as services; "
                       "services.resolve_ip_for_localhost = lambda host: host; "
                       "from ray.scripts.scripts import main; sys.argv[0] = 'ray'; sys.exit(main())")


@dataclass(frozen=True)
class TwoNodeRay:
    """The session's Ray cluster: where to join it, and which node is which."""

    address: str  # GCS address, for `ray.init(address=...)` and `expertmesh serve --ray-address`
    attention_node: str  # node id of the head, which advertises the "attention" resource
    expert_node: str  # node id of the joined node: the "expert" resource and the declared GPUs
    sessions: tuple[int, ...]  # the process sessions of the two nodes (every Ray process they start)

    def listeners(self) -> list[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int, int]]:
        """(address, port, pid) of every TCP socket listening in a process of the two nodes."""
        inodes = {}
        for sid in self.sessions:
            for pid in _session_pids(sid):
                with contextlib.suppress(OSError):  # gone meanwhile
                    for fd in Path(f"/proc/{pid}/fd").iterdir():
                        with contextlib.suppress(OSError):
                            target = os.readlink(fd)
                            if target.startswith("socket:["):
                                inodes[target[8:-1]] = pid
        found = []
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local, state, inode = fields[1], fields[3], fields[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                host, port = local.split(":")
                raw = bytes.fromhex(host)  # 32-bit words in the host's (little-endian) order
                packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
                found.append((ipaddress.ip_address(packed), int(port, 16), inodes[inode]))
        return found


def _free_ports(n: int) -> list[int]:
    """Ports the OS has free on loopback now (from its ephemeral range, outside Ray's worker ports)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((NODE_IP, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _start_node(temp_dir: Path, name: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --block` as our own child, leading its own process group (so it can be stopped whole,
    and only it). Every listener on loopback; ports the CLI would fix at a default are chosen free."""
    start = ["-c", _RAY_START_AS_GIVEN] if "--address" in args else ["-m", "ray.scripts.scripts"]
    cmd = [sys.executable, *start, "start", "--block", "--node-ip-address", NODE_IP,
           "--temp-dir", str(temp_dir), "--dashboard-agent-listen-port", "0", "--object-store-memory",
           str(128 << 20), "--num-cpus", "2", *args]
    with open(temp_dir / f"{name}.log", "w") as log:  # the child keeps its own copy of the file
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_until(what: str, ready, nodes: list[subprocess.Popen], temp_dir: Path) -> None:
    """Poll `ready` until it holds; fail with the nodes' output if one exits or time runs out."""
    deadline = time.monotonic() + RAY_START_TIMEOUT_S
    while not ready():
        if any(p.poll() is not None for p in nodes) or time.monotonic() > deadline:
            logs = "".join(f"--- {log.name}\n" + "".join(log.read_text().splitlines(True)[-15:])
                           for log in sorted(temp_dir.glob("*.log")))
            raise RuntimeError(f"Ray: no {what} within {RAY_START_TIMEOUT_S} s (or a node exited)\n{logs}")
        time.sleep(0.2)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection((NODE_IP, port), timeout=1).close()
        return True
    except OSError:
        return False


def _session_pids(sid: int) -> list[int]:
    """Live processes of session `sid` (Linux). Ray workers move to process groups of their own, but
    stay in the session of the `ray start` that started their node."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, _pgrp, session = stat.read_text().rsplit(")", 1)[1].split()[:4]
        except (OSError, IndexError):  # gone meanwhile
            continue
        if int(session) == sid and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _gone(node: subprocess.Popen, timeout_s: float) -> bool:
    """Whether every process of the node's session has exited within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        node.poll()  # reap the leader, or it stays a zombie
        if not _session_pids(node.pid):
            return True
        time.sleep(0.2)
    return False


def _stop_node(node: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the node's process group (`ray start`, raylet, GCS, agents; the raylet stops its
    workers), then SIGKILL to whatever of its session is still there."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGTERM)
    if _gone(node, grace_s):
        return
    for pid in _session_pids(node.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if not _gone(node, 10):
        raise RuntimeError(f"processes of the Ray node started as {node.pid} survived SIGKILL")


@pytest.fixture(scope="session")
def ray_cluster():
    """One real two-node Ray cluster for the whole session, on loopback only: a head node advertising
    "attention", and a second node joined with `ray start --address` advertising "expert" and GPUs that
    do not exist (so placement by GPU id can be checked on a CPU machine). This process joins it as a
    driver. Both nodes are processes this session started, and it stops exactly those."""
    ray = pytest.importorskip("ray")
    temp_dir = Path(tempfile.mkdtemp(prefix="em-ray-"))  # short: Ray's socket paths live under it
    gcs_port, client_port, autoscaler_metrics, dashboard_metrics = _free_ports(4)
    address = f"{NODE_IP}:{gcs_port}"
    # Both nodes: no draining on SIGTERM (there is nothing to drain in tests and it waits 30 s), and
    # free ports for the two metrics servers Ray would otherwise put on fixed ones (44217, 44227),
    # which another Ray on this machine may hold.
    # The joined one also needs Ray's multi-node switch on: "0" (set for this session) means to Ray
    # that no second node may join. Both run on loopback all the same, from --node-ip-address.
    env = {**os.environ, "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
           "AUTOSCALER_METRIC_PORT": str(autoscaler_metrics), "DASHBOARD_METRIC_PORT": str(dashboard_metrics)}
    nodes: list[subprocess.Popen] = []
    try:
        nodes.append(_start_node(
            temp_dir, "attention", "--head", "--port", str(gcs_port), "--ray-client-server-port", str(client_port),
            "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", "0",
            "--disable-usage-stats", "--num-gpus", "0", "--resources", json.dumps({ATTENTION: 1}), env=env))
        _wait_until("GCS", lambda: _accepts(gcs_port), nodes, temp_dir)
        nodes.append(_start_node(temp_dir, "expert", "--address", address, "--num-gpus", str(DECLARED_GPUS),
                                 "--resources", json.dumps({EXPERT: 1}),
                                 "--include-log-monitor", "false",  # one per machine: the head's
                                 env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}))
        ray.init(address=address, log_to_driver=False, configure_logging=False)

        def node_with(resource: str) -> str | None:
            ids = [n["NodeID"] for n in ray.nodes() if n["Alive"] and resource in n["Resources"]]
            return ids[0] if ids else None

        _wait_until("attention and expert nodes", lambda: node_with(ATTENTION) and node_with(EXPERT), nodes,
                    temp_dir)
        with pytest.MonkeyPatch.context() as mp:
            # For what finds its cluster by itself (Ray's state API): not by the machine's processes,
            # which include other Ray clusters.
            mp.setenv("RAY_ADDRESS", address)
            yield TwoNodeRay(address, node_with(ATTENTION), node_with(EXPERT), tuple(n.pid for n in nodes))
    finally:
        ray.shutdown()
        for node in reversed(nodes):  # the joined node first, while its GCS is still there
            _stop_node(node)
        shutil.rmtree(temp_dir, ignore_errors=True)
