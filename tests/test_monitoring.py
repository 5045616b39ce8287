"""The monitoring under deploy/, checked offline: the Grafana dashboard and the Prometheus Operator objects.

The dashboard validates against the Grafana dashboard schema in the `shared/schemas/` folder beside the
checkout; its queries name only metrics that services/metrics.py defines and series that
deploy/prometheus/rules.yml records, and they parse with promtool. (tests/test_serve.py runs every one of
them against a real Prometheus that scrapes a served cluster: each must return data.) The PodMonitor
scrapes the gateway's metrics port, the PrometheusRule carries exactly rules.yml's groups, and the
dashboard's ConfigMap is built the way kustomize builds it and validated like the other manifests.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import socket
import subprocess
import time

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from expertmesh.services.metrics import (AttentionMetrics, ClusterCollector, ExpertMetrics, GatewayMetrics,
                                         RouterMetrics)
from test_deploy import DEPLOY, KUBERAY_DIR, SCHEMAS, _gateway, _one, _require_schemas, _serve_flags, validate

GRAFANA_DIR = DEPLOY / "grafana"
MONITORING_DIR = DEPLOY / "monitoring"
DASHBOARD = json.loads((GRAFANA_DIR / "expertmesh.json").read_text())
RULES = yaml.safe_load((DEPLOY / "prometheus" / "rules.yml").read_text())
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# What Grafana puts in for its own variables when a query runs (1m: 4 scrapes at the PodMonitor's 15 s).
GRAFANA_BUILTINS = {"__rate_interval": "1m"}
# Metrics of services/metrics.py that have no panel, and why.
NOT_ON_DASHBOARD = {
    "expertmesh_router_weight": "routing weight mass is for studying the router; the token counts show the load",
}


# ------------------------------------------------------------------------------------ the queries

def panels(dashboard: dict = DASHBOARD) -> list[dict]:
    """Every panel, with those inside (collapsed) rows."""
    return [q for p in dashboard["panels"] for q in (p, *p.get("panels", []))]


def _variable_values(dashboard: dict) -> dict[str, str]:
    """A concrete value for each variable a query may use: a template variable's "All" value."""
    values = dict(GRAFANA_BUILTINS)
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            assert var.get("includeAll") and "allValue" in var, f"variable {var['name']}: give it an All value"
            values[var["name"]] = var["allValue"]
    return values


def _substitute(expr: str, values: dict[str, str]) -> str:
    # Grafana's three spellings: $name, ${name} or ${name:format}, [[name]].
    pattern = r"\$\{([A-Za-z_]\w*)(?::\w+)?\}|\$([A-Za-z_]\w*)|\[\[([A-Za-z_]\w*)\]\]"
    return re.sub(pattern, lambda m: values[next(filter(None, m.groups()))], expr)


def _label_values_as_promql(query: str) -> str:
    """Grafana's `label_values(metric, label)` as the PromQL that returns one series per value."""
    m = re.fullmatch(r"label_values\(\s*([A-Za-z_:][\w:]*)\s*,\s*(\w+)\s*\)", query.strip())
    assert m, f"unsupported variable query {query!r}"
    return f'count by ({m[2]}) ({m[1]}{{{m[2]}!=""}})'


def dashboard_queries(dashboard: dict = DASHBOARD) -> list[str]:
    """Every PromQL query the dashboard runs, variables replaced by concrete values: each panel target's
    expression, and each query variable's label_values() as the PromQL that returns its values."""
    values = _variable_values(dashboard)
    exprs = [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]
    exprs += [_label_values_as_promql(v["query"]) for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return [_substitute(e, values) for e in exprs]


def _legends(dashboard: dict = DASHBOARD) -> list[str]:
    return [t.get("legendFormat", "") for p in panels(dashboard) for t in p.get("targets", [])]


# ----------------------------------------------------------------- what the code and the rules define

def _code_metrics() -> list:
    registry = CollectorRegistry()
    return [m for group in (RouterMetrics(registry, num_experts=8), ExpertMetrics(registry),
                            AttentionMetrics(registry), GatewayMetrics(registry)) for m in vars(group).values()
            if hasattr(m, "collect")]


def _series_names() -> dict[str, str]:
    """Every series name a query may select -> the metric family (or recording rule) it belongs to."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = {f.name + s: f.name for m in _code_metrics() for f in m.collect() for s in suffixes[f.type]}
    names |= {r["record"]: r["record"] for g in RULES["groups"] for r in g["rules"] if "record" in r}
    return names


def _label_names() -> set[str]:
    return {"le"} | {label for m in _code_metrics() for label in m._labelnames}


_STRING = r'"(?:[^"\\]|\\.)*"'


def _parts(expr: str) -> tuple[set[str], set[str]]:
    """(series names, label names) an expression mentions: a small lexer, enough for our queries."""
    expr = re.sub(_STRING, '""', expr)
    labels = set()
    for clause in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr):
        labels |= {w for w in re.split(r"[\s,]+", clause) if w}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)|\{[^}]*\}|\[[^\]]*\]", " ", expr)
    names = {m[1] for m in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\()?", expr) if not m[2]}
    return names - {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "atan2"}, labels


# ------------------------------------------------------------------------------ dashboard tests

def _dashboard_errors(dashboard: dict) -> list[str]:
    with open(SCHEMAS / "grafana-foundation-sdk" / "dashboard.jsonschema.json") as f:
        validator = jsonschema.Draft7Validator(json.load(f))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message[:200]}"
            for e in validator.iter_errors(dashboard)]


def test_dashboard_validates_against_the_grafana_schema():
    _require_schemas()
    assert DASHBOARD["schemaVersion"] == 42
    errors = _dashboard_errors(DASHBOARD)
    assert not errors, "\n".join(errors)


def _unknown_panel_field(d):
    d["panels"][1]["legend"] = {"show": True}  # a pre-7 option, not in the schema


def _panel_too_wide(d):
    d["panels"][1]["gridPos"]["w"] = 30


def _override_by_plain_name(d):  # the schema wants a matcher's options to be an object
    [p] = [p for p in panels(d) if p["type"] == "table"]
    p["fieldConfig"]["overrides"][0]["matcher"] = {"id": "byName", "options": "layer\\expert"}


@pytest.mark.parametrize("break_it", [_unknown_panel_field, _panel_too_wide, _override_by_plain_name])
def test_the_schema_rejects_a_broken_dashboard(break_it):
    _require_schemas()
    dashboard = copy.deepcopy(DASHBOARD)
    break_it(dashboard)
    assert _dashboard_errors(dashboard), f"{break_it.__name__}: the broken dashboard validated"


def test_every_panel_queries_the_datasource_variable():
    [var] = [v for v in DASHBOARD["templating"]["list"] if v["type"] == "datasource"]
    assert var["query"] == "prometheus" and DATASOURCE["uid"] == "${%s}" % var["name"]
    for panel in panels():
        if panel["type"] != "row":
            assert panel["datasource"] == DATASOURCE, panel["title"]
            assert panel["targets"] and all(t["datasource"] == DATASOURCE for t in panel["targets"]), panel["title"]
    for var in DASHBOARD["templating"]["list"]:
        assert var["type"] == "datasource" or var["datasource"] == DATASOURCE, var["name"]


def test_panels_have_unique_ids_and_do_not_overlap():
    ids = [p["id"] for p in panels()]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in panels():
        g = p["gridPos"]
        assert g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_queries_name_only_metrics_and_labels_that_exist():
    series, labels = _series_names(), _label_names()
    for expr in dashboard_queries():
        names, used = _parts(expr)
        assert names and names <= series.keys(), f"{expr}: unknown series {names - series.keys()}"
        assert used <= labels, f"{expr}: unknown labels {used - labels}"
    for legend in _legends():
        assert set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend)) <= labels, legend
        # Grafana fills in {{label}} only: a single-brace {label} shows as written.
        assert not re.search(r"[{}]", re.sub(r"\{\{\s*\w+\s*\}\}", "", legend)), legend


def test_every_metric_and_recording_rule_is_on_the_dashboard():
    shown = {_series_names()[n] for e in dashboard_queries() for n in _parts(e)[0]}
    missing = set(_series_names().values()) - shown - NOT_ON_DASHBOARD.keys()
    assert not missing, f"no panel shows {sorted(missing)} (add one, or say why in NOT_ON_DASHBOARD)"


def test_the_dashboard_reads_recorded_series_rather_than_recomputing_them():
    squash = lambda s: re.sub(r"\s+", "", s)  # noqa: E731
    queries = [squash(q) for q in dashboard_queries()]
    for rule in (r for g in RULES["groups"] for r in g["rules"] if "record" in r):
        assert not any(squash(rule["expr"]) in q for q in queries), f"use {rule['record']} instead"


def test_every_variable_is_substituted():
    for expr in dashboard_queries():
        assert not re.search(r"\$[A-Za-z_{]|\[\[", expr), expr
    assert _substitute("rate(x[$__rate_interval]) ${layer} [[layer]] $1", {"__rate_interval": "1m", "layer": "a"}) \
        == "rate(x[1m]) a a $1"


def _promtool_check(exprs: list[str], tmp_path) -> subprocess.CompletedProcess:
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query_{i}", "expr": e}
                                                        for i, e in enumerate(exprs)]}]}
    (tmp_path / "dashboard-rules.yml").write_text(yaml.safe_dump(rules))
    return subprocess.run([shutil.which("promtool"), "check", "rules", "dashboard-rules.yml"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool not installed")
def test_every_query_parses_with_promtool(tmp_path):
    """promtool has no query-parsing command, but `check rules` parses each rule's expression."""
    queries = dashboard_queries()
    done = _promtool_check(queries, tmp_path)
    assert done.returncode == 0 and f"SUCCESS: {len(queries)} rules found" in done.stdout, done.stdout + done.stderr
    assert _promtool_check(["sum by (layer) (rate(x[1m])"], tmp_path).returncode != 0, "promtool accepts anything"


# --------------------------------------------------------------------------- Kubernetes objects

def _duration_s(value: str) -> int:
    return sum(int(n) * {"s": 1, "m": 60, "h": 3600}[u] for n, u in re.findall(r"(\d+)([smh])", value))


def test_podmonitor_scrapes_the_gateways_metrics_port():
    monitor, raycluster = _one("PodMonitor"), _one("RayCluster")
    # KubeRay sets ray.io/cluster and ray.io/node-type on every pod it creates.
    cluster = raycluster["metadata"]["name"]
    head = raycluster["spec"]["headGroupSpec"]["template"]
    head_labels = head["metadata"].get("labels", {}) | {"ray.io/cluster": cluster, "ray.io/node-type": "head"}
    selector = monitor["spec"]["selector"]
    assert set(selector) == {"matchLabels"} and selector["matchLabels"].items() <= head_labels.items()
    assert selector["matchLabels"].get("ray.io/node-type") == "head", "workers have no gateway to scrape"
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    ports = [(c["name"], p["containerPort"]) for c in head["spec"]["containers"] for p in c.get("ports", [])
             if p.get("name") == endpoint["port"]]
    assert ports == [(_gateway()["name"], _serve_flags().metrics_port)]
    assert endpoint.get("path", "/metrics") == "/metrics"
    # The recording rules take rate()s over 1 minute: they need several scrapes in it.
    assert _duration_s(endpoint["interval"]) <= 15
    assert _duration_s(endpoint["scrapeTimeout"]) <= _duration_s(endpoint["interval"])


def test_prometheusrule_carries_exactly_the_groups_of_rules_yml():
    assert _one("PrometheusRule")["spec"] == {"groups": RULES["groups"]}, \
        "deploy/monitoring/prometheusrule.yaml has drifted from deploy/prometheus/rules.yml: copy its groups over"


def dashboard_configmap() -> dict:
    """The ConfigMap that deploy/grafana/kustomization.yaml generates, built the way kustomize builds it."""
    [gen] = yaml.safe_load((GRAFANA_DIR / "kustomization.yaml").read_text())["configMapGenerator"]
    options = gen.get("options", {})
    assert options.get("disableNameSuffixHash") is True, "a fixed name, so that the old dashboard goes away"
    data = {}
    for entry in gen["files"]:
        key, _, path = entry.rpartition("=")
        data[key or path.rsplit("/", 1)[-1]] = (GRAFANA_DIR / path).read_text()
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": gen["name"], "labels": options.get("labels", {})}, "data": data}


def test_dashboard_configmap_validates_and_is_what_the_grafana_sidecar_loads():
    _require_schemas()
    configmap = dashboard_configmap()
    errors = validate(configmap)
    assert not errors, "\n".join(errors)
    assert configmap["metadata"]["labels"].get("grafana_dashboard") == "1"
    [(key, text)] = configmap["data"].items()
    assert key.endswith(".json") and json.loads(text) == DASHBOARD
    # `kubectl apply` keeps a copy in an annotation, and annotations are limited to 256 KiB in all.
    assert len(text.encode()) < 200 * 1024
    broken = copy.deepcopy(configmap)
    broken["data"][key] = DASHBOARD  # a JSON object where the API wants a string
    assert validate(broken), "the broken ConfigMap validated"


def test_monitoring_kustomization_adds_to_the_cluster_in_the_same_namespace():
    kustomization = yaml.safe_load((MONITORING_DIR / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        assert (MONITORING_DIR / name).exists(), name
    assert {"../kuberay", "../grafana", "podmonitor.yaml", "prometheusrule.yaml"} <= set(kustomization["resources"])
    base = yaml.safe_load((KUBERAY_DIR / "kustomization.yaml").read_text())
    assert kustomization.get("namespace") == base.get("namespace"), "the PodMonitor selects pods in its namespace"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with its built-in kustomize) not installed")
def test_monitoring_kustomization_builds_and_every_object_validates():
    _require_schemas()
    out = subprocess.run(["kubectl", "kustomize", str(MONITORING_DIR)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PodMonitor", "PrometheusRule", "RayCluster", "Service"]
    for doc in docs:
        errors = validate(doc)
        assert not errors, f"{doc['kind']}:\n" + "\n".join(errors)
    [built] = [d for d in docs if d["kind"] == "ConfigMap"]
    assert built == dashboard_configmap()


class _Recording(ClusterCollector):
    """Notes when each component's page was asked for and when its answer (or timeout) came."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.spans: dict[str, list[float]] = {}

    def _fetch(self, target):
        start = time.monotonic()
        try:
            return super()._fetch(target)
        finally:
            self.spans[target] = [start, time.monotonic()]


def test_the_merged_page_has_every_component_and_silent_ones_wait_together():
    """Two components answer, two accept the connection and never answer (restarting): the merged page
    has both answers' series, and the silent two were waited for at the same time, not in turn."""
    servers = []
    for layer in (0, 1):
        registry = CollectorRegistry()
        RouterMetrics(registry, 8, layers=(layer,))
        servers.append(start_http_server(0, addr="127.0.0.1", registry=registry)[0])
    pages = [f"127.0.0.1:{server.server_port}" for server in servers]
    silent = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]  # listen, never accept
    try:
        targets = pages + [f"127.0.0.1:{s.getsockname()[1]}" for s in silent]
        local = CollectorRegistry()
        GatewayMetrics(local)
        collector = _Recording(local, lambda: targets, timeout_s=1.0)
        families = {f.name: f for f in collector.collect()}
        layers = {s.labels["layer"] for s in families["expertmesh_router_sent_bytes"].samples}
        assert layers == {"0", "1"} and "expertmesh_gateway_requests" in families
        waits = [collector.spans[t] for t in targets[2:]]
        assert max(start for start, _ in waits) < min(end for _, end in waits)  # both pending at once
    finally:
        for s in silent:
            s.close()
        for server in servers:
            server.shutdown()
            server.server_close()
