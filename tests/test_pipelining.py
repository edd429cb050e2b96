"""The orchestrator pipelines samples: stage 1 of the next sample runs while stage 2 works on
earlier ones (one stage-2 call per replica in flight), and no picture changes."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR
from safetensors.torch import load_file

from anagram.v1 import anagram_pb2 as pb
from illusions.sampling import SamplingParams
from orchestrator.client import CascadeClient, ServiceError
from orchestrator.pipeline import GenerateConfig, generate


class StandIn:
    """A CascadeClient stand-in that records when each call starts and ends."""

    def __init__(self, stage2_seconds: float = 0.3, fail_seed: int | None = None,
                 stage1_seconds: float = 0.05, stage2_by_seed: dict[int, float] | None = None
                 ) -> None:
        self.stage1_seconds = stage1_seconds
        self.stage2_seconds = stage2_seconds
        self.stage2_by_seed = stage2_by_seed or {}
        self.fail_seed = fail_seed
        self.events: list[tuple[float, str, str, int]] = []
        self._lock = threading.Lock()

    def _log(self, what: str, edge: str, seed: int) -> None:
        with self._lock:
            self.events.append((time.perf_counter(), what, edge, seed))

    def describe(self) -> dict[str, pb.ModelInfo]:
        return {name: pb.ModelInfo(service=name, model="stand-in") for name in
                ("encoder", "stage1", "stage2")}

    def encode(self, prompts):
        return torch.zeros(len(prompts), 77, 8), torch.zeros(1, 77, 8)

    def stage1(self, request, progress=None):
        seed = request.params.seed
        self._log("stage1", "start", seed)
        time.sleep(self.stage1_seconds)
        self._log("stage1", "end", seed)
        return torch.full((1, 3, 8, 8), seed / 10), torch.tensor([seed])

    def stage2(self, request, progress=None):
        seed = request.params.seed
        self._log("stage2", "start", seed)
        time.sleep(self.stage2_by_seed.get(seed, self.stage2_seconds))
        if seed == self.fail_seed:
            raise ServiceError("stage2 at 127.0.0.1:9 is unavailable")
        self._log("stage2", "end", seed)
        return torch.full((1, 3, 16, 16), seed / 10), torch.tensor([seed])

    def when(self, what: str, edge: str, seed: int) -> float:
        return next(t for t, w, e, s in self.events if (w, e, s) == (what, edge, seed))


def _config(tmp_path: Path, n: int, name: str = "run") -> GenerateConfig:
    return GenerateConfig(prompts=("a", "b"), views=("identity", "flip"), save_dir=tmp_path,
                          name=name, num_samples=n,
                          params=SamplingParams(num_inference_steps=3, guidance_scale=3.0))


def test_stage_1_of_the_next_sample_overlaps_stage_2(tmp_path):
    client = StandIn()
    written = generate(_config(tmp_path, 3), client, progress=False, stage2_workers=1)
    assert [p.name for p in written] == ["0000", "0001", "0002"]
    assert all((p / "sample_16.png").is_file() for p in written)
    for seed in (0, 1):
        assert client.when("stage1", "start", seed + 1) < client.when("stage2", "end", seed)
    # One worker: stage-2 calls never overlap each other.
    assert client.when("stage2", "start", 1) >= client.when("stage2", "end", 0)


def _peak(client: StandIn, stage: str) -> int:
    """Most calls of ``stage`` in flight at once."""
    in_flight = peak = 0
    for _, what, edge, _ in sorted(client.events):
        if what == stage:
            in_flight += 1 if edge == "start" else -1
            peak = max(peak, in_flight)
    return peak


def test_one_stage_2_call_in_flight_per_worker(tmp_path):
    client = StandIn()
    generate(_config(tmp_path, 4), client, progress=False, stage2_workers=2)
    assert client.when("stage2", "start", 1) < client.when("stage2", "end", 0)
    assert _peak(client, "stage2") == 2
    assert _peak(client, "stage1") == 1


def test_a_batch_of_stage_1_calls_goes_out_together(tmp_path):
    """--batch 3: three stage-1 calls in flight at once (a service started with
    --max-concurrent 3 runs them through shared UNet calls)."""
    client = StandIn(stage1_seconds=0.3, stage2_seconds=0.1)
    written = generate(_config(tmp_path, 6), client, progress=False, stage1_workers=3,
                       stage2_workers=3)
    assert len(written) == 6 and all(p.is_dir() for p in written)
    assert _peak(client, "stage1") == 3


def test_a_failed_sample_stops_the_run_and_keeps_finished_ones(tmp_path):
    client = StandIn(fail_seed=1)
    with pytest.raises(ServiceError, match="unavailable"):
        generate(_config(tmp_path, 4), client, progress=False, stage2_workers=1)
    run = tmp_path / "run"
    assert (run / "0000").is_dir() and not (run / "0001").exists()
    assert not list(run.glob(".*.partial"))


class SlowStaging:
    """Wraps ``stage_sample`` so that staging takes ``seconds``; records the most at once."""

    def __init__(self, seconds: float) -> None:
        from orchestrator import output

        self.real = output.stage_sample
        self.seconds = seconds
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, *args, **kwargs):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.seconds)
            return self.real(*args, **kwargs)
        finally:
            with self.lock:
                self.now -= 1


def test_samples_finished_together_are_written_in_parallel(tmp_path, monkeypatch):
    staging = SlowStaging(0.3)
    monkeypatch.setattr("orchestrator.pipeline.stage_sample", staging)
    client = StandIn(stage2_seconds=0.05)
    written = generate(_config(tmp_path, 4), client, progress=False, stage1_workers=4,
                       stage2_workers=4)
    assert staging.peak >= 2
    assert all((p / "sample_16.png").is_file() for p in written)
    metadata = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert metadata["samples_done"] == [0, 1, 2, 3]


def test_a_sample_being_written_when_another_fails_is_finished(tmp_path, monkeypatch):
    """Seed 1's stage 2 fails while seed 0's files are being written: generate raises only once
    seed 0 is in place, and leaves no partial folder."""
    monkeypatch.setattr("orchestrator.pipeline.stage_sample", SlowStaging(0.6))
    client = StandIn(fail_seed=1, stage2_by_seed={0: 0.05, 1: 0.3})
    with pytest.raises(ServiceError, match="unavailable"):
        generate(_config(tmp_path, 2), client, progress=False, stage1_workers=2,
                 stage2_workers=2)
    run = tmp_path / "run"
    assert (run / "0000" / "sample_16.png").is_file() and not (run / "0001").exists()
    assert not list(run.glob(".*.partial"))
    assert json.loads((run / "metadata.json").read_text())["samples_done"] == [0]


def test_batched_and_pipelined_over_two_replicas_equals_one_at_a_time(tmp_path):
    """Real services: stage 1 shares its UNet calls among three samples (--max-concurrent 3), two
    stage-2 replicas behind one target; the tensors equal those of one sample at a time."""
    from test_services import running

    with running("encoder", str(STAGE1_DIR)) as enc, \
            running("stage1", str(STAGE1_DIR), max_concurrent=3) as s1, \
            running("stage2", str(STAGE2_DIR)) as a, running("stage2", str(STAGE2_DIR)) as b:
        with CascadeClient(enc, s1, f"{a},{b}", timeout=120) as client:
            config = _config(tmp_path, 3, "together")
            together = generate(GenerateConfig(**{**config.__dict__, "save_tensors": True}),
                                client, progress=False, stage1_workers=3, stage2_workers=2)
            config = _config(tmp_path, 3, "sequential")
            sequential = generate(GenerateConfig(**{**config.__dict__, "save_tensors": True}),
                                  client, progress=False)
    for p, q in zip(together, sequential, strict=True):
        x, y = load_file(str(p / "tensors.safetensors")), load_file(str(q / "tensors.safetensors"))
        assert (x["stage_1"] - y["stage_1"]).abs().max() <= 1e-4
        assert (x["stage_2"] - y["stage_2"]).abs().max() <= 1e-4


def test_local_mode_starts_stage_services_for_the_batch():
    from orchestrator.local import LocalServiceSpec

    stage = LocalServiceSpec("stage1", "m", max_concurrent=4).command()
    assert stage[stage.index("--max-concurrent") + 1] == "4"
    assert "--max-concurrent" not in LocalServiceSpec("stage2", "m").command()
    assert "--max-concurrent" not in LocalServiceSpec("encoder", "m", max_concurrent=4).command()
    assert "--compile" in LocalServiceSpec("stage2", "m", compile=True).command()
    assert "--compile" not in LocalServiceSpec("encoder", "m", compile=True).command()


def test_local_services_that_do_not_start_in_time_are_stopped_and_say_why(monkeypatch):
    """Local mode waits for the services (STARTUP_TIMEOUT_S by default); a service still
    starting when time runs out is stopped, and the error says it did not start in time (and,
    for a compiling UNet service, why it may take long), not that it failed; one that exits says
    why it failed."""
    import sys

    from orchestrator.local import LocalServiceError, LocalServices, LocalServiceSpec

    specs = [LocalServiceSpec("encoder", "m", compile=True),
             LocalServiceSpec("stage2", "m", compile=True, fixed_batch=True, max_batch=16)]
    monkeypatch.setattr(LocalServiceSpec, "command",
                        lambda self: [sys.executable, "-c", "import time; time.sleep(60)"])
    slow = LocalServices(specs[1:], startup_timeout=1)
    started = time.monotonic()
    with pytest.raises(LocalServiceError, match=r"local stage2 did not start within 1 s; it "
                                                r"compiles its UNet at start-up"):
        slow.start()
    assert time.monotonic() - started < 30  # stopped, not waited for
    assert not slow.children
    with pytest.raises(LocalServiceError, match=r"local encoder did not start within 1 s \(a "
                                                r"first run downloads the models: give it longer "
                                                r"with --startup-timeout\)$"):
        LocalServices(specs[:1], startup_timeout=1).start()

    # One that exits at once fails with its own error line, however long it was given.
    failing = "import sys; print('error: no model at m: give --model', file=sys.stderr); sys.exit(1)"
    monkeypatch.setattr(LocalServiceSpec, "command", lambda self: [sys.executable, "-c", failing])
    with pytest.raises(LocalServiceError, match="local stage2 service failed to start: no model "
                                                "at m: give --model"):
        LocalServices(specs[1:]).start()


def test_a_lost_local_service_whose_process_exited_ends_the_run_at_once(monkeypatch):
    """In local mode a service whose process has exited (killed, out of memory) cannot come
    back: a call lost with it fails at once, with the service's own last error line, instead
    of waiting --retry-timeout for it with advice about TLS (and its log then deleted)."""
    import sys

    from orchestrator.client import CascadeClient, ServiceError
    from orchestrator.local import LocalServices, LocalServiceSpec

    # It starts (its ready line names a port nothing listens on), then fails a second later.
    script = ("import sys, time; print('serving stage2 on 127.0.0.1:9', flush=True); "
              "time.sleep(1); print('error: CUDA out of memory: lower --max-batch', "
              "file=sys.stderr); sys.exit(3)")
    monkeypatch.setattr(LocalServiceSpec, "command", lambda self: [sys.executable, "-c", script])
    local = LocalServices([LocalServiceSpec("stage2", "m")])
    with local as addresses:
        assert local.exited("stage2") is None  # still running
        assert local.exited("encoder") is None  # none of that kind
        started = time.monotonic()
        with CascadeClient(addresses["stage2"], addresses["stage2"], addresses["stage2"],
                           retry_timeout=120, gone=local.exited) as client:
            with pytest.raises(ServiceError) as info:
                client.stage2(pb.Stage2Request())
        waited = time.monotonic() - started
    assert waited < 15, waited
    assert ("stage2 at 127.0.0.1:9 is gone" in str(info.value)
            and "the local stage2 service exited (code 3): CUDA out of memory: lower --max-batch"
            in str(info.value)), info.value


def test_local_services_interrupted_while_starting_are_stopped(monkeypatch):
    """Ctrl-C (or SIGTERM, which the CLI turns into an exception) while the services are still
    starting stops those already started: before, they went on loading their models (minutes,
    and a GPU's memory) with nobody to use them."""
    import subprocess
    import sys

    import orchestrator.local
    from orchestrator.local import LocalServices, LocalServiceSpec

    monkeypatch.setattr(LocalServiceSpec, "command",
                        lambda self: [sys.executable, "-c", "import time; time.sleep(60)"])
    started: list[subprocess.Popen] = []

    class Recorded(subprocess.Popen):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    class CtrlC(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            raise KeyboardInterrupt  # pressed while local mode waits for a service's ready line

    real_child = orchestrator.local._Child

    def child(spec, process, log):
        made = real_child(spec, process, log)
        made.ready = CtrlC()
        return made

    monkeypatch.setattr("orchestrator.local.subprocess.Popen", Recorded)
    monkeypatch.setattr(orchestrator.local, "_Child", child)
    services = LocalServices([LocalServiceSpec("encoder", "m"), LocalServiceSpec("stage1", "m")])
    with pytest.raises(KeyboardInterrupt):
        with services:
            pytest.fail("the services never said they were ready")
    assert len(started) == 2
    assert all(process.poll() is not None for process in started)  # stopped
    assert services._logdir is None  # and their logs' folder removed


# ----------------------------------------------------------------------------- the run folder


def test_overwrite_keeps_the_earlier_run_until_a_new_sample_is_ready(tmp_path):
    """--overwrite replaces an earlier run only once the new run has a sample to put in its
    place: a run that fails before that leaves the earlier one whole."""
    earlier = _config(tmp_path, 2)
    generate(earlier, StandIn(stage2_seconds=0.0), progress=False)
    other = GenerateConfig(prompts=("c", "d"), views=("identity", "rotate_180"),
                           save_dir=tmp_path, name="run", num_samples=1, overwrite=True)
    with pytest.raises(ServiceError):
        generate(other, StandIn(stage2_seconds=0.0, fail_seed=0), progress=False)
    run = tmp_path / "run"
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["prompts"] == ["a", "b"] and meta["samples_done"] == [0, 1]
    assert (run / "0000" / "sample_16.png").is_file() and (run / "0001").is_dir()

    generate(other, StandIn(stage2_seconds=0.0), progress=False)
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["prompts"] == ["c", "d"] and meta["samples_done"] == [0]
    assert not (run / "0001").exists()  # the earlier run's sample is gone with it


def test_the_same_overwrite_command_run_again_resumes_its_own_samples(tmp_path):
    """An --overwrite run stopped part-way (its failure, or Ctrl-C) and run again as it was
    resumes: the samples it made are kept, not deleted as "another run" (they were, which lost
    the work the interrupt message said was kept)."""
    generate(_config(tmp_path, 2), StandIn(stage2_seconds=0.0), progress=False)  # another run
    other = GenerateConfig(prompts=("c", "d"), views=("identity", "rotate_180"),
                           save_dir=tmp_path, name="run", num_samples=3, overwrite=True)
    with pytest.raises(ServiceError):
        generate(other, StandIn(stage2_seconds=0.0, fail_seed=2), progress=False, stage2_workers=1)
    run = tmp_path / "run"
    assert json.loads((run / "metadata.json").read_text())["samples_done"] == [0, 1]
    made = (run / "0000" / "sample_16.png").stat().st_mtime_ns

    again = StandIn(stage2_seconds=0.0)
    generate(other, again, progress=False)
    assert {seed for _, what, _, seed in again.events if what == "stage1"} == {2}
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["prompts"] == ["c", "d"] and meta["samples_done"] == [0, 1, 2]
    assert (run / "0000" / "sample_16.png").stat().st_mtime_ns == made


def test_a_sample_made_again_keeps_the_other_files_in_its_folder(tmp_path):
    """Resuming with --save-tensors makes finished samples again for their tensors: the new files
    replace their namesakes, and an animation or a user's notes in the folder stay."""
    config = _config(tmp_path, 1)
    generate(config, StandIn(stage2_seconds=0.0), progress=False)
    sample = tmp_path / "run" / "0000"
    (sample / "sample_16.gif").write_bytes(b"GIF89a")
    (sample / "notes.txt").write_text("keep me")
    generate(GenerateConfig(**{**config.__dict__, "save_tensors": True}),
             StandIn(stage2_seconds=0.0), progress=False)
    assert (sample / "sample_16.gif").read_bytes() == b"GIF89a"
    assert (sample / "notes.txt").read_text() == "keep me"
    assert set(load_file(str(sample / "tensors.safetensors"))) == {"stage_1", "stage_2"}
    # Written with the images' permissions (safetensors alone writes 0600).
    assert (sample / "tensors.safetensors").stat().st_mode == (sample / "sample_16.png").stat().st_mode
    assert not list((tmp_path / "run").glob(".*.partial"))


def test_a_sample_folder_without_its_images_is_made_again(tmp_path):
    """A folder NNNN made or emptied by hand is not a finished sample."""
    run = tmp_path / "run"
    generate(_config(tmp_path, 1), StandIn(stage2_seconds=0.0), progress=False)
    (run / "0001").mkdir()
    client = StandIn(stage2_seconds=0.0)
    generate(_config(tmp_path, 2), client, progress=False)
    assert {seed for _, what, _, seed in client.events if what == "stage1"} == {1}
    assert (run / "0001" / "sample_16.png").is_file()
    assert json.loads((run / "metadata.json").read_text())["samples_done"] == [0, 1]


def test_the_reference_image_goes_to_each_stage_at_its_size(tmp_path):
    """A camera photo would not fit in a message: each stage gets the reference already at its
    size, resized as the stage would resize it (so the pictures are the same)."""
    from PIL import Image

    from illusions.sampling import resize_reference
    from orchestrator.pipeline import load_ref_image
    from services.common import codec

    photo = tmp_path / "photo.png"
    Image.new("RGB", (300, 200), (200, 30, 90)).save(photo)
    sent: dict[str, torch.Tensor] = {}

    class Sizes(StandIn):
        def describe(self):
            return {"encoder": pb.ModelInfo(service="encoder"),
                    "stage1": pb.ModelInfo(service="stage1", sample_size=8),
                    "stage2": pb.ModelInfo(service="stage2", sample_size=16)}

        def stage1(self, request, progress=None):
            sent["stage1"] = codec.decode(request.ref_image)
            return super().stage1(request, progress)

        def stage2(self, request, progress=None):
            sent["stage2"] = codec.decode(request.ref_image)
            return super().stage2(request, progress)

    config = GenerateConfig(prompts=("a", "b"), views=("identity", "flip"), save_dir=tmp_path,
                            name="ref", ref_image=photo)
    generate(config, Sizes(stage2_seconds=0.0), progress=False)
    full = load_ref_image(photo)
    assert torch.equal(sent["stage1"], resize_reference(full, 8))
    assert torch.equal(sent["stage2"], resize_reference(full, 16))


def test_equivalent_view_arguments_are_the_same_run(tmp_path):
    """"4", "grid=4" and no argument (jigsaw's default grid is 4) are one view: the run
    resumes; another grid is another run."""
    from orchestrator.pipeline import RunMismatchError, _metadata, check_run_dir

    def config(view_args) -> GenerateConfig:
        return GenerateConfig(prompts=("a", "b"), views=("identity", "jigsaw"),
                              view_args=view_args, save_dir=tmp_path, name="run")

    run = tmp_path / "run"
    (run / "0000").mkdir(parents=True)
    first = config(((), ("4",)))
    (run / "metadata.json").write_text(json.dumps(_metadata(first, ["a", "b"], None, [0])))
    for same in (((), ("grid=4",)), ()):
        check_run_dir(config(same), _metadata(config(same), ["a", "b"], None, []))
    other = config(((), ("grid=8",)))
    with pytest.raises(RunMismatchError, match="it differs from this command in its views"):
        check_run_dir(other, _metadata(other, ["a", "b"], None, []))


@pytest.mark.parametrize(("change", "message"), [
    ({"views": ("identity", "flip", "negate"), "prompts": ("a", "b", "c")},
     "--ref-image needs exactly 2 views"),
    ({"view_seed": 2**63}, "--view-seed 9223372036854775808 is out of range"),
    ({"num_samples": 10**8}, "--num-samples 100000000: use 1 .. 1,000,000"),
])
def test_run_settings_that_cannot_work_are_refused_before_any_call(tmp_path, change, message):
    from dataclasses import replace

    from PIL import Image

    from orchestrator.pipeline import check_config

    photo = tmp_path / "photo.png"
    Image.new("RGB", (8, 8)).save(photo)
    config = replace(_config(tmp_path, 1), ref_image=photo, **change)
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("+", r"\+")):
        check_config(config)


def test_a_reference_is_read_as_it_is_seen(tmp_path):
    """A photo's EXIF orientation is applied (a phone's portrait photo is stored on its side),
    and 16-bit grey is scaled to 8 bits (Pillow's conversion clipped it at 255: nearly white)."""
    import numpy as np
    from PIL import Image

    from orchestrator.pipeline import load_ref_image

    wide = Image.new("RGB", (80, 40), (250, 0, 0))
    wide.paste((0, 0, 250), (0, 0, 40, 40))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to view
    wide.save(tmp_path / "portrait.jpg", exif=exif.tobytes(), quality=95)
    seen = load_ref_image(tmp_path / "portrait.jpg")
    assert seen.shape == (3, 80, 40)  # tall, as viewers show it
    assert seen[2, :30].mean() > 0.8 and seen[0, 50:].mean() > 0.8  # blue on top, then red

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "grey16.png")
    grey = load_ref_image(tmp_path / "grey16.png")
    assert grey.shape == (3, 64, 64)
    expected = torch.from_numpy(np.round(ramp / 257).astype(np.float32)) / 127.5 - 1
    assert (grey[0] - expected).abs().max() <= 1 / 127.5 + 1e-6
    assert torch.equal(grey[0], grey[2])
    # A 32-bit grey image holding 8-bit values is not scaled down.
    Image.fromarray(np.full((8, 8), 200, dtype=np.int32), mode="I").save(tmp_path / "grey32.tif")
    assert torch.allclose(load_ref_image(tmp_path / "grey32.tif"), torch.tensor(200 / 127.5 - 1))


def test_unusable_reference_and_save_dir_name_the_option(tmp_path, monkeypatch):
    from PIL import Image

    from orchestrator.pipeline import load_ref_image

    huge = tmp_path / "huge.png"
    Image.new("RGB", (40, 40)).save(huge)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 1600 pixels: a decompression bomb
    with pytest.raises(ValueError, match="--ref-image .*huge.png is too large to open safely"):
        load_ref_image(huge)
    afile = tmp_path / "afile"
    afile.write_text("")
    config = GenerateConfig(prompts=("a", "b"), views=("identity", "flip"),
                            save_dir=afile / "sub", name="run")
    with pytest.raises(ValueError, match="cannot make the run folder .*: give --save-dir a folder "
                                         "you can write to"):
        generate(config, StandIn(), progress=False)
