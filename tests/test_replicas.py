"""Replicas that die mid-run, a replica that comes back, and a soak with flat memory.

Stage-2 replicas (and the soaked stage-1 server) are separate ``illusion serve`` processes on
loopback ports, so they can be killed and their memory measured; the encoder and stage 1 of the
runs are in-process. Figures from these tests are reported in docs/reliability.md.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
import psutil
import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR
from safetensors.torch import load_file
from test_services import _stage1_request_static, running

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from orchestrator.cli import main as cli_main
from orchestrator.client import CascadeClient, ServiceError, open_channel
from services.common import codec

ROOT = Path(__file__).resolve().parents[1]
STEPS = 2  # stage 2 at 256 px costs about a second a step on 2 CPU cores
SAMPLES = 2
logger = logging.getLogger(__name__)


class Replica:
    """``illusion serve KIND`` as a process; its DEBUG log is read to know when it is sampling."""

    def __init__(self, kind: str, model: Path, port: int = 0, *extra: str,
                 env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "orchestrator.cli", "serve", kind, "--model",
             str(model), "--port", str(port), *extra],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={**os.environ, "ILLUSION_LOG_LEVEL": "DEBUG", **(env or {})},
        )
        self.address = ""
        self.steps = 0  # denoising steps logged so far
        self.stepping = threading.Event()  # set at every step; clear it to wait for the next
        self._tail: list[str] = []
        threading.Thread(target=self._read_stderr, daemon=True).start()

    def wait_ready(self, timeout: float = 120) -> Replica:
        line = self.process.stdout.readline().strip()  # type: ignore[union-attr]
        assert line.startswith(f"serving {self.kind} on "), (line, self._tail[-5:])
        self.address = line.rsplit(" ", 1)[-1]
        return self

    def _read_stderr(self) -> None:
        for line in self.process.stderr:  # type: ignore[union-attr]
            self._tail = [*self._tail[-20:], line]
            if " step " in line:
                self.steps += 1
                self.stepping.set()

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    def rss(self) -> int:
        return psutil.Process(self.process.pid).memory_info().rss

    def kill(self) -> None:
        self.process.kill()
        self.process.wait(30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


# glibc gives threads their own malloc arenas, so RSS steps up as new threads (one per sampling
# call) first touch them; two arenas keep that noise from hiding a real leak in the soak.
SOAK_ENV = {"MALLOC_ARENA_MAX": "2"}


@pytest.fixture(scope="module")
def processes() -> Iterator[dict[str, Replica]]:
    """Stage 1 and two stage-2 replicas as processes, started together (they load in parallel)."""
    started = {"stage1": Replica("stage1", STAGE1_DIR, env=SOAK_ENV),
               "stage2-a": Replica("stage2", STAGE2_DIR), "stage2-b": Replica("stage2", STAGE2_DIR)}
    try:
        yield {name: replica.wait_ready() for name, replica in started.items()}
    finally:
        for replica in started.values():
            replica.stop()


@pytest.fixture(scope="module")
def front(processes) -> Iterator[dict[str, str]]:
    """Encoder (in-process) and stage 1: every run here shares them."""
    with running("encoder", str(STAGE1_DIR)) as enc:
        yield {"encoder": enc, "stage1": processes["stage1"].address}


def generate(front: dict[str, str], stage2: str, save_dir: Path, name: str, *extra: str) -> int:
    """``illusion generate`` (in this process) of SAMPLES samples through the given stage 2."""
    return cli_main(["generate", "--prompts", "a waterfall", "a deer", "--views", "identity", "flip",
                     "--num-samples", str(SAMPLES), "--num-inference-steps", str(STEPS),
                     "--guidance-scale", "3", "--encoder", front["encoder"], "--stage1",
                     front["stage1"], "--stage2", stage2, "--save-dir", str(save_dir),
                     "--name", name, "--save-tensors", "--no-progress", *extra])


def assert_same_samples(run: Path, reference: Path) -> None:
    meta = json.loads((run / "metadata.json").read_text())
    assert meta["samples_done"] == list(range(SAMPLES))
    for seed in range(SAMPLES):
        mine = load_file(str(run / f"{seed:04d}" / "tensors.safetensors"))
        calm = load_file(str(reference / f"{seed:04d}" / "tensors.safetensors"))
        for key in ("stage_1", "stage_2"):
            assert torch.equal(mine[key], calm[key]), f"sample {seed} {key} differs"
    assert not list(run.glob(".*partial"))


def kill_when_sampling(candidates: list[Replica], after_steps: int = 1) -> list[Replica]:
    """In a thread: kill whichever replica first logs ``after_steps`` more steps. Returns a list
    that holds the victim once it is dead."""
    victims: list[Replica] = []
    start = {id(r): r.steps for r in candidates}

    def watch() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for replica in candidates:
                if replica.steps - start[id(replica)] >= after_steps:
                    replica.kill()
                    victims.append(replica)
                    return
            time.sleep(0.01)

    threading.Thread(target=watch, daemon=True).start()
    return victims


def test_killed_replica_mid_run_loses_nothing(front, processes, tmp_path, caplog):
    """Two stage-2 replicas behind round_robin; one is killed while it denoises a sample. The
    sample is retried on the other and every sample equals those of an undisturbed run. Then the
    survivor, now alone, is killed too and restarted on its port: the run waits and finishes."""
    caplog.set_level(logging.WARNING, logger="orchestrator.client")
    a, b = processes["stage2-a"], processes["stage2-b"]
    both = f"{a.address},{b.address}"
    assert generate(front, both, tmp_path, "calm") == 0

    victims = kill_when_sampling([a, b])
    assert generate(front, both, tmp_path, "killed") == 0
    assert len(victims) == 1, "no replica was killed"
    assert_same_samples(tmp_path / "killed", tmp_path / "calm")
    lost = [r for r in caplog.records if "call lost" in r.getMessage()]
    assert lost, "the killed call was not retried"

    # The only replica dies and comes back on the same port within --retry-timeout.
    survivor = b if victims[0] is a else a
    caplog.clear()
    victims = kill_when_sampling([survivor])
    restarted: list[Replica] = []

    def restart() -> None:
        while not victims:
            time.sleep(0.05)
        restarted.append(Replica("stage2", STAGE2_DIR, survivor.port).wait_ready())

    helper = threading.Thread(target=restart, daemon=True)
    helper.start()
    try:
        assert generate(front, survivor.address, tmp_path, "back", "--retry-timeout",
                        "120") == 0
    finally:
        helper.join(120)
        for replica in restarted:
            replica.stop()
    assert victims and restarted, "the replica was not killed and restarted"
    assert_same_samples(tmp_path / "back", tmp_path / "calm")
    assert any("call lost" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------------------------- soak

SOAK_REQUESTS = 180
SOAK_SECONDS = 60.0
RSS_GROWTH_BOUND = 32 * 2**20  # bytes, from the end of warm-up to the end


def test_soak_keeps_memory_flat(processes):
    """Many calls to one stage-1 process from 4 client threads: valid ones (through the client,
    which retries overload), bad ones, cancelled ones and ones whose deadline expires. None may
    be lost and the server's RSS must stay flat after warm-up."""
    rng = random.Random(0)
    valid = pb.Stage1Request(  # one view, one prompt, one step: the cheapest call that samples
        prompt_embeds=codec.encode(torch.zeros(1, 77, 32)),
        negative_prompt_embeds=codec.encode(torch.zeros(1, 77, 32)),
        views=[pb.ViewSpec(name="identity")],
        params=pb.SamplingParams(num_inference_steps=1, guidance_scale=3),
    )
    bad = pb.Stage1Request()
    bad.CopyFrom(valid)
    bad.views[0].name = "spin"
    long = _stage1_request_static(200)
    plan = [rng.choices(["valid", "bad", "cancel", "deadline"], [70, 15, 10, 5])[0]
            for _ in range(SOAK_REQUESTS)]
    warmup = 80  # requests before memory is measured: pools, caches and arenas fill up
    counts = {"valid": 0, "bad": 0, "cancel": 0, "deadline": 0, "lost": 0}
    lock = threading.Lock()
    rss: list[int] = []
    with ExitStack() as stack:
        server = processes["stage1"]
        address = server.address
        channel = stack.enter_context(open_channel(address))
        stub = pb_grpc.Stage1Stub(channel)
        client = stack.enter_context(CascadeClient(address, address, address, timeout=60,
                                                   retry_timeout=60))
        next_index = iter(range(SOAK_REQUESTS))
        started = time.monotonic()

        def one(kind: str) -> None:
            if kind == "valid":
                image, _ = client.stage1(valid)
                assert image.shape == (1, 3, 64, 64)
            elif kind == "bad":
                with pytest.raises(ServiceError, match="spin"):
                    client.stage1(bad)
            elif kind == "cancel":
                call = stub.Sample(long, timeout=60)
                try:
                    next(call)
                except grpc.RpcError as err:  # queue full: also fine, nothing ran
                    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                call.cancel()
            else:
                with pytest.raises(grpc.RpcError) as info:
                    list(stub.Sample(long, timeout=0.3))
                assert info.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                             grpc.StatusCode.RESOURCE_EXHAUSTED)

        def worker() -> None:
            for i in next_index:
                if time.monotonic() - started > SOAK_SECONDS:
                    return
                kind = plan[i]
                try:
                    one(kind)
                    with lock:
                        counts[kind] += 1
                except Exception:  # noqa: BLE001 - counted, then reported by the assert below
                    logger.exception("soak request %d (%s) lost", i, kind)
                    with lock:
                        counts["lost"] += 1
                if i >= warmup and i % 20 == 0:
                    with lock:
                        rss.append(server.rss())

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.monotonic() - started
        time.sleep(0.5)  # let cancelled calls wind down
        rss.append(server.rss())
        assert server.process.poll() is None, "the server died"
    done = sum(v for k, v in counts.items() if k != "lost")
    # Medians of the first and last three readings, so one reading taken mid-call is no trend.
    first, last = sorted(rss[:3])[1], sorted(rss[-3:])[1]
    logger.warning("soak: %d requests in %.1f s %s, RSS after warm-up %.1f MiB, at the end %.1f "
                   "MiB (readings %s)", done, elapsed, counts, first / 2**20, last / 2**20,
                   [round(r / 2**20) for r in rss])
    assert counts["lost"] == 0, counts
    assert done >= 100, f"only {done} requests in {SOAK_SECONDS} s"
    assert len(rss) >= 6
    assert last - first < RSS_GROWTH_BOUND, f"RSS grew {(last - first) / 2**20:.1f} MiB"
