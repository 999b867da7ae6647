"""TLS, mutual TLS and bearer tokens, with certificates made here (``cryptography``): the right
credentials get answers, every wrong or missing one is refused, and health checks need no
token."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gradserve.cli.main import main
from gradserve.client.api import GradientClient, GradserveError
from gradserve.client.credentials import Credentials
from gradserve.engine.builder import GraphBuilder, Value
from gradserve.server.app import GradServer
from gradserve.wire.responses import Gradients
from tests.conftest import StartServer
from tests.server.conftest import SERVING, health_check

SEED = {"a": 3.0, "b": -2.0, "c": 8.0, "f": -2.0}


def seed_loss() -> Value:
    g = GraphBuilder()
    a, b, c, f = (g.input(n) for n in "abcf")
    return (a * b + c) * f


@dataclass(frozen=True)
class Pki:
    """PEM files: a CA, a server certificate for 127.0.0.1 it signed, a client certificate it
    signed, and a client certificate signed by another CA."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    stranger_cert: str
    stranger_key: str


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
          issuer_key: ec.EllipticCurvePrivateKey, *, ca: bool = False,
          server: bool = False) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(name if issuer is None else issuer.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> str:
        path = folder / name
        path.write_bytes(data)
        return str(path)

    def pem(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key, other_key = _key(), _key()
    ca = _cert("gradserve test CA", ca_key, None, ca_key, ca=True)
    other = _cert("another CA", other_key, None, other_key, ca=True)
    keys = {name: _key() for name in ("server", "client", "stranger")}
    certs = {"server": _cert("127.0.0.1", keys["server"], ca, ca_key, server=True),
             "client": _cert("a client", keys["client"], ca, ca_key),
             "stranger": _cert("a stranger", keys["stranger"], other, other_key)}
    out = {"ca": write("ca.pem", ca.public_bytes(serialization.Encoding.PEM))}
    for name, key in keys.items():
        out[f"{name}_cert"] = write(f"{name}.pem",
                                    certs[name].public_bytes(serialization.Encoding.PEM))
        out[f"{name}_key"] = write(f"{name}.key", pem(key))
    return Pki(**out)


def compute(server: GradServer, credentials: Credentials) -> float:
    with GradientClient(server.target, timeout=5, credentials=credentials) as client:
        return float(client.compute(seed_loss(), SEED).gradients["a"])


def refused(server: GradServer, credentials: Credentials) -> grpc.StatusCode:
    with pytest.raises(GradserveError) as caught:
        compute(server, credentials)
    return caught.value.code


def test_tls_serves_clients_that_trust_its_ca_only(start_server: StartServer, pki: Pki) -> None:
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key)
    assert compute(server, Credentials(ca=pki.ca)) == 4.0
    assert refused(server, Credentials()) is grpc.StatusCode.UNAVAILABLE  # plaintext
    assert refused(server, Credentials(ca=pki.stranger_cert)) is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_demands_a_client_certificate_from_its_ca(start_server: StartServer,
                                                            pki: Pki) -> None:
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key,
                          tls_client_ca=pki.ca)
    mine = Credentials(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
    assert compute(server, mine) == 4.0
    for wrong in (Credentials(ca=pki.ca),
                  Credentials(ca=pki.ca, cert=pki.stranger_cert, key=pki.stranger_key)):
        assert refused(server, wrong) is grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("given", ["variable", "file"])
def test_bearer_tokens_are_required_but_not_for_health(start_server: StartServer,
                                                       tmp_path: Path, given: str) -> None:
    if given == "file":
        tokens = tmp_path / "tokens"
        tokens.write_text("alpha\n\nbeta\n")
        server = start_server(auth_token_file=str(tokens))
    else:
        server = start_server(auth_tokens="alpha, beta")
    assert compute(server, Credentials(token="beta")) == 4.0
    for wrong in (None, "gamma", "bet", "betaa", ""):
        assert refused(server, Credentials(token=wrong)) is grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(server.target) as channel:
        assert health_check(channel) == SERVING
        unauthorized: grpc.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/gradserve.v1.GradientService/ListOps")
        with pytest.raises(grpc.RpcError) as caught:
            unauthorized(b"", timeout=5, metadata=(("authorization", "Basic beta"),))
        assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_a_stream_needs_the_token_too(start_server: StartServer) -> None:
    server = start_server(auth_tokens="alpha")
    with GradientClient(server.target, timeout=5) as client, pytest.raises(GradserveError) as e:
        list(client.compute_many(seed_loss(), [SEED, SEED]))
    assert e.value.code is grpc.StatusCode.UNAUTHENTICATED
    with GradientClient(server.target, timeout=5,
                        credentials=Credentials(token="alpha")) as client:
        answers = list(client.compute_many(seed_loss(), [SEED, SEED]))
    assert [float(a.gradients["a"]) for a in answers if isinstance(a, Gradients)] == [4.0, 4.0]


def test_the_cli_takes_the_same_credentials(start_server: StartServer, pki: Pki,
                                            capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    server = start_server(tls_cert=pki.server_cert, tls_key=pki.server_key,
                          tls_client_ca=pki.ca, auth_tokens="alpha")
    tls = ["--target", server.target, "--tls-ca", pki.ca, "--tls-cert", pki.client_cert,
           "--tls-key", pki.client_key]
    assert main(["health", *tls]) == 0
    monkeypatch.setenv("GRADSERVE_TOKEN", "alpha")
    assert main(["grad", "L = (a*b + c) * f", "a=3", "b=-2", "c=8", "f=-2", "--json", *tls]) == 0
    assert '"a": 4.0' in capsys.readouterr().out
    assert main(["loadtest", "-n", "10", "--workload", "quadratic", "--format", "json",
                "--verify", "1", *tls]) == 0
    assert '"wrong": 0' in capsys.readouterr().out
