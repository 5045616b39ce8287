"""Start, describe and stop the cluster's Ray actors for a placement plan.

Order follows the dependencies of the data path: expert groups first (they need nothing), then one
router per attention shard (it needs the groups' addresses), then the shards (each needs its router).
Every component is restartable by Ray (`max_restarts`) and reloads its weights when restarted. Callers
of expert groups and routers resend the message that found them gone; a restarted attention shard
has lost its KV cache, so the engine re-prefills every running sequence (`CacheLostError`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import ray

from expertmesh.checkpoint import CheckpointReader
from expertmesh.orchestrator.actors import (AttentionShardComponent, ExpertGroupComponent, Endpoint,
                                            RouterComponent, RuntimeOptions)
from expertmesh.orchestrator.placement import ClusterPlan, ComponentPlan
from expertmesh.presets import DTYPES
from expertmesh.services.attention import ShardChain

log = logging.getLogger(__name__)


def _actor(cls, plan: ComponentPlan, max_restarts: int = 0):
    return ray.remote(cls).options(
        name=None, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=plan.resources or None,
        max_restarts=max_restarts, max_task_retries=0,
    )


@dataclass
class Cluster:
    """The running actors of one model. `runner()` is the gateway's StepRunner over them."""

    checkpoint: str
    plan: ClusterPlan
    options: RuntimeOptions
    num_slots: int
    max_len: int
    router: str = "service"  # "service": a RouterService actor per shard; "inline": inside each shard
    start_timeout_s: float = 300.0
    restarts: int = 3  # how often Ray restarts a dead component (a shard's KV cache is then re-prefilled)
    groups: list = field(default_factory=list)
    routers: list = field(default_factory=list)
    shards: list = field(default_factory=list)

    def start(self) -> Cluster:
        """Create every actor and wait until each has loaded its weights and is listening."""
        try:
            self.groups = [_actor(ExpertGroupComponent, g, self.restarts).remote(
                self.checkpoint, g.experts, self.options, str(g.group), g.replica) for g in self.plan.groups]
            group_addrs = ray.get([a.address.remote() for a in self.groups], timeout=self.start_timeout_s)
            members: list[list[Endpoint]] = [[] for _ in range(1 + max(g.group for g in self.plan.groups))]
            for addr, g, actor in zip(group_addrs, self.plan.groups, self.groups):
                members[g.group].append(Endpoint(addr, actor, g.experts))
            if self.router == "inline":
                router_addrs = [members] * len(self.plan.shards)
            else:
                # A router does [T, D] x [D, E] gate matmuls and waits on the groups: it stays on its
                # shard's node pool but holds no GPU, computing on CPU in the wire dtype of the shards.
                router_options = replace(self.options, device="cpu", dtype=self._wire_dtype())
                self.routers = [_actor(RouterComponent, replace(s, num_gpus=0.0), self.restarts).remote(
                    self.checkpoint, s.layers, members, router_options) for s in self.plan.shards]
                addrs = ray.get([a.address.remote() for a in self.routers], timeout=self.start_timeout_s)
                router_addrs = [Endpoint(addr, actor) for addr, actor in zip(addrs, self.routers)]
            self.shards = [_actor(AttentionShardComponent, s, self.restarts).remote(
                self.checkpoint, s.layers, addr, self.num_slots, self.max_len, self.options, str(k))
                for k, (s, addr) in enumerate(zip(self.plan.shards, router_addrs))]
            self.shard_addresses = ray.get([a.address.remote() for a in self.shards], timeout=self.start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        log.info("cluster up: %d attention shards, %d expert group actors", len(self.shards), len(self.groups))
        return self

    def _wire_dtype(self) -> str:
        """The dtype hidden states travel in: the shards' compute dtype."""
        if self.options.dtype:
            return self.options.dtype
        dtype = self.options.torch_dtype(CheckpointReader(self.checkpoint))
        return next(name for name, d in DTYPES.items() if d == dtype)

    def runner(self, timeout_s: float | None = None) -> ShardChain:
        resolvers = [Endpoint(a, actor).resolver(self.options.restart_timeout_s)
                     for a, actor in zip(self.shard_addresses, self.shards)]
        return ShardChain(self.shard_addresses, timeout_s=timeout_s or 2 * self.options.call_timeout_s,
                          resolvers=resolvers, tls=self.options.tls())

    def describe(self) -> dict:
        """Where every component runs: {"groups": [...], "routers": [...], "shards": [...]} of info dicts."""
        def infos(actors):
            return ray.get([a.info.remote() for a in actors], timeout=30)

        return {"groups": infos(self.groups), "routers": infos(self.routers), "shards": infos(self.shards)}

    def metrics_targets(self) -> tuple[list[str], dict[tuple[int, int], int | None]]:
        """Every component's metrics address, and per expert group (group, replica) the process id that
        answered (None: dead or restarting)."""
        targets, pids = [], {}
        for kind, actors in (("groups", self.groups), ("routers", self.routers), ("shards", self.shards)):
            for k, actor in enumerate(actors):
                try:
                    info = ray.get(actor.info.remote(), timeout=5)
                    pid = info["pid"]
                    if info["metrics"]:
                        targets.append(info["metrics"])
                except Exception:  # noqa: BLE001 - dead or restarting: its series pause
                    pid = None
                if kind == "groups":
                    pids[self.plan.groups[k].group, self.plan.groups[k].replica] = pid
        return targets, pids

    def shutdown(self) -> None:
        """Kill every actor this cluster started (no restart)."""
        for actor in (*self.shards, *self.routers, *self.groups):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("actor already gone", exc_info=True)
        self.groups, self.routers, self.shards = [], [], []
