"""The cluster on a real local Ray cluster with real gRPC servers on loopback: the same tokens as the
single-process engine for 16 concurrent, staggered requests (greedy, and seeded sampling for every
fourth), across topologies."""

from __future__ import annotations

import gc
import os
import random
import time
import types
from pathlib import Path

import pytest

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.model.config import ModelConfig
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler
from expertmesh.tokenizer import Tokenizer

SLOTS, MAX_LEN = 8, 96


def requests(n=16, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = tuple([1] + [rng.randrange(3, 32000) for _ in range(rng.randrange(1, 40))])
        params = SamplingParams(max_new_tokens=rng.randrange(1, 24), ignore_eos=True,
                                **({"temperature": 0.8, "top_p": 0.9, "seed": i} if i % 4 == 3 else {}))
        out.append(GenerationRequest(prompt_token_ids=ids, params=params, request_id=f"r{i}"))
    return out


def run_staggered(engine: Engine, reqs) -> dict[str, list[int]]:
    """Requests arrive a few at a time while earlier ones are running (bounded loop)."""
    pending, tokens = list(reqs), {r.request_id: [] for r in reqs}
    for _ in range(10_000):
        for _ in range(3):
            if pending:
                engine.add(pending.pop(0))
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
        if not pending and not engine.scheduler.has_work():
            return tokens
    raise AssertionError("did not finish")


@pytest.fixture(scope="module")
def reference_tokens(tiny_ckpt):
    engine = Engine.from_checkpoint(tiny_ckpt, max_batch_size=SLOTS, max_seq_len=MAX_LEN)
    return run_staggered(engine, requests())


@pytest.mark.parametrize("shards, groups, router", [(1, 1, "service"), (2, 4, "service"), (1, 8, "inline")])
def test_cluster_matches_single_process_engine(ray_cluster, tiny_ckpt, reference_tokens, shards, groups, router):
    tokenizer = Tokenizer.from_checkpoint(tiny_ckpt)
    engine_ref = Engine.from_checkpoint(tiny_ckpt, max_batch_size=1, max_seq_len=MAX_LEN)
    plan = plan_cluster(engine_ref.cfg, attention_shards=shards, expert_groups=groups)
    cluster = Cluster(str(tiny_ckpt), plan, RuntimeOptions(threads=1), SLOTS, MAX_LEN, router=router).start()
    try:
        runner = cluster.runner()
        engine = Engine(runner, tokenizer, engine_ref.cfg, Scheduler(SLOTS, MAX_LEN))
        got = run_staggered(engine, requests())
        assert got == reference_tokens
        placement = cluster.describe()
        assert sorted(e for g in placement["groups"] for e in g["experts"]) == list(range(8))
        assert [tuple(s["layers"]) for s in placement["shards"]] == [p.layers for p in plan.shards]
        runner.close()
    finally:
        cluster.shutdown()


def test_a_runner_keeps_its_cluster_alive(ray_cluster, tiny_ckpt, reference_tokens):
    """Ray removes an actor once no handle to it is left: a caller that keeps only the runner still
    gets every token, and the components go when the runner does."""
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    cluster = Cluster(str(tiny_ckpt), plan_cluster(cfg, attention_shards=1, expert_groups=2),
                      RuntimeOptions(threads=1), SLOTS, MAX_LEN, router="inline").start()
    placed = cluster.describe()
    runner, pids = cluster.runner(), [info["pid"] for info in placed["shards"] + placed["groups"]]
    del cluster
    gc.collect()
    for _ in range(30):  # 3 s: Ray removes actors whose last handle is gone within a second here
        assert all(Path(f"/proc/{pid}").exists() for pid in pids)
        time.sleep(0.1)
    engine = Engine(runner, Tokenizer.from_checkpoint(tiny_ckpt), cfg, Scheduler(SLOTS, MAX_LEN))
    reqs = requests()[:4]
    assert run_staggered(engine, reqs) == {r.request_id: reference_tokens[r.request_id] for r in reqs}
    assert all(Path(f"/proc/{pid}").exists() for pid in pids)
    runner.close()
    del engine, runner
    gc.collect()
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(Path(f"/proc/{pid}").exists() for pid in pids)


def test_each_expert_group_gets_its_own_gpu(ray_cluster, tiny_ckpt):
    """Ray was started with declared GPUs: each group asking for one lands on a distinct GPU id."""
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    plan = plan_cluster(cfg, attention_shards=2, expert_groups=4, gpus_per_group=1.0, gpus_per_shard=0.5)
    cluster = Cluster(str(tiny_ckpt), plan, RuntimeOptions(threads=1), 2, 32).start()
    try:
        placed = cluster.describe()
        gpus = [tuple(g["gpu_ids"]) for g in placed["groups"]]
        assert all(len(g) == 1 for g in gpus) and len(set(gpus)) == 4
        shard_gpus = [tuple(s["gpu_ids"]) for s in placed["shards"]]
        assert all(len(g) == 1 for g in shard_gpus) and not set(shard_gpus) & set(gpus)  # half a GPU each
        assert all(r["gpu_ids"] == [] for r in placed["routers"])  # routers hold no GPU
    finally:
        cluster.shutdown()


def test_components_start_with_their_environment_and_groups_never_preempt_on_wakeup(ray_cluster, tiny_ckpt,
                                                                                     monkeypatch):
    """Every component process gets COMPONENT_ENV, where the caller's environment does not override a
    variable; every thread of an expert group on CPU runs under SCHED_BATCH, and the shards' do not."""
    from expertmesh.orchestrator.cluster import COMPONENT_ENV

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # the caller's own setting wins, on every node
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    cluster = Cluster(str(tiny_ckpt), plan_cluster(cfg, attention_shards=1, expert_groups=2),
                      RuntimeOptions(threads=1), 2, 32, router="inline").start()
    try:
        placed = cluster.describe()
        for info in placed["groups"] + placed["shards"]:
            environ = dict(kv.split("=", 1) for kv in
                           Path(f"/proc/{info['pid']}/environ").read_text().split("\0") if "=" in kv)
            assert environ["GRPC_EXPERIMENTS"] == COMPONENT_ENV["GRPC_EXPERIMENTS"]
            assert environ["GOMP_SPINCOUNT"] == COMPONENT_ENV["GOMP_SPINCOUNT"]
            assert environ["OMP_WAIT_POLICY"] == "ACTIVE"
        for kind, policy in (("groups", os.SCHED_BATCH), ("shards", os.SCHED_OTHER)):
            for info in placed[kind]:
                tids = [int(t) for t in os.listdir(f"/proc/{info['pid']}/task")]
                assert {os.sched_getscheduler(t) for t in tids} == {policy}, (kind, info["pid"])
    finally:
        cluster.shutdown()


def test_a_busy_component_gets_one_probe_at_a_time(ray_cluster):
    import ray

    class Busy:  # defined here, so that Ray ships it by value (workers cannot import this module)
        """A component stand-in: `info` as the cluster's components answer it, and `hold` to keep its
        one thread busy, as a component stuck in a long call would."""

        def __init__(self):
            self.answered = 0

        def info(self) -> dict:
            self.answered += 1
            return {"pid": os.getpid(), "metrics": None}

        def hold(self, seconds: float) -> None:
            time.sleep(seconds)

        def count(self) -> int:
            return self.answered

    busy = ray.remote(num_cpus=0)(Busy).remote()
    assert ray.get(busy.count.remote(), timeout=60) == 0
    held = busy.hold.remote(4)
    plan = types.SimpleNamespace(shards=[types.SimpleNamespace(layers=(0, 1))], groups=[])
    cluster = Cluster("unused", plan, RuntimeOptions(), 1, 1, shards=[busy])
    try:
        for _ in range(3):
            assert cluster.metrics_targets(timeout_s=0.3) == ([], {})  # a scrape: no answer in time
        assert cluster.lost(timeout_s=0.3) == []  # busy is not lost
        ray.get(held, timeout=60)
        # Every probe sent would have been answered once the component was free: one was sent.
        assert ray.get(busy.count.remote(), timeout=60) == 1
        assert cluster.metrics_targets(timeout_s=30) == ([], {})
        assert ray.get(busy.count.remote(), timeout=60) == 2  # a fresh probe once the last was answered
    finally:
        ray.kill(busy)
