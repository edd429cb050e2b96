"""The ``illusion`` CLI end to end, through real service processes on loopback ports."""

from __future__ import annotations

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import CASES, STAGE1_DIR, STAGE2_DIR, TOLERANCE
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stage1-model", str(STAGE1_DIR), "--stage2-model", str(STAGE2_DIR)]


def illusion(*args: str, env: dict[str, str] | None = None, timeout: float = 600
             ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def case_args(name: str) -> list[str]:
    case = next(c for c in CASES if c["name"] == name)
    args = ["--prompts", *case["prompts"], "--views", *case["views"],
            "--seed", str(case["seed"]), "--num-inference-steps", str(case["steps"]),
            "--guidance-scale", str(case["guidance_scale"]), "--reduction", case["reduction"],
            "--noise-level", str(case["noise_level"])]
    if "view_seed" in case:
        args += ["--view-seed", str(case["view_seed"])]
    return args


def assert_matches_reference(sample: Path, name: str, reference) -> None:
    tensors = load_file(str(sample / "tensors.safetensors"))
    assert tensors["stage_1"].shape == (1, 3, 64, 64)
    assert tensors["stage_2"].shape == (1, 3, 256, 256)
    assert (tensors["stage_1"] - reference[f"{name}/stage_1"]).abs().max() <= TOLERANCE
    assert (tensors["stage_2"] - reference[f"{name}/stage_2"]).abs().max() <= TOLERANCE


@contextmanager
def serve(kind: str, model: Path, env: dict[str, str] | None = None) -> Iterator[
        tuple[str, subprocess.Popen[str]]]:
    """``illusion serve KIND --port 0`` as a separate process; yields (address, process)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.cli", "serve", kind, "--model", str(model),
         "--port", "0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **(env or {})},
    )
    try:
        line = process.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith(f"serving {kind} on 127.0.0.1:"), (line, process.stderr.read())
        yield line.rsplit(" ", 1)[-1], process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(30)


@pytest.fixture(scope="module")
def remote() -> Iterator[dict[str, str]]:
    with serve("encoder", STAGE1_DIR) as (enc, _), serve("stage1", STAGE1_DIR) as (s1, _), \
            serve("stage2", STAGE2_DIR) as (s2, _):
        yield {"encoder": enc, "stage1": s1, "stage2": s2}


def test_local_mode_reproduces_reference(tmp_path, reference):
    # Two local stage-2 replicas (one per device; here both on the CPU) share the samples.
    result = illusion("-v", "generate", *case_args("flip"), *TINY, "--save-dir", str(tmp_path),
                      "--name", "flip", "--save-tensors", "--num-samples", "2",
                      "--stage2-devices", "cpu", "cpu")
    assert result.returncode == 0, result.stderr
    run = tmp_path / "flip"
    assert_matches_reference(run / "0000", "flip", reference)
    for seed in ("0000", "0001"):
        for f in ("sample_64.png", "sample_64.views.png", "sample_256.png",
                  "sample_256.views.png", "tensors.safetensors"):
            assert (run / seed / f).is_file(), f"{seed}/{f} missing"
    # Sample 1 uses seed 1: another picture.
    t0, t1 = (load_file(str(run / s / "tensors.safetensors"))["stage_2"] for s in ("0000", "0001"))
    assert (t0 - t1).abs().max() > 1e-2
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["samples_done"] == [0, 1] and meta["views"][1]["name"] == "flip"
    assert meta["models"]["stage1"]["model"] == str(STAGE1_DIR)
    assert not list(run.glob(".*partial"))
    assert "and 2 stage-2 service(s)" in result.stderr
    # The same command again: every sample is made, so no service starts and nothing changes.
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    again = illusion("-v", "generate", *case_args("flip"), *TINY, "--save-dir", str(tmp_path),
                     "--name", "flip", "--save-tensors", "--num-samples", "2",
                     "--stage2-devices", "cpu", "cpu")
    assert again.returncode == 0, again.stderr
    assert f"{run}: all 2 samples are made already, nothing to do" in again.stderr
    assert "starting the encoder" not in again.stderr
    assert again.stdout.split() == [str(run / "0000"), str(run / "0001")]
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before


def test_remote_services_reproduce_reference_with_style(tmp_path, remote, reference):
    # The flip case's prompts are "an oil painting of a waterfall" / "... a deer".
    args = case_args("flip")
    i = args.index("--prompts")
    args[i + 1:i + 3] = ["a waterfall", "a deer"]
    result = illusion("generate", *args, "--style", "an oil painting of",
                      "--encoder", remote["encoder"], "--stage1", remote["stage1"],
                      "--stage2", remote["stage2"], "--save-dir", str(tmp_path), "--name", "r",
                      "--save-tensors")
    assert result.returncode == 0, result.stderr
    assert_matches_reference(tmp_path / "r" / "0000", "flip", reference)
    meta = json.loads((tmp_path / "r" / "metadata.json").read_text())
    assert meta["prompts"] == ["an oil painting of a waterfall", "an oil painting of a deer"]


def test_remote_permutation_view_with_view_seed(tmp_path, remote, reference):
    result = illusion("generate", *case_args("patch_permute"), "--encoder", remote["encoder"],
                      "--stage1", remote["stage1"], "--stage2", remote["stage2"],
                      "--save-dir", str(tmp_path), "--name", "p", "--save-tensors")
    assert result.returncode == 0, result.stderr
    assert_matches_reference(tmp_path / "p" / "0003", "patch_permute", reference)  # seed 3


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    return lines[-1]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--prompts", "a", "b", "--views", "identity", "spin"], ["spin", "jigsaw", "flip"]),
        (["--prompts", "a", "b", "c", "--views", "identity", "flip"],
         ["3 prompts for 2 views", "one prompt per view"]),
        (["--prompts", "a", "b", "--views", "identity", "patch_permute",
          "--view-args", "", "num_patches=7"], ["num_patches"]),
        (["--prompts", "a", "b", "--views", "identity", "skew", "--view-args", "", "abc"],
         ["skew"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--num-inference-steps", "0"],
         ["--num-inference-steps 0 is out of range: use 1 .. 1000"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--guidance-scale", "nan"],
         ["--guidance-scale nan is out of range: use 0 .. 100"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--ref-image", "."],
         ["--ref-image . is a folder: give an image file"]),
        (["--prompts", "a", "b", "--views", "identity", "jigsaw", "--view-args", "", "grid=3"],
         ["jigsaw grid must divide 64", "use one of [2, 4, 8, 16, 32, 64]"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--name", "../escape"],
         ["--name '../escape': give one folder name, without '/'", "choose where with --save-dir"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--name", "a/b"],
         ["--name 'a/b': give one folder name"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--name", ".."],
         ["--name '..': give one folder name"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--timeout", "0"],
         ["--timeout 0: use more than 0 seconds"]),
        # gRPC's deadline overflowed: every call failed at once, "raise --timeout"
        (["--prompts", "a", "b", "--views", "identity", "flip", "--timeout", "1e10"],
         ["--timeout 1e+10: use more than 0 seconds and at most 1e+06"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--startup-timeout", "0"],
         ["--startup-timeout 0: use more than 0 seconds"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--retry-timeout", "nan"],
         ["--retry-timeout nan: use 0 .. 1e+06 seconds"]),
        (["--prompts", *"abcdefghijklmnopq", "--views", "identity", *["flip"] * 16],
         ["17 views: use at most 16"]),  # refused by the services only, after loading
        (["--prompts", "a", "b", "--views", "identity", "flip", "--seed", str(2**63 - 1),
          "--num-samples", "2"],
         [f"--seed {2**63 - 1} is out of range: use 0 .. {2**63 - 2} with --num-samples 2"]),
        (["--prompts", "a", "b", "--views", "identity", "flip", "--name", "瀑" * 90],
         ["--name is 270 bytes long: give a name of at most 255 bytes"]),
    ],
)
def test_user_errors_are_one_line(tmp_path, capsys, args, expected):
    # In this process (the same main() as the command; a subprocess per case costs seconds of
    # importing torch): exit status 2 and one line, before any service starts.
    from orchestrator.cli import main

    assert main(["generate", *args, *TINY, "--save-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    line = _one_error_line(subprocess.CompletedProcess([], 2, "", err))
    for text in expected:
        assert text in line
    assert not any(tmp_path.iterdir()), "nothing is written for a bad request"


def test_unanswering_address_is_named(tmp_path):
    result = illusion("generate", "--prompts", "a", "b", "--views", "identity", "flip",
                      "--encoder", "127.0.0.1:9", "--stage1", "127.0.0.1:9",
                      "--stage2", "127.0.0.1:9", "--save-dir", str(tmp_path), timeout=120)
    assert result.returncode == 1
    assert "encoder at 127.0.0.1:9 does not answer" in _one_error_line(result)


def test_bind_failure_is_one_line_without_grpc_log_lines():
    result = illusion("serve", "stage1", "--model", str(STAGE1_DIR), "--host", "192.0.2.1",
                      "--port", "5000", timeout=120)
    assert result.returncode == 1
    assert _one_error_line(result) == (
        "error: could not bind 192.0.2.1:5000: 192.0.2.1 is not an address of this machine: use "
        "--host 127.0.0.1, 0.0.0.0 or one of its addresses")
    assert "add_port" not in result.stderr, result.stderr  # gRPC's own log line


class _GatedHub(http.server.BaseHTTPRequestHandler):
    """Answers every Hub request the way the Hub answers for a gated repo without a login."""

    def _gated(self) -> None:
        self.send_response(401)
        self.send_header("X-Error-Code", "GatedRepo")
        self.send_header("X-Error-Message", "Access to model DeepFloyd/IF-I-M-v1.0 is restricted.")
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = _gated  # noqa: N815

    def log_message(self, *args: object) -> None:
        pass


def test_client_and_encoder_start_without_diffusers():
    """The ``illusion`` client (``views``, ``--help``, remote ``generate``) and the encoder
    service draw no noise and load no UNet, so they do not import diffusers, which takes about
    two seconds (it loads ``torch._dynamo``); the stage services import it when they need it."""
    code = ("import sys, orchestrator.cli, orchestrator.pipeline, services.encoder.server; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'diffusers'))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    listing = illusion("views")
    assert listing.returncode == 0 and "jigsaw" in listing.stdout


def test_gated_model_without_login_is_one_sentence(tmp_path):
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _GatedHub)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_port}",
           "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_TOKEN": ""}
    try:
        result = illusion("generate", "--prompts", "a", "b", "--views", "identity", "flip",
                          "--save-dir", str(tmp_path / "out"), env=env, timeout=300)
    finally:
        hub.shutdown()
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "DeepFloyd/IF-I-M-v1.0 is a gated model" in line and "hf auth login" in line


def test_killed_service_mid_run_leaves_no_half_written_sample(tmp_path, remote):
    """The only stage-2 replica dies and does not come back within --retry-timeout."""
    with serve("stage2", STAGE2_DIR, env={"ILLUSION_LOG_LEVEL": "DEBUG"}) as (address, stage2):
        run = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "generate", "--prompts", "a", "b",
             "--views", "identity", "flip", "--num-inference-steps", "60",
             "--guidance-scale", "3", "--encoder", remote["encoder"], "--stage1",
             remote["stage1"], "--stage2", address, "--save-dir", str(tmp_path), "--name", "k",
             "--save-tensors", "--retry-timeout", "3"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        # Wait until stage 2 is denoising (its DEBUG log shows the steps), then kill it hard.
        denoising = threading.Event()

        def watch() -> None:
            for line in stage2.stderr:  # type: ignore[union-attr]
                if "step 3/60" in line:
                    denoising.set()

        threading.Thread(target=watch, daemon=True).start()
        assert denoising.wait(300), "stage 2 never started denoising"
        stage2.kill()
        stage2.wait()
        out, err = run.communicate(timeout=120)
    assert run.returncode == 1, err
    line = _one_error_line(subprocess.CompletedProcess([], 1, out, err))
    assert f"stage2 at {address}" in line and "did not come back within 3 s" in line
    run_dir = tmp_path / "k"
    assert not (run_dir / "0000").exists()
    assert not list(run_dir.glob(".*partial"))
    assert json.loads((run_dir / "metadata.json").read_text())["samples_done"] == []


def test_views_command_lists_every_view_with_arguments(capsys):
    from orchestrator.cli import main

    assert main(["views"]) == 0
    out = capsys.readouterr().out
    for name in ("identity", "flip", "jigsaw", "patch_permute", "low_pass", "scale"):
        assert name in out
    assert "num_patches" in out and "grid" in out


def test_sigterm_drains_in_flight_call_then_exits():
    import grpc
    import torch

    from anagram.v1 import anagram_pb2 as pb
    from anagram.v1 import anagram_pb2_grpc as pb_grpc
    from orchestrator.client import open_channel
    from services.common import codec

    request = pb.Stage1Request(
        prompt_embeds=codec.encode(torch.zeros(2, 77, 32)),
        negative_prompt_embeds=codec.encode(torch.zeros(1, 77, 32)),
        views=[pb.ViewSpec(name="identity"), pb.ViewSpec(name="flip")],
        # Long enough to be in flight at SIGTERM, short enough to finish within the 10 s grace
        # on a busy 2-core machine (a tiny-model step takes up to ~0.25 s there).
        params=pb.SamplingParams(num_inference_steps=15, guidance_scale=3),
    )
    with serve("stage1", STAGE1_DIR) as (address, process), open_channel(address) as channel:
        stub = pb_grpc.Stage1Stub(channel)
        call = stub.Sample(request, timeout=120)
        first = next(call)
        assert first.HasField("progress")
        process.send_signal(signal.SIGTERM)
        events = list(call)  # the call in flight is allowed to finish
        assert events[-1].HasField("result")
        assert codec.decode(events[-1].result.image).shape == (1, 3, 64, 64)
        assert process.wait(30) == 0
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Sample(request, timeout=5))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_in_local_mode_stops_the_services_and_keeps_no_partial_sample(tmp_path, stop):
    """Ctrl-C, and SIGTERM (`docker stop`, a Kubernetes job's end) alike."""
    import psutil

    # A job started in the background by a non-interactive shell (CI scripts, nohup ... &)
    # inherits SIGINT ignored, and so would generate: start it the way a terminal does, with
    # SIGINT at its default (a Python handler here becomes the default across exec).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        run = subprocess.Popen(
            [sys.executable, "-m", "orchestrator.cli", "generate", "--prompts", "a", "b",
             "--views", "identity", "flip", "--num-inference-steps", "400", "--guidance-scale",
             "3", *TINY, "--save-dir", str(tmp_path), "--name", "c"],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    metadata = tmp_path / "c" / "metadata.json"
    deadline = time.monotonic() + 300
    while not metadata.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert metadata.exists(), run.stderr.read() if run.poll() is not None else "no metadata"
    children = psutil.Process(run.pid).children(recursive=True)
    assert len(children) == 3, [c.cmdline() for c in children]  # the three local services
    time.sleep(1.0)  # now sampling
    run.send_signal(stop)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    assert "interrupted" in _one_error_line(subprocess.CompletedProcess([], 130, out, err))
    gone, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, [c.cmdline() for c in alive]
    assert not (tmp_path / "c" / "0000").exists()
    assert not list((tmp_path / "c").glob(".*partial"))


def test_option_combinations_that_cannot_work_are_refused_before_anything_starts(capsys):
    from orchestrator.cli import main

    assert main(["serve", "stage1", "--fixed-batch"]) == 2
    assert "give --max-batch N too" in capsys.readouterr().err
    remote = ["generate", "--prompts", "a", "b", "--views", "identity", "flip",
              "--encoder", "127.0.0.1:1", "--stage1", "127.0.0.1:2", "--stage2", "127.0.0.1:3"]
    assert main([*remote, "--stage2-devices", "cuda:1"]) == 2
    assert "list their addresses in --stage2" in capsys.readouterr().err
    assert main([*remote, "--compile"]) == 2
    assert "illusion serve ... --compile" in capsys.readouterr().err
    assert main([*remote, "--fixed-batch"]) == 2
    assert "illusion serve ... --fixed-batch" in capsys.readouterr().err
    assert main([*remote, "--batch-multiple", "4"]) == 2
    assert "illusion serve ... --batch-multiple" in capsys.readouterr().err
    assert main(["serve", "stage2", "--max-batch", "16", "--batch-multiple", "4"]) == 2
    assert "add --fixed-batch" in capsys.readouterr().err
    assert main(["serve", "stage2", "--fixed-batch", "--max-batch", "16", "--batch-multiple",
                 "-4"]) == 2
    assert "--batch-multiple -4: give one number, 0 (pad to --max-batch)" in capsys.readouterr().err
    # Server settings that would bind another port, or report SERVING and hang every call.
    assert main(["serve", "stage1", "--port", "70000"]) == 2
    assert "--port 70000: use 1 .. 65535, or 0 to pick a free port" in capsys.readouterr().err
    assert main(["serve", "stage2", "--max-concurrent", "0"]) == 2
    assert "--max-concurrent 0: use 1 or more" in capsys.readouterr().err
    # The encoder has no UNet: its options would be ignored.
    assert main(["serve", "encoder", "--compile", "--max-batch", "4", "--no-cuda-graphs"]) == 2
    assert ("error: --compile, --no-cuda-graphs, --max-batch only apply to the UNet services "
            "(serve stage1|stage2): leave them out for the encoder") in capsys.readouterr().err
    # Options of the services local mode starts would be ignored with remote services.
    for option, where in ((["--dtype", "float16"], "illusion serve stage1|stage2 --dtype"),
                          (["--stage2-model", "m"], "illusion serve stage2 --model"),
                          (["--max-batch", "8"], "illusion serve stage1|stage2 --max-batch"),
                          (["--encoder-device", "cuda"], "illusion serve encoder --device")):
        assert main([*remote, *option]) == 2
        err = capsys.readouterr().err
        assert f"{option[0]} applies to local mode" in err and where in err, err


def test_stage2_replicas_behind_a_dns_name_are_counted(monkeypatch):
    """--parallel's default is one stage-2 call per replica: a dns:/// target counts the
    addresses its name resolves to now (a headless service's pods)."""
    import socket

    from orchestrator.cli import replica_count

    def resolve(host, port, *args, **kwargs):
        assert (host, port) == ("stage2.illusion.svc", 50052)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"10.0.0.{k}", port))
                for k in (1, 2, 3, 3)]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    assert replica_count("dns:///stage2.illusion.svc:50052") == 3
    assert replica_count("10.0.0.1:1,10.0.0.2:1") == 2

    def unresolved(*args, **kwargs):
        raise socket.gaierror("no such name")

    monkeypatch.setattr(socket, "getaddrinfo", unresolved)
    assert replica_count("dns:///stage2.illusion.svc:50052") == 1


def test_local_mode_gives_its_services_the_startup_timeout(tmp_path, monkeypatch, capsys):
    """--startup-timeout reaches the local services' wait (900 s was fixed: a first run that
    downloads the models on a slow link had no way to wait longer)."""
    import orchestrator.local
    from orchestrator.cli import main

    given: list[float] = []

    class Refusing(orchestrator.local.LocalServices):
        def start(self) -> dict[str, str]:
            given.append(self.startup_timeout)
            raise orchestrator.local.LocalServiceError("local encoder did not start (test)")

    monkeypatch.setattr(orchestrator.local, "LocalServices", Refusing)
    args = ["generate", "--prompts", "a", "b", "--views", "identity", "flip", *TINY,
            "--save-dir", str(tmp_path), "--no-progress"]
    assert main([*args, "--startup-timeout", "3600"]) == 1
    assert main(args) == 1
    assert given == [3600.0, 900.0]
    assert "local encoder did not start (test)" in capsys.readouterr().err


def test_default_run_name_is_one_folder(tmp_path):
    """The default name takes each prompt's last word: an empty prompt has none, and a word with
    a '/' would make a sub-folder."""
    from orchestrator.pipeline import GenerateConfig, check_config

    config = GenerateConfig(prompts=("", "a poster of AC/DC"), views=("identity", "flip"),
                            save_dir=tmp_path)
    assert config.run_name == "identity.flip.blank.AC_DC"
    assert config.run_dir == tmp_path / "identity.flip.blank.AC_DC"
    check_config(config)
    unchanged = GenerateConfig(prompts=("an oil painting of a rabbit", "a platypus, duck-billed"),
                               views=("identity", "rotate_cw"))
    assert unchanged.run_name == "identity.rotate_cw.rabbit.duck-billed"
    # Letters of other scripts take 3 bytes: the name stays within a folder name's 255 bytes
    # (120 such letters made "File name too long").
    long = GenerateConfig(prompts=("a", "瀑布" * 60), views=("identity", "flip"),
                          save_dir=tmp_path)
    assert long.run_name.startswith("identity.flip.a.瀑布") and len(long.run_name.encode()) <= 200
    check_config(long)
    long.run_dir.mkdir()
    # The largest seed is allowed for the last sample (2**63-1 for one sample).
    check_config(GenerateConfig(prompts=("a", "b"), views=("identity", "flip"), seed=2**63 - 1))


def test_local_mode_services_for_fixed_batch_and_compile():
    """generate --fixed-batch pads the stage services' calls to --max-batch, or to all rows of a
    --batch; each service command is one `illusion serve` accepts."""
    from illusions.sampling import InvalidInputError
    from orchestrator.cli import build_parser, local_specs

    def specs(*extra: str):
        args = build_parser().parse_args(["generate", "--prompts", "a", "b", "--views",
                                          "identity", "flip", "--device", "cpu", *extra])
        return local_specs(args)

    encoder, stage1, stage2 = specs("--batch", "4", "--fixed-batch", "--compile")
    assert (encoder.kind, stage1.kind, stage2.kind) == ("encoder", "stage1", "stage2")
    for unet in (stage1, stage2):
        assert (unet.max_batch, unet.fixed_batch, unet.compile, unet.max_concurrent) == (
            16, True, True, 4)  # 2 rows x 2 views x 4 samples
        command = unet.command()
        served = build_parser().parse_args(command[command.index("serve"):])
        assert (served.max_batch, served.fixed_batch, served.compile) == (16, True, True)
    assert [s.max_batch for s in specs("--batch", "4", "--fixed-batch", "--max-batch", "6")][1:] \
        == [6, 6]
    per_stage = specs("--batch", "16", "--fixed-batch", "--max-batch", "64", "16",
                      "--stage2-devices", "cpu", "cpu")
    assert [(s.kind, s.max_batch) for s in per_stage][1:] == [
        ("stage1", 64), ("stage2", 16), ("stage2", 16)]
    assert [s.max_batch for s in specs("--batch", "4", "--fixed-batch", "--max-batch", "0", "2")][
        1:] == [16, 2]  # 0: all rows of the batch
    for bad in (["3", "2", "1"], ["-1"]):
        with pytest.raises(InvalidInputError, match="one number for both stages or two"):
            specs("--max-batch", *bad)
    plain = specs("--batch", "4", "--stage2-devices", "cpu", "cpu")
    assert [(s.kind, s.max_batch, s.fixed_batch) for s in plain] == [
        ("encoder", 0, False), ("stage1", 0, False), ("stage2", 0, False), ("stage2", 0, False)]
    # --parallel stage-2 calls spread over the replicas: each runs its share at once.
    groups = specs("--batch", "8", "--parallel", "24", "--stage2-devices", "cpu", "cpu", "cpu")
    assert [(s.kind, s.max_concurrent) for s in groups][1:] == [
        ("stage1", 8), ("stage2", 8), ("stage2", 8), ("stage2", 8)]
    one = specs("--batch", "8", "--parallel", "24", "--fixed-batch", "--max-batch", "32", "16")
    assert [(s.kind, s.max_concurrent, s.max_batch) for s in one][1:] == [
        ("stage1", 8, 32), ("stage2", 24, 16)]
    command = one[2].command()
    assert command[command.index("--max-concurrent") + 1] == "24"
    assert [s.max_concurrent for s in specs("--batch", "4", "--parallel", "5",
                                            "--stage2-devices", "cpu", "cpu")][2:] == [4, 4]


def test_local_mode_warns_when_padding_fills_calls(caplog: pytest.LogCaptureFixture):
    """--fixed-batch with a --max-batch that the samples in flight cannot fill pads every call
    with rows that cost as much as real ones: generate says so, and how to fix it."""
    from orchestrator.cli import build_parser, local_specs

    def warnings(*extra: str) -> list[str]:
        caplog.clear()
        args = build_parser().parse_args(["generate", "--prompts", "a", "b", "--views",
                                          "identity", "flip", "--device", "cpu", *extra])
        with caplog.at_level("WARNING", logger="illusion"):
            local_specs(args)
        return [r.getMessage() for r in caplog.records]

    fixed = ("--fixed-batch", "--max-batch", "64", "16")
    (message,) = warnings("--batch", "8", *fixed)
    assert "pads stage-1's calls to 64 rows in all, but --batch 8 with 2 views fill at most 32" \
        in message
    assert "50 % of the rows are padding" in message and "a --max-batch that 32 fills" in message
    assert warnings("--batch", "16", *fixed) == []  # 16 samples x 2 views x 2 = 64 rows
    assert warnings("--batch", "8", *fixed, "--batch-multiple", "32", "4") == []  # padded to 32
    assert warnings("--batch", "8", "--max-batch", "64", "16") == []  # no padding at all
    (message,) = warnings("--batch", "2", "--fixed-batch", "--max-batch", "8", "16")
    assert "pads stage-2's calls to 16 rows in all, but 2 samples in flight a replica" in message
    # 20 rows in flight in calls of at most 16: one full call, then 4 rows padded to 16.
    (message,) = warnings("--batch", "5", "--fixed-batch", "--max-batch", "20", "16")
    assert "stage-2's calls to 32 rows in all" in message and "at most 20: 38 %" in message
    assert warnings("--batch", "5", "--fixed-batch", "--max-batch", "20", "16",
                    "--batch-multiple", "0", "4") == []
    assert warnings("--batch", "2", "--fixed-batch", "--max-batch", "8", "16",
                    "--batch-multiple", "0", "4") == []


def test_local_models_are_what_a_rerun_compares():
    """local_models: the three services' models as metadata names them, or None when stage-2
    replicas differ (then only the services can say which one a run's metadata names)."""
    from orchestrator.cli import build_parser, local_models, local_specs

    args = build_parser().parse_args(["generate", "--prompts", "a", "b", "--views", "identity",
                                      "flip", "--device", "cpu", "--stage2-devices", "cpu", "cpu",
                                      "--stage2-model", "some/IF-II"])
    specs = local_specs(args)
    models = local_models(specs)
    assert models is not None and sorted(models) == ["encoder", "stage1", "stage2"]
    assert models["stage2"] == {"model": "some/IF-II", "dtype": "float32", "quantize": "none",
                                "random_weights": False}
    specs[-1] = replace(specs[-1], dtype="float16")
    assert local_models(specs) is None


def test_local_mode_batch_multiple_per_stage():
    """generate --batch-multiple N [M] reaches each stage service as `serve --batch-multiple`,
    and only with --fixed-batch, whose padding it sets."""
    from illusions.sampling import InvalidInputError
    from orchestrator.cli import build_parser, local_specs

    def specs(*extra: str):
        args = build_parser().parse_args(["generate", "--prompts", "a", "b", "--views",
                                          "identity", "flip", "--device", "cpu", *extra])
        return local_specs(args)

    fixed = ("--batch", "8", "--fixed-batch", "--max-batch", "32", "16")
    both = specs(*fixed, "--batch-multiple", "8", "4", "--stage2-devices", "cpu", "cpu")
    assert [(s.kind, s.batch_multiple) for s in both] == [
        ("encoder", 0), ("stage1", 8), ("stage2", 4), ("stage2", 4)]
    for spec in both[1:]:
        command = spec.command()
        served = build_parser().parse_args(command[command.index("serve"):])
        assert (served.fixed_batch, served.max_batch, served.batch_multiple) == (
            True, spec.max_batch, spec.batch_multiple)
    assert [s.batch_multiple for s in specs(*fixed, "--batch-multiple", "4")][1:] == [4, 4]
    assert "--batch-multiple" not in specs(*fixed)[1].command()
    with pytest.raises(InvalidInputError, match="add --fixed-batch"):
        specs("--batch-multiple", "4")
    for bad in (["8", "4", "2"], ["-4"]):
        with pytest.raises(InvalidInputError, match="one number for both stages or two"):
            specs(*fixed, "--batch-multiple", *bad)
