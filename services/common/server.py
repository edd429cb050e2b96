"""What the three servers share: creating the gRPC server, health, reflection, admission control,
streaming progress from a worker thread, start-up (load, warm up, then SERVING) and graceful drain.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import queue
import signal
import socket
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from anagram.v1 import anagram_pb2 as pb
from illusions.sampling import InvalidInputError, SamplingCancelled
from services.common.errors import NotReady, ServiceOverloaded
from services.common.security import ServerSecurity

logger = logging.getLogger(__name__)

# 4 views of fp32 T5-XXL embeddings are ~5 MB and a 1024px fp32 image 12 MB: far above gRPC's
# 4 MiB default. Servers and channels raise both limits to this.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


def message_options(max_bytes: int = MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Channel/server options raising both message limits to ``max_bytes``."""
    return [("grpc.max_send_message_length", max_bytes),
            ("grpc.max_receive_message_length", max_bytes)]


GRPC_OPTIONS: list[tuple[str, Any]] = message_options()
# Clients ping every KEEPALIVE_S during a call (orchestrator/client.py), so a replica on a host
# that vanished (no TCP reset ever comes) is noticed in seconds, not at the call's deadline.
# Servers must accept those pings instead of answering GOAWAY "too_many_pings".
KEEPALIVE_S = 10
SERVER_KEEPALIVE_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.http2.min_recv_ping_interval_without_data_ms", KEEPALIVE_S * 1000 // 2),
    ("grpc.http2.max_ping_strikes", 0),
]
SERVICE_NAMES = {
    "encoder": "anagram.v1.Encoder",
    "stage1": "anagram.v1.Stage1",
    "stage2": "anagram.v1.Stage2",
}
# What makes two services the same model for a run (the device may differ between replicas).
SAME_MODEL_FIELDS = ("service", "model", "dtype", "quantize", "sample_size", "embed_dim",
                     "random_weights")
# Initial metadata of every Encode and Sample answer: a ModelInfo holding SAME_MODEL_FIELDS of the
# replica that answers, so that a client behind round_robin can tell which model made each answer.
MODEL_KEY = "anagram-model-bin"


def model_metadata(info: pb.ModelInfo) -> tuple[tuple[str, bytes], ...]:
    """The initial metadata that names the model ``info`` describes (``MODEL_KEY``)."""
    same = pb.ModelInfo(**{name: getattr(info, name) for name in SAME_MODEL_FIELDS})
    return ((MODEL_KEY, same.SerializeToString(deterministic=True)),)


@dataclass(frozen=True)
class ServerConfig:
    """Everything one service process is started with (built from CLI flags at the edge)."""

    service: str  # encoder | stage1 | stage2
    model: str  # Hub id or local directory (or config directory with random_weights)
    host: str = "127.0.0.1"  # loopback unless asked otherwise
    port: int = 0  # 0: pick a free port
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str = "none"
    random_weights: bool = False
    cuda_graphs: bool = True  # replay UNet calls from CUDA graphs when on a GPU
    compile: bool = False  # torch.compile the UNet (each new row count compiles on first use)
    max_batch: int = 0  # most rows per UNet call; 0: all 2 x views rows (bounds memory)
    fixed_batch: bool = False  # every UNet call runs exactly max_batch rows (short ones padded)
    batch_multiple: int = 0  # with fixed_batch: pad to the next multiple of this (0: max_batch)
    max_concurrent: int = 1  # sampling calls running at once (one GPU, one at a time)
    max_queue: int = 8  # calls allowed to wait beyond those; more get RESOURCE_EXHAUSTED
    grace_s: float = 10.0  # SIGTERM: how long in-flight calls may finish
    parent_pid: int | None = None  # local mode: exit when this process goes away
    security: ServerSecurity = field(default_factory=ServerSecurity)  # TLS, token (none: plain)
    max_message_bytes: int = MAX_MESSAGE_BYTES  # larger requests get RESOURCE_EXHAUSTED

    def __post_init__(self) -> None:
        """Settings that cannot work are refused here, before the model loads: a port beyond
        65535 would wrap around to another one, and no request slot (``max_concurrent`` 0)
        would report SERVING and then hang every call."""
        if not 0 <= self.port <= 65535:
            raise InvalidInputError(f"--port {self.port}: use 1 .. 65535, or 0 to pick a free "
                                    "port")
        for flag, value, low, meaning in (
            ("--max-concurrent", self.max_concurrent, 1, "requests sampled at once"),
            ("--max-queue", self.max_queue, 0, "calls that may wait; 0: refuse when busy"),
            ("--max-batch", self.max_batch, 0, "most rows per UNet call; 0: all at once"),
            ("--batch-multiple", self.batch_multiple, 0, "0: pad to --max-batch"),
        ):
            if value < low:
                raise InvalidInputError(f"{flag} {value}: use {low} or more ({meaning})")


class RequestDecodeErrors(grpc.ServerInterceptor):
    """Bytes that do not parse as the method's request message get INVALID_ARGUMENT.

    gRPC itself answers them with INTERNAL ("Exception deserializing request!"), which reads like
    a server bug; here the request is parsed inside the handler instead, so the client learns that
    its message was malformed. Streaming requests (reflection) are left to gRPC.
    """

    def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                       grpc.RpcMethodHandler | None],
                          details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        parse, method = handler.request_deserializer, details.method

        def request_of(raw: bytes, context: grpc.ServicerContext) -> Any:
            try:
                return parse(raw)
            except Exception as exc:  # noqa: BLE001 - DecodeError and friends: the client's bytes
                logger.warning("%s refused: request does not parse (%s)", method, exc)
                context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                              f"the request is not a valid {method} message ({exc}): send the "
                              "message of anagram/v1/anagram.proto")

        if handler.response_streaming:
            def unary_stream(raw: bytes, context: grpc.ServicerContext) -> Iterator[Any]:
                yield from handler.unary_stream(request_of(raw, context), context)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, response_serializer=handler.response_serializer)

        def unary_unary(raw: bytes, context: grpc.ServicerContext) -> Any:
            return handler.unary_unary(request_of(raw, context), context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, response_serializer=handler.response_serializer)


def create_server(address: str, max_workers: int = 16, security: ServerSecurity | None = None,
                  max_message_bytes: int = MAX_MESSAGE_BYTES) -> tuple[grpc.Server, int]:
    """A gRPC server bound to ``address`` (port 0 picks one). Returns (server, port).

    With ``security``: a TLS port (mutual TLS when it has a client CA) and the bearer-token check.
    """
    security = security or ServerSecurity()
    # Calls beyond the threads are refused (RESOURCE_EXHAUSTED, which the `illusion` client
    # retries as overload: orchestrator.client.GRPC_RPC_LIMIT) rather than left waiting for a
    # thread with no bound, behind long streams.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers),
                         maximum_concurrent_rpcs=max_workers,
                         interceptors=[*security.interceptors(), RequestDecodeErrors()],
                         options=[*message_options(max_message_bytes),
                                  *SERVER_KEEPALIVE_OPTIONS,
                                  # gRPC binds with SO_REUSEPORT on Linux by default: a second
                                  # server on a port in use would start and take part of its calls.
                                  ("grpc.so_reuseport", 0)])
    credentials = security.credentials()
    if credentials is None:
        try:
            port = server.add_insecure_port(address)
        except RuntimeError:
            port = 0
    else:
        try:
            port = server.add_secure_port(address, credentials)
        except RuntimeError:  # gRPC says only "Failed to bind"
            problem = bind_problem(address)
            raise OSError(f"could not bind {address} with TLS: "
                          f"{problem or 'are the certificate and key valid PEM that belong together?'}"
                          ) from None
    if port == 0:
        raise OSError(f"could not bind {address}: {bind_problem(address) or 'is the port in use?'}")
    return server, port


def bind_problem(address: str) -> str | None:
    """Why ``host:port`` cannot be bound, found by binding a plain socket there (gRPC reports
    only that it failed); None when a plain socket binds."""
    host, _, port_text = address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return (f"the host {host!r} does not resolve ({exc.strerror}): give --host an address of "
                "this machine, e.g. 127.0.0.1 or 0.0.0.0")
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as probe:
        try:
            probe.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"port {port} is in use: choose another --port, or 0 for a free one"
            if exc.errno == errno.EADDRNOTAVAIL:
                return (f"{host} is not an address of this machine: use --host 127.0.0.1, "
                        "0.0.0.0 or one of its addresses")
            if exc.errno == errno.EACCES:
                return f"port {port} needs privileges here: use a port above 1023"
            return exc.strerror or str(exc)
    return None


class Admission:
    """At most ``max_running`` calls run and ``max_waiting`` wait; the rest are refused.

    Refusing (RESOURCE_EXHAUSTED, with a retry hint) instead of queueing without bound keeps a
    burst of requests from exhausting memory. Waiting calls are admitted in their order of
    arrival: a freed slot goes to the call that has waited longest, never to one that arrives
    (or retries) at that moment.
    """

    def __init__(self, max_running: int, max_waiting: int) -> None:
        self.max_running = max_running
        self._free = max_running
        self._lock = threading.Lock()
        self._waiting: deque[threading.Event] = deque()  # set: this call now holds a slot
        self._max_waiting = max_waiting

    def acquire(self, is_active: Callable[[], bool]) -> None:
        with self._lock:
            if self._free > 0 and not self._waiting:
                self._free -= 1
                return
            if len(self._waiting) >= self._max_waiting:
                raise ServiceOverloaded(
                    f"server busy: {len(self._waiting)} requests already waiting; retry shortly",
                    retry_after_s=2.0,
                )
            turn = threading.Event()
            self._waiting.append(turn)
        try:
            while not turn.wait(0.1):
                if not is_active():
                    raise SamplingCancelled("cancelled while waiting for a free slot")
        except BaseException:
            with self._lock:
                if turn.is_set():  # given a slot as it left: the next call gets it
                    self._release_locked()
                else:
                    self._waiting.remove(turn)
            raise

    def release(self) -> None:
        with self._lock:
            self._release_locked()

    def _release_locked(self) -> None:
        if self._waiting:
            self._waiting.popleft().set()  # handed over: the slot is never free in between
        else:
            self._free += 1

    @contextmanager
    def slot(self, is_active: Callable[[], bool]) -> Iterator[None]:
        """``with admission.slot(context.is_active): ...`` runs the body in an admitted slot."""
        self.acquire(is_active)
        try:
            yield
        finally:
            self.release()


T = TypeVar("T")


class ModelHandle(Generic[T]):
    """Holds the model once loaded; before that, calls get UNAVAILABLE."""

    def __init__(self, service: str) -> None:
        self._model: T | None = None
        self._service = service
        self.info = pb.ModelInfo(service=service)

    def set(self, model: T, info: pb.ModelInfo) -> None:
        self._model, self.info = model, info

    def describe(self) -> pb.ModelInfo:
        """The model's info, with the accelerator memory peak since the service became ready."""
        info = pb.ModelInfo()
        info.CopyFrom(self.info)
        if info.device.startswith("cuda"):
            device = torch.device(info.device)
            info.peak_memory_bytes = torch.cuda.max_memory_reserved(device)
            info.peak_allocated_bytes = torch.cuda.max_memory_allocated(device)
        return info

    def get(self) -> T:
        if self._model is None:
            raise NotReady(f"{self._service} is still loading its model: retry in a moment")
        return self._model

    def answering(self, context: grpc.ServicerContext) -> T:
        """The model, once the call's initial metadata has told the client which model answers
        (:func:`model_metadata`): a client checks every answer against the model its run began
        with, so a replica with other settings cannot slip samples of another model into it."""
        model = self.get()
        context.send_initial_metadata(model_metadata(self.info))
        return model


def stream_with_progress(
    work: Callable[[Callable[[int, int], None], Callable[[], bool]], pb.SampleResult],
    context: grpc.ServicerContext,
) -> Iterator[pb.SampleEvent]:
    """Run ``work(progress, should_stop)`` in a thread, yielding progress events then the result.

    ``should_stop`` turns true when the client cancels or the deadline passes, so the denoising
    loop stops within one step.
    """
    events: queue.Queue[tuple[str, Any]] = queue.Queue()

    def should_stop() -> bool:
        remaining = context.time_remaining()
        return not context.is_active() or (remaining is not None and remaining <= 0)

    def progress(step: int, total: int) -> None:
        logger.debug("step %d/%d", step, total)
        events.put(("progress", pb.Progress(step=step, total=total)))

    def run() -> None:
        try:
            events.put(("result", work(progress, should_stop)))
        except BaseException as exc:  # noqa: BLE001 - handed to the RPC thread
            events.put(("error", exc))

    worker = threading.Thread(target=run, name="sample", daemon=True)
    worker.start()
    while True:
        kind, value = events.get()
        if kind == "progress":
            yield pb.SampleEvent(progress=value)
        elif kind == "result":
            yield pb.SampleEvent(result=value)
            return
        else:
            raise value


def configure_logging() -> None:
    logging.basicConfig(
        level=os.environ.get("ILLUSION_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,  # the CLI configured logging for itself already
    )


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _watch_parent(parent_pid: int, stop: threading.Event) -> None:
    """Local mode: if the orchestrator dies without stopping us, stop too."""
    while not stop.wait(1.0):
        if os.getppid() != parent_pid:
            logger.warning("parent process %d is gone; shutting down", parent_pid)
            stop.set()


def use_device(device: str) -> None:
    """Make ``device`` the main thread's current CUDA device (nothing for the CPU), before
    anything touches CUDA, so that loading on ``cuda:1`` creates no context on GPU 0. (Threads
    start on cuda:0; the UNet calls make their own device current, illusions.fast.)"""
    if device.startswith("cuda") and torch.cuda.is_available():
        chosen = torch.device(device)
        if chosen.index is not None:  # plain "cuda" is the current device already
            torch.cuda.set_device(chosen)


def serve(
    config: ServerConfig,
    add_servicer: Callable[[grpc.Server], None],
    load: Callable[[], pb.ModelInfo],
    ready_line: Callable[[str], None] | None = None,
    stop: threading.Event | None = None,
) -> None:
    """Run one service until SIGTERM/SIGINT.

    1. Bind the port and start the server with health NOT_SERVING (calls get UNAVAILABLE).
    2. ``load()`` loads the model and warms it up; health becomes SERVING and one line
       ``serving <service> on <host>:<port>`` is printed.
    3. On SIGTERM (or ``stop`` set): NOT_SERVING, refuse new calls, give in-flight calls
       ``grace_s``, return.
    """
    name = SERVICE_NAMES[config.service]
    server, port = create_server(f"{config.host}:{config.port}",
                                 max_workers=config.max_concurrent + config.max_queue + 8,
                                 security=config.security,
                                 max_message_bytes=config.max_message_bytes)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    add_servicer(server)
    reflection.enable_server_reflection(
        (name, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
    server.start()
    address = f"{config.host}:{port}"
    logger.info("%s listening on %s (%s); loading %s", config.service, address,
                config.security.describe(), config.model)
    if not config.security.tls and not _is_loopback(config.host):
        logger.warning("%s is reachable beyond this machine without TLS: add --tls-cert/--tls-key "
                       "(and --token-file) unless the network is private", address)

    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
    if config.parent_pid is not None:
        threading.Thread(target=_watch_parent, args=(config.parent_pid, stop), daemon=True).start()

    try:
        use_device(config.device)
        load()
    except Exception:
        server.stop(0)
        raise
    if stop.is_set():  # asked to stop while loading
        server.stop(0)
        return
    if config.device.startswith("cuda") and torch.cuda.is_available():
        # Loading (random weights are built, then quantized) may peak above what serving needs:
        # the reported peak starts here.
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(torch.device(config.device))
    for service in ("", name):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    line = f"serving {config.service} on {address}"
    (ready_line or (lambda text: print(text, flush=True)))(line)
    logger.info(line)

    stop.wait()
    logger.info("draining: finishing in-flight calls for up to %.0f s", config.grace_s)
    health_servicer.enter_graceful_shutdown()
    server.stop(config.grace_s).wait()
    logger.info("%s stopped", config.service)
