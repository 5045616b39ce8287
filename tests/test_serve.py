"""`expertmesh serve` as a user runs it: a subprocess, health over grpc.health.v1, a client built from
the .proto files, SIGTERM, and nothing left behind."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc
import pytest
import yaml

from expertmesh.engine import Engine, GenerationRequest
from expertmesh.sampling import SamplingParams
from expertmesh.v1 import generate_pb2, generate_pb2_grpc
from serving import alive_components, scrape, serve_process, wait_for_line, wait_serving
from test_monitoring import dashboard_queries


def check_metrics(families: dict[str, list], prompt_len: int, generated: int, requests: int) -> None:
    """Exact counting: each token that passed a layer was routed to top-2 experts there. Tokens that
    passed each layer: the warm-up request (BOS, then 1 decode step: 2) plus, per request, its prompt
    and every generated token but the last (which is sampled, never fed back)."""
    passed = 2 + requests * (prompt_len + generated - 1)
    per_layer: dict[str, float] = {}
    for sample in families["expertmesh_router_tokens"]:
        if sample.name.endswith("_total"):
            per_layer[sample.labels["layer"]] = per_layer.get(sample.labels["layer"], 0) + sample.value
    assert per_layer == {"0": 2 * passed, "1": 2 * passed}
    gen = [s.value for s in families["expertmesh_gateway_generated_tokens"] if s.name.endswith("_total")]
    assert gen == [requests * generated]
    codes = {s.labels["code"]: s.value for s in families["expertmesh_gateway_requests"] if s.name.endswith("_total")}
    assert codes == {"OK": requests, "INVALID_ARGUMENT": 1}
    assert {(s.labels["group"], s.labels["replica"]): s.value for s in families["expertmesh_expert_group_up"]} == \
        {("0", "0"): 1.0, ("1", "0"): 1.0}
    for name in ("expertmesh_router_dispatch_seconds", "expertmesh_expert_forward_seconds",
                 "expertmesh_attention_step_seconds", "expertmesh_gateway_time_to_first_token_seconds",
                 "expertmesh_scheduler_kv_cache_used_ratio", "expertmesh_router_sent_bytes"):
        assert families.get(name), f"{name} missing"


PROMETHEUS_PORT = 29090  # fixed (Prometheus cannot report a port 0 choice); outside Ray's worker range
RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "rules.yml"


def query(expr: str) -> list:
    url = f"http://127.0.0.1:{PROMETHEUS_PORT}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as reply:
        body = json.loads(reply.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


def rule_expressions() -> list[str]:
    """What must return data: each recording rule's series, each alert's expression without its
    threshold (a healthy cluster rightly fires no alert), and every query of the Grafana dashboard
    (deploy/grafana/expertmesh.json, its variables set to concrete values)."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            out.append(rule["record"] if "record" in rule else re.split(r" (?:==|>) ", rule["expr"])[0])
    return out + dashboard_queries()


def has_data(expr: str) -> bool:
    """At least one sample that is a number (a quantile over a window without observations is NaN)."""
    return any(sample["value"][1] != "NaN" for sample in query(expr))


def check_with_prometheus(metrics_url: str, stub, tmp_path: Path) -> bool:
    """A real Prometheus scrapes the cluster under a short load; every rule and dashboard expression
    returns data. False if there is no Prometheus to run."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        return False
    target = urllib.parse.urlparse(metrics_url).netloc
    shutil.copyfile(RULES, tmp_path / "rules.yml")
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "rule_files: [rules.yml]\n"
        f"scrape_configs: [{{job_name: expertmesh, static_configs: [{{targets: ['{target}']}}]}}]\n")
    server = subprocess.Popen([prometheus, f"--config.file={tmp_path / 'prometheus.yml'}",
                               f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sampling = generate_pb2.SamplingParams(max_new_tokens=8, ignore_eos=True)
        missing = rule_expressions()
        deadline = time.monotonic() + 90
        for _ in range(1000):  # load while Prometheus scrapes; bounded in count and time
            if not missing or time.monotonic() > deadline:
                break
            stub.Generate(generate_pb2.GenerateRequest(prompt="Load for the scraper", sampling=sampling), timeout=60)
            try:
                missing = [e for e in missing if not has_data(e)]
            except OSError:  # Prometheus still starting
                time.sleep(0.5)
        assert not missing, f"no data for {missing}"
    finally:
        server.terminate()
        server.wait(timeout=30)
    return True


def test_serve_subprocess_generate_and_sigterm(ray_cluster, tiny_ckpt, tmp_path):
    import ray

    gcs = ray.get_runtime_context().gcs_address
    with serve_process(tiny_ckpt, gcs, "--attention-shards", "2", "--expert-groups", "2", "--max-batch-size", "4",
                       "--max-seq-len", "128", "--threads", "1", "--metrics-port", "0") as (proc, lines):
        metrics_url = wait_for_line(proc, lines, r"metrics on (http://\S+/metrics)")
        address = wait_for_line(proc, lines, r"serving .* on (\S+:\d+)")
        wait_serving(address)
        assert len(alive_components()) == 2 + 2 + 2  # shards, their routers, expert groups
        stub = generate_pb2_grpc.GenerateServiceStub(grpc.insecure_channel(address))
        sampling = generate_pb2.SamplingParams(max_new_tokens=12, ignore_eos=True)
        reply = stub.Generate(generate_pb2.GenerateRequest(prompt="The experts are", sampling=sampling), timeout=60)
        expected = Engine.from_checkpoint(tiny_ckpt, max_batch_size=1, max_seq_len=128).generate(
            [GenerationRequest(prompt="The experts are", params=SamplingParams(max_new_tokens=12, ignore_eos=True))])[0]
        assert list(reply.token_ids) == expected.token_ids and reply.text == expected.text
        assert reply.finish_reason == generate_pb2.FINISH_REASON_LENGTH
        chunks = list(stub.GenerateStream(generate_pb2.GenerateRequest(prompt="The experts are", sampling=sampling),
                                          timeout=60))
        assert [t for c in chunks for t in c.token_ids] == expected.token_ids
        assert "".join(c.text for c in chunks) == expected.text and len(chunks) > 1
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(generate_pb2.GenerateRequest(prompt_token_ids=[1, 32000], sampling=sampling), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        check_metrics(scrape(metrics_url), prompt_len=len(expected.prompt_token_ids), generated=12, requests=2)
        prometheus_ran = check_with_prometheus(metrics_url, stub, tmp_path)
        info = stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), timeout=10)
        assert info.attention_shards == 2 and [list(g.experts) for g in info.expert_groups] == [[0, 1, 2, 3],
                                                                                                [4, 5, 6, 7]]
    if not prometheus_ran:  # everything else was checked; say what was not
        pytest.skip("prometheus not installed (.ci/run installs Debian's prometheus package): its part not run")
