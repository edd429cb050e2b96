"""Clients of the three services. Every ``grpc.RpcError`` becomes one :class:`ServiceError` whose
message names the service and its address ("stage2 at 10.0.0.7:50052 is unavailable ...").
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from services.common import codec
from services.common.server import GRPC_OPTIONS, SERVICE_NAMES

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]


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
    if len(parts) == 1:
        return parts[0]
    hosts = []
    for part in parts:
        host, sep, port = part.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"address {part!r} has no port: use host:port")
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


def open_channel(addresses: str) -> grpc.Channel:
    """An insecure channel with raised message limits and ``round_robin`` over all replicas."""
    service_config = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
    return grpc.insecure_channel(
        grpc_target(addresses), options=[*GRPC_OPTIONS, ("grpc.service_config", service_config)]
    )


def _translate(service: str, address: str, error: grpc.RpcError, timeout: float | None
               ) -> ServiceError:
    code = error.code() if hasattr(error, "code") else None
    details = error.details() if hasattr(error, "details") else str(error)
    where = f"{service} at {address}"
    if code == grpc.StatusCode.UNAVAILABLE:
        text = f"{where} is unavailable ({details}): check that it is running and reachable"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        text = f"{where} did not finish within {timeout:.0f} s: raise --timeout or check the service"
    elif code == grpc.StatusCode.INVALID_ARGUMENT:
        text = f"{where} rejected the request: {details}"
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        text = f"{where} is overloaded: {details}"
    elif code == grpc.StatusCode.CANCELLED:
        text = f"{where}: call cancelled ({details})"
    else:
        name = code.name if code is not None else "error"
        text = f"{where} failed ({name}): {details}"
    return ServiceError(text, code)


@dataclass
class _Service:
    name: str  # encoder | stage1 | stage2
    address: str
    channel: grpc.Channel

    def check(self, timeout: float) -> None:
        """Health check; waits up to ``timeout`` for the service to come up and be SERVING."""
        stub = health_pb2_grpc.HealthStub(self.channel)
        request = health_pb2.HealthCheckRequest(service=SERVICE_NAMES[self.name])
        try:
            reply = stub.Check(request, timeout=timeout, wait_for_ready=True)
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
                raise ServiceError(
                    f"{self.name} at {self.address} does not answer (waited {timeout:.0f} s): "
                    "check the address and that the service is running",
                    err.code(),
                ) from None
            raise _translate(self.name, self.address, err, timeout) from None
        if reply.status != health_pb2.HealthCheckResponse.SERVING:
            raise ServiceError(f"{self.name} at {self.address} is not serving yet (still loading)")


class CascadeClient:
    """Talks to the encoder, stage-1 and stage-2 services."""

    def __init__(self, encoder: str, stage1: str, stage2: str, timeout: float = 3600.0) -> None:
        self.timeout = timeout
        self.services = {
            name: _Service(name, address, open_channel(address))
            for name, address in (("encoder", encoder), ("stage1", stage1), ("stage2", stage2))
        }
        self._encoder = pb_grpc.EncoderStub(self.services["encoder"].channel)
        self._stage1 = pb_grpc.Stage1Stub(self.services["stage1"].channel)
        self._stage2 = pb_grpc.Stage2Stub(self.services["stage2"].channel)

    def close(self) -> None:
        for service in self.services.values():
            service.channel.close()

    def __enter__(self) -> CascadeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def check(self, timeout: float = 10.0) -> None:
        for service in self.services.values():
            service.check(timeout)

    def _unary(self, name: str, call: Callable[..., object], request: object,
               timeout: float) -> object:
        try:
            return call(request, timeout=timeout)
        except grpc.RpcError as err:
            service = self.services[name]
            raise _translate(name, service.address, err, timeout) from None

    def describe(self) -> dict[str, pb.ModelInfo]:
        stubs = {"encoder": self._encoder, "stage1": self._stage1, "stage2": self._stage2}
        return {name: self._unary(name, stub.Describe, pb.DescribeRequest(), 30.0)  # type: ignore
                for name, stub in stubs.items()}

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (prompt_embeds (N,77,D), negative_prompt_embeds (1,77,D))."""
        reply = self._unary("encoder", self._encoder.Encode,
                            pb.EncodeRequest(prompts=list(prompts)), min(self.timeout, 600.0))
        return (codec.decode(reply.prompt_embeds, "prompt_embeds"),  # type: ignore[attr-defined]
                codec.decode(reply.negative_prompt_embeds,  # type: ignore[attr-defined]
                             "negative_prompt_embeds"))

    def _stream(self, name: str, events: Iterator[pb.SampleEvent],
                progress: ProgressCallback | None) -> tuple[torch.Tensor, torch.Tensor]:
        service = self.services[name]
        try:
            for event in events:
                if event.HasField("progress"):
                    if progress is not None:
                        progress(event.progress.step, event.progress.total)
                else:
                    result = event.result
                    return (codec.decode(result.image, "image"),
                            codec.decode(result.rng_state, "rng_state"))
        except grpc.RpcError as err:
            raise _translate(name, service.address, err, self.timeout) from None
        raise ServiceError(f"{name} at {service.address} ended the call without a result")

    def stage1(self, request: pb.Stage1Request, progress: ProgressCallback | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image (1,3,64,64) float32, generator state)."""
        events = self._stage1.Sample(request, timeout=self.timeout)
        return self._stream("stage1", events, progress)

    def stage2(self, request: pb.Stage2Request, progress: ProgressCallback | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (image (1,3,256,256) float32, generator state)."""
        events = self._stage2.Sample(request, timeout=self.timeout)
        return self._stream("stage2", events, progress)
