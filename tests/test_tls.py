"""TLS on both front doors (router.tls_*): a served cluster with a test CA's server certificate;
mutual TLS on a second gRPC + HTTPS server pair over the same router core.

Certificates are made here, at test time (``cryptography``): a CA, a server certificate for
localhost / 127.0.0.1, a client certificate, and a second CA nobody trusts.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import grpc
import httpx
import pytest

from cluster.api import tessera_pb2 as pb
from cluster.api import tessera_pb2_grpc
from cluster.client import ClientTLS, TesseraClient
from cluster.config import ClusterConfig, RouterConfig
from cluster.request_types import MediaInput, SamplingParams
from models.media_samples import make_test_image
from router.tls import ServerTLS, TLSConfigError
from tests.conftest import ServedCluster
from tests.reference import HFReference

ARCH = "llava-clip-llama"
PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


# -- certificates ---------------------------------------------------------------------------------
def _name(common_name: str):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(subject: str, key, issuer_name, issuer_key, *, is_ca: bool, extensions=()):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name or _name(subject))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(folder: Path, name: str, key, cert) -> tuple[str, str]:
    from cryptography.hazmat.primitives import serialization

    cert_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> dict[str, str]:
    """name -> PEM path: ca, other_ca, server(+_key) for localhost/127.0.0.1, client(+_key) and
    stranger(+_key) (a client certificate from other_ca)."""
    pytest.importorskip("cryptography")
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    folder = tmp_path_factory.mktemp("tls")
    out: dict[str, str] = {}
    cas = {}
    for ca in ("ca", "other_ca"):
        key = ec.generate_private_key(ec.SECP256R1())
        cas[ca] = (key, _certificate(f"Tessera test {ca}", key, None, None, is_ca=True))
        out[ca], _ = _write(folder, ca, *cas[ca])
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    leaves = {"server": ("ca", [san, x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])]),
              "client": ("ca", [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])]),
              "stranger": ("other_ca", [x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])])}
    for name, (ca, extensions) in leaves.items():
        ca_key, ca_cert = cas[ca]
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(f"tessera-{name}", key, ca_cert.subject, ca_key, is_ca=False, extensions=extensions)
        out[name], out[f"{name}_key"] = _write(folder, name, key, cert)
    return out


# -- config and file checks (no cluster) ------------------------------------------------------------
def test_config_wants_cert_and_key_together_and_mtls_only_with_them():
    for bad in ({"tls_cert_file": "a.pem"}, {"tls_key_file": "a.key"}, {"tls_client_ca_file": "ca.pem"}):
        with pytest.raises(ValueError, match="tls_"):
            RouterConfig(**bad)
    assert ServerTLS.from_config(RouterConfig()) is None  # TLS off by default
    ok = RouterConfig(tls_cert_file="s.pem", tls_key_file="s.key", tls_client_ca_file="ca.pem")
    assert ClusterConfig(router=ok).router.tls_client_ca_file == "ca.pem"  # paths are checked at server start


def test_bad_files_fail_at_server_start_naming_the_key(certs, tmp_path):
    def load(**fields):
        return ServerTLS.from_config(RouterConfig(**{"tls_cert_file": certs["server"],
                                                     "tls_key_file": certs["server_key"], **fields}))

    assert load().is_mutual is False and load(tls_client_ca_file=certs["ca"]).is_mutual
    missing = str(tmp_path / "missing.pem")
    with pytest.raises(TLSConfigError, match=r"router\.tls_cert_file: cannot read .*missing\.pem"):
        load(tls_cert_file=missing)
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(TLSConfigError, match=r"router\.tls_client_ca_file: .*not a PEM file"):
        load(tls_client_ca_file=str(tmp_path / "junk.pem"))
    with pytest.raises(TLSConfigError, match="tls_key_file"):  # the client's key does not match
        load(tls_key_file=certs["client_key"])


# -- a served cluster with TLS --------------------------------------------------------------------
@pytest.fixture(scope="module")
def tls_stack(ray_session, tiny_models, certs):
    stack = ServedCluster(ARCH, tiny_models[ARCH],
                          router={"tls_cert_file": certs["server"], "tls_key_file": certs["server_key"]})
    yield stack
    stack.close()


def _model_info(address: str, credentials: grpc.ChannelCredentials | None):
    channel = (grpc.secure_channel(address, credentials) if credentials is not None
               else grpc.insecure_channel(address))
    with channel:
        return tessera_pb2_grpc.TesseraStub(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=20)


def _refused(address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _model_info(address, credentials)
    return err.value.code()


def test_a_client_trusting_the_ca_gets_a_correct_generation(tls_stack, tiny_models, certs):
    image = MediaInput(make_test_image(3), "image/png")
    with TesseraClient(tls_stack.address, tls_ca_file=certs["ca"]) as client:
        got = client.generate(PROMPT, [image], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
        assert client.health() == "SERVING"
    assert got.finish_reason == "length"
    assert got.token_ids == HFReference(tiny_models[ARCH]).greedy(PROMPT, [image], 8)


def test_plaintext_and_untrusting_clients_are_refused(tls_stack, certs):
    assert _refused(tls_stack.address, None) == grpc.StatusCode.UNAVAILABLE
    assert _refused(tls_stack.address, ClientTLS(ca_file=certs["other_ca"]).grpc_credentials()) == \
        grpc.StatusCode.UNAVAILABLE


def test_cli_and_bench_clients_take_the_ca(tls_stack, certs, capsys):
    from benchmarks.clients import make_client
    from benchmarks.metrics import RequestRecord
    from benchmarks.workloads import BenchRequest
    from cluster.cli import main

    assert main(["status", "--server", tls_stack.address, "--tls-ca", certs["ca"], "--json"]) == 0
    assert '"pools"' in capsys.readouterr().out
    assert main(["status", "--server", tls_stack.address]) == 1  # plaintext: refused
    assert "UNAVAILABLE" in capsys.readouterr().err

    async def bench_one(target: str) -> RequestRecord:
        request, record = BenchRequest(0, "text", "Hello", (), max_tokens=3), RequestRecord(0, request_id="b-0")
        async with make_client(target, tls=ClientTLS(ca_file=certs["ca"])) as client:
            await client.send(request, client.prepare(request), record, timeout_s=60)
        return record

    for target in (f"grpc://{tls_stack.address}", f"https://{tls_stack.router.http_address}"):
        record = tls_stack.router.run(bench_one(target))  # grpc.aio: on the loop it already runs on
        assert record.ok and record.output_tokens == 3, (target, record.error)


def test_https_serves_health_and_models_and_refuses_plain_http(tls_stack, certs):
    url = f"https://{tls_stack.router.http_address}"
    verify = ClientTLS(ca_file=certs["ca"]).ssl_context()
    assert httpx.get(f"{url}/health", verify=verify, timeout=30).status_code == 200
    models = httpx.get(f"{url}/v1/models", verify=verify, timeout=30)
    assert models.status_code == 200 and models.json()["data"]
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://{tls_stack.router.http_address}/health", timeout=10)
    with pytest.raises(httpx.ConnectError):  # certificate verify failed: not our CA
        httpx.get(f"{url}/health", verify=ClientTLS(ca_file=certs["other_ca"]).ssl_context(), timeout=10)


# -- mutual TLS: a second gRPC + HTTPS server over the same core ----------------------------------
@pytest.fixture(scope="module")
def mtls_servers(tls_stack, certs):
    from router.grpc_server import GrpcServer
    from router.http_server import HttpServer

    config = tls_stack.config.router.model_copy(update={"tls_client_ca_file": certs["ca"]})

    async def start(server_class):  # on the router's loop: grpc.aio binds a server to the loop it is made on
        server = server_class(tls_stack.core, config)
        await server.start()
        return server

    grpc_server, http_server = tls_stack.router.run(start(GrpcServer)), tls_stack.router.run(start(HttpServer))
    yield grpc_server.address, http_server.address
    tls_stack.router.run(http_server.stop(0))
    tls_stack.router.run(grpc_server.server.stop(0))  # not GrpcServer.stop: the core stays up


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_ca(mtls_servers, certs):
    grpc_address, http_address = mtls_servers
    for tls in (ClientTLS(ca_file=certs["ca"]),
                ClientTLS(ca_file=certs["ca"], cert_file=certs["stranger"], key_file=certs["stranger_key"])):
        assert _refused(grpc_address, tls.grpc_credentials()) == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(httpx.TransportError):  # the handshake fails (TLS 1.3: at the first read)
            httpx.get(f"https://{http_address}/health", verify=tls.ssl_context(), timeout=10)


def test_mutual_tls_serves_clients_with_a_certificate_from_the_ca(mtls_servers, certs):
    grpc_address, http_address = mtls_servers
    tls = dict(tls_ca_file=certs["ca"], tls_cert_file=certs["client"], tls_key_file=certs["client_key"])
    with TesseraClient(grpc_address, **tls) as client:
        got = client.generate("The capital of France is", sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    assert got.finish_reason == "length" and len(got.token_ids) == 4
    context = ClientTLS(certs["ca"], certs["client"], certs["client_key"]).ssl_context()
    assert httpx.get(f"https://{http_address}/health", verify=context, timeout=30).status_code == 200
