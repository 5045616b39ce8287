"""Mutual TLS between the cluster's components: a component serves only peers with a certificate from
the cluster's CA, and a whole cluster on Ray runs with it, token for token as without."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
import torch

from certs import issue, make_ca, require_openssl
from expertmesh.checkpoint import CheckpointReader
from expertmesh.engine import Engine, GenerationRequest
from expertmesh.model.config import ModelConfig
from expertmesh.model.load import load_expert_group
from expertmesh.orchestrator.actors import RuntimeOptions
from expertmesh.orchestrator.cluster import Cluster
from expertmesh.orchestrator.placement import plan_cluster
from expertmesh.sampling import SamplingParams
from expertmesh.scheduler import Scheduler
from expertmesh.services.access import INTERNAL_SERVER_NAME, InternalTLS
from expertmesh.services.expert import ExpertServicer, ExpertStream, serve_experts
from expertmesh.services.internal import EventLoopThread
from expertmesh.tokenizer import Tokenizer

BOTH_WAYS = "serverAuth,clientAuth"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """The cluster's CA and the components' certificate; a stranger CA and its certificate."""
    require_openssl()
    d = tmp_path_factory.mktemp("internal-pki")
    make_ca(d, "ca")
    issue(d, "component", f"DNS:{INTERNAL_SERVER_NAME}", BOTH_WAYS, ca="ca")
    make_ca(d, "other-ca")
    issue(d, "stranger", f"DNS:{INTERNAL_SERVER_NAME}", BOTH_WAYS, ca="other-ca")
    return d


def tls_of(d: Path, cert: str = "component", ca: str = "ca") -> InternalTLS:
    return InternalTLS.load(str(d / f"{ca}.pem"), str(d / f"{cert}.pem"), str(d / f"{cert}.key"))


@pytest.fixture(scope="module")
def loop():
    thread = EventLoopThread("test-internal-tls")
    yield thread
    thread.close()


def test_an_expert_group_serves_only_peers_with_the_cluster_certificate(tiny_ckpt, pki, loop):
    reader = CheckpointReader(tiny_ckpt)
    group = load_expert_group(reader, (0, 1), torch.float32)
    servicer = ExpertServicer(group, reader.config.hidden_size, torch.float32)
    server, port = loop.run(serve_experts(servicer, "127.0.0.1:0", tls=tls_of(pki)))
    x, ids = torch.randn(3, reader.config.hidden_size), torch.tensor([0, 1, 1])
    expected = group(0, x, ids)

    async def call(tls: InternalTLS | None):
        stream = ExpertStream(f"127.0.0.1:{port}", (0, 1), timeout_s=10, tls=tls)
        try:
            return await stream.forward(0, x, ids)
        finally:
            await stream.close()

    try:
        assert torch.equal(loop.run(call(tls_of(pki)), timeout_s=30), expected)
        for who in (None, tls_of(pki, "stranger", "other-ca")):  # plaintext; a certificate from another CA
            with pytest.raises(grpc.RpcError) as err:
                loop.run(call(who), timeout_s=30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert torch.equal(loop.run(call(tls_of(pki)), timeout_s=30), expected)  # still serving
    finally:
        loop.run(server.stop(grace=None))


def test_partial_or_unreadable_internal_tls_is_refused_naming_the_flag(pki):
    with pytest.raises(ValueError, match="give all three"):
        InternalTLS.load(str(pki / "ca.pem"), str(pki / "component.pem"), None)
    with pytest.raises(ValueError, match="--internal-tls-ca: cannot read"):
        InternalTLS.load(str(pki / "missing.pem"), str(pki / "component.pem"), str(pki / "component.key"))
    with pytest.raises(ValueError, match="--internal-tls-cert, --internal-tls-key: .* not a PEM"):
        InternalTLS.load(str(pki / "ca.pem"), str(pki / "component.pem"), str(pki / "stranger.key"))


def test_a_cluster_with_internal_mutual_tls_gives_the_same_tokens(ray_cluster, tiny_ckpt, pki):
    cfg = ModelConfig.from_checkpoint(tiny_ckpt)
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    requests = [GenerationRequest(prompt=p, params=params) for p in ("Only peers", "with the cluster's CA")]
    expected = Engine.from_checkpoint(tiny_ckpt, max_batch_size=2, max_seq_len=64).generate(requests)
    paths = tuple(str(pki / f) for f in ("ca.pem", "component.pem", "component.key"))
    cluster = Cluster(str(tiny_ckpt), plan_cluster(cfg, 2, 2), RuntimeOptions(threads=1, internal_tls=paths),
                      2, 64).start()
    try:
        engine = Engine(cluster.runner(), Tokenizer.from_checkpoint(tiny_ckpt), cfg, Scheduler(2, 64))
        assert [r.token_ids for r in engine.generate(requests)] == [r.token_ids for r in expected]
    finally:
        cluster.shutdown()
