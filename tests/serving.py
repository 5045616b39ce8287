"""`expertmesh serve` as a subprocess, for the tests that run it as a user does: start it against the
session's Ray cluster, read its output lines, wait for health, list its actors, scrape its metrics,
and stop it with SIGTERM checking that it exits 0 and leaves no actor behind."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

STOP_TIMEOUT_S = 60  # SIGTERM to exit: the grace period for in-flight requests, then actors removed
ACTORS_GONE_TIMEOUT_S = 30  # exit to Ray's state API no longer listing the actors as alive


def wait_for_line(proc: subprocess.Popen, lines: list[str], pattern: str, timeout_s: float = 180) -> str:
    """Read the server's output (kept in `lines`) until a line matches `pattern`; its first group."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                raise AssertionError(f"serve exited with {proc.returncode}:\n" + "".join(lines[-30:]))
            continue
        lines.append(line)
        m = re.search(pattern, line)
        if m:
            return m.group(1)
    raise AssertionError(f"serve did not print {pattern!r} in time:\n" + "".join(lines[-30:]))


def scrape(url: str) -> dict[str, list]:
    """Metric families by name from a Prometheus text endpoint."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=30) as reply:
        return {f.name: f.samples for f in text_string_to_metric_families(reply.read().decode())}


def wait_serving(address: str, timeout_s: float = 60) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                    health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.2)
    raise AssertionError("never SERVING")


def alive_components() -> list:
    """Ray's view of the live expertmesh actors (their classes end in "Component"): id, class, node, pid."""
    from ray.util.state import list_actors

    return [a for a in list_actors(filters=[("state", "=", "ALIVE")], timeout=30)
            if a.class_name.endswith("Component")]


@contextlib.contextmanager
def serve_process(model, ray_address: str | None, *flags: str) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`expertmesh serve --model MODEL --port 0 --ray-address ADDRESS FLAGS...`: the process and the list
    `wait_for_line` keeps its output in. `ray_address` None: no --ray-address, and no RAY_ADDRESS in its
    environment, so it starts an embedded Ray of its own. On leaving, SIGTERM; it must exit within
    STOP_TIMEOUT_S, and, when the body passed (a failure is not hidden behind these), with status 0 and
    (joined to the session's cluster) no actor left."""
    cmd = [sys.executable, "-m", "expertmesh.cli", "serve", "--model", str(model), "--port", "0",
           *(["--ray-address", ray_address] if ray_address else []), *flags]
    env = None if ray_address else {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    try:
        yield proc, lines
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            pytest.fail(f"serve did not exit within {STOP_TIMEOUT_S} s of SIGTERM")
        lines += proc.stdout.readlines()
    assert code == 0, "".join(lines[-30:])
    # Ray's warning that a component's restart could fail (its constructor arguments in the object store)
    assert not [line for line in lines if "constructor arguments in the object store" in line]
    if ray_address is None:
        return
    deadline = time.monotonic() + ACTORS_GONE_TIMEOUT_S
    while alive_components() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert alive_components() == [], "actors left behind after SIGTERM"


def serve_without_ray(tmp_path, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess:
    """`expertmesh serve ARGS`, which should stop before Ray starts: its own embedded Ray would live
    under `tmp_path/ray-tmp` (RAY_TMPDIR), and that folder must never appear. No RAY_ADDRESS."""
    ray_tmp = tmp_path / "ray-tmp"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "expertmesh.cli", "serve", *args], capture_output=True, text=True,
                          timeout=timeout_s, env={**env, "RAY_TMPDIR": str(ray_tmp)})
    assert not ray_tmp.exists(), f"Ray was started: {done.stderr}"
    return done
