"""The three services on real loopback ports: codec, health, reflection, errors, deadlines,
cancellation, overload and the RNG hand-over between stage 1 and stage 2."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
import torch
from conftest import CASES, STAGE1_DIR, STAGE2_DIR, TOLERANCE
from grpc_health.v1 import health_pb2, health_pb2_grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from orchestrator.client import CascadeClient, ServiceError, grpc_target, open_channel
from services.common import codec
from services.common.server import ServerConfig


@contextmanager
def running(service: str, model: str, **options) -> Iterator[str]:
    """Run one service in a thread through its real ``main``; yield its address."""
    from services.encoder.server import main as encoder_main
    from services.stage1.server import main as stage1_main
    from services.stage2.server import main as stage2_main

    mains = {"encoder": encoder_main, "stage1": stage1_main, "stage2": stage2_main}
    stop, ready = threading.Event(), threading.Event()
    address: list[str] = []

    def on_ready(line: str) -> None:
        address.append(line.rsplit(" ", 1)[-1])
        ready.set()

    config = ServerConfig(service=service, model=model, grace_s=2.0, **options)
    thread = threading.Thread(target=mains[service], args=(config, stop, on_ready), daemon=True)
    thread.start()
    assert ready.wait(120), f"{service} did not start"
    try:
        yield address[0]
    finally:
        stop.set()
        thread.join(30)


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, str]]:
    with running("encoder", str(STAGE1_DIR)) as enc, running("stage1", str(STAGE1_DIR)) as s1, \
            running("stage2", str(STAGE2_DIR)) as s2:
        yield {"encoder": enc, "stage1": s1, "stage2": s2}


@pytest.fixture(scope="module")
def client(services) -> Iterator[CascadeClient]:
    with CascadeClient(services["encoder"], services["stage1"], services["stage2"],
                       timeout=120) as c:
        yield c


# ---------------------------------------------------------------------------------- codec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64,
                                   torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (2, 3), (1, 3, 4, 4)])
def test_codec_round_trip(dtype, shape):
    source = (torch.randn(shape) * 50).to(dtype)
    back = codec.decode(codec.encode(source))
    assert back.dtype == dtype and back.shape == source.shape
    assert torch.equal(back, source)


def test_codec_handles_non_contiguous_and_rejects_bad_messages():
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    assert torch.equal(codec.decode(codec.encode(x)), x)
    with pytest.raises(codec.CodecError, match="needs 16"):
        codec.decode(pb.Tensor(dtype="float32", shape=[4], data=b"\0" * 15))
    with pytest.raises(codec.CodecError, match="not supported"):
        codec.decode(pb.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8))
    with pytest.raises(codec.CodecError, match="negative"):
        codec.decode(pb.Tensor(dtype="float32", shape=[-1], data=b""))
    assert not codec.is_set(pb.Tensor())
    assert codec.is_set(pb.Tensor(data=b"\0" * 4))  # data without a header is not "not given"
    with pytest.raises(codec.CodecError, match="dtype='' is not supported"):
        codec.decode(pb.Tensor(data=b"\0" * 4), "image")


def test_replica_targets():
    assert grpc_target("127.0.0.1:5000") == "127.0.0.1:5000"
    assert grpc_target("127.0.0.1:1,localhost:2") == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert grpc_target("dns:///stage2.svc:50052") == "dns:///stage2.svc:50052"
    with pytest.raises(ValueError, match="dns:///"):
        grpc_target("host-a:1,host-b:2")


# ------------------------------------------------------------------------- health, reflection


def test_health_and_reflection(services):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    for name, service in (("encoder", "anagram.v1.Encoder"), ("stage1", "anagram.v1.Stage1"),
                          ("stage2", "anagram.v1.Stage2")):
        with open_channel(services[name]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = stub.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            listed = {s.name for a in answers for s in a.list_services_response.service}
            assert service in listed


def test_describe(client):
    info = client.describe()
    assert info["stage1"].sample_size == 64 and info["stage2"].sample_size == 256
    assert info["encoder"].embed_dim == info["stage1"].embed_dim == 32


# ------------------------------------------------------------------- the job through services


def _requests(client: CascadeClient, case: dict) -> tuple[pb.Stage1Request, pb.SamplingParams]:
    prompt_embeds, negative = client.encode(case["prompts"])
    params = pb.SamplingParams(num_inference_steps=case["steps"],
                               guidance_scale=case["guidance_scale"],
                               reduction=case["reduction"], noise_level=case["noise_level"],
                               seed=case["seed"])
    views = [pb.ViewSpec(name=v, seed=case.get("view_seed", 0)) for v in case["views"]]
    return pb.Stage1Request(prompt_embeds=codec.encode(prompt_embeds),
                            negative_prompt_embeds=codec.encode(negative), views=views,
                            params=params), params


@pytest.mark.parametrize("name", ["patch_permute", "hybrid"])
def test_services_reproduce_reference(client, reference, name):
    case = next(c for c in CASES if c["name"] == name)
    request, params = _requests(client, case)
    steps: list[tuple[int, int]] = []
    image64, state = client.stage1(request, lambda i, n: steps.append((i, n)))
    assert steps[-1] == (case["steps"], case["steps"]) and len(steps) == case["steps"]
    image256, _ = client.stage2(pb.Stage2Request(
        image=codec.encode(image64), prompt_embeds=request.prompt_embeds,
        negative_prompt_embeds=request.negative_prompt_embeds, views=request.views,
        params=params, rng_state=codec.encode(state)))
    assert (image64 - reference[f"{name}/stage_1"]).abs().max() <= TOLERANCE
    assert (image256 - reference[f"{name}/stage_2"]).abs().max() <= TOLERANCE


# ------------------------------------------------------------------------------ bad requests


def _stage1_request(client: CascadeClient, **changes) -> pb.Stage1Request:
    request, _ = _requests(client, CASES[0])
    for key, value in changes.items():
        if key == "params":
            request.params.CopyFrom(value)
        elif key == "views":
            del request.views[:]
            request.views.extend(value)
        else:
            getattr(request, key).CopyFrom(value)
    return request


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"views": [pb.ViewSpec(name="spin")]}, "spin"),
        ({"views": [pb.ViewSpec(name="identity")]}, "one prompt per view"),
        ({"views": [pb.ViewSpec(name="identity"),
                    pb.ViewSpec(name="patch_permute", args=["num_patches=7"])]}, "num_patches"),
        ({"params": pb.SamplingParams(num_inference_steps=0, guidance_scale=3)},
         "num_inference_steps"),
        ({"params": pb.SamplingParams(num_inference_steps=2, guidance_scale=3,
                                      reduction="median")}, "reduction"),
        ({"prompt_embeds": pb.Tensor(dtype="float32", shape=[2, 77, 32], data=b"x")}, "bytes"),
        ({"prompt_embeds": codec.encode(torch.full((2, 77, 32), float("nan")))}, "NaN"),
        # finite, but far beyond an encoder's output: the UNet overflows, and the image is refused
        ({"prompt_embeds": codec.encode(torch.full((2, 77, 32), 1e30))},
         "stage1 made an image with NaN or infinite values from this request (prompt_embeds up "
         "to |x| = 1e+30"),
        ({"ref_image": codec.encode(torch.full((3, 64, 64), 2.0))},
         "ref_image holds values up to 2 in magnitude: pass an RGB image with values in [-1, 1]"),
        ({"ref_image": codec.encode(torch.zeros(3, 1100, 900))},
         "ref_image is 1100 x 900 pixels, more than 1024 a side"),
        ({"prompt_embeds": pb.Tensor()}, "prompt_embeds is missing"),
        # refused from the header, before its (here absent) 2.5 GB of data would be copied
        ({"prompt_embeds": pb.Tensor(dtype="float32", shape=[1000, 77, 8192])},
         "prompt_embeds has shape [1000, 77, 8192], more values than 16 prompts of 77 tokens "
         "8192 wide"),
        ({"prompt_embeds": codec.encode(torch.zeros(2, 77, 16))}, "width"),
        ({"negative_prompt_embeds": codec.encode(torch.zeros(1, 77, 32, dtype=torch.int32))},
         "float"),
    ],
)
def test_bad_stage1_requests_are_invalid_argument(client, services, changes, match):
    with pytest.raises(ServiceError) as info:
        client.stage1(_stage1_request(client, **changes))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert match in str(info.value) and services["stage1"] in str(info.value)
    client.check(timeout=5)  # still serving


def test_bad_stage2_requests(client):
    request, params = _requests(client, CASES[0])
    base = dict(prompt_embeds=request.prompt_embeds,
                negative_prompt_embeds=request.negative_prompt_embeds, views=request.views,
                params=params)
    with pytest.raises(ServiceError, match="image is missing"):
        client.stage2(pb.Stage2Request(**base))
    with pytest.raises(ServiceError, match="image is 1100 x 1100 pixels, more than 1024 a side"):
        client.stage2(pb.Stage2Request(image=codec.encode(torch.zeros(1, 3, 1100, 1100)), **base))
    with pytest.raises(ServiceError, match="rng_state"):
        client.stage2(pb.Stage2Request(image=codec.encode(torch.zeros(1, 3, 64, 64)),
                                       rng_state=codec.encode(torch.zeros(3, dtype=torch.uint8)),
                                       **base))
    # rng_state and the images are checked from their headers, before any data is copied; a
    # field with data only is not "missing" (stage 2 would quietly start from the seed instead).
    state = torch.Generator().get_state()
    for bad_state in (pb.Tensor(data=state.numpy().tobytes()), codec.encode(state.float() + 0.7),
                      pb.Tensor(dtype="uint8", shape=[50_000_000])):
        with pytest.raises(ServiceError, match=r"rng_state has dtype .* send the uint8 state of "
                                               r"5056 values stage 1 returned"):
            client.stage2(pb.Stage2Request(image=codec.encode(torch.zeros(1, 3, 64, 64)),
                                           rng_state=bad_state, **base))
    for field, image in (("image", pb.Tensor(dtype="float32", shape=[60_000_000])),
                         ("image", codec.encode(torch.zeros(2, 3, 64, 64))),
                         ("ref_image", pb.Tensor(data=b"\0" * 64))):
        images = {"image": codec.encode(torch.zeros(1, 3, 64, 64)), field: image}
        with pytest.raises(ServiceError, match=f"{field} has shape .*: send one RGB image"):
            client.stage2(pb.Stage2Request(**images, **base))
    with pytest.raises(ServiceError, match="prompts is empty"):
        client.encode([])


def test_an_error_that_repeats_a_long_input_stays_one_invalid_argument(client, services):
    """A status message repeating a client's input (a view name of 20,000 characters) is cut to
    its start and end, so gRPC still carries it (over its trailer limit it became a
    RESOURCE_EXHAUSTED of gRPC's own, read as overload, and without the message)."""
    with pytest.raises(ServiceError) as info:
        client.stage1(_stage1_request(client, views=[pb.ViewSpec(name="é" * 20_000),
                                                     pb.ViewSpec(name="flip")]))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    message = str(info.value)
    assert "unknown view 'éé" in message and " … " in message and "Valid views:" in message
    assert len(message.encode()) < 3000
    client.check(timeout=5)


def test_deadline_stops_the_loop_and_server_keeps_serving(services, client):
    request = _stage1_request(client, params=pb.SamplingParams(
        num_inference_steps=1000, guidance_scale=3, seed=0))
    with open_channel(services["stage1"]) as channel:
        stub = pb_grpc.Stage1Stub(channel)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Sample(request, timeout=1.0):
                pass
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The abandoned 1000-step call must not hold the single slot: a short call runs right away.
    quick = _stage1_request(client, params=pb.SamplingParams(
        num_inference_steps=2, guidance_scale=3, seed=0))
    image, _ = client.stage1(quick)
    assert image.shape == (1, 3, 64, 64)
    assert time.monotonic() - started < 30


def test_cancel_stops_within_a_step(caplog):
    caplog.set_level(logging.DEBUG, logger="services.common.server")
    with running("stage1", str(STAGE1_DIR)) as address:
        with open_channel(address) as channel:
            stub = pb_grpc.Stage1Stub(channel)
            call = stub.Sample(_stage1_request_static(num_inference_steps=500), timeout=60)
            seen = 0
            for event in call:
                seen = event.progress.step
                if seen >= 2:
                    call.cancel()
                    break
            time.sleep(1.5)  # without the stop, hundreds of tiny steps would run meanwhile
            steps_run = [r.args[0] for r in caplog.records if r.getMessage().startswith("step ")
                         and r.args[1] == 500]
            # The server is free again: a new call runs to the end.
            events = list(stub.Sample(_stage1_request_static(num_inference_steps=3), timeout=60))
    assert seen >= 2
    assert max(steps_run) <= seen + 2, f"loop ran on to step {max(steps_run)} after cancel at {seen}"
    assert len(events) == 4 and events[-1].HasField("result")  # 3 progress events + the result


def _stage1_request_static(num_inference_steps: int) -> pb.Stage1Request:
    return pb.Stage1Request(
        prompt_embeds=codec.encode(torch.zeros(2, 77, 32)),
        negative_prompt_embeds=codec.encode(torch.zeros(1, 77, 32)),
        views=[pb.ViewSpec(name="identity"), pb.ViewSpec(name="flip")],
        params=pb.SamplingParams(num_inference_steps=num_inference_steps, guidance_scale=3),
    )


def test_overload_is_resource_exhausted():
    with running("stage1", str(STAGE1_DIR), max_queue=0) as address:
        with open_channel(address) as channel:
            stub = pb_grpc.Stage1Stub(channel)
            busy = stub.Sample(_stage1_request_static(500), timeout=60)
            next(busy)  # it is running now and holds the only slot
            with pytest.raises(grpc.RpcError) as info:
                list(stub.Sample(_stage1_request_static(2), timeout=30))
            busy.cancel()
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry" in info.value.details()
    trailing = dict(info.value.trailing_metadata() or ())
    assert int(trailing["retry-after-ms"]) > 0


@pytest.mark.parametrize("service", ["stage1", "stage2"])
def test_a_request_that_cannot_run_is_refused_before_it_waits(service):
    """A bad request is refused at once (INVALID_ARGUMENT), not after waiting for a slot, nor with
    RESOURCE_EXHAUSTED when the queue is full: a client that follows a retry hint would retry a
    request that can never run."""
    directory = STAGE1_DIR if service == "stage1" else STAGE2_DIR
    stub_class = pb_grpc.Stage1Stub if service == "stage1" else pb_grpc.Stage2Stub

    def request(steps: int, prompts: int = 2) -> pb.Stage1Request | pb.Stage2Request:
        stage1 = _stage1_request_static(steps)
        stage1.prompt_embeds.CopyFrom(codec.encode(torch.zeros(prompts, 77, 32)))
        if service == "stage1":
            return stage1
        return pb.Stage2Request(image=codec.encode(torch.zeros(1, 3, 64, 64)),
                                prompt_embeds=stage1.prompt_embeds,
                                negative_prompt_embeds=stage1.negative_prompt_embeds,
                                views=stage1.views, params=stage1.params)

    with running(service, str(directory), max_queue=0) as address:
        with open_channel(address) as channel:
            stub = stub_class(channel)
            busy = stub.Sample(request(500), timeout=60)
            next(busy)  # it is running now and holds the only slot
            for bad, match in ((request(0), "num_inference_steps=0 is out of range"),
                               (request(3, prompts=3), "3 prompts for 2 views")):
                started = time.monotonic()
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Sample(bad, timeout=30))
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
                assert match in info.value.details()
                assert time.monotonic() - started < 5
            busy.cancel()


def test_unreachable_service_is_named():
    with CascadeClient("127.0.0.1:1", "127.0.0.1:1", "127.0.0.1:1", timeout=5) as dead:
        with pytest.raises(ServiceError, match=r"encoder at 127\.0\.0\.1:1 does not answer"):
            dead.check(timeout=1)


def test_a_service_makes_its_gpu_the_current_device(monkeypatch):
    """serve on cuda:1 sets the process's current device to cuda:1 before loading (no context on
    GPU 0, and the current-device calls mean its own GPU); on the CPU it touches nothing."""
    from services.common.server import use_device

    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    use_device("cpu")
    assert chosen == []
    use_device("cuda:1")
    assert chosen == [torch.device("cuda:1")]
    use_device("cuda")  # the current device already; set_device refuses a device without index
    assert chosen == [torch.device("cuda:1")]


def test_plain_cuda_is_the_first_gpu_with_its_index(monkeypatch):
    """--device cuda (and auto on a GPU host) name cuda:0, with its index: torch.cuda.set_device
    raises ValueError for "cuda", which stopped every service started with it (the default of
    local mode on a GPU host) before it loaded."""
    from illusions.models import parse_device
    from orchestrator.cli import _resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert parse_device("cuda") == torch.device("cuda:0")
    assert parse_device("cuda:1") == torch.device("cuda:1")
    assert _resolve_device("auto") == "cuda:0" and _resolve_device("cuda") == "cuda:0"


@pytest.mark.parametrize(("device", "made_current"), [("cuda:1", [torch.device("cuda:1")]),
                                                      ("cuda", [])])
def test_the_batch_runners_thread_makes_its_stages_gpu_current(monkeypatch, stage1, device,
                                                               made_current):
    """The thread that runs a stage's UNet calls starts on cuda:0; it makes the stage's GPU its
    current device (for a device without index, the current one is already meant)."""
    from illusions.batching import BatchRunner

    chosen: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(stage1, "device", torch.device(device))
    runner = BatchRunner(stage1)
    runner.close()  # the thread ran and ended (an error in it would leave jobs waiting forever)
    assert chosen == made_current


def test_a_port_in_use_is_an_error_not_a_shared_port():
    """gRPC binds with SO_REUSEPORT on Linux unless told not to: a second server on a port in use
    would start and take part of the first one's calls."""
    from services.common.server import create_server

    first, port = create_server("127.0.0.1:0")
    first.start()
    try:
        with pytest.raises(OSError, match=f"could not bind 127.0.0.1:{port}: port {port} is in "
                                          "use: choose another --port, or 0 for a free one"):
            create_server(f"127.0.0.1:{port}")
    finally:
        first.stop(None)


@pytest.mark.parametrize(("host", "reason"), [
    ("192.0.2.1", "192.0.2.1 is not an address of this machine: use --host 127.0.0.1"),
    ("no-such-host.invalid", "the host 'no-such-host.invalid' does not resolve"),
])
def test_a_bind_failure_says_why(host, reason):
    from services.common.server import create_server

    with pytest.raises(OSError, match=f"could not bind {host}:5000: {reason}"):
        create_server(f"{host}:5000")


@pytest.mark.parametrize(("options", "message"), [
    ({"port": 70000}, "--port 70000: use 1 .. 65535, or 0 to pick a free port"),
    ({"port": -1}, "--port -1: use 1 .. 65535"),
    ({"max_concurrent": 0}, "--max-concurrent 0: use 1 or more"),
    ({"max_queue": -1}, "--max-queue -1: use 0 or more"),
    ({"max_batch": -3}, "--max-batch -3: use 0 or more"),
    ({"batch_multiple": -4}, "--batch-multiple -4: use 0 or more"),
])
def test_server_settings_that_cannot_work_are_refused(options, message):
    """A port beyond 65535 would wrap around to another one; no request slot would report SERVING
    and hang every call; a negative row bound would fail only at the first call."""
    with pytest.raises(ValueError, match=message):
        ServerConfig(service="stage1", model="m", **options)


def test_an_address_of_another_service_is_named(services):
    with CascadeClient(services["stage1"], services["stage1"], services["stage2"]) as client:
        with pytest.raises(ServiceError) as info:
            client.check()
    assert str(info.value) == (f"encoder at {services['stage1']} answers as the stage1 service, "
                               "not as encoder: check --encoder (and --stage1)")


def test_an_address_of_a_foreign_grpc_server_is_named():
    """A gRPC server with a health service but none of ours (another team's service, say)."""
    from grpc_health.v1 import health

    from services.common.server import create_server

    server, port = create_server("127.0.0.1:0")
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), server)
    server.start()
    try:
        address = f"127.0.0.1:{port}"
        with CascadeClient(address, address, address) as client:
            with pytest.raises(ServiceError, match=f"encoder at {address} is a gRPC server but "
                                                   "not an illusion encoder service: check "
                                                   "--encoder"):
                client.check()
    finally:
        server.stop(None)


@pytest.mark.parametrize(("address", "message"), [
    ("localhost", "--stage2 localhost: address 'localhost' is not host:port"),
    (":5000", "address ':5000' is not host:port"),
    ("127.0.0.1:70000", "address '127.0.0.1:70000': the port must be 1 .. 65535"),
    ("127.0.0.1:1,10.0.0.2", "address '10.0.0.2' is not host:port"),
])
def test_malformed_addresses_are_refused_before_connecting(address, message):
    with pytest.raises(ValueError, match=message):
        CascadeClient("127.0.0.1:1", "127.0.0.1:2", address)


def test_first_check_waits_for_a_service_still_loading(caplog):
    """A service that is up but still loading its model (NOT_SERVING) is waited for, up to the
    client's retry_timeout; one that does not finish loading in time is named as loading."""
    import socket

    from services.common.server import serve

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loaded, stop, ready = threading.Event(), threading.Event(), threading.Event()

    def load() -> pb.ModelInfo:
        loaded.wait(60)
        return pb.ModelInfo(service="encoder")

    thread = threading.Thread(target=serve, daemon=True, args=(
        ServerConfig(service="encoder", model="slow", port=port, grace_s=0.5), lambda _: None,
        load, lambda _: ready.set(), stop))
    thread.start()
    address = f"127.0.0.1:{port}"
    for _ in range(300):  # until the server has bound its port (it does so before loading)
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    try:
        service = CascadeClient(address, address, address, retry_timeout=1).services["encoder"]
        with pytest.raises(ServiceError, match=f"encoder at {address} is still loading its model "
                                               "after 1 s: wait for its `serving ...` line, or "
                                               "raise --retry-timeout"):
            service.check(1.0)
        threading.Timer(1.0, loaded.set).start()
        with caplog.at_level(logging.WARNING, logger="orchestrator.client"):
            service.check(60.0)  # returns once the model is loaded
        assert ready.is_set()
        assert "is loading its model; waiting up to 60 s (--retry-timeout)" in caplog.text
    finally:
        loaded.set()
        stop.set()
        thread.join(10)


def test_a_message_over_the_limit_is_not_called_overload():
    """gRPC answers a message over its limit with RESOURCE_EXHAUSTED, as it does a full queue:
    the user is told what is too large, not that the service is busy."""
    from orchestrator.client import _translate

    class TooLarge(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.RESOURCE_EXHAUSTED

        def details(self) -> str:
            return "CLIENT: Sent message larger than max (432029675 vs. 268435456)"

    text = str(_translate("stage1", "10.0.0.7:50051", TooLarge(), 60.0))
    assert text.startswith("stage1 at 10.0.0.7:50051: a message is larger than the 256 MiB gRPC "
                           "allows (CLIENT: Sent message larger than max")
    assert "overloaded" not in text


@pytest.mark.parametrize(("quantize", "hint"), [
    ("4bit", "--quantize 4bit may not work for this model on cpu: try 8bit, int8 or none"),
    ("none", "check the model files"),
])
def test_an_encoder_that_loads_but_cannot_encode_is_one_sentence(monkeypatch, quantize, hint):
    """bitsandbytes' 4-bit layers on the CPU failed in the warm-up with a RuntimeError deep in
    its code, printed as a traceback; now the service refuses to start in one sentence."""
    from illusions.models import ModelLoadError
    from services.encoder import server as encoder_server

    class Broken:
        @classmethod
        def from_pretrained(cls, *args, **kwargs) -> Broken:
            return cls()

        def encode(self, prompts: list[str]) -> None:
            raise RuntimeError("shape '[32, 0]' is invalid for input of size 16")

    monkeypatch.setattr(encoder_server, "TextEncoder", Broken)
    config = ServerConfig(service="encoder", model="t5-dir", quantize=quantize)
    with pytest.raises(ModelLoadError) as info:
        encoder_server.main(config, stop=threading.Event())
    assert str(info.value) == (
        "the T5 text encoder from t5-dir loaded but could not encode a prompt (shape '[32, 0]' "
        f"is invalid for input of size 16): {hint}")
