"""The router's routing counters: decisions are queued on the hot path and counted when scraped."""

from __future__ import annotations

import asyncio
import threading

import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from expertmesh.services.metrics import RouterMetrics


def _scrape(registry: CollectorRegistry) -> dict[tuple[str, str, str], float]:
    """{(family, layer, expert): value} of the routing counters, from the exposition text."""
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name in ("expertmesh_router_tokens", "expertmesh_router_weight"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    out[family.name, s.labels["layer"], s.labels["expert"]] = s.value
    return out


def _expected(decisions, num_experts: int) -> dict[tuple[str, str, str], float]:
    out: dict[tuple[str, str, str], float] = {}
    for layer, experts, weights in decisions:
        for e, w in zip(experts.reshape(-1).tolist(), weights.reshape(-1).tolist()):
            for name, v in (("expertmesh_router_tokens", 1.0), ("expertmesh_router_weight", w)):
                key = (name, str(layer), str(e))
                out[key] = out.get(key, 0.0) + v
    return out


def _decisions(n: int, seed: int = 0, layers: int = 3, tokens: int = 5, experts: int = 8):
    g = torch.Generator().manual_seed(seed)
    return [(k % layers, torch.randint(0, experts, (tokens, 2), generator=g), torch.rand(tokens, 2, generator=g))
            for k in range(n)]


def _assert_counts(got: dict, want: dict) -> None:
    assert set(got) == set(want)
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-6 * max(1.0, value), key


def test_a_scrape_counts_every_queued_decision_once():
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, num_experts=8)
    decisions = _decisions(40)
    for d in decisions[:25]:
        metrics.observe_routing(*d)
    _assert_counts(_scrape(registry), _expected(decisions[:25], 8))
    for d in decisions[25:]:
        metrics.observe_routing(*d)
    _assert_counts(_scrape(registry), _expected(decisions, 8))
    _assert_counts(_scrape(registry), _expected(decisions, 8))  # nothing new: nothing counted twice


def test_the_queue_is_counted_without_a_scrape_once_it_holds_fold_at_decisions():
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, num_experts=8)
    metrics.FOLD_AT = 10
    decisions = _decisions(10)
    for d in decisions[:9]:
        metrics.observe_routing(*d)
    assert not [s for f in metrics.tokens.collect() for s in f.samples if s.name.endswith("_total")]
    metrics.observe_routing(*decisions[9])
    # the counter itself, read without the registry (so without the scrape's fold), holds all ten
    direct = {(s.labels["layer"], s.labels["expert"]): s.value
              for f in metrics.tokens.collect() for s in f.samples if s.name.endswith("_total")}
    want = {k[1:]: v for k, v in _expected(decisions, 8).items() if k[0] == "expertmesh_router_tokens"}
    assert direct == want


def test_decisions_queued_while_another_thread_scrapes_are_all_counted():
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, num_experts=8)
    metrics.FOLD_AT = 64  # folds on the hot path as well as in the scraping thread
    decisions = _decisions(600, seed=1)
    done = threading.Event()

    def scrape_until_done():
        while not done.is_set():
            _scrape(registry)

    scraper = threading.Thread(target=scrape_until_done)
    scraper.start()
    try:
        for d in decisions:
            metrics.observe_routing(*d)
    finally:
        done.set()
        scraper.join(timeout=30)
    assert not scraper.is_alive()
    _assert_counts(_scrape(registry), _expected(decisions, 8))


class _Identity:
    """Stands in for a RemoteRouter around the metrics: top-2 routing whose MoE returns its input."""

    class router:  # noqa: N801 - the attribute the metrics read
        top_k, observe = 2, None

    async def __call__(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return x


def _samples(registry: CollectorRegistry, family: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(generate_latest(registry).decode()) if f.name == family
            for s in f.samples if s.name.endswith("_total")}


def test_every_series_of_a_routers_layers_starts_at_zero_and_bytes_are_per_layer():
    """Two routers (two shards' layers): their series are disjoint, so the gateway's merged page keeps
    both; an expert no token reached yet is there at 0, so it counts in the layer's mean load."""
    registries = [CollectorRegistry(), CollectorRegistry()]
    routers = [RouterMetrics(registries[0], 8, layers=(0, 1)), RouterMetrics(registries[1], 8, layers=(2, 3))]
    for k, registry in enumerate(registries):
        tokens = _samples(registry, "expertmesh_router_tokens")
        assert tokens == {(("expert", str(e)), ("layer", str(layer))): 0.0 for layer in (2 * k, 2 * k + 1)
                          for e in range(8)}
    x = torch.zeros(3, 16)  # 3 tokens of 16 floats: 3 x 2 routed rows x 64 bytes each way
    for k, metrics in enumerate(routers):
        asyncio.run(metrics.metered(_Identity())(2 * k + 1, x))
    for family in ("expertmesh_router_sent_bytes", "expertmesh_router_received_bytes"):
        got = [_samples(registry, family) for registry in registries]
        assert got == [{(("layer", "0"),): 0.0, (("layer", "1"),): 384.0},
                       {(("layer", "2"),): 0.0, (("layer", "3"),): 384.0}]
