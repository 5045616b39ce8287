"""The cluster's components as plain Python classes; `cluster.py` makes them Ray actors.

Each loads only the tensors it owns, starts its gRPC server on its node's address (port chosen by the
OS) and reports where it listens. They are testable without Ray: construct one and call it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import torch
from prometheus_client import CollectorRegistry

from expertmesh.checkpoint import CheckpointReader
from expertmesh.model.load import load_decoder_stack, load_expert_group, load_gates
from expertmesh.model.moe import Router
from expertmesh.presets import DTYPES
from expertmesh.model.decoder import DecoderStack
from expertmesh.services.access import InternalTLS
from expertmesh.services.attention import HEAD_THREADS_MAX, AttentionServicer, serve_attention
from expertmesh.services.expert import ExpertReplicas, ExpertServicer, ExpertStream, serve_experts
from expertmesh.services.internal import EventLoopThread, ServiceGoneError
from expertmesh.services.metrics import AttentionMetrics, ExpertMetrics, RouterMetrics, serve_metrics
from expertmesh.services.router import RemoteRouter, RouterServicer, RouterStream, serve_router

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RuntimeOptions:
    """How every component computes: device, dtype and CPU threads."""

    device: str = "cpu"
    dtype: str | None = None  # None: float32 on CPU, the checkpoint's dtype on CUDA
    threads: int = 1  # torch CPU threads per component (see _setup)
    # An attention shard's torch threads for the layers of steps of PARALLEL_STEP_TOKENS tokens or more
    # (they run while every expert group waits); None: on CPU this node's cores, at most
    # HEAD_THREADS_MAX, else `threads`. Smaller steps, and the MoE calls, always use `threads`.
    attention_threads: int | None = None
    # The last shard's threads for the LM head, which runs while every other component waits; None:
    # on CPU this node's cores, at most HEAD_THREADS_MAX (services/attention.py).
    head_threads: int | None = None
    host: str | None = None  # where servers listen; None: this node's address as Ray knows it
    call_timeout_s: float = 30.0
    restart_timeout_s: float = 120.0  # how long a caller waits for a restarted expert group
    metrics: bool = True  # record and serve Prometheus metrics in every component
    # Mutual TLS between components: (CA, certificate chain, key) PEM paths, the same on every node.
    internal_tls: tuple[str, str, str] | None = None

    def torch_dtype(self, reader: CheckpointReader) -> torch.dtype:
        if self.dtype:
            return DTYPES[self.dtype]
        return torch.float32 if self.device == "cpu" else reader.stored_dtype()

    def tls(self) -> InternalTLS | None:
        return InternalTLS.load(*self.internal_tls) if self.internal_tls else None

    def torch_device(self) -> str:
        return "cuda" if self.device == "cuda" else "cpu"  # Ray's CUDA_VISIBLE_DEVICES makes it our GPU


def _setup(options: RuntimeOptions) -> str:
    """Per-process settings; returns the host to listen on."""
    # One thread per component by default: the components of a step hand work to each other, and a
    # process whose OpenMP team spins after its part steals the cores the next one needs. Measured on
    # 2 cores, small preset, 2 shards x 4 groups: one thread each gave 110 ms per decode step at
    # concurrency 1, one per core 149 ms (and 0.57x vs 0.46x of the engine at concurrency 32).
    # Attention shards switch to more threads for large steps only (`AttentionServicer`).
    torch.set_num_threads(options.threads)
    if options.host:
        return options.host
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    return "127.0.0.1"


def _cores(at_least: int) -> int:
    """Threads for a phase that has this node's cores to itself: every core we may run on, up to
    HEAD_THREADS_MAX."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(at_least, min(cores, HEAD_THREADS_MAX))


def _no_wakeup_preemption() -> None:
    """Put every thread of this process under SCHED_BATCH (Linux): a woken thread waits for the
    running one's time slice instead of preempting it. For expert groups on CPU: an attention shard
    sends one message per group in turn, and each group it wakes used to preempt it before it had sent
    the rest (measured at concurrency 32 on 2 cores: the last group started 5.6 ms after the first;
    3.6 ms under SCHED_BATCH, and 134.6 instead of 126.6 tokens/s side by side).
    Threads started later inherit the policy from the thread that starts them."""
    if not hasattr(os, "SCHED_BATCH"):
        return
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setscheduler(int(tid), os.SCHED_BATCH, os.sched_param(0))
        except OSError as exc:  # a thread that just ended, or a sandbox that forbids it: no harm
            log.debug("SCHED_BATCH for thread %s: %s", tid, exc)


def _in_ray_actor() -> bool:
    try:
        import ray

        return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None
    except ImportError:
        return False


def node_info() -> dict:
    """Where this component runs: pid, and with Ray, the node id and GPU ids."""
    info = {"pid": os.getpid(), "node_id": "local", "gpu_ids": []}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            info.update(node_id=ctx.get_node_id(), gpu_ids=[str(g) for g in ctx.get_accelerator_ids().get("GPU", [])])
    except ImportError:
        pass
    return info


class ExpertGroupComponent:
    """Serves experts `experts` of every layer over gRPC: expert group `name`, one of its replicas."""

    def __init__(self, checkpoint: str, experts: tuple[int, ...], options: RuntimeOptions, name: str = "0",
                 replica: int = 0):
        host = _setup(options)
        reader = CheckpointReader(checkpoint)
        dtype = options.torch_dtype(reader)
        group = load_expert_group(reader, experts, dtype, options.torch_device())
        self.metrics = Metrics(host, options.metrics)
        servicer = ExpertServicer(group, reader.config.hidden_size, dtype, options.torch_device(),
                                  self.metrics.make(ExpertMetrics), name, str(replica))
        self.loop = EventLoopThread(f"experts-{name}")
        self.server, port = self.loop.run(serve_experts(servicer, f"{host}:0", tls=options.tls()))
        self.experts, self.replica, self._address = tuple(experts), replica, f"{host}:{port}"
        if options.device == "cpu" and _in_ray_actor():  # a whole process of its own
            _no_wakeup_preemption()

    def address(self) -> str:
        return self._address

    def info(self) -> dict:
        return {**node_info(), "experts": list(self.experts), "replica": self.replica, "address": self._address,
                "metrics": self.metrics.address}


GONE_AFTER = 3
"""Fresh calls an actor must fail as dead, 0.5 s apart, to be taken as gone for good."""


@dataclass(frozen=True)
class Endpoint:
    """Where a restartable service (an expert group, a router) listens; `actor`, the name of its Ray
    actor, tells the new address after a restart. `experts`: what an expert group owns.

    A name, not a handle: an actor handle among a restartable actor's constructor arguments puts them
    in Ray's object store, from where they may be gone when the actor restarts (ray-project/ray#53727)."""

    address: str
    actor: str | None = None
    experts: tuple[int, ...] = ()

    def resolver(self, timeout_s: float):
        """A callable that waits (up to `timeout_s`) for the service to be alive and returns its address;
        it raises `ServiceGoneError` as soon as the actor is gone for good."""
        if self.actor is None:
            return None
        name = self.actor

        def resolve() -> str:
            import ray

            deadline, died = time.monotonic() + timeout_s, 0
            try:
                actor = ray.get_actor(name)
            except ValueError:  # no such actor any more
                raise ServiceGoneError(f"{name}: gone for good") from None
            while True:
                try:
                    return ray.get(actor.address.remote(), timeout=max(0.1, deadline - time.monotonic()))
                except ray.exceptions.ActorUnavailableError:  # restarting: ask again shortly
                    died = 0
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                except ray.exceptions.ActorDiedError:
                    # A restarting actor queues a new call or says it is unavailable; one that fails
                    # fresh calls again and again will never run again (a call that was running when
                    # the process died fails the same way once).
                    died += 1
                    if died == GONE_AFTER:
                        raise ServiceGoneError(f"{name}: gone for good (its restarts are used up)") from None
                    time.sleep(0.5)

        return resolve


Groups = list[list[Endpoint]]  # per expert group, its replicas


class Metrics:
    """This process's registry, served over HTTP on a free port of `host` (or nothing, when off)."""

    def __init__(self, host: str, enabled: bool = True):
        self.enabled = enabled
        self.registry = CollectorRegistry()
        self.address = f"{host}:{serve_metrics(self.registry, host)}" if enabled else None

    def make(self, cls, *args):
        """`cls(registry, *args)`, or None when metrics are off."""
        return cls(self.registry, *args) if self.enabled else None


def remote_router(reader: CheckpointReader, layers: tuple[int, ...], groups: Groups,
                  options: RuntimeOptions) -> RemoteRouter:
    """The gates of `layers`, fanning out to the expert services at `groups`. Call it on the event
    loop that will use it (its channels belong to that loop)."""
    cfg, device = reader.config, options.torch_device()
    tls = options.tls()
    replicas = [ExpertReplicas([ExpertStream(r.address, r.experts, options.call_timeout_s, device=device,
                                             resolve=r.resolver(options.restart_timeout_s), tls=tls) for r in group])
                for group in groups]
    return RemoteRouter(Router(load_gates(reader, layers, options.torch_dtype(reader), device),
                               cfg.num_experts_per_tok, replicas, cfg.num_local_experts))


class RouterComponent:
    """Serves the gates of `layers` and fans out to the expert groups at `groups`."""

    def __init__(self, checkpoint: str, layers: tuple[int, ...], groups: Groups, options: RuntimeOptions):
        host = _setup(options)
        self.metrics = Metrics(host, options.metrics)
        self.loop = EventLoopThread("router")
        self.server, port = self.loop.run(self._serve(CheckpointReader(checkpoint), layers, groups, options, host))
        self._address = f"{host}:{port}"

    async def _serve(self, reader: CheckpointReader, layers: tuple[int, ...], groups: Groups,
                     options: RuntimeOptions, host: str):
        router = remote_router(reader, layers, groups, options)
        metrics = self.metrics.make(RouterMetrics, reader.config.num_local_experts, layers)
        servicer = RouterServicer(metrics.metered(router) if metrics else router, layers, reader.config.hidden_size,
                                  options.torch_dtype(reader), options.torch_device())
        return await serve_router(servicer, f"{host}:0", tls=options.tls())

    def address(self) -> str:
        return self._address

    def info(self) -> dict:
        return {**node_info(), "address": self._address, "metrics": self.metrics.address}


class AttentionShardComponent:
    """Serves the attention side of `layers` with a KV cache of `num_slots` x `max_len` positions.

    `router` is its RouterService, or the expert groups themselves: then the router runs inside this
    process and each layer saves a network hop.
    """

    def __init__(self, checkpoint: str, layers: tuple[int, ...], router: Endpoint | Groups, num_slots: int,
                 max_len: int, options: RuntimeOptions, name: str = "0"):
        host = _setup(options)
        reader = CheckpointReader(checkpoint)
        self.metrics = Metrics(host, options.metrics)
        stack = load_decoder_stack(reader, layers, None, num_slots, max_len, options.torch_dtype(reader),
                                   options.torch_device())
        self.loop = EventLoopThread(f"attention-{name}")
        self.server, port = self.loop.run(self._serve(reader, stack, router, options, host, name))
        self.layers, self._address = tuple(layers), f"{host}:{port}"

    async def _serve(self, reader: CheckpointReader, stack: DecoderStack, router: Endpoint | Groups,
                     options: RuntimeOptions, host: str, name: str):
        if isinstance(router, Endpoint):
            moe = RouterStream(router.address, options.call_timeout_s, device=options.torch_device(),
                               resolve=router.resolver(options.restart_timeout_s), tls=options.tls())
        else:
            moe = remote_router(reader, stack.layers, router, options)
            metrics = self.metrics.make(RouterMetrics, reader.config.num_local_experts, stack.layers)
            moe = metrics.metered(moe) if metrics else moe
        cores = _cores(options.threads) if options.device == "cpu" else None
        servicer = AttentionServicer(stack, moe, self.metrics.make(AttentionMetrics), name, threads=options.threads,
                                     parallel_threads=options.attention_threads or cores,
                                     head_threads=options.head_threads or cores)
        return await serve_attention(servicer, f"{host}:0", tls=options.tls())

    def address(self) -> str:
        return self._address

    def info(self) -> dict:
        return {**node_info(), "layers": list(self.layers), "address": self._address,
                "metrics": self.metrics.address}
