"""Every Prometheus metric of expertmesh, defined in one place, and how they are served.

Names follow `expertmesh_<component>_<quantity>_<unit>`; labels come from closed sets (layer, expert,
group, shard, phase, code), never request ids. Each process of the cluster (gateway, routers, expert
groups, attention shards) records into its own registry and serves it on its own port; the gateway's
`--metrics-port` endpoint merges them all (`ClusterCollector`), so one scrape sees the whole cluster.
Label sets are disjoint between processes (a layer has one router, a group one process), so merging
never adds two processes' samples together.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.services.access import DENIED_REASONS

if TYPE_CHECKING:
    from expertmesh.services.router import AsyncMoE, RemoteRouter

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROWS_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)


class RouterMetrics:
    """Routing decisions and the fan-out to expert groups, per layer.

    A layer's routing decision is only queued where it is made, on the step's critical path (a list
    append instead of about 80-130 us of counting and labelled increments per layer on CPU, and on a
    GPU no copy to the host per layer); the queue is counted into the token and weight counters when
    the registry is scraped, and whenever it holds FOLD_AT decisions."""

    FOLD_AT = 1024

    def __init__(self, registry: CollectorRegistry, num_experts: int, layers: Iterable[int] = ()):
        """`layers`: the layers whose gates this process holds. Their series start at 0, so an expert
        that no token has reached yet counts in a layer's mean load (the imbalance rule)."""
        self._pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self._lock = threading.Lock()
        registry.register(_BeforeCollect(self.fold))  # registered first: collected before the counters
        self.tokens = Counter("expertmesh_router_tokens_total", "Tokens routed to each expert (each token counts "
                              "once for each of its top-k experts)", ["layer", "expert"], registry=registry)
        self.weight = Counter("expertmesh_router_weight_total", "Routing weight mass given to each expert",
                              ["layer", "expert"], registry=registry)
        self.dispatch = Histogram("expertmesh_router_dispatch_seconds", "One layer's MoE for one step: routing, "
                                  "the calls to expert groups, combining", ["layer"], buckets=_LATENCY_BUCKETS,
                                  registry=registry)
        # Per layer: a layer has one router, so the series of different processes never collide.
        self.sent = Counter("expertmesh_router_sent_bytes_total", "Hidden-state bytes sent to expert groups",
                            ["layer"], registry=registry)
        self.received = Counter("expertmesh_router_received_bytes_total",
                                "Hidden-state bytes received from expert groups", ["layer"], registry=registry)
        self.num_experts = num_experts
        self._series: dict[int, tuple] = {}  # layer -> its (dispatch, sent, received) series, looked up once
        for layer in layers:
            self._series_of(layer)
            for e in range(num_experts):
                self.tokens.labels(layer, e)
                self.weight.labels(layer, e)

    def _series_of(self, layer: int) -> tuple:
        series = self._series.get(layer)
        if series is None:
            series = self._series[layer] = (self.dispatch.labels(layer), self.sent.labels(layer),
                                            self.received.labels(layer))
        return series

    def metered(self, router: RemoteRouter) -> AsyncMoE:
        """`router` as an MoE that records routing, dispatch latency and bytes (installs its observer)."""
        router.router.observe = self.observe_routing
        top_k = router.router.top_k

        async def moe(layer: int, x: torch.Tensor) -> torch.Tensor:
            start = time.perf_counter()
            y = await router(layer, x)
            dispatch, sent, received = self._series_of(layer)
            dispatch.observe(time.perf_counter() - start)
            nbytes = x.shape[0] * top_k * x.shape[1] * x.element_size()  # each routed row, out and back
            sent.inc(nbytes)
            received.inc(nbytes)
            return y

        return moe

    def observe_routing(self, layer: int, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """experts, weights: [T, A] of one layer's step, on the router's device (not modified later)."""
        with self._lock:
            self._pending.append((layer, experts, weights))
            full = len(self._pending) >= self.FOLD_AT
        if full:
            self.fold()

    def fold(self) -> None:
        """Count the queued routing decisions into the token and weight counters."""
        with self._lock:
            pending, self._pending = self._pending, []
        by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for layer, experts, weights in pending:
            by_layer.setdefault(layer, []).append((experts, weights))
        for layer, decisions in by_layer.items():
            flat = torch.cat([e.reshape(-1) for e, _ in decisions]).cpu()
            mass = torch.cat([w.reshape(-1) for _, w in decisions]).cpu().double()
            counts = torch.bincount(flat, minlength=self.num_experts).tolist()
            mass = torch.zeros(self.num_experts, dtype=torch.float64).index_add_(0, flat, mass).tolist()
            for e, n in enumerate(counts):
                if n:
                    self.tokens.labels(layer, e).inc(n)
                    self.weight.labels(layer, e).inc(mass[e])


class _BeforeCollect:
    """A collector of no metrics that runs `hook` whenever its registry is collected."""

    def __init__(self, hook: Callable[[], None]):
        self.hook = hook

    def describe(self) -> list:
        return []

    def collect(self) -> list:
        self.hook()
        return []


class ExpertMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.forward = Histogram("expertmesh_expert_forward_seconds", "One expert-group call: rows through experts",
                                 ["group", "replica"], buckets=_LATENCY_BUCKETS, registry=registry)
        self.rows = Histogram("expertmesh_expert_rows", "Rows (token, expert pairs) per expert-group call",
                              ["group", "replica"], buckets=_ROWS_BUCKETS, registry=registry)


class AttentionMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.step = Histogram("expertmesh_attention_step_seconds", "One attention shard's part of a step",
                              ["shard", "phase"], buckets=_LATENCY_BUCKETS, registry=registry)


class GatewayMetrics:
    """Requests, latencies as clients see them, and the scheduler."""

    def __init__(self, registry: CollectorRegistry):
        self.requests = Counter("expertmesh_gateway_requests_total", "Finished requests by gRPC status code",
                                ["code"], registry=registry)
        self.denied = Counter("expertmesh_gateway_denied_calls_total", "Calls ended UNAUTHENTICATED before "
                              "reaching the API: bearer token missing, malformed or invalid", ["reason"],
                              registry=registry)
        for reason in DENIED_REASONS:  # every series exists from the start, so a rate over it is 0, not absent
            self.denied.labels(reason)
        self.ttft = Histogram("expertmesh_gateway_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=_LATENCY_BUCKETS, registry=registry)
        self.itl = Histogram("expertmesh_gateway_inter_token_latency_seconds", "Between consecutive outputs",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.e2e = Histogram("expertmesh_gateway_request_duration_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=registry)
        self.prompt_tokens = Counter("expertmesh_gateway_prompt_tokens_total", "Prompt tokens of admitted requests",
                                     registry=registry)
        self.generated_tokens = Counter("expertmesh_gateway_generated_tokens_total", "Generated tokens",
                                        registry=registry)
        self.waiting = Gauge("expertmesh_scheduler_waiting_requests", "Requests waiting for a slot",
                             registry=registry)
        self.running = Gauge("expertmesh_scheduler_running_requests", "Requests in the running batch",
                             registry=registry)
        self.batch = Histogram("expertmesh_scheduler_batch_size", "Sequences per step", buckets=_ROWS_BUCKETS,
                               registry=registry)
        self.kv_used = Gauge("expertmesh_scheduler_kv_cache_used_ratio", "Share of KV-cache positions in use",
                             registry=registry)
        self.group_up = Gauge("expertmesh_expert_group_up", "1 when the expert group (replica) answered when last "
                              "looked at (each scrape, and every 15 s)", ["group", "replica"], registry=registry)
        self.group_restarts = Counter("expertmesh_expert_group_restarts", "Expert group (replica) processes seen "
                                      "replaced by a new one (a new process id when looked at)", ["group", "replica"],
                                      registry=registry)
        self._group_pids: dict[tuple[str, str], int] = {}
        self._group_down: set[tuple[str, str]] = set()
        self._groups_lock = threading.Lock()  # scrapes and the serve process's watch both observe

    def observe_groups(self, pids: dict[tuple[int, int], int | None]) -> None:
        """Per (group, replica): its current process id, or None if it did not answer. Sets `group_up`
        and counts a restart whenever a group answers from a process other than the one seen last;
        logs both changes (so the serve log says what happened to a group)."""
        with self._groups_lock:
            for (group, replica), pid in pids.items():
                labels = (str(group), str(replica))
                self.group_up.labels(*labels).set(0 if pid is None else 1)
                restarts = self.group_restarts.labels(*labels)  # exported at 0 from the first scrape on
                if pid is None:
                    if labels not in self._group_down:
                        log.warning("expert group %s replica %s is not answering (restarting, or gone)", *labels)
                    self._group_down.add(labels)
                    continue
                last = self._group_pids.get(labels, pid)
                if last != pid:
                    restarts.inc()
                    log.warning("expert group %s replica %s restarted (process %d, now %d)", *labels, last, pid)
                elif labels in self._group_down:
                    log.info("expert group %s replica %s is answering again", *labels)
                self._group_down.discard(labels)
                self._group_pids[labels] = pid


def serve_metrics(registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0) -> int:
    """Serve `registry` over HTTP at /metrics; returns the bound port."""
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port


class ClusterCollector:
    """Merges the /metrics of every component (addresses from `targets()`) with this process's own."""

    def __init__(self, local: CollectorRegistry, targets: Callable[[], Iterable[str]], timeout_s: float = 3.0):
        """`timeout_s`: for each component's page; they are fetched at once."""
        self.local, self.targets, self.timeout_s = local, targets, timeout_s

    def _fetch(self, target: str) -> str | None:
        try:
            with urllib.request.urlopen(f"http://{target}/metrics", timeout=self.timeout_s) as reply:
                return reply.read().decode()
        except OSError as exc:  # a component restarting: its series pause, the scrape goes on
            log.warning("metrics of %s unavailable: %s", target, exc)
            return None

    def collect(self):
        families: dict[str, Metric] = {}
        targets = list(self.targets())
        with ThreadPoolExecutor(max_workers=max(1, len(targets))) as pool:  # one wait, however many are silent
            texts = [t for t in pool.map(self._fetch, targets) if t is not None]
        for family in (*self.local.collect(), *(f for t in texts for f in text_string_to_metric_families(t))):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type))
            merged.samples.extend(family.samples)
        return list(families.values())
