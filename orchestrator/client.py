"""Clients of the three services. Every ``grpc.RpcError`` becomes one :class:`ServiceError` whose
message names the service and its address ("stage2 at 10.0.0.7:50052 is unavailable ...").
"""

from __future__ import annotations

import ipaddress
import json
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import torch
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from services.common import codec
from services.common.errors import RETRY_AFTER_KEY
from services.common.security import ClientSecurity
from services.common.server import (
    GRPC_OPTIONS,
    KEEPALIVE_S,
    MAX_MESSAGE_BYTES,
    MODEL_KEY,
    SAME_MODEL_FIELDS,
    SERVICE_NAMES,
)

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
T = TypeVar("T")


class ServiceError(RuntimeError):
    """A service could not be reached or refused a call; the message is meant for the user."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.code = code


def grpc_target(addresses: str) -> str:
    """``host:port`` | ``host:port,host:port`` | ``dns:///name:port`` -> a gRPC target.

    Several addresses become one ``ipv4:``/``ipv6:`` target that gRPC's ``round_robin`` policy
    balances over; a ``dns:///`` name is passed through (every address it resolves to is used).
    """
    addresses = addresses.strip()
    if "://" in addresses or addresses.startswith(("ipv4:", "ipv6:", "unix:")):
        return addresses
    parts = [a.strip() for a in addresses.split(",") if a.strip()]
    if not parts:
        raise ValueError("empty service address: use host:port")
    hosts = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit() or not host.strip("[]"):
            raise ValueError(f"address {part!r} is not host:port: give e.g. 10.0.0.7:50052")
        if not 1 <= int(port) <= 65535:
            raise ValueError(f"address {part!r}: the port must be 1 .. 65535")
        if len(parts) == 1:
            return part
        host = host.strip("[]")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"replica list {addresses!r}: {host!r} is not an IP address; give IPs, or one "
                "dns:///name:port target whose name resolves to every replica"
            ) from None
        hosts.append((ip, int(port)))
    if all(ip.version == 4 for ip, _ in hosts):
        return "ipv4:" + ",".join(f"{ip}:{port}" for ip, port in hosts)
    if all(ip.version == 6 for ip, _ in hosts):
        return "ipv6:" + ",".join(f"[{ip}]:{port}" for ip, port in hosts)
    raise ValueError(f"replica list {addresses!r} mixes IPv4 and IPv6 addresses")


# Reconnect quickly once a replica is back (gRPC's default backoff grows to 120 s between tries),
# and ping during calls so that a replica whose host vanished (no TCP reset) fails the call in
# about 2 x KEEPALIVE_S seconds, when it is retried elsewhere, instead of at the deadline.
RECONNECT_OPTIONS: list[tuple[str, int]] = [
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", KEEPALIVE_S * 1000),
    ("grpc.keepalive_timeout_ms", KEEPALIVE_S * 1000),
    ("grpc.http2.max_pings_without_data", 0),
]


def _first_host(target: str) -> str:
    """The host of the first address of a gRPC target (``ipv4:a:1,b:2`` -> ``a``)."""
    rest = target.split(":", 1)[1] if target.startswith(("ipv4:", "ipv6:")) else target
    first = rest.removeprefix("dns:///").split(",")[0]
    host = first.rpartition(":")[0] if first.count(":") == 1 or first.startswith("[") else first
    return host.strip("[]")


def open_channel(addresses: str, security: ClientSecurity | None = None) -> grpc.Channel:
    """A channel with raised message limits and ``round_robin`` over all replicas.

    With ``security.ca`` the channel speaks TLS (presenting ``security.cert`` when set). The
    server certificate is checked against ``security.server_name``, else the target's host (for a
    replica list: the first address's, since every replica carries the same certificate).
    """
    service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    target = grpc_target(addresses)
    options: list[tuple[str, object]] = [*GRPC_OPTIONS, *RECONNECT_OPTIONS,
                                         ("grpc.service_config", service_config)]
    credentials = security.credentials() if security is not None else None
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    name = security.server_name if security is not None else None
    if name is None and target.startswith(("ipv4:", "ipv6:")):
        name = _first_host(target)
    if name:
        options.append(("grpc.ssl_target_name_override", name))
    return grpc.secure_channel(target, credentials, options=options)


def _is_tls_failure(details: str) -> bool:
    lowered = details.lower()
    return any(word in lowered for word in ("ssl", "tls", "handshake", "certificate"))


def _translate(service: str, address: str, error: grpc.RpcError, timeout: float | None
               ) -> ServiceError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    where = f"{service} at {address}"
    if code == grpc.StatusCode.UNAVAILABLE and _is_tls_failure(details):
        text = (f"{where}: the TLS handshake failed ({details}): check --tls-ca (the CA that signed "
                "the server's certificate) and, for mutual TLS, --tls-cert/--tls-key")
    elif code == grpc.StatusCode.UNAVAILABLE:
        text = f"{where} is unavailable ({details}): check that it is running and reachable"
    elif code == grpc.StatusCode.UNAUTHENTICATED:
        text = f"{where} refused the call: {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = f"{where} did not finish within {timeout:.0f} s: raise --timeout or check the service"
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        text = f"{where} rejected the request: {details}"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in details:
        text = (f"{where}: a message is larger than the {MAX_MESSAGE_BYTES // 2**20} MiB gRPC "
                f"allows ({details}): send less at once")
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        text = f"{where} is overloaded: {details}"
    elif code == grpc.StatusCode.CANCELLED:
        text = f"{where}: call cancelled ({details})"
    else:
        name = code.name if code is not None else "error"
        text = f"{where} failed ({name}): {details}"
    return ServiceError(text, code)


# gRPC's own refusal (RESOURCE_EXHAUSTED, without a retry hint) of a call beyond the server's
# threads (``maximum_concurrent_rpcs``): overload, like a full queue.
GRPC_RPC_LIMIT = "Concurrent RPC limit exceeded"


def _server_busy(error: grpc.RpcError) -> bool:
    return (error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and GRPC_RPC_LIMIT in (error.details() or ""))


DEFAULT_RETRY_TIMEOUT = 120.0  # seconds to wait for a lost service to come back
MIN_FIRST_ANSWER_S = 10.0  # how long the first health check waits for any answer
MAX_ATTEMPTS = 5  # tries of one call that keeps losing its replica
MAX_OVERLOAD_DELAY = 10.0  # longest single back-off after RESOURCE_EXHAUSTED, seconds


class _BrokenStream(Exception):
    """The stream ended without a result (the replica went away): retried like UNAVAILABLE."""


def retry_after(error: grpc.RpcError) -> float | None:
    """The server's ``retry-after-ms`` hint of a RESOURCE_EXHAUSTED error, in seconds, or None."""
    trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value) / 1000)
            except ValueError:
                return None
    return None


@dataclass
class _Service:
    name: str  # encoder | stage1 | stage2
    address: str
    channel: grpc.Channel
    metadata: tuple[tuple[str, str], ...] = ()
    # Why the service cannot come back (a local service whose process has exited), or None.
    gone: Callable[[str], str | None] | None = None

    def check(self, timeout: float) -> None:
        """Wait until the service answers SERVING: up to ``timeout`` seconds while it is up but
        still loading its model, and up to ``MIN_FIRST_ANSWER_S`` of those (at least one) for a
        first answer at all (a service just started, a slow network).

        A server there that is another service is named at once.
        """
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[self.name])
        connect = min(max(timeout, 1.0), MIN_FIRST_ANSWER_S)
        deadline = time.monotonic() + max(timeout, connect)
        call_timeout, waiting_logged = connect, False
        while True:
            try:
                reply = stub.Check(request, timeout=call_timeout, wait_for_ready=True,
                                   metadata=self.metadata)
            except grpc.RpcError as err:
                if not (_server_busy(err) and time.monotonic() < deadline):
                    raise self._first_answer_error(err, connect) from None
                time.sleep(0.5)  # every thread of the server is busy: it answers, just not now
                continue
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return
            if time.monotonic() >= deadline:
                raise ServiceError(
                    f"{self.name} at {self.address} is still loading its model after "
                    f"{max(timeout, connect):.0f} s: wait for its `serving ...` line, or raise "
                    "--retry-timeout",
                    grpc.StatusCode.UNAVAILABLE,
                )
            if not waiting_logged:
                logger.warning("%s at %s is loading its model; waiting up to %.0f s "
                               "(--retry-timeout)", self.name, self.address, max(timeout, connect))
                waiting_logged = True
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
            call_timeout = 30.0  # it answered once: a later answer is a matter of moments

    def _first_answer_error(self, err: grpc.RpcError, waited: float) -> ServiceError:
        code = err.code()
        if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNIMPLEMENTED):
            return self._wrong_service(code)
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return ServiceError(
                f"{self.name} at {self.address} does not answer (waited {waited:.0f} s): check the "
                "address, that the service is running and, with TLS, --tls-ca and the client "
                "certificate", code)
        return _translate(self.name, self.address, err, waited)

    def _wrong_service(self, code: grpc.StatusCode) -> ServiceError:
        """The server at the address has no ``self.name`` service: name the one it has."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        found = None
        for kind, service in SERVICE_NAMES.items():
            try:
                stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5.0,
                           metadata=self.metadata)
            except grpc.RpcError:
                continue
            found = kind
            break
        flag = f"--{self.name}"
        if found is not None:
            return ServiceError(f"{self.name} at {self.address} answers as the {found} service, "
                                f"not as {self.name}: check {flag} (and --{found})", code)
        return ServiceError(f"{self.name} at {self.address} is a gRPC server but not an illusion "
                            f"{self.name} service: check {flag}", code)

    def wait_until_serving(self, budget: float, lost: str) -> None:
        """Wait up to ``budget`` seconds until some replica answers SERVING.

        ``lost`` describes what went wrong, for the error raised when none comes back in time.
        """
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[self.name])
        deadline = time.monotonic() + budget
        while (remaining := deadline - time.monotonic()) > 0:
            if self.gone is not None and (why := self.gone(self.name)) is not None:
                raise ServiceError(f"{self.name} at {self.address} is gone ({lost}): {why}",
                                   grpc.StatusCode.UNAVAILABLE)
            try:  # in steps of a second when it may turn out to be gone meanwhile
                reply = stub.Check(request, wait_for_ready=True, metadata=self.metadata,
                                   timeout=remaining if self.gone is None else min(remaining, 1.0))
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as err:
                if err.code() not in (grpc.StatusCode.UNAVAILABLE,
                                      grpc.StatusCode.DEADLINE_EXCEEDED) and not _server_busy(err):
                    raise _translate(self.name, self.address, err, budget) from None
            time.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
        raise ServiceError(
            f"{self.name} at {self.address} is unavailable ({lost}) and did not come back within "
            f"{budget:.0f} s (--retry-timeout): check that it is running and reachable, and "
            "with TLS, --tls-ca and the client certificate",
            grpc.StatusCode.UNAVAILABLE,
        )


class CascadeClient:
    """Talks to the encoder, stage-1 and stage-2 services.

    Calls that fail because a replica is gone (UNAVAILABLE, or a stream that breaks off) are tried
    again, up to ``MAX_ATTEMPTS`` times: first the client waits (``wait_for_ready``, at most
    ``retry_timeout`` seconds) until a replica reports SERVING, so with several replicas the retry
    lands on a live one and with one it waits for it to come back. Calls refused with
    RESOURCE_EXHAUSTED are tried again after the server's ``retry-after-ms`` hint (growing
    back-off, ``retry_timeout`` seconds in all). Every call is deterministic given its request
    (seeds and generator state travel in it), so a retried sample equals an undisturbed one.
    Every answer names the model of the replica that gives it: one that is not the model the run
    began with (the first :meth:`describe`, else the first answer) stops the run with
    :class:`ServiceError` rather than mix models in it: a replica restarted with other settings,
    a rolling update, a fleet whose replicas differ.
    """

    def __init__(self, encoder: str, stage1: str, stage2: str, timeout: float = 3600.0,
                 retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
                 security: ClientSecurity | None = None,
                 gone: Callable[[str], str | None] | None = None) -> None:
        """``gone(name)``, if given, says why service ``name`` cannot come back (e.g. its local
        process has exited), or None: a lost call then fails at once instead of waiting
        ``retry_timeout`` seconds for it."""
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.security = security or ClientSecurity()
        self.metadata = self.security.metadata()
        if self.security.token and not self.security.tls:
            logger.warning("the bearer token travels unencrypted: add --tls-ca unless the network "
                           "is private")
        self.services: dict[str, _Service] = {}
        for name, address in (("encoder", encoder), ("stage1", stage1), ("stage2", stage2)):
            try:
                channel = open_channel(address, self.security)
            except ValueError as exc:
                self.close()
                raise ValueError(f"--{name} {address}: {exc}") from None
            self.services[name] = _Service(name, address, channel, self.metadata, gone)
        self._encoder = pb_grpc.EncoderStub(self.services["encoder"].channel)
        self._stage1 = pb_grpc.Stage1Stub(self.services["stage1"].channel)
        self._stage2 = pb_grpc.Stage2Stub(self.services["stage2"].channel)
        self.retries: dict[str, int] = {"encoder": 0, "stage1": 0, "stage2": 0}  # calls repeated
        # Each service's model as first described (or as its first answer named it).
        self.described: dict[str, pb.ModelInfo] = {}

    def close(self) -> None:
        for service in self.services.values():
            service.channel.close()

    def __enter__(self) -> CascadeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, timeout: float | None = None) -> None:
        """Every service answers SERVING; waits up to ``timeout`` (default ``retry_timeout``)
        for one that is still loading its model."""
        for service in self.services.values():
            service.check(self.retry_timeout if timeout is None else timeout)

    def _with_retries(self, name: str, attempt: Callable[[], T], timeout: float) -> T:
        """Run ``attempt()`` (one RPC), repeating it after lost replicas and overload."""
        service = self.services[name]
        overload_waited = 0.0
        tries = lost_tries = 0
        while True:
            tries += 1
            try:
                return attempt()
            except _BrokenStream as exc:
                code, lost = grpc.StatusCode.UNAVAILABLE, str(exc)
                error: grpc.RpcError | None = None
            except grpc.RpcError as err:
                code, lost, error = err.code(), f"{err.code().name}: {err.details()}", err
            if code == grpc.StatusCode.RESOURCE_EXHAUSTED and error is not None:
                hint = retry_after(error)
                if hint is None and _server_busy(error):
                    hint = 0.5
                if hint is None:  # not the queue (e.g. out of memory): retrying will not help
                    raise _translate(name, service.address, error, timeout) from None
                delay = min(MAX_OVERLOAD_DELAY, max(hint, 0.25 * 2 ** (tries - 1)))
                delay *= 1 + 0.2 * random.random()  # many clients do not come back in step
                if overload_waited + delay > self.retry_timeout:
                    raise ServiceError(
                        f"{name} at {service.address} stayed overloaded for "
                        f"{overload_waited:.0f} s ({tries} tries; --retry-timeout "
                        f"{self.retry_timeout:.0f}): {error.details()}",
                        code,
                    ) from None
                logger.info("%s at %s is busy; trying again in %.1f s", name, service.address,
                            delay)
                time.sleep(delay)
                overload_waited += delay
            elif code == grpc.StatusCode.UNAVAILABLE:
                lost_tries += 1
                if lost_tries >= MAX_ATTEMPTS:
                    if error is not None:
                        raise _translate(name, service.address, error, timeout) from None
                    raise ServiceError(f"{name} at {service.address}: {lost} ({lost_tries} tries)",
                                       code)
                if error is not None and _is_tls_failure(error.details() or ""):
                    raise _translate(name, service.address, error, timeout) from None
                logger.warning("%s at %s: call lost (%s); trying again once a replica is "
                               "serving (try %d of %d)", name, service.address, lost,
                               lost_tries + 1, MAX_ATTEMPTS)
                service.wait_until_serving(self.retry_timeout, lost)
            else:
                assert error is not None
                raise _translate(name, service.address, error, timeout) from None
            self.retries[name] += 1

    def _unary(self, name: str, call: Callable[..., Any], request: object,
               timeout: float) -> Any:
        return self._with_retries(
            name, lambda: call(request, timeout=timeout, metadata=self.metadata), timeout)

    def _stub(self, name: str) -> Any:
        return {"encoder": self._encoder, "stage1": self._stage1, "stage2": self._stage2}[name]

    def describe(self, services: Sequence[str] = ("encoder", "stage1", "stage2")
                 ) -> dict[str, pb.ModelInfo]:
        infos = {name: self._unary(name, self._stub(name).Describe, pb.DescribeRequest(), 30.0)
                 for name in services}
        for name, info in infos.items():
            self.described.setdefault(name, info)
        return infos

    def _check_answer(self, name: str, call: grpc.Call) -> None:
        """The replica answering ``call`` serves the model of the run (:data:`MODEL_KEY` in the
        call's initial metadata); if not, the call is cancelled and the run stops here."""
        answered = None
        for key, value in call.initial_metadata() or ():
            if key == MODEL_KEY:
                try:
                    answered = pb.ModelInfo.FromString(value)
                except DecodeError:
                    return  # not an illusion service's answer: the call itself will say more
        if answered is None:
            return  # the call failed before it answered, and says why
        first = self.described.setdefault(name, answered)
        changed = [f"{field} {getattr(answered, field)!r}, the run's is {getattr(first, field)!r}"
                   for field in SAME_MODEL_FIELDS if getattr(answered, field) != getattr(first, field)]
        if not changed:
            return
        call.cancel()
        address = self.services[name].address
        where = f"a replica of {name} at {address}" if "," in address else f"{name} at {address}"
        raise ServiceError(
            f"{where} answered as another model ({'; '.join(changed)}): the run would mix two "
            "models' samples, so it stops here with its finished samples kept. Run every "
            f"{name} replica with the same settings, then rerun the same command to resume (or "
            "start a new run for the new model)",
            grpc.StatusCode.FAILED_PRECONDITION)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (prompt_embeds (N,77,D), negative_prompt_embeds (1,77,D))."""
        request, timeout = pb.EncodeRequest(prompts=list(prompts)), min(self.timeout, 600.0)

        def attempt() -> pb.EncodeResponse:
            call = self._encoder.Encode.future(request, timeout=timeout, metadata=self.metadata)
            self._check_answer("encoder", call)
            return call.result()

        reply = self._with_retries("encoder", attempt, timeout)
        return (codec.decode(reply.prompt_embeds, "prompt_embeds"),
                codec.decode(reply.negative_prompt_embeds, "negative_prompt_embeds"))

    def _sample(self, name: str, method: Callable[..., Iterator[pb.SampleEvent]],
                request: object, progress: ProgressCallback | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        def attempt() -> tuple[torch.Tensor, torch.Tensor]:
            call = method(request, timeout=self.timeout, metadata=self.metadata)
            self._check_answer(name, call)
            for event in call:
                if event.HasField("progress"):
                    if progress is not None:
                        progress(event.progress.step, event.progress.total)
                else:
                    result = event.result
                    return (codec.decode(result.image, "image"),
                            codec.decode(result.rng_state, "rng_state"))
            raise _BrokenStream("the call ended without a result")

        return self._with_retries(name, attempt, self.timeout)

    def stage1(self, request: pb.Stage1Request, progress: ProgressCallback | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image (1,3,64,64) float32, generator state)."""
        return self._sample("stage1", self._stage1.Sample, request, progress)

    def stage2(self, request: pb.Stage2Request, progress: ProgressCallback | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image (1,3,256,256) float32, generator state)."""
        return self._sample("stage2", self._stage2.Sample, request, progress)
