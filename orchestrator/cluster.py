"""Start, describe and stop the cluster's Ray actors for a placement plan.

Order follows the dependencies of the data path: expert groups first (they need nothing), then one
router per attention shard (it needs the groups' addresses), then the shards (each needs its router).
Every component is restartable by Ray (`max_restarts`) and reloads its weights when restarted. Callers
of expert groups and routers resend the message that found them gone; a restarted attention shard
has lost its KV cache, so the engine re-prefills every running sequence (`CacheLostError`).

A component whose constructor raises (a damaged checkpoint on its node, say) is not restarted: Ray
restarts only processes that die, and reports the constructor's error to whoever waits on the actor.
`start()` then kills whatever it started and raises `ComponentStartError` with that error's message.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field, replace

import ray

from expertmesh.checkpoint import CheckpointReader
from expertmesh.orchestrator.actors import (GONE_AFTER, AttentionShardComponent, ExpertGroupComponent, Endpoint,
                                            RouterComponent, RuntimeOptions)
from expertmesh.orchestrator.placement import ClusterPlan, ComponentPlan, alive_nodes, shortfall, unpacked
from expertmesh.presets import DTYPES
from expertmesh.services.attention import ShardChain
from expertmesh.services.internal import INTERNAL_GRPC_EXPERIMENTS

log = logging.getLogger(__name__)


class ComponentStartError(RuntimeError):
    """A component raised while starting (loading its weights, opening its server); the message is
    which kind, on which node, and the component's own error without Ray's traceback around it."""


def _start_error(exc: ray.exceptions.RayActorError, what: str) -> ComponentStartError:
    """The error of an actor whose constructor raised (`exc.actor_init_failed`), told in one line.

    Ray keeps only the text of a constructor's error: its first line names the node
    ("ray::Cls.__init__() (pid=.., ip=..)"), a Python traceback follows, and the lines after the
    traceback's last frame are the error itself ("module.Error: message").
    """
    lines = exc.error_msg.rstrip().splitlines()
    frames = [k for k, line in enumerate(lines) if line.startswith("  File ")]
    start = frames[-1] + 1 if frames else 1
    error = "\n".join(line for line in lines[start:] if not line.startswith(" ")) or exc.error_msg
    kind, sep, message = error.partition(": ")
    error = f"{kind.rsplit('.', 1)[-1]}{sep}{message}"  # expertmesh.checkpoint.CheckpointError -> CheckpointError
    node = re.search(r"\bip=([^,)\s]+)", lines[0])
    return ComponentStartError(f"{what}{f' on {node.group(1)}' if node else ''} failed to start: {error}")


COMPONENT_ENV = {
    # An OpenMP team does not spin long after its work (libgomp spins for about 300000 iterations,
    # some 3 ms, by default) on the cores that the next component of the step needs.
    "OMP_WAIT_POLICY": "PASSIVE",
    # libgomp (torch's OpenMP), where this overrides the policy: about 0.3 ms of spinning before
    # sleeping. That bridges the gaps between the kernels of a shard's attention on two threads, whose
    # helper thread otherwise sleeps after each kernel and must be woken for the next; and it is over
    # before the step's expert groups get work. Small preset, 2 shards x 4 groups, concurrency 32,
    # against shards on one thread, side by side: faster in 13 of 14 rounds (three runs, medians
    # 1.02-1.05x); two threads that sleep at once were no faster than one. One layer's attention at 32
    # tokens after an 8 ms idle gap: 5.3 ms on one thread, 5.9 on two sleeping, 4.2 on two spinning
    # (3000 and 10000 iterations: 7.6-9.3 ms, slower than sleeping at once).
    "GOMP_SPINCOUNT": "30000",
    "GRPC_EXPERIMENTS": INTERNAL_GRPC_EXPERIMENTS,
}


def component_env() -> dict[str, str]:
    """The environment every component process starts with (libraries read it when they load):
    COMPONENT_ENV, except where this process's environment sets a variable, which then wins on
    every node."""
    return {k: os.environ.get(k, v) for k, v in COMPONENT_ENV.items()}


def _actor(cls, plan: ComponentPlan, max_restarts: int = 0, name: str | None = None):
    return ray.remote(cls).options(
        name=name, num_cpus=plan.num_cpus, num_gpus=plan.num_gpus, resources=plan.resources or None,
        max_restarts=max_restarts, max_task_retries=0, runtime_env={"env_vars": component_env()},
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
    shard_names: list = field(default_factory=list)  # the actors' names (`Endpoint.actor`)
    group_names: list = field(default_factory=list)
    # Per actor, its `info` call still unanswered: a busy or hung actor runs every call sent to it once
    # free (Ray 2.60's cancel does not take a queued actor call back), so it gets one at a time.
    _probes: dict = field(default_factory=dict, repr=False)
    _probes_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def start(self) -> Cluster:
        """Create every actor and wait until each has loaded its weights and is listening, all within
        `start_timeout_s` (groups, then routers, then shards share it)."""
        deadline = time.monotonic() + self.start_timeout_s
        # Actors are named (unique to this cluster): components find a restarted peer by its name.
        prefix = f"expertmesh-{uuid.uuid4().hex[:12]}-"
        self.group_names = [prefix + g.name for g in self.plan.groups]
        router_names = [f"{prefix}router-{k}" for k in range(len(self.plan.shards))]
        self.shard_names = [prefix + s.name for s in self.plan.shards]
        try:
            self.groups = [_actor(ExpertGroupComponent, g, self.restarts, name).remote(
                self.checkpoint, g.experts, self.options, str(g.group), g.replica)
                for g, name in zip(self.plan.groups, self.group_names)]
            group_addrs = self._addresses(self.groups, "an expert group", deadline)
            members: list[list[Endpoint]] = [[] for _ in range(1 + max(g.group for g in self.plan.groups))]
            for addr, g, name in zip(group_addrs, self.plan.groups, self.group_names):
                members[g.group].append(Endpoint(addr, name, g.experts))
            if self.router == "inline":
                router_addrs = [members] * len(self.plan.shards)
            else:
                # A router does [T, D] x [D, E] gate matmuls and waits on the groups: it stays on its
                # shard's node pool but holds no GPU, computing on CPU in the wire dtype of the shards.
                router_options = replace(self.options, device="cpu", dtype=self._wire_dtype())
                self.routers = [_actor(RouterComponent, replace(s, num_gpus=0.0), self.restarts, name).remote(
                    self.checkpoint, s.layers, members, router_options)
                    for s, name in zip(self.plan.shards, router_names)]
                addrs = self._addresses(self.routers, "a router", deadline)
                router_addrs = [Endpoint(addr, name) for addr, name in zip(addrs, router_names)]
            self.shards = [_actor(AttentionShardComponent, s, self.restarts, name).remote(
                self.checkpoint, s.layers, addr, self.num_slots, self.max_len, self.options, str(k))
                for k, (s, addr, name) in enumerate(zip(self.plan.shards, router_addrs, self.shard_names))]
            self.shard_addresses = self._addresses(self.shards, "an attention shard", deadline)
        except BaseException:
            self.shutdown()
            raise
        log.info("cluster up: %d attention shards, %d expert group actors", len(self.shards), len(self.groups))
        return self

    def _addresses(self, actors: list, what: str, deadline: float) -> list[str]:
        """Wait (until `deadline`, monotonic) for `actors` to load and listen; their addresses, or the
        error of one that failed."""
        try:
            return ray.get([a.address.remote() for a in actors], timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.RayActorError as exc:
            if not exc.actor_init_failed:  # the process died (a signal, out of memory): Ray's report says so
                raise
            raise _start_error(exc, what) from None
        except ray.exceptions.GetTimeoutError:
            nodes = alive_nodes()
            why = shortfall(self.plan, ray.cluster_resources(), nodes) or unpacked(self.plan, nodes) or (
                "still loading its weights, or no single node has everything it asks for "
                f"(GPU, CPU, node-pool resource); Ray's resources in all: {ray.cluster_resources()}")
            raise ComponentStartError(f"the cluster was not up within {self.start_timeout_s:g} s (still waiting for "
                                      f"{what}): {why}") from None

    def _wire_dtype(self) -> str:
        """The dtype hidden states travel in: the shards' compute dtype."""
        if self.options.dtype:
            return self.options.dtype
        dtype = self.options.torch_dtype(CheckpointReader(self.checkpoint))
        return next(name for name, d in DTYPES.items() if d == dtype)

    def runner(self, timeout_s: float | None = None) -> ShardChain:
        """The shards as the engine's step runner. It holds this cluster, so the components live as
        long as it does even where the caller keeps no other reference."""
        resolvers = [Endpoint(a, name).resolver(self.options.restart_timeout_s)
                     for a, name in zip(self.shard_addresses, self.shard_names)]
        return ShardChain(self.shard_addresses, timeout_s=timeout_s or 2 * self.options.call_timeout_s,
                          resolvers=resolvers, tls=self.options.tls(), owner=self)

    def _probe(self, actor) -> ray.ObjectRef:
        """`actor.info.remote()`, or the call to it still unanswered."""
        with self._probes_lock:
            pending = self._probes.get(actor)
            if pending is not None and not ray.wait([pending], timeout=0)[0]:
                return pending
            self._probes[actor] = call = actor.info.remote()
            return call

    def describe(self) -> dict:
        """Where every component runs: {"groups": [...], "routers": [...], "shards": [...]} of info dicts."""
        def infos(actors):
            return ray.get([self._probe(a) for a in actors], timeout=30)

        return {"groups": infos(self.groups), "routers": infos(self.routers), "shards": infos(self.shards)}

    def metrics_targets(self, timeout_s: float = 3.0) -> tuple[list[str], dict[tuple[int, int], int | None]]:
        """Every component's metrics address, and per expert group (group, replica) the process id that
        answered (None: dead or restarting). Every component is asked at once, and all together get
        `timeout_s`: restarting groups do not add up past a scrape's timeout."""
        actors = [*self.groups, *self.routers, *self.shards]
        calls = [self._probe(actor) for actor in actors]
        deadline = time.monotonic() + timeout_s
        targets, pids = [], {}
        for k, call in enumerate(calls):
            try:
                info = ray.get(call, timeout=max(0.0, deadline - time.monotonic()))
                pid = info["pid"]
                if info["metrics"]:
                    targets.append(info["metrics"])
            except Exception:  # noqa: BLE001 - dead or restarting: its series pause
                pid = None
            if k < len(self.groups):
                pids[self.plan.groups[k].group, self.plan.groups[k].replica] = pid
        return targets, pids

    def lost(self, timeout_s: float = 5.0) -> list[str]:
        """The components that are gone for good (Ray gave up restarting them) and without which no
        step can run: an attention shard, a router, or an expert group whose every replica is gone.
        Empty while everything is alive or restarting."""
        def dead(actor) -> bool:
            # The resolvers' rule (GONE_AFTER): a restarting actor queues a new call or says it is
            # unavailable; one that fails fresh calls as dead again and again will never run again.
            for _ in range(GONE_AFTER):
                try:
                    ray.get(self._probe(actor), timeout=timeout_s)
                    return False
                except ray.exceptions.ActorDiedError:
                    time.sleep(0.5)
                except Exception:  # noqa: BLE001 - restarting, slow or unreachable: not known lost
                    return False
            return True

        gone = [f"attention shard {k} (layers {plan.layers[0]}-{plan.layers[-1]})"
                for k, (plan, actor) in enumerate(zip(self.plan.shards, self.shards)) if dead(actor)]
        gone += [f"the router of attention shard {k}" for k, actor in enumerate(self.routers) if dead(actor)]
        replicas: dict[tuple[int, tuple[int, ...]], list[bool]] = {}
        for plan, actor in zip(self.plan.groups, self.groups):
            replicas.setdefault((plan.group, plan.experts), []).append(dead(actor))
        gone += [f"expert group {g} (experts {', '.join(map(str, experts))})"
                 for (g, experts), down in replicas.items() if all(down)]
        return gone

    def shutdown(self) -> None:
        """Kill every actor this cluster started (no restart)."""
        for actor in (*self.shards, *self.routers, *self.groups):
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already gone is fine
                log.debug("actor already gone", exc_info=True)
        self.groups, self.routers, self.shards = [], [], []
        with self._probes_lock:
            self._probes.clear()
