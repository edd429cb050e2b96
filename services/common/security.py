"""TLS and the shared bearer token, for servers and clients.

Services bind to loopback by default and then need neither. Exposed on a network they take
``--tls-cert``/``--tls-key`` (server TLS), plus ``--tls-client-ca`` (mutual TLS: clients must present
a certificate signed by that CA) and ``--token-file`` (or ``ILLUSION_TOKEN``): every call must carry
the metadata ``authorization: Bearer TOKEN``. The health service stays open without the token, so
that load balancers and Kubernetes probes can ask it; it still needs TLS when the server has TLS.

Files are read once at the command-line edge (``read_pem``, ``read_token``); what is read goes into
the frozen configs, so nothing deeper touches the filesystem or the environment.
"""

from __future__ import annotations

import argparse
import hmac
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

logger = logging.getLogger(__name__)

TOKEN_ENV = "ILLUSION_TOKEN"
AUTH_HEADER = "authorization"
# Methods anyone may call without the token: the health check (load balancers, Kubernetes
# probes). Not the health Watch stream: each open stream holds one of the server's threads.
OPEN_METHODS = frozenset({"/grpc.health.v1.Health/Check"})


class SecurityConfigError(ValueError):
    """A TLS or token option that cannot work; the message names the option and the fix."""


def read_pem(path: str | Path | None, option: str) -> bytes | None:
    """The bytes of a PEM file named by ``option`` (e.g. ``--tls-cert``), or None without a path.

    Raises SecurityConfigError with one line naming the option and the file when it is missing,
    unreadable or not PEM.
    """
    if path is None:
        return None
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise SecurityConfigError(f"{option} {path}: no such file") from None
    except OSError as exc:
        raise SecurityConfigError(f"{option} {path} cannot be read: {exc.strerror or exc}") from None
    if b"-----BEGIN " not in data:
        raise SecurityConfigError(f"{option} {path} is not a PEM file (no '-----BEGIN' line)")
    return data


def check_key_pair(cert: str | Path, key: str | Path, cert_option: str = "--tls-cert",
                   key_option: str = "--tls-key") -> None:
    """Raise SecurityConfigError (one line) unless ``cert`` is a certificate chain and ``key``
    its unencrypted private key. gRPC would only say that it failed to bind the port."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(str(cert), str(key), password=b"")
    except ssl.SSLError as exc:
        raise SecurityConfigError(
            f"{cert_option} {cert} and {key_option} {key} are not a certificate and its "
            f"unencrypted private key ({exc.reason or exc}): check that they belong together"
        ) from None


def check_ca(path: str | Path, option: str) -> None:
    """Raise SecurityConfigError (one line) unless ``path`` holds CA certificates."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError as exc:
        raise SecurityConfigError(f"{option} {path} holds no usable CA certificate "
                                  f"({exc.reason or exc})") from None


def read_token(path: str | Path | None, environ: dict[str, str]) -> str | None:
    """The bearer token from ``--token-file PATH``, else from ``ILLUSION_TOKEN``, else None.

    Surrounding whitespace (a trailing newline) is dropped. ``environ`` is passed in by the CLI, the
    only place that reads the environment.
    """
    if path is not None:
        try:
            token = Path(path).read_text().strip()
        except FileNotFoundError:
            raise SecurityConfigError(f"--token-file {path}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SecurityConfigError(f"--token-file {path} cannot be read: {exc}") from None
        if not token:
            raise SecurityConfigError(f"--token-file {path} is empty: put the shared token in it")
        source = f"--token-file {path}"
    else:
        token = environ.get(TOKEN_ENV, "").strip()
        if not token:
            return None
        source = TOKEN_ENV
    if any(c.isspace() or not c.isprintable() for c in token):
        raise SecurityConfigError(f"the token from {source} contains spaces or control characters: "
                                  "use one word, e.g. the output of `openssl rand -hex 32`")
    return token


# ------------------------------------------------------------------------------------- server


@dataclass(frozen=True)
class ServerSecurity:
    """What a server needs for TLS and the token (PEM bytes as read at the edge)."""

    cert: bytes | None = field(default=None, repr=False)  # server certificate chain
    key: bytes | None = field(default=None, repr=False)  # its private key
    client_ca: bytes | None = field(default=None, repr=False)  # set: mutual TLS with this CA
    token: str | None = field(default=None, repr=False)  # set: calls need "Bearer TOKEN"

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("give --tls-cert and --tls-key together (or neither)")
        if self.client_ca is not None and self.cert is None:
            raise SecurityConfigError(
                "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first"
            )

    @property
    def tls(self) -> bool:
        return self.cert is not None

    def describe(self) -> str:
        """``plaintext`` | ``TLS`` | ``mutual TLS``, plus ``+ token``: for logs."""
        text = "mutual TLS" if self.client_ca else "TLS" if self.tls else "plaintext"
        return text + (" + token" if self.token else "")

    def credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials, or None for a plaintext port."""
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        return [TokenInterceptor(self.token)] if self.token else []


def _refusal(handler: grpc.RpcMethodHandler | None,
             abort: Callable[[Any, grpc.ServicerContext], Any]) -> grpc.RpcMethodHandler | None:
    """A handler of the same kind (unary/streaming) as ``handler`` that only runs ``abort``."""
    if handler is None:
        return None
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(abort)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call without ``authorization: Bearer TOKEN`` with UNAUTHENTICATED.

    The comparison takes the same time wherever the tokens differ (``hmac.compare_digest``). Health
    checks (``OPEN_METHODS``) pass without a token.
    """

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> bool:
        values = [v for k, v in (metadata or ()) if k == AUTH_HEADER]
        if len(values) != 1:
            return False
        value = values[0]
        given = value if isinstance(value, bytes) else value.encode("utf-8", "replace")
        return hmac.compare_digest(given, self._expected)

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        if details.method in OPEN_METHODS or self._authorized(details.invocation_metadata):
            return continuation(details)
        method = details.method
        has_header = any(k == AUTH_HEADER for k, _ in details.invocation_metadata or ())

        def abort(request: Any, context: grpc.ServicerContext) -> Any:
            logger.warning("%s refused: %s bearer token", method, "wrong" if has_header else "no")
            context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "wrong bearer token: give the server's token with --token-file or ILLUSION_TOKEN"
                if has_header else
                "this server needs a bearer token: give it with --token-file or ILLUSION_TOKEN",
            )

        return _refusal(continuation(details), abort)


# ------------------------------------------------------------------------------------- client


@dataclass(frozen=True)
class ClientSecurity:
    """How a client dials the services: TLS trust, an optional client certificate, the token."""

    ca: bytes | None = field(default=None, repr=False)  # set: TLS, trusting this CA
    cert: bytes | None = field(default=None, repr=False)  # client certificate (mutual TLS)
    key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    server_name: str | None = None  # check the server certificate against this name

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("give --tls-cert and --tls-key together (or neither)")
        if self.cert is not None and self.ca is None:
            raise SecurityConfigError("--tls-cert/--tls-key need --tls-ca (the CA that signed the "
                                      "servers' certificates)")
        if self.server_name is not None and self.ca is None:
            raise SecurityConfigError("--tls-server-name needs --tls-ca")

    @property
    def tls(self) -> bool:
        return self.ca is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata to send with every call."""
        return ((AUTH_HEADER, f"Bearer {self.token}"),) if self.token else ()


def add_client_options(parser: argparse.ArgumentParser, token_help: str) -> None:
    """The TLS and token options of a client (``illusion generate``, the health probe)."""
    parser.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                        help="the services use TLS: trust this CA (without it: plaintext)")
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                        help="client certificate, for services started with --tls-client-ca")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                        help="key of --tls-cert")
    parser.add_argument("--tls-server-name", default=None, metavar="NAME",
                        help="check the services' certificate against this name (default: the "
                             "host of each address), e.g. localhost when calling 127.0.0.1")
    parser.add_argument("--token-file", type=Path, default=None, metavar="PATH", help=token_help)


def add_server_options(parser: argparse.ArgumentParser, token_help: str) -> None:
    """The TLS and token options of a service (``illusion serve``)."""
    parser.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                        help="serve TLS with this certificate (chain), PEM")
    parser.add_argument("--tls-key", type=Path, default=None, metavar="PEM",
                        help="private key of --tls-cert, PEM")
    parser.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                        help="mutual TLS: clients must present a certificate signed by this CA")
    parser.add_argument("--token-file", type=Path, default=None, metavar="PATH", help=token_help)
