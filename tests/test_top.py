"""`expertmesh top`: rates and imbalance from two scrapes of real metric text."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from expertmesh.services.metrics import RouterMetrics
from expertmesh.services.top import render, routed_tokens, run_top


def test_top_draws_rates_and_imbalance_from_router_counters():
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry, num_experts=4)
    texts = []
    metrics.tokens.labels(0, 1).inc(10)
    texts.append(generate_latest(registry).decode())
    metrics.tokens.labels(0, 1).inc(30)  # layer 0: all load on expert 1 -> 15 tokens/s, imbalance 4.00
    for e in range(4):
        metrics.tokens.labels(1, e).inc(10)  # layer 1: balanced, 5 tokens/s each -> 1.00
    texts.append(generate_latest(registry).decode())
    assert routed_tokens(texts[1])[(0, 1)] == 40
    frames, clock = [], iter([100.0, 102.0])  # the two scrapes, 2 s apart
    run_top("unused", interval_s=0.0, iterations=1, out=frames.append, get=lambda _: texts.pop(0),
            clock=lambda: next(clock))
    lines = frames[0].splitlines()
    assert "last 2.0 s" in lines[0]
    layer0, layer1 = lines[2], lines[3]
    assert layer0.replace("█", " ").split() == ["0", "0", "15", "0", "0", "15", "4.00"]
    assert layer1.replace("█", " ").split() == ["1", "5", "5", "5", "5", "20", "1.00"]
    assert layer0.count("█") == 2 and not any(c in layer0 for c in "░▒▓")  # only the hot expert is shaded
    assert layer1.count("█") == 8  # every expert equally hot


def test_render_empty_is_harmless():
    assert render({}, 2, 3).splitlines()[1].split()[-1] == "-"
