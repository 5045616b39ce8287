"""`expertmesh top`: a live layer x expert load heat map in the terminal, from the metrics endpoint.

For a person without Grafana at hand: every interval it scrapes `expertmesh_router_tokens_total`,
turns the deltas into tokens/s per (layer, expert), and draws one row per layer, one cell per expert,
shaded by the share of that layer's load, with the layer's imbalance (max / mean) at the end.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

SHADES = " ░▒▓█"


def routed_tokens(text: str) -> dict[tuple[int, int], float]:
    """(layer, expert) -> tokens routed so far, from a Prometheus text exposition."""
    out: dict[tuple[int, int], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "expertmesh_router_tokens":
            continue
        for s in family.samples:
            if s.name.endswith("_total"):
                out[int(s.labels["layer"]), int(s.labels["expert"])] = s.value
    return out


def render(rates: dict[tuple[int, int], float], num_layers: int, num_experts: int) -> str:
    """One line per layer: a shaded cell per expert, its tokens/s, and max/mean imbalance."""
    head = "layer  " + "".join(f"{e:>7}" for e in range(num_experts)) + "   tok/s  max/mean"
    lines = [head]
    for layer in range(num_layers):
        row = [rates.get((layer, e), 0.0) for e in range(num_experts)]
        total = sum(row)
        peak = max(row) if total else 0.0
        cells = []
        for r in row:
            shade = SHADES[min(len(SHADES) - 1, round(r / peak * (len(SHADES) - 1)))] if peak else " "
            cells.append(f" {shade * 2}{r:>4.0f}")
        imbalance = f"{peak / (total / num_experts):.2f}" if total else "-"
        lines.append(f"{layer:>5}  " + "".join(cells) + f"  {total:>6.0f}  {imbalance:>8}")
    return "\n".join(lines)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def run_top(url: str, interval_s: float = 2.0, iterations: int | None = None,
            out: Callable[[str], None] = print, get: Callable[[str], str] = fetch,
            clock: Callable[[], float] = time.monotonic) -> None:
    """Redraw every `interval_s` (forever, or `iterations` times)."""
    before, t0 = routed_tokens(get(url)), clock()
    n = 0
    while iterations is None or n < iterations:
        time.sleep(interval_s)
        now, t1 = routed_tokens(get(url)), clock()
        rates = {k: (v - before.get(k, 0.0)) / (t1 - t0) for k, v in now.items()}
        layers = 1 + max((k[0] for k in now), default=-1)
        experts = 1 + max((k[1] for k in now), default=-1)
        out(("\x1b[H\x1b[2J" if iterations is None else "") + f"expertmesh top  {url}  (tokens/s, last "
            f"{t1 - t0:.1f} s)\n" + render(rates, layers, experts))
        before, t0 = now, t1
        n += 1
