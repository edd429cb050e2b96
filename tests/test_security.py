"""TLS (server and mutual) and the shared bearer token: the right clients get in, the others are
refused with a clear error. Certificates are made at test time with ``cryptography``."""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from orchestrator.cli import main as cli_main
from orchestrator.client import CascadeClient, ServiceError, open_channel
from services.common.security import (
    ClientSecurity,
    SecurityConfigError,
    ServerSecurity,
    read_pem,
    read_token,
)
from services.common.server import Admission, ModelHandle, ServerConfig, serve
from services.encoder.server import EncoderServicer

x509 = pytest.importorskip("cryptography.x509")
from cryptography.hazmat.primitives import hashes, serialization  # noqa: E402
from cryptography.hazmat.primitives.asymmetric import ec  # noqa: E402
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID  # noqa: E402

TOKEN = "0123456789abcdef-shared"


# ------------------------------------------------------------------------------ certificates


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(common_name: str) -> tuple[Pem, ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name))
            .issuer_name(_name(common_name)).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def make_leaf(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str,
              server: bool) -> Pem:
    """A certificate signed by the CA: for a server (localhost, 127.0.0.1) or a client."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Pki:
    ca: Pem
    server: Pem
    client: Pem
    other_ca: Pem  # a CA nobody here trusts
    other_server: Pem  # a server certificate from it
    other_client: Pem  # a client certificate from it


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca, ca_key, ca_cert = make_ca("test CA")
    other, other_key, other_cert = make_ca("another CA")
    return Pki(ca, make_leaf(ca_key, ca_cert, "services", server=True),
               make_leaf(ca_key, ca_cert, "client", server=False), other,
               make_leaf(other_key, other_cert, "services", server=True),
               make_leaf(other_key, other_cert, "client", server=False))


# --------------------------------------------------------------------------------- a server


class _FakeT5:
    """Stands in for the T5 encoder: the tests are about the transport, not the model."""

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones(len(prompts), 77, 4), torch.zeros(1, 77, 4)


@contextmanager
def encoder_server(security: ServerSecurity) -> Iterator[str]:
    """The encoder's servicer under the real ``serve`` (TLS, token, health), on a loopback port."""
    config = ServerConfig(service="encoder", model="fake", grace_s=0.5, security=security)
    handle: ModelHandle[_FakeT5] = ModelHandle("encoder")
    servicer = EncoderServicer(handle, Admission(1, 4))  # type: ignore[arg-type]
    stop, ready = threading.Event(), threading.Event()
    address: list[str] = []

    def load() -> pb.ModelInfo:
        handle.set(_FakeT5(), pb.ModelInfo(service="encoder", model="fake"))
        return handle.info

    def on_ready(line: str) -> None:
        address.append(line.rsplit(" ", 1)[-1])
        ready.set()

    thread = threading.Thread(
        target=serve, daemon=True,
        args=(config, lambda s: pb_grpc.add_EncoderServicer_to_server(servicer, s), load,
              on_ready, stop))
    thread.start()
    assert ready.wait(30), "server did not start"
    try:
        yield address[0]
    finally:
        stop.set()
        thread.join(10)


def encode_with(address: str, security: ClientSecurity) -> torch.Tensor:
    """One Encode call as ``illusion generate`` makes it (same channel, metadata and errors)."""
    with CascadeClient(address, address, address, timeout=5, retry_timeout=1,
                       security=security) as client:
        return client.encode(["a waterfall"])[0]


def refused(address: str, security: ClientSecurity) -> ServiceError:
    with pytest.raises(ServiceError) as info:
        encode_with(address, security)
    assert f"encoder at {address}" in str(info.value)
    return info.value


def health_status(address: str, security: ClientSecurity) -> int:
    with open_channel(address, security) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="anagram.v1.Encoder"), timeout=5).status


# ------------------------------------------------------------------------------------ tests


def test_mutual_tls_and_token(pki):
    security = ServerSecurity(cert=pki.server.cert, key=pki.server.key, client_ca=pki.ca.cert,
                              token=TOKEN)
    good = ClientSecurity(ca=pki.ca.cert, cert=pki.client.cert, key=pki.client.key, token=TOKEN)
    with encoder_server(security) as address:
        assert encode_with(address, good).shape == (1, 77, 4)
        # Through localhost too: the certificate names both.
        port = address.rsplit(":", 1)[1]
        assert encode_with(f"localhost:{port}", good).shape == (1, 77, 4)

        no_token = refused(address, ClientSecurity(ca=pki.ca.cert, cert=pki.client.cert,
                                                   key=pki.client.key))
        assert no_token.code == grpc.StatusCode.UNAUTHENTICATED
        assert "needs a bearer token" in str(no_token) and "--token-file" in str(no_token)
        wrong = refused(address, ClientSecurity(ca=pki.ca.cert, cert=pki.client.cert,
                                                key=pki.client.key, token=TOKEN + "x"))
        assert wrong.code == grpc.StatusCode.UNAUTHENTICATED and "wrong bearer token" in str(wrong)

        # Without a client certificate, with one from another CA, trusting another CA, plaintext:
        # the handshake fails, whatever the token.
        for bad in (ClientSecurity(ca=pki.ca.cert, token=TOKEN),
                    ClientSecurity(ca=pki.ca.cert, cert=pki.other_client.cert,
                                   key=pki.other_client.key, token=TOKEN),
                    ClientSecurity(ca=pki.other_ca.cert, cert=pki.client.cert,
                                   key=pki.client.key, token=TOKEN),
                    ClientSecurity(token=TOKEN)):
            error = refused(address, bad)
            assert error.code == grpc.StatusCode.UNAVAILABLE, error

        # Health stays open without the token (probes), but not without TLS.
        assert health_status(address, ClientSecurity(ca=pki.ca.cert, cert=pki.client.cert,
                                                     key=pki.client.key)) == 1  # SERVING
        # The server keeps serving the right client after all those refusals.
        assert encode_with(address, good).shape == (1, 77, 4)


def test_health_watch_needs_the_token_and_streams_beyond_the_threads_are_refused():
    """Anyone may call the health Check (probes), but a Watch stream holds one of the server's
    threads for as long as it is open: it needs the token, and calls beyond the server's threads
    are refused at once (RESOURCE_EXHAUSTED) instead of waiting behind the streams with no bound
    (before, 17 open streams made every later call, Check included, time out). The `illusion`
    client takes that refusal as overload: it tries again, and the call goes through once a
    thread is free."""
    config = ServerConfig(service="encoder", model="fake")
    threads = config.max_concurrent + config.max_queue + 8  # what serve gives the server
    request = health_pb2.HealthCheckRequest(service="anagram.v1.Encoder")
    with encoder_server(ServerSecurity(token=TOKEN)) as address:
        with open_channel(address, ClientSecurity()) as channel:
            stranger = health_pb2_grpc.HealthStub(channel)
            assert stranger.Check(request, timeout=5).status == 1  # SERVING, no token needed
            with pytest.raises(grpc.RpcError) as info:
                next(stranger.Watch(request, timeout=5))
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = ClientSecurity(token=TOKEN).metadata()
        with open_channel(address, ClientSecurity(token=TOKEN)) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            streams = [stub.Watch(request, timeout=60, metadata=token) for _ in range(threads)]
            for stream in streams:
                assert next(stream).status == 1  # open, each holding a thread
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(request, timeout=20)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert time.monotonic() - started < 10
            # The streams end a second from now; meanwhile the client's call is refused, waits
            # and tries again.
            threading.Timer(1.0, lambda: [stream.cancel() for stream in streams]).start()
            with CascadeClient(address, address, address, timeout=10, retry_timeout=30,
                               security=ClientSecurity(token=TOKEN)) as client:
                started = time.monotonic()
                client.services["encoder"].check(30)  # the first health check waits too
                assert client.encode(["a waterfall"])[0].shape == (1, 77, 4)
            assert time.monotonic() - started >= 0.9


def test_server_tls_without_client_certificates(pki):
    with encoder_server(ServerSecurity(cert=pki.server.cert, key=pki.server.key)) as address:
        assert encode_with(address, ClientSecurity(ca=pki.ca.cert)).shape == (1, 77, 4)
        error = refused(address, ClientSecurity(ca=pki.other_ca.cert))
        assert "TLS handshake failed" in str(error) and "--tls-ca" in str(error)
        refused(address, ClientSecurity())  # plaintext against TLS


def test_server_with_a_certificate_of_another_ca_is_refused(pki):
    server = ServerSecurity(cert=pki.other_server.cert, key=pki.other_server.key)
    with encoder_server(server) as address:
        error = refused(address, ClientSecurity(ca=pki.ca.cert))
        assert error.code == grpc.StatusCode.UNAVAILABLE


def test_token_without_tls_and_plaintext_default():
    with encoder_server(ServerSecurity(token=TOKEN)) as address:
        assert encode_with(address, ClientSecurity(token=TOKEN)).shape == (1, 77, 4)
        assert refused(address, ClientSecurity()).code == grpc.StatusCode.UNAUTHENTICATED
    with encoder_server(ServerSecurity()) as address:  # the default: plaintext, no token
        assert encode_with(address, ClientSecurity()).shape == (1, 77, 4)


def test_reading_files_and_tokens(tmp_path, pki):
    pem = tmp_path / "ca.pem"
    pem.write_bytes(pki.ca.cert)
    assert read_pem(pem, "--tls-ca") == pki.ca.cert
    with pytest.raises(SecurityConfigError, match=r"--tls-cert .*missing\.pem: no such file"):
        read_pem(tmp_path / "missing.pem", "--tls-cert")
    (tmp_path / "junk.pem").write_text("hello")
    with pytest.raises(SecurityConfigError, match="not a PEM file"):
        read_pem(tmp_path / "junk.pem", "--tls-key")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert read_token(token, {"ILLUSION_TOKEN": "env"}) == "s3cret"  # the file wins
    assert read_token(None, {"ILLUSION_TOKEN": " env "}) == "env"
    assert read_token(None, {}) is None
    token.write_text("\n")
    with pytest.raises(SecurityConfigError, match="is empty"):
        read_token(token, {})
    with pytest.raises(SecurityConfigError, match="together"):
        ServerSecurity(cert=pki.server.cert)
    with pytest.raises(SecurityConfigError, match="needs --tls-cert"):
        ServerSecurity(client_ca=pki.ca.cert)
    with pytest.raises(SecurityConfigError, match="need --tls-ca"):
        ClientSecurity(cert=pki.client.cert, key=pki.client.key)


def test_cli_errors_for_tls_files_are_one_line(tmp_path, capsys, pki):
    missing = tmp_path / "nope.pem"
    for name, data in (("cert.pem", pki.server.cert), ("other.key", pki.client.key),
                       ("ca.pem", pki.ca.cert)):
        (tmp_path / name).write_bytes(data)
    code = cli_main(["serve", "stage1", "--model", "x", "--tls-cert", str(tmp_path / "cert.pem"),
                     "--tls-key", str(tmp_path / "other.key")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "belong together" in err[0], err
    code = cli_main(["generate", "--prompts", "a", "b", "--views", "identity", "flip",
                     "--encoder", "127.0.0.1:9", "--stage1", "127.0.0.1:9", "--stage2",
                     "127.0.0.1:9", "--tls-ca", str(tmp_path / "other.key"),
                     "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no usable CA certificate" in err[0], err
    code = cli_main(["serve", "stage1", "--model", "x", "--tls-cert", str(missing),
                     "--tls-key", str(missing)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --tls-cert {missing}: no such file"]
    code = cli_main(["generate", "--prompts", "a", "b", "--views", "identity", "flip",
                     "--encoder", "127.0.0.1:9", "--stage1", "127.0.0.1:9", "--stage2",
                     "127.0.0.1:9", "--tls-ca", str(missing), "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [f"error: --tls-ca {missing}: no such file"]
    code = cli_main(["generate", "--prompts", "a", "b", "--views", "identity", "flip",
                     "--token-file", str(missing), "--save-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "only apply to remote services" in err[-1] and len(err) == 1
