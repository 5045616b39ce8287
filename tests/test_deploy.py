"""The deployment files under deploy/, checked offline.

Every manifest validates against the schemas in the `shared/schemas/` folder beside the checkout the way
its README says: KubeRay CRDs with the API server's defaults filled in and `additionalProperties: false`
added (so a misspelt field fails, as with kubeconform's strict mode), core kinds against the strict
Kubernetes schemas. Then the pieces have to agree with each other and with the code: the gateway's
flags parse with `expertmesh serve`'s own parser, the Ray resources it pins actors with are the ones the
worker groups advertise, the GPUs it asks for exist, and the probes and the Service point at the port
it listens on.
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import math
import re
import shlex
import shutil
import subprocess
import urllib.parse
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import referencing
import yaml

from expertmesh.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERAY_DIR = DEPLOY / "kuberay"
SCRAPE_LOCAL = DEPLOY / "prometheus" / "scrape-local.yml"
KUSTOMIZATION = KUBERAY_DIR / "kustomization.yaml"
SCHEMAS = Path(__file__).resolve().parents[2] / "shared" / "schemas"
K8S_SCHEMAS = SCHEMAS / "kubernetes-v1.36.0-local-strict"
K8S_DEFS = "https://kubernetes.io/api/_definitions.json#/$defs/"

# apiVersion group -> (schema folder, {kind: CRD file}) for the custom resources we may deploy.
CRDS = {
    "ray.io": ("kuberay-v1.7.0", {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml",
                                  "RayJob": "ray.io_rayjobs.yaml"}),
    "monitoring.coreos.com": ("prometheus-operator-v0.93.0", {
        "ServiceMonitor": "monitoring.coreos.com_servicemonitors.yaml",
        "PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}),
}
GPU = "nvidia.com/gpu"


# ---------------------------------------------------------------------------------------------- files

def _yaml_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".yaml", ".yml"))


def _manifests() -> list[tuple[str, dict]]:
    """(id, document) for every Kubernetes object under deploy/."""
    out = []
    for path in _yaml_files():
        if path.name == KUSTOMIZATION.name or path.parent == SCRAPE_LOCAL.parent:
            continue  # kustomize's files, and Prometheus's own (config, rules, rule tests): promtool checks them
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        out += [(f"{path.relative_to(DEPLOY)}#{i}", doc) for i, doc in enumerate(docs)]
    return out


MANIFESTS = _manifests()


def _one(kind: str) -> dict:
    [doc] = [d for _, d in MANIFESTS if d.get("kind") == kind]
    return doc


RAYCLUSTER = _one("RayCluster")
SERVICE = _one("Service")
HEAD_POD = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["spec"]
WORKER_GROUPS = RAYCLUSTER["spec"]["workerGroupSpecs"]


def _gateway_of(raycluster: dict) -> dict:
    """The head pod's container that runs `expertmesh serve`."""
    containers = raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    [c] = [c for c in containers if c.get("args", [])[:2] == ["expertmesh", "serve"]]
    return c


def _gateway() -> dict:
    return _gateway_of(RAYCLUSTER)


def _mounts(container: dict, pod: dict) -> dict[str, tuple[dict, dict]]:
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: (m, volumes[m["name"]]) for m in container.get("volumeMounts", [])}


# -------------------------------------------------------------------------------------------- schemas

def _require_schemas() -> None:
    if not SCHEMAS.is_dir():
        pytest.skip(f"offline schemas not found at {SCHEMAS} (the shared/ folder beside the checkout)")


def _subschemas(schema: dict):
    """The schemas directly inside `schema` (properties, items, additionalProperties, combinators)."""
    yield from schema.get("properties", {}).values()
    for key in ("items", "additionalProperties", "not"):
        if isinstance(schema.get(key), dict):
            yield schema[key]
    for key in ("allOf", "anyOf", "oneOf"):
        yield from schema.get(key, [])


def _strict(schema: dict) -> dict:
    """`additionalProperties: false` on every object with properties that does not keep unknown fields."""
    if schema.get("properties") and "additionalProperties" not in schema \
            and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    for sub in _subschemas(schema):
        _strict(sub)
    return schema


def _fill_defaults(schema: dict, value) -> None:
    """What the API server does before validating a custom resource: drop nulls on non-nullable fields,
    then set each missing field that has a schema default (recursively, inside present objects)."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for name in [n for n, v in value.items() if v is None and not props.get(n, {}).get("nullable")]:
            del value[name]
        for name, sub in props.items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                _fill_defaults(sub, value[name])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name in value.keys() - props.keys():
                _fill_defaults(extra, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            _fill_defaults(schema["items"], item)


@cache
def _crd_schema(folder: str, file: str, version: str, strict: bool) -> dict:
    with open(SCHEMAS / folder / file) as f:
        # libyaml's loader: 5x faster than the pure-Python one on these 1 MB files.
        crd = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = served["schema"]["openAPIV3Schema"]
    return _strict(schema) if strict else schema


@cache
def _k8s_registry() -> referencing.Registry:
    with open(K8S_SCHEMAS / "_definitions.json") as f:
        return referencing.Resource.from_contents(json.load(f)) @ referencing.Registry()


@cache
def _k8s_validator(ref: str) -> jsonschema.Draft202012Validator:
    """A strict core-kind validator: a per-kind file name, or a `$defs` name in _definitions.json."""
    if ref.endswith(".json"):
        schema = json.loads((K8S_SCHEMAS / ref).read_text())
    else:
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$ref": K8S_DEFS + ref}
    return jsonschema.Draft202012Validator(schema, registry=_k8s_registry())


@cache
def _k8s_defs_by_kind() -> dict[tuple[str, str, str], str]:
    """(group, version, kind) -> name in _definitions.json, for core kinds without a per-kind file."""
    defs = _k8s_registry().contents("https://kubernetes.io/api/_definitions.json")["$defs"]
    return {(gvk["group"], gvk["version"], gvk["kind"]): name
            for name, d in defs.items() for gvk in d.get("x-kubernetes-group-version-kind", [])}


def _errors(validator, instance, where: str = "") -> list[str]:
    return [f"{where}{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in validator.iter_errors(instance)]


def _validate_crd(doc: dict, group: str, version: str, strict: bool = True) -> list[str]:
    folder, files = CRDS[group]
    assert doc["kind"] in files, f"no schema here for {group} {doc['kind']}"
    schema = _crd_schema(folder, files[doc["kind"]], version, strict)
    doc = copy.deepcopy(doc)
    _fill_defaults(schema, doc)
    errors = _errors(jsonschema.Draft7Validator(schema), doc)
    # CRD schemas leave metadata unchecked; ObjectMeta is a core type.
    errors += _errors(_k8s_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"), doc.get("metadata", {}),
                      "metadata/")
    return errors


def _validate_core(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    file = "-".join(filter(None, (doc["kind"].lower(), group.replace(".", "-"), version))) + ".json"
    if (K8S_SCHEMAS / file).exists():
        return _errors(_k8s_validator(file), doc)
    name = _k8s_defs_by_kind().get((group, version, doc["kind"]))
    assert name, f"no schema here for {doc['apiVersion']} {doc['kind']}"
    return _errors(_k8s_validator(name), doc)


def _pod_templates(doc: dict) -> list[tuple[str, dict]]:
    if doc.get("kind") != "RayCluster":
        return []
    spec = doc["spec"]
    return [("spec/headGroupSpec", spec["headGroupSpec"]["template"])] + [
        (f"spec/workerGroupSpecs/{i}", g["template"]) for i, g in enumerate(spec.get("workerGroupSpecs", []))]


def validate(doc: dict, strict: bool = True) -> list[str]:
    """Every schema error in one manifest, as 'path: message' lines."""
    group, _, version = doc["apiVersion"].rpartition("/")
    if group not in CRDS:
        return _validate_core(doc)
    errors = _validate_crd(doc, group, version, strict)
    # The CRD's copy of PodTemplateSpec is generated by controller-gen; check the templates against
    # Kubernetes' own strict one as well.
    for where, template in _pod_templates(doc):
        errors += _errors(_k8s_validator("io.k8s.api.core.v1.PodTemplateSpec"), template, f"{where}/template/")
    return errors


@pytest.mark.parametrize("doc", [d for _, d in MANIFESTS], ids=[i for i, _ in MANIFESTS])
def test_manifest_validates_against_its_schema(doc):
    _require_schemas()
    errors = validate(doc)
    assert not errors, "\n".join(errors)


def _misspelt_group_field(doc):
    group = doc["spec"]["workerGroupSpecs"][0]
    group["rayStartParam"] = group.pop("rayStartParams")


def _replicas_as_words(doc):
    doc["spec"]["workerGroupSpecs"][1]["replicas"] = "eight"


def _misspelt_probe(doc):
    gateway = _gateway_of(doc)
    gateway["readinesProbe"] = gateway.pop("readinessProbe")


def _probe_port_as_name(doc):  # a gRPC probe takes a number, unlike httpGet
    _gateway_of(doc)["livenessProbe"]["grpc"]["port"] = "grpc"


def _misspelt_service_field(doc):
    port = doc["spec"]["ports"][0]
    port["targetport"] = port.pop("targetPort")


def _service_port_as_words(doc):
    doc["spec"]["ports"][0]["port"] = "fifty thousand"


@pytest.mark.parametrize("break_it, kind", [
    (_misspelt_group_field, "RayCluster"), (_replicas_as_words, "RayCluster"), (_misspelt_probe, "RayCluster"),
    (_probe_port_as_name, "RayCluster"), (_misspelt_service_field, "Service"), (_service_port_as_words, "Service"),
])
def test_validator_rejects_a_broken_copy(break_it, kind):
    """The negative control: the same validation fails on a deliberately broken copy."""
    _require_schemas()
    doc = copy.deepcopy(_one(kind))
    break_it(doc)
    assert validate(doc), f"{break_it.__name__}: the broken {kind} validated"


def test_strict_mode_is_what_catches_a_misspelt_crd_field():
    """CRD schemas allow unknown fields, so without strict mode a typo would pass unnoticed."""
    _require_schemas()
    doc = copy.deepcopy(RAYCLUSTER)
    _misspelt_group_field(doc)
    assert not _validate_crd(doc, "ray.io", "v1", strict=False)
    assert any("rayStartParam" in e for e in _validate_crd(doc, "ray.io", "v1", strict=True))


# ------------------------------------------------------------------ what the pieces must agree on

def _serve_flags():
    args = _gateway()["args"]
    try:
        return build_parser().parse_args(args[1:])
    except SystemExit:
        pytest.fail(f"`expertmesh serve` rejects the gateway's arguments: {shlex.join(args)}")


def _advertised(group: dict) -> dict[str, float]:
    """The custom Ray resources a group's pods advertise. KubeRay pastes rayStartParams values into a
    bash command line (`--resources=<value>`), so the value carries its own shell quoting."""
    assert not group.get("resources"), "KubeRay rejects resources in both rayStartParams and the group"
    value = group.get("rayStartParams", {}).get("resources")
    if value is None:
        return {}
    [word] = shlex.split(value)
    return json.loads(word)


def _group_with(resource: str) -> dict:
    groups = [g for g in WORKER_GROUPS if resource in _advertised(g)]
    assert len(groups) == 1, f"{len(groups)} worker groups advertise the Ray resource {resource!r}"
    return groups[0]


def test_gateway_runs_expertmesh_serve_in_the_cluster():
    flags = _serve_flags()
    assert flags.command == "serve"
    assert flags.ray_address == "auto"  # join the head's Ray, never start an embedded one
    assert flags.host == "0.0.0.0"
    assert flags.model and flags.model.startswith("/")
    command = _gateway()["command"]
    assert command[:2] == ["/bin/bash", "-c"] and command[2].rstrip().endswith('exec "$@"'), \
        "the wrapper must end by exec'ing the args, so that SIGTERM reaches expertmesh serve"


def test_gateway_shares_the_head_containers_raylet():
    """A driver attaches to its node's raylet: through the sockets under /tmp/ray, after finding the
    raylet process (Ray 2.55+ scans processes for it). Both must be visible from the gateway."""
    ray_head = HEAD_POD["containers"][0]
    assert ray_head is not _gateway(), "containers[0] is the Ray container: KubeRay writes its command"
    assert "command" not in ray_head and "args" not in ray_head
    assert HEAD_POD.get("shareProcessNamespace") is True
    _, ray_tmp = _mounts(ray_head, HEAD_POD)["/tmp/ray"]
    assert "emptyDir" in ray_tmp
    assert _mounts(_gateway(), HEAD_POD)["/tmp/ray"][1] is ray_tmp


def test_actors_are_pinned_to_the_worker_groups_that_advertise_their_resources():
    flags = _serve_flags()
    assert flags.attention_resource and flags.expert_resource
    assert flags.attention_resource != flags.expert_resource
    attention, experts = _group_with(flags.attention_resource), _group_with(flags.expert_resource)
    assert attention is not experts
    assert not _advertised(RAYCLUSTER["spec"]["headGroupSpec"]), "the head must not host shards or groups"


def _gpus_per_pod(group: dict) -> int:
    resources = group["template"]["spec"]["containers"][0]["resources"]
    limits, requests = resources["limits"], resources.get("requests", {})
    assert requests.get(GPU, limits.get(GPU)) == limits.get(GPU), "extended resources need requests == limits"
    return int(limits.get(GPU, 0))


def test_the_worker_groups_have_the_gpus_the_gateway_asks_for():
    flags = _serve_flags()
    assert flags.device == "cuda"
    # Routers (--router service) hold no GPU: only the shards count against the attention pods' GPUs.
    for resource, actors, share in (
            (flags.attention_resource, flags.attention_shards, flags.gpus_per_shard or 1.0),
            (flags.expert_resource, flags.expert_groups, flags.gpus_per_group or 1.0)):
        group = _group_with(resource)
        per_pod = _gpus_per_pod(group)
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        fits = group["replicas"] * math.floor(per_pod / share + 1e-9)
        assert actors <= fits, f"{group['groupName']}: {actors} actors of {share} GPU, room for {fits}"


def test_every_pod_mounts_the_checkpoint_read_only_from_one_claim():
    model = _serve_flags().model
    pods = [(_gateway(), HEAD_POD)] + [(g["template"]["spec"]["containers"][0], g["template"]["spec"])
                                      for g in WORKER_GROUPS]
    claims = set()
    for container, pod in pods:
        [(path, (mount, volume))] = [(p, mv) for p, mv in _mounts(container, pod).items()
                                     if model.startswith(p.rstrip("/") + "/")]
        assert mount.get("readOnly") is True and volume["persistentVolumeClaim"].get("readOnly") is True
        claims.add((path, volume["persistentVolumeClaim"]["claimName"]))
    assert len(claims) == 1, f"pods see the checkpoint from different claims or paths: {claims}"


def test_gateway_probes_are_grpc_health_on_the_serving_port():
    gateway, port = _gateway(), _serve_flags().port
    assert ("grpc", port) in [(p.get("name"), p["containerPort"]) for p in gateway["ports"]]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert set(gateway[probe]) & {"exec", "httpGet", "tcpSocket", "grpc"} == {"grpc"}, probe
        assert gateway[probe]["grpc"]["port"] == port, probe
    assert gateway["readinessProbe"]["grpc"].get("service", "") in ("", "expertmesh.v1.GenerateService")


def test_pod_port_names_are_unique_service_names():
    """Kubernetes wants each named port unique within its pod (an IANA service name); a PodMonitor that
    selects a port by a name two containers share scrapes both."""
    for where, template in _pod_templates(RAYCLUSTER):
        names = [p["name"] for c in template["spec"]["containers"] for p in c.get("ports", []) if "name" in p]
        assert len(names) == len(set(names)), f"{where}: port names used twice in one pod: {names}"
        for name in names:
            assert len(name) <= 15 and re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", name) \
                and "--" not in name and re.search("[a-z]", name), name


def test_service_sends_traffic_to_the_gateway_port_of_the_head_pod():
    # KubeRay sets these labels on the head pod (template labels cannot override them).
    head_labels = {"ray.io/cluster": RAYCLUSTER["metadata"]["name"], "ray.io/node-type": "head"}
    pod_labels = RAYCLUSTER["spec"]["headGroupSpec"]["template"]["metadata"].get("labels", {}) | head_labels
    selector = SERVICE["spec"]["selector"]
    assert selector.items() <= pod_labels.items()
    assert head_labels.items() <= selector.items(), "select the head pod of this cluster only"
    [port] = SERVICE["spec"]["ports"]
    target = port.get("targetPort", port["port"])
    by_name = {p["name"]: p["containerPort"] for p in _gateway()["ports"] if "name" in p}
    assert by_name.get(target, target) == _serve_flags().port


def test_ray_version_matches_the_installed_ray():
    installed = importlib.metadata.version("ray").split(".")[:2]
    assert RAYCLUSTER["spec"]["rayVersion"].split(".")[:2] == installed


def test_kustomization_lists_files_that_exist():
    kustomization = yaml.safe_load(KUSTOMIZATION.read_text())
    resources = kustomization["resources"]
    for name in resources:
        assert (KUBERAY_DIR / name).is_file(), name
    assert {"raycluster.yaml", "service.yaml"} <= set(resources)
    images = {i["name"] for i in kustomization.get("images", [])}
    used = {c["image"] for _, t in _pod_templates(RAYCLUSTER) for c in t["spec"]["containers"]}
    assert used <= images, f"images the kustomization does not set: {used - images}"


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl (with its built-in kustomize) not installed")
def test_kustomization_builds():
    out = subprocess.run(["kubectl", "kustomize", str(KUBERAY_DIR)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    assert sorted(d["kind"] for d in docs) == ["RayCluster", "Service"]


def test_dockerfile_comments_every_build_arg_and_exposes_the_gateway_port():
    text = (DEPLOY / "Dockerfile").read_text()
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("ARG "):
            assert lines[i - 1].startswith("#"), f"uncommented build arg: {line}"
    assert f"EXPOSE {_serve_flags().port}" in lines
    assert not any(re.match(r"(ENTRYPOINT|CMD)\b", line) for line in lines), "KubeRay sets the commands"
    # KubeRay starts Ray with `bash -lc`, whose /etc/profile resets PATH on Debian and Ubuntu.
    assert "/opt/venv" not in text or "/etc/profile.d/" in text, "the venv must be on a login shell's PATH"


def test_local_prometheus_config_scrapes_expertmesh():
    config = yaml.safe_load(SCRAPE_LOCAL.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    targets = [t for sc in jobs["expertmesh"]["static_configs"] for t in sc["targets"]]
    top_default = build_parser().parse_args(["top"]).metrics  # what `expertmesh top` reads by default
    assert urllib.parse.urlparse(top_default).netloc in targets


def test_every_yaml_file_under_deploy_parses():
    for path in _yaml_files():
        assert list(yaml.safe_load_all(path.read_text())), path
