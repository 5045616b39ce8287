"""Faults on a real Ray cluster: an expert group, a router or an attention shard killed with SIGKILL
mid-generation costs a pause, not a request. Ray restarts the actor and it reloads its weights. For a
group or a router its caller sends the layer's message again; a restarted shard has lost its KV cache,
so every running sequence is re-prefilled from its prompt and the tokens generated so far."""

from __future__ import annotations

import os
import signal
import time
import urllib.request

import pytest

from prometheus_client import CollectorRegistry

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.model.config import ModelConfig
from expertmesh.orchestrator.actors import Endpoint, RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler
from expertmesh.services.internal import ServiceGoneError
from expertmesh.services.metrics import GatewayMetrics
from expertmesh.tokenizer import Tokenizer

SLOTS, MAX_LEN = 4, 96


def reqs():
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    return [GenerationRequest(prompt=p, params=params, request_id=f"f{i}")
            for i, p in enumerate(["Experts are", "A dead expert", "costs a pause,", "not a request."])]


def pid_of(actor) -> int:
    """The actor's process, as Ray's state API reports it (what an operator would look up)."""
    from ray.util.state import get_actor

    return get_actor(actor._actor_id.hex(), timeout=30).pid


def run(engine: Engine, kill=None) -> tuple[dict[str, list[int]], float | None]:
    tokens = {r.request_id: [] for r in reqs()}
    for r in reqs():
        engine.add(r)
    pause, steps = None, 0
    while engine.scheduler.has_work() and steps < 1000:
        if steps == 5 and kill:
            kill()
            killed_at = time.monotonic()
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if steps == 5 and kill:
            pause = time.monotonic() - killed_at  # kill -> the next token
        steps += 1
    return tokens, pause


@pytest.mark.parametrize("kind, index", [("groups", 1), ("routers", 0), ("shards", 1)])
def test_component_killed_mid_generation_loses_nothing(ray_cluster, tiny_ckpt, kind, index):
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    expected, _ = run(Engine.from_checkpoint(tiny_ckpt, max_batch_size=SLOTS, max_seq_len=MAX_LEN))
    cluster = Cluster(str(tiny_ckpt), plan_cluster(cfg, 2, 2), RuntimeOptions(threads=1), SLOTS, MAX_LEN).start()
    watch = GatewayMetrics(CollectorRegistry())  # what serve's /metrics reports about the groups
    try:
        victim = pid_of(getattr(cluster, kind)[index])
        assert victim == cluster.describe()[kind][index]["pid"]
        watch.observe_groups(cluster.metrics_targets()[1])
        engine = Engine(cluster.runner(), tok, cfg, Scheduler(SLOTS, MAX_LEN))
        got, pause = run(engine, kill=lambda: os.kill(victim, signal.SIGKILL))
        assert got == expected  # every request complete, token for token
        assert cluster.describe()[kind][index]["pid"] != victim  # a new process serves it
        print(f"{kind}[{index}] killed -> next token: {pause:.2f} s")
        watch.observe_groups(cluster.metrics_targets()[1])
        restarts = {labels: watch.group_restarts.labels(*labels)._value.get() for labels in (("0", "0"), ("1", "0"))}
        assert restarts == {("0", "0"): 0, ("1", "0"): 1 if kind == "groups" else 0}
        assert all(watch.group_up.labels(g, "0")._value.get() == 1 for g in ("0", "1"))
    finally:
        cluster.shutdown()


def forward_calls(metrics_address: str) -> float:
    text = urllib.request.urlopen(f"http://{metrics_address}/metrics", timeout=10).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("expertmesh_expert_forward_seconds_count"))


def test_expert_replicas_share_load_and_fail_over_without_a_restart(ray_cluster, tiny_ckpt):
    """Two replicas of each group: both serve; one killed (and never restarted: restarts=0) costs
    nothing, because its messages go to the other replica at once. With the other one killed too, the
    group is gone for good, and the cluster says which."""
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    tok = Tokenizer.from_checkpoint(tiny_ckpt)
    expected, _ = run(Engine.from_checkpoint(tiny_ckpt, max_batch_size=SLOTS, max_seq_len=MAX_LEN))
    plan = plan_cluster(cfg, 1, 2, expert_replicas=2)
    assert [(g.group, g.replica) for g in plan.groups] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    cluster = Cluster(str(tiny_ckpt), plan, RuntimeOptions(threads=1), SLOTS, MAX_LEN, restarts=0).start()
    try:
        engine = Engine(cluster.runner(), tok, cfg, Scheduler(SLOTS, MAX_LEN))
        got, _ = run(engine)
        assert got == expected
        groups = cluster.describe()["groups"]
        assert all(forward_calls(g["metrics"]) > 0 for g in groups)  # every replica took messages
        victim = pid_of(cluster.groups[3])  # group 1, replica 1
        got, pause = run(engine, kill=lambda: os.kill(victim, signal.SIGKILL))
        assert got == expected
        print(f"replica killed, no restart -> next token: {pause:.2f} s")
        with pytest.raises(ServiceGoneError):  # what the router's reconnection found: not a timeout
            Endpoint("", cluster.group_names[3]).resolver(60)()
        assert cluster.lost() == []  # group 1 still has a replica: nothing is missing
        os.kill(pid_of(cluster.groups[2]), signal.SIGKILL)  # and now that one (no restarts either)
        deadline, lost = time.monotonic() + 30, []
        while not lost and time.monotonic() < deadline:  # until Ray has noticed
            lost = cluster.lost()
            time.sleep(0.2)
        experts = ", ".join(map(str, plan.groups[2].experts))
        assert lost == [f"expert group 1 (experts {experts})"]
    finally:
        cluster.shutdown()
