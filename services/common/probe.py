"""A health probe for containers: ``python -m services.common.probe HOST:PORT [--service NAME]``.

Asks the standard ``grpc.health.v1`` health service of a running server and exits 0 only when it
answers SERVING. Anything else (NOT_SERVING while the model loads or the server drains, an unknown
service name, no answer within the timeout, a refused connection, a TLS or token mismatch) exits 1
with one line on stdout saying why, which Docker keeps in ``docker inspect`` and Kubernetes in the
pod's events.

It stands in for ``grpc_health_probe`` where that binary cannot be fetched, and, unlike Kubernetes'
native ``grpc:`` probe, it speaks TLS: ``--tls-ca`` (plus ``--tls-cert``/``--tls-key`` when the
server asks for client certificates) and ``--token-file`` as the ``illusion generate`` client does.

Service names: ``""`` is the whole server; ``anagram.v1.Encoder``, ``anagram.v1.Stage1`` and
``anagram.v1.Stage2`` are the services the servers register. Both turn SERVING together once the
model is loaded and warmed up, and NOT_SERVING when the server starts draining.

Only grpc is imported (no torch), so a probe costs a fraction of a second of CPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence

# gRPC's C core would log its own lines (a CA it cannot load, say) beside the probe's one line.
# It reads this once, when grpc is first imported.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from services.common.security import (  # noqa: E402
    add_client_options,
    check_ca,
    check_key_pair,
    read_pem,
    read_token,
)

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.common.probe",
        description="Exit 0 when the gRPC health service at ADDRESS reports SERVING, else 1.",
    )
    parser.add_argument("address", metavar="HOST:PORT", help="server to ask, e.g. 127.0.0.1:50052")
    parser.add_argument("--service", default="", metavar="NAME",
                        help='service name to ask about ("" = the whole server, the default; '
                             "e.g. anagram.v1.Stage2)")
    parser.add_argument("--timeout", type=float, default=5.0, metavar="S",
                        help="seconds to wait for an answer (default 5)")
    add_client_options(parser, "send the bearer token in this file, as the clients do")
    return parser


def _channel(args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        if args.tls_cert or args.tls_key or args.tls_server_name:
            raise ValueError("--tls-cert, --tls-key and --tls-server-name need --tls-ca")
        return grpc.insecure_channel(args.address)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("give --tls-cert and --tls-key together (or neither)")
    ca = read_pem(args.tls_ca, "--tls-ca")
    check_ca(args.tls_ca, "--tls-ca")
    key, chain = read_pem(args.tls_key, "--tls-key"), read_pem(args.tls_cert, "--tls-cert")
    if args.tls_cert is not None:
        check_key_pair(args.tls_cert, args.tls_key)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                               certificate_chain=chain)
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(args.address, credentials, options=options)


def check(args: argparse.Namespace) -> tuple[int, str]:
    """Ask once. Returns (exit code, one line saying what was found)."""
    if not (math.isfinite(args.timeout) and args.timeout > 0):
        raise ValueError(f"--timeout {args.timeout}: use seconds > 0")
    metadata = None
    if args.token_file is not None:
        token = read_token(args.token_file, {})
        if not token:
            raise ValueError(f"--token-file {args.token_file} is empty")
        metadata = (("authorization", f"Bearer {token}"),)
    what = f"{args.address} service {args.service!r}"
    with _channel(args) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=args.service),
                               timeout=args.timeout, metadata=metadata)
        except grpc.RpcError as exc:
            code = exc.code() if isinstance(exc, grpc.Call) else None
            name = code.name if code is not None else "ERROR"
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            return EXIT_NOT_SERVING, f"{what}: {name}: {detail}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return EXIT_SERVING, f"{what}: {status}"
    return EXIT_NOT_SERVING, f"{what}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # Docker reserves exit code 2: a usage error is "unhealthy" too
        return EXIT_SERVING if exc.code == 0 else EXIT_NOT_SERVING
    try:
        code, line = check(args)
    except (OSError, ValueError) as exc:  # unreadable TLS or token files, bad combinations
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NOT_SERVING
    print(line)
    return code


if __name__ == "__main__":
    sys.exit(main())
