"""Nothing lost: resuming interrupted runs, refusing to mix runs, retrying overload with back-off,
and cancellation reaching every service. In-process services with the tiny checkpoints."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import grpc
import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR
from safetensors.torch import load_file
from test_services import _stage1_request_static, running

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from illusions.sampling import SamplingParams
from orchestrator.cli import main as cli_main
from orchestrator.client import CascadeClient, ServiceError, open_channel
from orchestrator.pipeline import GenerateConfig, RunMismatchError, generate
from services.common import codec
from services.common.server import Admission, ModelHandle, ServerConfig, model_metadata, serve
from services.encoder.server import EncoderServicer

# Small enough for 2 CPU cores: stage 2 at 256 px costs about a second a step here.
PARAMS = SamplingParams(num_inference_steps=2, guidance_scale=3.0)


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, str]]:
    with running("encoder", str(STAGE1_DIR)) as enc, running("stage1", str(STAGE1_DIR)) as s1, \
            running("stage2", str(STAGE2_DIR)) as s2:
        yield {"encoder": enc, "stage1": s1, "stage2": s2}


class CountingClient(CascadeClient):
    """Counts stage calls; ``interrupt_at``: the stage-2 call (1-based) that is 'Ctrl-C'ed."""

    def __init__(self, services: dict[str, str], interrupt_at: int | None = None) -> None:
        super().__init__(services["encoder"], services["stage1"], services["stage2"], timeout=120)
        self.calls = {"stage1": 0, "stage2": 0}
        self.interrupt_at = interrupt_at

    def stage1(self, request, progress=None):  # noqa: ANN001
        self.calls["stage1"] += 1
        return super().stage1(request, progress)

    def stage2(self, request, progress=None):  # noqa: ANN001
        self.calls["stage2"] += 1
        if self.calls["stage2"] == self.interrupt_at:
            raise KeyboardInterrupt
        return super().stage2(request, progress)


def job(tmp_path: Path, **changes: object) -> GenerateConfig:
    base = GenerateConfig(prompts=("a waterfall", "a deer"), views=("identity", "flip"),
                          name="run", save_dir=tmp_path, num_samples=3, params=PARAMS,
                          save_tensors=True)
    return replace(base, **changes)


def done_in(run: Path) -> list[int]:
    return json.loads((run / "metadata.json").read_text())["samples_done"]


# ---------------------------------------------------------------------------------- resume


def test_interrupted_run_resumes_with_the_same_command(services, tmp_path):
    config = job(tmp_path)
    run = config.run_dir
    # 1. Interrupted while sample 1 is in stage 2: sample 0 is kept, nothing of sample 1 is.
    with CountingClient(services, interrupt_at=2) as client, pytest.raises(KeyboardInterrupt):
        generate(config, client, progress=False)
    assert (run / "0000" / "tensors.safetensors").is_file()
    assert not (run / "0001").exists() and not list(run.glob(".*partial"))
    assert done_in(run) == [0]
    first = (run / "0000").stat().st_ino

    # 2. The same command again: sample 0 is skipped, 1 and 2 are made.
    with CountingClient(services) as client:
        folders = generate(config, client, progress=False)
        assert client.calls == {"stage1": 2, "stage2": 2}
    assert folders == [run / "0000", run / "0001", run / "0002"]
    assert (run / "0000").stat().st_ino == first, "a finished sample was redone"
    assert done_in(run) == [0, 1, 2]

    # 3. The redone sample equals an undisturbed run of it.
    with CountingClient(services) as client:
        generate(job(tmp_path, name="undisturbed", seed=1, num_samples=1), client, progress=False)
    resumed = load_file(str(run / "0001" / "tensors.safetensors"))
    undisturbed = load_file(str(tmp_path / "undisturbed" / "0001" / "tensors.safetensors"))
    for key in ("stage_1", "stage_2"):
        assert torch.equal(resumed[key], undisturbed[key]), key

    # 4. Nothing left to do: no call at all; more samples later only make the new ones.
    with CountingClient(services) as client:
        generate(config, client, progress=False)
        assert client.calls == {"stage1": 0, "stage2": 0}


def test_a_different_command_does_not_mix_into_a_run(services, tmp_path):
    config = job(tmp_path, num_samples=1, save_tensors=False)
    with CountingClient(services) as client:
        generate(config, client, progress=False)
        for changes, what in (({"params": replace(PARAMS, guidance_scale=4.0)}, "sampling"),
                              ({"views": ("identity", "rotate_180")}, "views"),
                              ({"prompts": ("a waterfall", "a cat")}, "prompts"),
                              ({"style": "an oil painting of"}, "prompts")):
            with pytest.raises(RunMismatchError, match=f"it differs from this command in its {what}") as info:
                generate(replace(config, **changes), client, progress=False)
            assert "--name" in str(info.value) and "--overwrite" in str(info.value)
        assert client.calls["stage1"] == 1, "a refused command sampled"

        # Other models: found once the services have said what they hold.
        meta = json.loads((config.run_dir / "metadata.json").read_text())
        meta["models"]["stage2"]["model"] = "DeepFloyd/IF-II-L-v1.0"
        (config.run_dir / "metadata.json").write_text(json.dumps(meta))
        with pytest.raises(RunMismatchError, match="it differs from this command in its models"):
            generate(config, client, progress=False)

        # --overwrite replaces the earlier run.
        other = replace(config, views=("identity", "rotate_180"), overwrite=True)
        generate(other, client, progress=False)
        meta = json.loads((config.run_dir / "metadata.json").read_text())
        assert meta["views"][1]["name"] == "rotate_180" and meta["samples_done"] == [0]
        # More samples of the same run are fine: only the new one is made.
        calls = client.calls["stage1"]
        generate(replace(other, overwrite=False, num_samples=2), client, progress=False)
        assert client.calls["stage1"] == calls + 1
        assert json.loads((config.run_dir / "metadata.json").read_text())["samples_done"] == [0, 1]


@contextmanager
def holding_lock(run_dir: Path) -> Iterator[None]:
    """Another process holds ``run_dir``'s lock (as a running ``generate`` does) until the block
    ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(run_dir / ".lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.communicate(timeout=30)


def test_a_second_process_on_one_run_folder_is_refused(services, tmp_path):
    """While one generate writes into a run folder, another into the same folder (which would
    replace the first one's half-written samples) is refused, and nothing of the first changes."""
    from orchestrator.pipeline import RunBusyError

    config = job(tmp_path, num_samples=1, save_tensors=False)
    with CountingClient(services) as client:
        generate(config, client, progress=False)
        first = (config.run_dir / "0000").stat().st_ino
        with holding_lock(config.run_dir):
            with pytest.raises(RunBusyError, match="another `illusion generate` is writing into"):
                generate(replace(config, num_samples=2), client, progress=False)
        assert client.calls["stage1"] == 1, "a refused command sampled"
        assert done_in(config.run_dir) == [0]
        generate(replace(config, num_samples=2), client, progress=False)  # free again: resumes
    assert (config.run_dir / "0000").stat().st_ino == first
    assert done_in(config.run_dir) == [0, 1]


def test_a_finished_run_is_found_without_services(services, tmp_path):
    """finished_run (local mode asks it before starting any service) finds a run whose samples are
    all made by the same command and models, and nothing else."""
    from orchestrator.pipeline import RunBusyError, finished_run, locked_run_dir

    config = job(tmp_path, num_samples=2, save_tensors=False)
    with CountingClient(services) as client:
        generate(config, client, progress=False)
    recorded = json.loads((config.run_dir / "metadata.json").read_text())["models"]
    models = {name: {key: info[key] for key in ("model", "dtype", "quantize", "random_weights")}
              for name, info in recorded.items()}
    assert finished_run(config, models) == [config.run_dir / "0000", config.run_dir / "0001"]
    assert finished_run(replace(config, num_samples=1, seed=1), models) == [config.run_dir / "0001"]
    # --overwrite replaces another run only: the same run's samples are its pictures already.
    assert finished_run(replace(config, overwrite=True), models) == [config.run_dir / "0000",
                                                                      config.run_dir / "0001"]
    other_model = {**models, "stage1": {**models["stage1"], "model": "DeepFloyd/IF-I-XL-v1.0"}}
    for changed, given in ((config, other_model), (replace(config, num_samples=3), models),
                           (replace(config, save_tensors=True), models),
                           (replace(config, style="an oil painting of"), models),
                           (replace(config, name="elsewhere"), models)):
        assert finished_run(changed, given) is None, changed
    # The holding thread may hold the folder again; another thread is refused meanwhile.
    refused: list[BaseException] = []

    def other_thread() -> None:
        try:
            with locked_run_dir(config.run_dir):
                pass
        except RunBusyError as exc:
            refused.append(exc)

    with locked_run_dir(config.run_dir), locked_run_dir(config.run_dir):
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(refused) == 1
    other_thread()  # free again
    assert len(refused) == 1
    # A folder it made and left empty goes again.
    fresh = tmp_path / "results" / "never-used"
    with locked_run_dir(fresh):
        assert fresh.is_dir()
    assert not (tmp_path / "results").exists()
    (tmp_path / "results").mkdir()
    with locked_run_dir(fresh):
        (tmp_path / "results" / "other-run").mkdir()  # the folder above fills meanwhile
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == ["other-run"]
    with locked_run_dir(config.run_dir):
        pass
    assert (config.run_dir / ".lock").is_file() and done_in(config.run_dir) == [0, 1]


def test_save_dir_that_is_a_file_is_one_sentence(tmp_path):
    from illusions.sampling import InvalidInputError
    from orchestrator.pipeline import check_config

    (tmp_path / "results").write_text("not a folder")
    with pytest.raises(InvalidInputError, match="--save-dir: .*results is a file, not a folder"):
        check_config(job(tmp_path / "results"))
    (tmp_path / "run").write_text("not a folder")
    with pytest.raises(InvalidInputError, match="--name: .*run is a file, not a folder"):
        check_config(job(tmp_path))
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")
    with pytest.raises(InvalidInputError, match="--save-dir: .*gone is a link to nothing"):
        check_config(job(tmp_path / "gone"))


def test_a_run_that_made_no_sample_does_not_hold_its_folder(services, tmp_path):
    """A command that ended before its first sample (refused by a service, interrupted) leaves
    metadata.json but no sample: a corrected command runs in the same folder instead of being
    called another run."""
    config = job(tmp_path, num_samples=1, save_tensors=False)
    with CountingClient(services, interrupt_at=1) as client, pytest.raises(KeyboardInterrupt):
        generate(config, client, progress=False)
    assert (config.run_dir / "metadata.json").is_file() and done_in(config.run_dir) == []
    corrected = replace(config, params=replace(PARAMS, guidance_scale=4.0))
    with CountingClient(services) as client:
        generate(corrected, client, progress=False)
    assert done_in(config.run_dir) == [0]
    meta = json.loads((config.run_dir / "metadata.json").read_text())
    assert meta["sampling"]["guidance_scale"] == 4.0


def test_cli_refuses_another_run_in_one_line(services, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "0000").mkdir()  # samples of unknown origin
    code = cli_main(["generate", "--prompts", "a", "b", "--views", "identity", "flip",
                     "--save-dir", str(tmp_path), "--name", "run", "--encoder",
                     services["encoder"], "--stage1", services["stage1"], "--stage2",
                     services["stage2"]])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert "no metadata.json" in lines[0] and "--overwrite" in lines[0]


# --------------------------------------------------------------------------------- overload


def occupy(channel: grpc.Channel, steps: int) -> Iterator[pb.SampleEvent]:
    """Start a ``steps``-step call and return it once it runs (holding the only slot). The slot of
    a call that just finished may take a moment to be released: retry until admitted."""
    deadline = time.monotonic() + 10
    while True:
        call = pb_grpc.Stage1Stub(channel).Sample(_stage1_request_static(steps), timeout=60)
        try:
            next(call)
            return call
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_overload_is_retried_after_the_servers_hint():
    with running("stage1", str(STAGE1_DIR), max_queue=0) as address:
        with open_channel(address) as channel, \
                CascadeClient(address, address, address, timeout=60, retry_timeout=30) as client:
            busy = occupy(channel, 6)
            started = time.monotonic()
            image, _ = client.stage1(_stage1_request_static(1))  # refused, waits, retried
            waited = time.monotonic() - started
            assert list(busy)[-1].HasField("result")
            assert image.shape == (1, 3, 64, 64)
            assert client.retries["stage1"] >= 1
            assert waited >= 2.0  # the server's retry-after-ms hint (2000) was honoured

            # Bounded: a budget shorter than the hint gives up at once, with a clear error.
            busy = occupy(channel, 200)
            impatient = CascadeClient(address, address, address, timeout=60, retry_timeout=1)
            with impatient, pytest.raises(ServiceError, match="stayed overloaded") as info:
                impatient.stage1(_stage1_request_static(1))
            busy.cancel()
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert f"stage1 at {address}" in str(info.value)


# ------------------------------------------------------------------------ a service that is gone


def test_a_service_that_stays_away_is_a_clear_error_after_retry_timeout():
    """One replica, gone for good: the client waits --retry-timeout for it, then names it."""
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    started = time.monotonic()
    with CascadeClient(address, address, address, timeout=30, retry_timeout=2) as client, \
            pytest.raises(ServiceError) as info:
        client.stage2(pb.Stage2Request())
    waited = time.monotonic() - started
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert f"stage2 at {address} is unavailable" in str(info.value)
    assert "did not come back within 2 s (--retry-timeout)" in str(info.value)
    assert 2 <= waited < 10


class _RestartedEncoder(pb_grpc.EncoderServicer):
    """An encoder whose first Encode call is lost as it restarts, as ``restarted_as`` when given
    (a replica restarted with other settings); the Encode tried again answers."""

    def __init__(self, restarted_as: pb.ModelInfo | None) -> None:
        self.info = pb.ModelInfo(service="encoder", model="t5", dtype="float32", embed_dim=4)
        self.restarted_as, self.encodes = restarted_as, 0

    def Describe(self, request, context):  # noqa: N802
        return self.info

    def Encode(self, request, context):  # noqa: N802
        self.encodes += 1
        if self.encodes == 1:
            self.info = self.restarted_as or self.info
            context.abort(grpc.StatusCode.UNAVAILABLE, "restarting")
        context.send_initial_metadata(model_metadata(self.info))
        embeds = codec.encode(torch.zeros(len(request.prompts), 77, 4))
        return pb.EncodeResponse(prompt_embeds=embeds,
                                 negative_prompt_embeds=codec.encode(torch.zeros(1, 77, 4)))


@contextmanager
def _encoder_serving(servicer: pb_grpc.EncoderServicer, load: Callable[[], pb.ModelInfo],
                     model: str = "t5") -> Iterator[str]:
    """``servicer`` served in a thread (``load`` as the model's loading); yields its address."""
    stop, ready, address = threading.Event(), threading.Event(), []
    thread = threading.Thread(target=serve, daemon=True, args=(
        ServerConfig(service="encoder", model=model, grace_s=0.5),
        lambda s: pb_grpc.add_EncoderServicer_to_server(servicer, s), load,
        lambda line: (address.append(line.rsplit(" ", 1)[-1]), ready.set()), stop))
    thread.start()
    assert ready.wait(30)
    try:
        yield address[0]
    finally:
        stop.set()
        thread.join(10)


def test_a_service_that_comes_back_as_another_model_stops_the_run():
    """A lost call is tried again once the service serves; if it came back with other settings
    (a rolling update of a replica's arguments), the client says so instead of mixing models."""
    same = _RestartedEncoder(restarted_as=None)
    with _encoder_serving(same, lambda: same.info) as address, \
            CascadeClient(address, address, address, retry_timeout=5) as client:
        client.describe(["encoder"])
        prompts, _ = client.encode(["a", "b"])
        assert prompts.shape == (2, 77, 4) and client.retries["encoder"] == 1
    other = _RestartedEncoder(pb.ModelInfo(service="encoder", model="t5", dtype="bfloat16",
                                           embed_dim=4))
    with _encoder_serving(other, lambda: other.info) as address, \
            CascadeClient(address, address, address, retry_timeout=5) as client, \
            pytest.raises(ServiceError) as info:
        client.describe(["encoder"])
        client.encode(["a", "b"])
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"encoder at {address} answered as another model (dtype 'bfloat16', the run's is "
            "'float32'): the run would mix two models' samples") in str(info.value)
    assert other.encodes == 2  # its answer on the other model was refused, not tried again


def test_a_replica_of_another_model_among_the_replicas_stops_the_run():
    """Two real encoder replicas behind one round_robin target, one loaded in bfloat16: every
    answer names its model, so the first answer of the odd replica stops the run, and names it.
    Replicas with the same settings answer call after call."""
    model = str(STAGE1_DIR)
    with running("encoder", model) as a, running("encoder", model) as b, \
            CascadeClient(f"{a},{b}", a, a, retry_timeout=5) as client:
        client.describe(["encoder"])
        for _ in range(4):
            assert client.encode(["a"])[0].dtype == torch.float32
    with running("encoder", model) as a, running("encoder", model, dtype="bfloat16") as b, \
            CascadeClient(f"{a},{b}", a, a, retry_timeout=5) as client:
        first = client.describe(["encoder"])["encoder"].dtype  # round_robin starts anywhere
        with pytest.raises(ServiceError) as info:
            for _ in range(4):
                client.encode(["a"])
    other = {"float32": "bfloat16", "bfloat16": "float32"}[first]
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert (f"a replica of encoder at {a},{b} answered as another model (dtype '{other}', the "
            f"run's is '{first}')") in str(info.value)


# ----------------------------------------------------------------------------- cancellation


class _SlowT5:
    """A text encoder whose one forward pass takes ``seconds``; counts the passes."""

    def __init__(self, seconds: float) -> None:
        self.seconds, self.calls = seconds, 0

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        time.sleep(self.seconds)
        return torch.zeros(len(prompts), 77, 4), torch.zeros(1, 77, 4)


@contextmanager
def slow_encoder(model: _SlowT5) -> Iterator[str]:
    handle: ModelHandle[_SlowT5] = ModelHandle("encoder")
    servicer = EncoderServicer(handle, Admission(1, 4))  # type: ignore[arg-type]

    def load() -> pb.ModelInfo:
        handle.set(model, pb.ModelInfo(service="encoder"))
        return handle.info

    with _encoder_serving(servicer, load, model="slow") as address:
        yield address


def test_encoder_skips_calls_cancelled_or_expired_while_queued():
    """The encoder's work is one forward pass: a call whose deadline passes or that the client
    cancels while it waits for the model never runs it."""
    model = _SlowT5(1.5)
    with slow_encoder(model) as address, open_channel(address) as channel:
        stub = pb_grpc.EncoderStub(channel)
        first = stub.Encode.future(pb.EncodeRequest(prompts=["a"]), timeout=10)
        time.sleep(0.3)  # the first call holds the model
        with pytest.raises(grpc.RpcError) as info:
            stub.Encode(pb.EncodeRequest(prompts=["b"]), timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        cancelled = stub.Encode.future(pb.EncodeRequest(prompts=["c"]), timeout=10)
        time.sleep(0.2)
        cancelled.cancel()
        assert first.result().prompt_embeds.shape == [1, 77, 4]
        time.sleep(0.5)  # the queued calls would run now
        assert model.calls == 1
        assert stub.Encode(pb.EncodeRequest(prompts=["d"]), timeout=10).prompt_embeds.shape[0] == 1
        assert model.calls == 2


def test_stage2_cancel_stops_within_a_step(services, caplog):
    caplog.set_level(logging.DEBUG, logger="services.common.server")
    prompt = codec.encode(torch.zeros(2, 77, 32))
    request = pb.Stage2Request(
        image=codec.encode(torch.zeros(1, 3, 64, 64)), prompt_embeds=prompt,
        negative_prompt_embeds=codec.encode(torch.zeros(1, 77, 32)),
        views=[pb.ViewSpec(name="identity"), pb.ViewSpec(name="flip")],
        params=pb.SamplingParams(num_inference_steps=500, guidance_scale=3, noise_level=50))
    with open_channel(services["stage2"]) as channel:
        stub = pb_grpc.Stage2Stub(channel)
        call = stub.Sample(request, timeout=120)
        seen = next(call).progress.step  # step 1 done
        call.cancel()
        time.sleep(4.0)  # a few steps' time
        steps = [r.args[0] for r in caplog.records
                 if r.getMessage().startswith("step ") and r.args[1] == 500]
        # Free again: a short call runs to the end.
        request.params.num_inference_steps = 1
        assert list(stub.Sample(request, timeout=60))[-1].HasField("result")
    assert seen >= 1 and max(steps) <= seen + 1, f"ran on to step {max(steps)} after {seen}"


def test_a_failed_metadata_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    from orchestrator.output import write_json_atomic

    path = tmp_path / "metadata.json"
    write_json_atomic(path, {"samples_done": [0]})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"samples_done": [0, 1], "bad": object()})
    assert json.loads(path.read_text()) == {"samples_done": [0]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metadata.json"]
    assert path.stat().st_mode & 0o777 == 0o644, "readable like the images beside it"


def test_a_sample_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every file of a sample, its folder, and the run folder after the rename are fsync'd, in
    that order: a machine that dies after the rename leaves a whole sample, not empty files."""
    import os

    from illusions.views import build_views
    from orchestrator import output

    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(output.os, "fsync", fsync)
    images = {64: torch.rand(1, 3, 64, 64) * 2 - 1, 256: torch.rand(1, 3, 256, 256) * 2 - 1}
    run = tmp_path.resolve() / "run"  # as /proc names the files
    final = output.write_sample(run, 7, build_views(["identity", "flip"]), images,
                                save_tensors=True, prompts=["a", "b"])
    partial = str(run / ".0007.partial")
    files = sorted(p.name for p in final.iterdir())
    assert files == ["sample_256.png", "sample_256.views.png", "sample_64.png",
                     "sample_64.views.png", "tensors.safetensors"]
    assert sorted(synced[:5]) == [f"{partial}/{name}" for name in files]
    assert synced[5:] == [partial, str(run)]
    synced.clear()
    output.write_json_atomic(run / "metadata.json", {"samples_done": [7]})
    assert len(synced) == 2 and synced[1] == str(run), synced


def test_a_freed_slot_goes_to_the_call_that_waited_longest():
    """Admission is first come, first served: a call arriving (or retrying) just as a slot is
    freed queues behind those already waiting instead of taking it, a waiting call that is
    cancelled leaves the queue, and one cancelled just as it is given the slot passes it on."""
    from illusions.sampling import SamplingCancelled
    from services.common.errors import ServiceOverloaded
    from services.common.server import Admission

    admission = Admission(max_running=1, max_waiting=3)
    admission.acquire(lambda: True)  # the running call
    order: list[str] = []
    active = {"a": True, "b": True, "c": True, "d": True}

    def until(condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.01)

    def call(name: str, waiting: int | None) -> threading.Thread:
        def run() -> None:
            try:
                with admission.slot(lambda: active[name]):
                    order.append(name)
            except SamplingCancelled:
                order.append(f"{name} cancelled")

        thread = threading.Thread(target=run)
        thread.start()
        if waiting is not None:  # in the queue before the next one arrives
            until(lambda: len(admission._waiting) == waiting)
        return thread

    threads = [call(name, waiting) for waiting, name in enumerate("abc", start=1)]
    with pytest.raises(ServiceOverloaded, match="3 requests already waiting"):
        admission.acquire(lambda: True)
    active["b"] = False  # b gives up while waiting
    until(lambda: order == ["b cancelled"])
    admission.release()  # the running call ends; at that moment d arrives
    threads.append(call("d", None))
    for thread in threads:
        thread.join(5)
    assert order == ["b cancelled", "a", "c", "d"]

    # Cancelled as its turn came: the slot goes on to the next call rather than being lost.
    admission = Admission(max_running=1, max_waiting=2)
    admission.acquire(lambda: True)
    errors: list[BaseException] = []

    def slot_ends_as_it_gives_up() -> bool:
        admission.release()  # the running call ends: its slot is handed to this waiting call
        return False  # which is cancelled at that very moment

    def give_up() -> None:
        try:
            admission.acquire(slot_ends_as_it_gives_up)
        except SamplingCancelled as error:
            errors.append(error)

    waiting = threading.Thread(target=give_up)
    waiting.start()
    waiting.join(5)
    assert len(errors) == 1
    admission.acquire(lambda: True)  # does not wait: the slot was passed on, not lost
    admission.release()
