"""The router's routing counters: decisions are queued on the hot path and counted when scraped."""

from __future__ import annotations

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
