"""`expertmesh serve`: bring the cluster up on Ray, put the gateway in front, serve until told to stop.

Start-up: check the checkpoint's headers and tokenizer -> join or start Ray -> start the actors (each
loads only its tensors) -> one warm-up step through the whole data path -> gateway listening, health
SERVING. A damaged checkpoint fails at the first step, before Ray; a component that fails to start
fails start-up, with every actor started so far killed. SIGTERM or Ctrl-C: health
NOT_SERVING, in-flight requests finish within the grace period (the rest get UNAVAILABLE), then every
actor is killed and an embedded Ray is shut down, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry

from expertmesh.checkpoint import CheckpointReader
from expertmesh.engine import Engine, GenerationRequest
from expertmesh.model.config import ModelConfig
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import ClusterPlan, alive_nodes, plan_cluster, shortfall, unpacked
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler
from expertmesh.services.access import InternalTLS, PublicAccess
from expertmesh.services.gateway import ExpertGroupPlacement, ModelInfo, start_gateway
from expertmesh.services.gateway_loop import EngineLoop
from expertmesh.services.metrics import ClusterCollector, GatewayMetrics, serve_metrics
from expertmesh.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeOptions:
    model: str
    host: str = "127.0.0.1"
    port: int = 50051
    ray_address: str | None = None
    attention_shards: int = 1
    expert_groups: int = 1
    expert_replicas: int = 1
    router: str = "service"
    device: str = "cpu"
    dtype: str | None = None
    gpus_per_shard: float | None = None
    gpus_per_group: float | None = None
    attention_resource: str | None = None
    expert_resource: str | None = None
    max_batch_size: int = 32
    max_seq_len: int = 2048
    max_waiting: int = 1024
    max_tokens_per_step: int = 4096
    internal_tls: tuple[str, str, str] | None = None  # mutual TLS between components: CA, cert, key paths
    threads: int = 1
    attention_threads: int | None = None  # an attention shard's layers in steps of 32+ tokens; None: cores, at most 8
    head_threads: int | None = None  # for the LM head; None: the node's cores, at most 8
    metrics_port: int | None = None
    grace_s: float = 10.0
    start_timeout_s: float = 300.0  # for the components to be placed and loaded
    # The public API's access control (see services/access.py): PEM files, and the token or its file.
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = field(default=None, repr=False)
    auth_token_file: str | None = None


def _init_ray(address: str | None) -> bool:
    """Join `address`, or start an embedded local Ray on loopback. Returns True if embedded."""
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        ray.init(address=address, log_to_driver=False)
        return False
    ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    return True


def model_info(name: str, cfg: ModelConfig, max_len: int, cluster: Cluster) -> ModelInfo:
    groups = cluster.describe()["groups"]
    placements = tuple(ExpertGroupPlacement(plan.group, tuple(info["experts"]), info["node_id"],
                                            tuple(info["gpu_ids"]), plan.replica)
                       for plan, info in zip(cluster.plan.groups, groups))
    return ModelInfo(name, cfg.vocab_size, max_len, cfg.num_hidden_layers, cfg.num_local_experts,
                     cfg.num_experts_per_tok, len(cluster.shards), placements)


def cluster_plan(opts: ServeOptions, cfg: ModelConfig) -> ClusterPlan:
    """The actors `opts` asks for; ValueError naming the flag if it cannot be cut that way."""
    return plan_cluster(cfg, opts.attention_shards, opts.expert_groups, opts.device, opts.gpus_per_shard,
                        opts.gpus_per_group, attention_resource=opts.attention_resource,
                        expert_resource=opts.expert_resource, expert_replicas=opts.expert_replicas)


def start_cluster(opts: ServeOptions, cfg: ModelConfig, tokenizer: Tokenizer, plan: ClusterPlan,
                  fixed_size: bool = False) -> tuple[Cluster, Engine]:
    """The actors of `plan` up and one warm-up request through every component; blocking. On failure
    nothing is left running. `fixed_size` (an embedded Ray: no autoscaler will add nodes): a plan that
    asks for more than the cluster has fails at once (ValueError naming the flags) instead of at the
    start timeout."""
    max_len = min(opts.max_seq_len, cfg.max_position_embeddings)
    import ray

    nodes = alive_nodes()
    problem = shortfall(plan, ray.cluster_resources(), nodes)
    if problem and fixed_size:
        raise ValueError(problem)
    if problem:  # an autoscaler may still add the nodes
        log.warning("%s; waiting for the cluster to grow", problem)
    elif hint := unpacked(plan, nodes):
        log.warning("%s; waiting for Ray to place them", hint)
    runtime = RuntimeOptions(device=opts.device, dtype=opts.dtype, threads=opts.threads,
                             attention_threads=opts.attention_threads, head_threads=opts.head_threads, host=None,
                             internal_tls=opts.internal_tls)
    cluster = Cluster(str(Path(opts.model).resolve()), plan, runtime, opts.max_batch_size, max_len,
                      router=opts.router, start_timeout_s=opts.start_timeout_s).start()
    try:
        engine = Engine(cluster.runner(), tokenizer, cfg,
                        Scheduler(opts.max_batch_size, max_len, max_tokens_per_step=opts.max_tokens_per_step,
                                  max_waiting=opts.max_waiting))
        warm = engine.generate([GenerationRequest(prompt_token_ids=(cfg.bos_token_id,),
                                                  params=SamplingParams(max_new_tokens=2, ignore_eos=True))])
    except BaseException:
        cluster.shutdown()
        raise
    log.info("warm-up step done (%d tokens through every component)", len(warm[0].token_ids))
    return cluster, engine


def serve_cluster_metrics(cluster: Cluster, registry: CollectorRegistry, metrics: GatewayMetrics, host: str,
                          port: int) -> int:
    """One /metrics for the whole cluster: this process's metrics merged with every component's."""
    def targets() -> list[str]:
        addresses, pids = cluster.metrics_targets()
        metrics.observe_groups(pids)
        return addresses

    merged = CollectorRegistry()
    merged.register(ClusterCollector(registry, targets))
    return serve_metrics(merged, host, port)


def check_free(flag: str, host: str, port: int | None) -> None:
    """Raise ValueError naming `flag` if nothing can listen on host:port: before Ray starts and the
    weights load, not after (port 0 and None: any free port, or none)."""
    if not port:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
            probe.bind(address)
    except OSError as exc:
        raise ValueError(f"{flag}: cannot listen on {host}:{port}: {exc.strerror or exc}") from None


WATCH_S = 15.0


async def watch_cluster(cluster: Cluster, metrics: GatewayMetrics, engine_loop: EngineLoop,
                        every_s: float = WATCH_S) -> None:
    """Look at the components every `every_s`, with or without traffic and scrapes: the groups'
    up/restart metrics stay current, the serve log says when a group stops answering or comes back as
    a new process, and a component gone for good turns health NOT_SERVING before a request finds it."""
    while True:
        await asyncio.sleep(every_s)
        try:
            _, pids = await asyncio.to_thread(cluster.metrics_targets)
            metrics.observe_groups(pids)
            engine_loop.mark_lost(await asyncio.to_thread(cluster.lost))
        except Exception:  # noqa: BLE001 - the next look may work; the step path reports real trouble
            log.debug("could not look at the cluster", exc_info=True)


async def serve(opts: ServeOptions) -> int:
    # Certificates, token and checkpoint are checked before anything starts: a bad flag or a damaged
    # file fails in a second, not after Ray or after the first components have loaded their weights.
    access = PublicAccess.load(opts.tls_cert, opts.tls_key, opts.auth_token, opts.auth_token_file)
    check_free("--port", opts.host, opts.port)
    check_free("--metrics-port", opts.host, opts.metrics_port)
    if opts.internal_tls:
        InternalTLS.load(*opts.internal_tls)  # every component loads them again on its node
    # Every tensor's header (name, shape, dtype, bytes present); components check what they read again.
    cfg = CheckpointReader(opts.model).check()
    tokenizer = Tokenizer.from_checkpoint(opts.model)
    plan = cluster_plan(opts, cfg)  # shards, groups and GPU shares that cannot work, before Ray starts
    embedded = _init_ray(opts.ray_address)
    cluster = None
    try:
        cluster, engine = await asyncio.to_thread(start_cluster, opts, cfg, tokenizer, plan, embedded)
        info = model_info(Path(opts.model).name, engine.cfg, engine.max_len, cluster)
        registry = CollectorRegistry()
        metrics = GatewayMetrics(registry)
        engine_loop = EngineLoop(engine, metrics=metrics, diagnose=cluster.lost)
        gateway, port = await start_gateway(engine_loop, info, f"{opts.host}:{opts.port}", ready=True, access=access)
        if opts.metrics_port is not None:
            metrics_port = serve_cluster_metrics(cluster, registry, metrics, opts.host, opts.metrics_port)
            print(f"expertmesh: metrics on http://{opts.host}:{metrics_port}/metrics", flush=True)
        shards, groups = info.attention_shards, len(info.expert_groups)
        print(f"expertmesh: serving {info.model_name} on {opts.host}:{port} ({shards} attention "
              f"shard{'s' * (shards != 1)}, {groups} expert group{'s' * (groups != 1)})", flush=True)
        watch = asyncio.create_task(watch_cluster(cluster, metrics, engine_loop))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("stopping: draining in-flight requests for up to %.0f s", opts.grace_s)
        watch.cancel()
        await gateway.stop(opts.grace_s)
        return 0
    finally:
        if cluster is not None:
            cluster.shutdown()
        import ray

        if embedded and ray.is_initialized():
            ray.shutdown()
        if cluster is not None:
            log.info("stopped: every component removed")
