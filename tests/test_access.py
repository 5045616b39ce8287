"""Access control on the public API, with certificates made here by the `openssl` command.

A gateway with TLS and a bearer token, called the way the README tells users to (its Python snippet
and its `expertmesh generate --tls-ca ... --auth-token-file ...` line are run as they stand): a TLS
client with the token gets output; a missing or wrong token gets UNAUTHENTICATED, and so does
reflection; health stays open; a plaintext client, or one that does not trust the CA, cannot connect;
the server serves normally after all of that. Bad certificate, key and token flags fail at start-up,
naming the flag and the file, before Ray starts.
"""

from __future__ import annotations

import logging
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from serving import serve_without_ray

from expertmesh.engine import Engine
from expertmesh.services.access import DENIED_REASONS, PublicAccess
from expertmesh.services.gateway import SERVICE_NAME, ModelInfo, start_gateway
from expertmesh.services.gateway_loop import EngineLoop
from expertmesh.services.metrics import GatewayMetrics
from expertmesh.v1 import generate_pb2, generate_pb2_grpc
from certs import issue, make_ca, openssl, require_openssl
from test_gateway import AioThread

SAMPLING = generate_pb2.SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate it signs for 127.0.0.1 and localhost, and a stray key."""
    require_openssl()
    d = tmp_path_factory.mktemp("certs")
    make_ca(d)
    issue(d, "server", "IP:127.0.0.1,DNS:localhost")
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "other.key", cwd=d)
    return d


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(secrets.token_urlsafe(32) + "\n")  # as `echo` or a Kubernetes Secret would leave it
    return path


class Secured:
    """A gateway with TLS and a token, its address, the CA and the token."""

    def __init__(self, aio: AioThread, engine: Engine, access: PublicAccess, ca: bytes):
        self.aio, self.engine, self.ca, self.token = aio, engine, ca, access.token
        self.metrics = GatewayMetrics(CollectorRegistry())
        self.gateway, port = aio.run(start_gateway(EngineLoop(engine, metrics=self.metrics),
                                                   ModelInfo.local(engine, "tiny"), ready=True, access=access))
        self.address = f"127.0.0.1:{port}"
        self.metadata = [("authorization", f"Bearer {self.token}")]  # what an authorised call sends

    def channel(self) -> grpc.Channel:
        """A channel as the README's Python snippet opens one: TLS, trusting the CA."""
        return grpc.secure_channel(self.address, grpc.ssl_channel_credentials(root_certificates=self.ca))


@pytest.fixture(scope="module")
def secured(tiny_ckpt, certs, token_file):
    aio = AioThread()
    access = PublicAccess.load(str(certs / "server.pem"), str(certs / "server.key"),
                               auth_token_file=str(token_file))
    s = Secured(aio, Engine.from_checkpoint(tiny_ckpt, max_batch_size=2, max_seq_len=128), access,
                (certs / "ca.pem").read_bytes())
    yield s
    aio.run(s.gateway.stop(1.0))
    aio.close()


def generate(channel: grpc.Channel, metadata=None, sampling=SAMPLING) -> generate_pb2.GenerateResponse:
    stub = generate_pb2_grpc.GenerateServiceStub(channel)
    return stub.Generate(generate_pb2.GenerateRequest(prompt="Hello", sampling=sampling), metadata=metadata,
                         timeout=30)


README = Path(__file__).resolve().parents[1] / "README.md"


def readme_snippet(language: str) -> str:
    """The first `language` code block of the README's "Securing the API" section."""
    section = README.read_text().split("## Securing the API", 1)[1].split("\n## ", 1)[0]
    return section.split(f"```{language}\n", 1)[1].split("```", 1)[0]


def test_readme_python_snippet_gets_output(secured, certs, token_file, tmp_path):
    shutil.copyfile(certs / "ca.pem", tmp_path / "ca.pem")
    shutil.copyfile(token_file, tmp_path / "token")
    code = readme_snippet("python").replace("gateway.example:50051", secured.address)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with secured.channel() as channel:
        expected = generate(channel, secured.metadata,
                            generate_pb2.SamplingParams(max_new_tokens=8))  # the snippet's request
    assert done.stdout == expected.text + "\n"


def test_tls_client_with_the_token_gets_output(secured):
    token = secured.token
    with secured.channel() as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        reply = stub.Generate(generate_pb2.GenerateRequest(prompt="Hello", sampling=SAMPLING),
                              metadata=secured.metadata, timeout=30)
        chunks = list(stub.GenerateStream(generate_pb2.GenerateRequest(prompt="Hello", sampling=SAMPLING),
                                          metadata=secured.metadata, timeout=30))
    assert len(reply.token_ids) == 8 and reply.finish_reason == generate_pb2.FINISH_REASON_LENGTH
    assert [t for c in chunks for t in c.token_ids] == list(reply.token_ids)


def _calls(stub):
    """Every GenerateService method, each called once with `metadata`."""
    return {
        "Generate": lambda md: stub.Generate(generate_pb2.GenerateRequest(prompt="hi", sampling=SAMPLING),
                                             metadata=md, timeout=10),
        "GenerateStream": lambda md: list(stub.GenerateStream(
            generate_pb2.GenerateRequest(prompt="hi", sampling=SAMPLING), metadata=md, timeout=10)),
        "Tokenize": lambda md: stub.Tokenize(generate_pb2.TokenizeRequest(text="hi"), metadata=md, timeout=10),
        "GetModelInfo": lambda md: stub.GetModelInfo(generate_pb2.GetModelInfoRequest(), metadata=md, timeout=10),
    }


# Given the right token: the metadata a call sends, what the error must say, and the metric's reason.
BAD_METADATA = {
    "no metadata": (lambda token: None, "missing bearer token", "missing"),
    "other metadata only": (lambda token: [("x-api-key", token)], "missing bearer token", "missing"),
    "wrong token": (lambda token: [("authorization", "Bearer not-the-token")], "invalid bearer token", "invalid"),
    "token with a suffix": (lambda token: [("authorization", f"Bearer {token}x")], "invalid bearer token",
                            "invalid"),
    "token without the scheme": (lambda token: [("authorization", token)], "must be 'Bearer <token>'", "malformed"),
    "basic scheme": (lambda token: [("authorization", f"Basic {token}")], "must be 'Bearer <token>'", "malformed"),
}


def denied_counts(metrics: GatewayMetrics) -> dict[str, float]:
    return {reason: metrics.denied.labels(reason)._value.get() for reason in DENIED_REASONS}


@pytest.mark.parametrize("case", sorted(BAD_METADATA))
def test_missing_or_wrong_token_is_unauthenticated(secured, case, caplog):
    make_metadata, message, reason = BAD_METADATA[case]
    token = secured.token
    metadata = make_metadata(token)
    caplog.set_level(logging.INFO, logger="expertmesh.services.access")
    before = denied_counts(secured.metrics)
    with secured.channel() as channel:
        calls = _calls(generate_pb2_grpc.GenerateServiceStub(channel))
        for method, call in calls.items():
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
            assert message in err.value.details() and token not in err.value.details()
        assert len(generate(channel, secured.metadata).token_ids) == 8  # still serving
    # every denied call is counted under its reason (an authorised one is not)
    assert denied_counts(secured.metrics) == {**before, reason: before[reason] + len(calls)}
    assert f"denied /{SERVICE_NAME}/Generate" in caplog.text
    assert token not in caplog.text


def test_scheme_is_case_insensitive(secured):
    with secured.channel() as channel:
        assert len(generate(channel, [("authorization", f"bearer {secured.token}")]).token_ids) == 8


def test_health_is_open_without_a_token(secured):
    with secured.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE_NAME):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def list_services(channel: grpc.Channel, metadata=None) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                        metadata=metadata, timeout=10)
    return {s.name for s in reply.list_services_response.service}


def test_reflection_needs_the_token(secured):
    with secured.channel() as channel:
        with pytest.raises(grpc.RpcError) as err:
            list_services(channel)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert SERVICE_NAME in list_services(channel, secured.metadata)


def test_unknown_method_without_a_token_is_unauthenticated_not_unimplemented(secured):
    with secured.channel() as channel:
        call = channel.unary_unary(f"/{SERVICE_NAME}/NoSuchMethod")
        with pytest.raises(grpc.RpcError) as err:
            call(b"", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as err:
            call(b"", metadata=secured.metadata, timeout=10)
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_plaintext_client_cannot_use_the_tls_port(secured):
    with grpc.insecure_channel(secured.address) as channel:
        with pytest.raises(grpc.RpcError) as err:
            generate(channel, secured.metadata)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as err:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with secured.channel() as channel:  # and a proper client is served right after
        assert generate(channel, secured.metadata).token_ids


def test_client_that_does_not_trust_the_ca_cannot_connect(secured):
    # The system's CA certificates: the test CA is not among them.
    with grpc.secure_channel(secured.address, grpc.ssl_channel_credentials()) as channel:
        with pytest.raises(grpc.RpcError) as err:
            generate(channel, secured.metadata)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with secured.channel() as channel:  # and a proper client is served right after
        assert generate(channel, secured.metadata).token_ids


def cli(*args: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """`expertmesh ...` as a user runs it."""
    return subprocess.run([sys.executable, "-m", "expertmesh.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd, env={**os.environ, **(env or {})})


def test_cli_generate_as_the_readme_says(secured, certs, token_file, tmp_path):
    shutil.copyfile(certs / "ca.pem", tmp_path / "ca.pem")
    shutil.copyfile(token_file, tmp_path / "token")
    [line] = [x for x in readme_snippet("bash").splitlines() if x.startswith("expertmesh generate")]
    args = shlex.split(line.replace("gateway.example:50051", secured.address))[1:]
    assert {"--tls-ca", "--auth-token-file"} <= set(args)
    prompt = args[1]
    with secured.channel() as channel:
        stub = generate_pb2_grpc.GenerateServiceStub(channel)
        expected = stub.Generate(generate_pb2.GenerateRequest(prompt=prompt, sampling=generate_pb2.SamplingParams(
            max_new_tokens=32)), metadata=secured.metadata, timeout=30)  # the CLI's defaults: greedy, 32 tokens
    reason = generate_pb2.FinishReason.Name(expected.finish_reason).removeprefix("FINISH_REASON_").lower()
    done = cli(*args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{prompt}{expected.text}\n[finish_reason={reason} " \
                          f"completion_tokens={len(expected.token_ids)}]\n"
    assert secured.token not in done.stderr

    i = args.index("--auth-token-file")
    without_file = args[:i] + args[i + 2:]
    from_env = cli(*without_file, cwd=tmp_path, env={"EXPERTMESH_AUTH_TOKEN": secured.token})
    assert from_env.returncode == 0 and from_env.stdout == done.stdout, from_env.stderr

    without = cli(*without_file, cwd=tmp_path, env={"EXPERTMESH_AUTH_TOKEN": ""})
    assert without.returncode == 1
    assert "UNAUTHENTICATED: missing bearer token" in without.stderr


def test_serves_normally_after_all_of_that(secured):
    with secured.channel() as channel:
        assert len(generate(channel, secured.metadata).token_ids) == 8
    assert not secured.engine.scheduler.running and not secured.engine.scheduler.waiting


def test_token_without_tls_works_and_warns(tiny_ckpt, caplog):
    aio = AioThread()
    engine = Engine.from_checkpoint(tiny_ckpt, max_batch_size=1, max_seq_len=64)
    token = secrets.token_hex(16)
    with caplog.at_level(logging.INFO, logger="expertmesh.services"):
        gateway, port = aio.run(start_gateway(engine, ModelInfo.local(engine, "tiny"), ready=True,
                                              access=PublicAccess(token=token)))
    try:
        assert "TLS off, bearer token required (health checks open)" in caplog.text
        assert "crosses the network in clear text" in caplog.text and token not in caplog.text
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert len(generate(channel, [("authorization", f"Bearer {token}")]).token_ids) == 8
            with pytest.raises(grpc.RpcError) as err:
                generate(channel)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        aio.run(gateway.stop(1.0))
        aio.close()


# (load arguments, words the message must hold); paths are names inside the `certs` directory.
START_UP_ERRORS = {
    "cert without key": (dict(tls_cert="server.pem"), ["--tls-key: missing", "--tls-cert was given"]),
    "key without cert": (dict(tls_key="server.key"), ["--tls-cert: missing", "--tls-key was given"]),
    "unreadable cert": (dict(tls_cert="absent.pem", tls_key="server.key"), ["--tls-cert", "absent.pem"]),
    "unreadable key": (dict(tls_cert="server.pem", tls_key="absent.key"), ["--tls-key", "absent.key"]),
    "key of another certificate": (dict(tls_cert="server.pem", tls_key="other.key"), ["other.key", "private key"]),
    "key given as the certificate": (dict(tls_cert="server.key", tls_key="server.key"), ["--tls-cert", "server.key"]),
    "unreadable token file": (dict(auth_token_file="absent-token"), ["--auth-token-file", "absent-token"]),
    "empty token file": (dict(auth_token_file="empty"), ["--auth-token-file", "empty"]),
    "token with a space": (dict(auth_token="two words"), ["--auth-token", "printable ASCII"]),
    "token and token file": (dict(auth_token="t", auth_token_file="t"), ["--auth-token", "not both"]),
}


@pytest.mark.parametrize("case", sorted(START_UP_ERRORS))
def test_bad_access_flags_fail_at_start_up(certs, case):
    (certs / "empty").write_text("\n")
    kwargs, words = START_UP_ERRORS[case]
    paths = {k: (v if k == "auth_token" else str(certs / v)) for k, v in kwargs.items()}
    with pytest.raises(ValueError) as err:
        PublicAccess.load(**paths)
    for word in words:
        assert word in str(err.value), str(err.value)


def test_serve_with_a_bad_flag_exits_before_starting_anything(certs, tmp_path):
    done = serve_without_ray(tmp_path, "--port", "0", "--tls-cert", str(certs / "server.pem"))
    assert done.returncode == 2
    assert "expertmesh: error: --tls-key: missing" in done.stderr
