"""Property-based fuzzing of every RPC with malformed requests (hypothesis).

Every bad request must be answered with a clear status (INVALID_ARGUMENT, RESOURCE_EXHAUSTED for
oversize messages; OK when the mutation happens to be valid), never UNKNOWN or INTERNAL, and the
server must serve a valid call afterwards. In-process services with the tiny checkpoints and a
bounded number of examples (derandomized, so CI sees the same ones every run).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_services import running

from anagram.v1 import anagram_pb2 as pb
from illusions.views import VIEWS
from orchestrator.client import open_channel
from services.common import codec
from services.common.stage import MAX_VIEWS
from services.encoder.server import MAX_PROMPT_CHARS, MAX_PROMPTS

LIMIT = 1 << 20  # the fuzzed servers accept messages up to 1 MiB, so oversize ones are cheap
DIM = 32  # embedding width of the tiny checkpoints
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
FUZZ = settings(max_examples=50, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TRIED: dict[str, int] = {}  # examples sent per RPC, for docs/reliability.md


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, str]]:
    with running("encoder", str(STAGE1_DIR), max_message_bytes=LIMIT) as enc, \
            running("stage1", str(STAGE1_DIR), max_message_bytes=LIMIT) as s1, \
            running("stage2", str(STAGE2_DIR), max_message_bytes=LIMIT) as s2:
        yield {"encoder": enc, "stage1": s1, "stage2": s2}


@pytest.fixture(scope="module")
def channels(services) -> Iterator[dict[str, grpc.Channel]]:
    opened = {name: open_channel(address) for name, address in services.items()}
    yield opened
    for channel in opened.values():
        channel.close()


def raw_call(channel: grpc.Channel, method: str, payload: bytes, streaming: bool,
             timeout: float = 30.0) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send ``payload`` as the request bytes of ``method``; return (code, details, responses)."""
    try:
        if streaming:
            call = channel.unary_stream(method)
            responses = list(call(payload, timeout=timeout))
        else:
            responses = [channel.unary_unary(method)(payload, timeout=timeout)]
        return grpc.StatusCode.OK, "", responses
    except grpc.RpcError as err:
        return err.code(), err.details() or "", []


def check_answer(rpc: str, channel: grpc.Channel, method: str, payload: bytes,
                 streaming: bool) -> tuple[grpc.StatusCode, str, list[bytes]]:
    TRIED[rpc] = TRIED.get(rpc, 0) + 1
    code, details, responses = raw_call(channel, method, payload, streaming)
    assert code in ALLOWED, f"{rpc}: {code.name}: {details}"
    if code != grpc.StatusCode.OK:
        assert len(details) > 10, f"{rpc}: {code.name} without an explanation"
    return code, details, responses


# ------------------------------------------------------------------------------- strategies

DTYPES = sorted(codec.DTYPES)
finite_or_not = st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e38, -0.0, 3.0])


@st.composite
def tensors(draw: st.DrawFn, shape: tuple[int, ...]) -> pb.Tensor:
    """A Tensor message meant to be ``shape`` float32, broken in one of many ways."""
    kind = draw(st.sampled_from(["garbage", "shape", "near", "dtype", "nonfinite", "oversize",
                                 "huge_dims", "many_dims", "short_data", "valid", "empty"]))
    if kind == "garbage":
        return pb.Tensor(dtype=draw(st.sampled_from([*DTYPES, "", "complex64", "float8", "x" * 300])),
                         shape=draw(st.lists(st.integers(-2**63, 2**63 - 1), max_size=6)),
                         data=draw(st.binary(max_size=64)))
    if kind == "shape":
        other = tuple(draw(st.lists(st.integers(0, 80), min_size=0, max_size=5)))
        if math.prod(other) > 200_000:
            other = (1, 2, 3)
        return codec.encode(torch.zeros(other))
    if kind == "near":  # the right number of dimensions, some of other sizes
        near = tuple(draw(st.sampled_from([d, 0, 1, 2, 3, 5, 63, 65, 128, 200])) for d in shape)
        if math.prod(near) > 250_000:
            near = shape[:-1] + (1,)
        return codec.encode(torch.zeros(near))
    if kind == "dtype":
        dtype = draw(st.sampled_from(DTYPES))
        return codec.encode(torch.zeros(shape).to(codec.DTYPES[dtype]))
    if kind == "nonfinite":
        tensor = torch.zeros(shape)
        tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = draw(finite_or_not)
        return codec.encode(tensor)
    if kind == "oversize":
        count = LIMIT // 4 + draw(st.integers(1, 1000))
        return pb.Tensor(dtype="float32", shape=[count], data=bytes(count * 4))
    if kind == "huge_dims":
        return pb.Tensor(dtype="float32", shape=[2**40, 2**40, 0, 2**62], data=b"")
    if kind == "many_dims":
        return pb.Tensor(dtype="float32", shape=[1] * draw(st.integers(9, 200)), data=bytes(4))
    if kind == "short_data":
        full = codec.encode(torch.zeros(shape))
        return pb.Tensor(dtype="float32", shape=shape, data=full.data[: draw(st.integers(0, 7))])
    if kind == "empty":
        return pb.Tensor()
    return codec.encode(torch.zeros(shape))


seeds = st.integers(-2**63, 2**63 - 1)
view_names = st.sampled_from([*VIEWS, "", "spin", "IDENTITY", "identity ", "flip\x00", "é" * 40])
view_args = st.lists(st.one_of(
    st.sampled_from(["num_patches=0", "num_patches=-4", "num_patches=7", "num_patches=100000000",
                     "grid=0", "grid=1", "grid=999", "skew_factor=nan", "skew_factor=inf",
                     "skew_factor=-1e30", "sigma=0", "sigma=-1", "kernel_size=0",
                     "kernel_size=100000", "size=-3", "scale=0", "scale=inf", "=", "a=b=c",
                     "nope=1", "3", "1e400", ""]),
    st.text(max_size=20)), max_size=4)


BAD_VALUES = ["0", "-1", "1", "2", "3", "7", "64", "65", "100000000", "1e400", "nan", "inf",
              "-1e30", "0.0001", "2.5", "", "x"]
# Every argument of every view, with values at and beyond its limits.
targeted_views = st.sampled_from([
    pb.ViewSpec(name=name, args=[f"{arg.name}={value}"])
    for name, info in VIEWS.items() for arg in info.args for value in BAD_VALUES
])


@st.composite
def view_lists(draw: st.DrawFn) -> list[pb.ViewSpec]:
    """Mostly one view (as many as the request has prompts), sometimes none or too many; one view
    seed for all of them, sometimes one each."""
    count = draw(st.one_of(st.just(1), st.integers(0, MAX_VIEWS + 4)))
    seed = draw(st.one_of(st.just(0), seeds))
    views = []
    for _ in range(count):
        spec = pb.ViewSpec()
        if draw(st.booleans()):
            spec.CopyFrom(draw(targeted_views))
        else:
            spec.name, spec.args[:] = draw(view_names), draw(view_args)
        spec.seed = seed if draw(st.integers(0, 9)) else draw(seeds)
        views.append(spec)
    return views


steps = st.one_of(st.integers(-2**31, 0), st.integers(1001, 2**31 - 1), st.integers(1, 2))
noise = st.one_of(st.integers(-2**31, -1), st.integers(1000, 2**31 - 1), st.integers(0, 999))
guidance = st.floats(width=32, allow_nan=True, allow_infinity=True)


def params(**base: object) -> st.SearchStrategy[pb.SamplingParams]:
    return st.builds(pb.SamplingParams, num_inference_steps=st.one_of(st.just(1), steps),
                     guidance_scale=st.one_of(st.just(3.0), guidance),
                     reduction=st.one_of(st.sampled_from(["mean", "sum", "alternate"]),
                                         st.text(max_size=12)),
                     noise_level=st.one_of(st.just(50), noise), seed=st.one_of(st.just(0), seeds))


def one_view_request(kind: type, **fields: object) -> object:
    """A valid one-view request (the cheapest that samples): identity, one prompt, 1 step."""
    return kind(prompt_embeds=codec.encode(torch.zeros(1, 77, DIM)),
                negative_prompt_embeds=codec.encode(torch.zeros(1, 77, DIM)),
                views=[pb.ViewSpec(name="identity")],
                params=pb.SamplingParams(num_inference_steps=1, guidance_scale=3.0, noise_level=50),
                **fields)


@st.composite
def stage_requests(draw: st.DrawFn, kind: type) -> bytes:
    """A valid stage request with 1 to 3 fields broken."""
    image = {"image": codec.encode(torch.zeros(1, 3, 64, 64))} if kind is pb.Stage2Request else {}
    request = one_view_request(kind, **image)
    fields = ["prompt_embeds", "negative_prompt_embeds", "views", "params", "ref_image"]
    shapes = {"prompt_embeds": (1, 77, DIM), "negative_prompt_embeds": (1, 77, DIM),
              "ref_image": (3, 64, 64), "image": (1, 3, 64, 64), "rng_state": (5056,)}
    if kind is pb.Stage2Request:
        fields += ["image", "rng_state"]
    for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique=True)):
        if field == "views":
            del request.views[:]
            request.views.extend(draw(view_lists()))
        elif field == "params":
            request.params.CopyFrom(draw(params()))
        elif field == "rng_state" and draw(st.booleans()):
            request.rng_state.CopyFrom(codec.encode(
                torch.randint(0, 256, (draw(st.integers(0, 6000)),), dtype=torch.uint8)))
        else:
            getattr(request, field).CopyFrom(draw(tensors(shapes[field])))
    return request.SerializeToString()


prompt_text = st.one_of(st.text(max_size=50), st.just(""), st.just("x" * (MAX_PROMPT_CHARS + 1)),
                        st.text(min_size=MAX_PROMPT_CHARS - 5, max_size=MAX_PROMPT_CHARS + 50))
encode_requests = st.one_of(
    st.builds(pb.EncodeRequest, prompts=st.lists(prompt_text, max_size=MAX_PROMPTS + 4)),
    st.just(pb.EncodeRequest(prompts=["y" * (LIMIT + 10)])),  # oversize message
).map(lambda r: r.SerializeToString())
# Bytes on the wire that may not even parse as the request message.
wire_garbage = st.one_of(st.binary(max_size=200),
                         st.binary(min_size=1, max_size=40).map(lambda b: b"\x0a\xff\xff\xff\x0f" + b),
                         st.just(b"\x12\x03\xff\xfe\xfd"))


# ------------------------------------------------------------------------------------ tests


def still_serving(channel: grpc.Channel, rpc: str, method: str, request: bytes,
                  streaming: bool) -> None:
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    code, details, responses = raw_call(channel, method, request, streaming, timeout=60)
    assert code == grpc.StatusCode.OK, f"{rpc} fails a valid call after fuzzing: {details}"
    if streaming:
        assert pb.SampleEvent.FromString(responses[-1]).HasField("result")


@FUZZ
@given(payload=encode_requests)
def test_fuzz_encoder_encode(channels, payload):
    check_answer("Encoder.Encode", channels["encoder"], "/anagram.v1.Encoder/Encode", payload,
                 streaming=False)


METHODS = [("encoder", "Encoder", "Encode", False), ("encoder", "Encoder", "Describe", False),
           ("stage1", "Stage1", "Sample", True), ("stage1", "Stage1", "Describe", False),
           ("stage2", "Stage2", "Sample", True), ("stage2", "Stage2", "Describe", False)]


@settings(FUZZ, max_examples=15)
@given(payload=wire_garbage)
def test_fuzz_wire_bytes_of_every_rpc(channels, payload):
    """Bytes that may not parse as the request message at all, sent to every RPC."""
    for name, service, rpc, streaming in METHODS:
        code, _, responses = check_answer(f"{service}.{rpc} (wire bytes)", channels[name],
                                          f"/anagram.v1.{service}/{rpc}", payload, streaming)
        if code == grpc.StatusCode.OK and rpc == "Describe":
            assert pb.ModelInfo.FromString(responses[0]).service == name


@settings(FUZZ, max_examples=100)
@given(payload=stage_requests(pb.Stage1Request))
def test_fuzz_stage1_sample(channels, payload):
    code, _, responses = check_answer("Stage1.Sample", channels["stage1"],
                                      "/anagram.v1.Stage1/Sample", payload, streaming=True)
    if code == grpc.StatusCode.OK:
        assert pb.SampleEvent.FromString(responses[-1]).HasField("result")


@settings(FUZZ, max_examples=80)
@given(payload=stage_requests(pb.Stage2Request))
def test_fuzz_stage2_sample(channels, payload):
    code, _, responses = check_answer("Stage2.Sample", channels["stage2"],
                                      "/anagram.v1.Stage2/Sample", payload, streaming=True)
    if code == grpc.StatusCode.OK:
        assert pb.SampleEvent.FromString(responses[-1]).HasField("result")


CHECKS: list[tuple[str, str, str, Callable[[], bytes], bool]] = [
    ("encoder", "Encoder.Encode", "/anagram.v1.Encoder/Encode",
     lambda: pb.EncodeRequest(prompts=["a deer"]).SerializeToString(), False),
    ("stage1", "Stage1.Sample", "/anagram.v1.Stage1/Sample",
     lambda: one_view_request(pb.Stage1Request).SerializeToString(), True),
    ("stage2", "Stage2.Sample", "/anagram.v1.Stage2/Sample",
     lambda: one_view_request(pb.Stage2Request, image=codec.encode(torch.zeros(1, 3, 64, 64)))
     .SerializeToString(), True),
]


@pytest.mark.parametrize(("name", "rpc", "method", "request_bytes", "streaming"), CHECKS,
                         ids=[c[1] for c in CHECKS])
def test_servers_still_serve_after_fuzzing(channels, name, rpc, method, request_bytes, streaming):
    """Runs after the fuzz tests above (file order): every server still answers a valid call."""
    still_serving(channels[name], rpc, method, request_bytes(), streaming)
