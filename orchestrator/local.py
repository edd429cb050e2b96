"""Local mode: start the three services as child processes on free loopback ports, stop them after.

Each child is ``python -m orchestrator.cli serve KIND --port 0 ...``; it prints one line
``serving KIND on HOST:PORT`` once its model is loaded and warmed up. Children run in their own
process group (Ctrl-C reaches only the orchestrator, which then stops them) and watch their parent,
so they also go away if the orchestrator is killed.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.common.security import TOKEN_ENV

logger = logging.getLogger(__name__)

READY = re.compile(r"^serving (\w+) on (\S+)$")
STARTUP_TIMEOUT_S = 900.0  # a service's load and warm-up (compiling its UNet, with --compile)


class LocalServiceError(RuntimeError):
    """A local service failed to start; the message carries its last error line."""


@dataclass(frozen=True)
class LocalServiceSpec:
    kind: str  # encoder | stage1 | stage2
    model: str
    device: str = "cpu"
    dtype: str = "float32"
    quantize: str = "none"
    random_weights: bool = False
    max_batch: int = 0  # UNet services only
    max_concurrent: int = 1  # UNet services: requests that share UNet calls
    compile: bool = False  # UNet services: torch.compile the UNet
    fixed_batch: bool = False  # UNet services: every UNet call has max_batch rows
    batch_multiple: int = 0  # UNet services, with fixed_batch: pad to multiples of this

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "orchestrator.cli", "serve", self.kind,
            "--model", self.model, "--host", "127.0.0.1", "--port", "0",
            "--device", self.device, "--dtype", self.dtype, "--quantize", self.quantize,
            "--parent-pid", str(os.getpid()),
        ]
        if self.kind != "encoder":  # the UNet services' options
            if self.max_batch:
                cmd += ["--max-batch", str(self.max_batch)]
            if self.max_concurrent > 1:
                cmd += ["--max-concurrent", str(self.max_concurrent)]
            cmd += ["--compile"] * self.compile + ["--fixed-batch"] * self.fixed_batch
            if self.batch_multiple:
                cmd += ["--batch-multiple", str(self.batch_multiple)]
        return cmd + (["--random-weights"] if self.random_weights else [])


@dataclass
class _Child:
    spec: LocalServiceSpec
    process: subprocess.Popen[str]
    log: Path
    address: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)

    def read_stdout(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            match = READY.match(line.strip())
            if match and self.address is None:
                self.address = match.group(2)
                self.ready.set()
        self.ready.set()  # stdout closed: the process ended

    def last_error(self) -> str:
        try:
            lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        except OSError:
            return "no output"
        for line in reversed(lines):
            if line.startswith("error: "):
                return line.removeprefix("error: ")
        return lines[-1] if lines else "no output"


class LocalServices:
    """Context manager: ``with LocalServices(specs) as addresses: ...`` (kind -> host:port).

    Several specs of one kind (stage-2 replicas, e.g. one per GPU) give that kind a comma-separated
    list of addresses, which the client balances over with gRPC's ``round_robin``.
    """

    def __init__(self, specs: list[LocalServiceSpec],
                 startup_timeout: float = STARTUP_TIMEOUT_S) -> None:
        self.specs = specs
        self.startup_timeout = startup_timeout
        self.children: list[_Child] = []
        self._logdir: tempfile.TemporaryDirectory[str] | None = None

    def start(self) -> dict[str, str]:
        """Start the services and wait until each serves; returns their addresses. However it
        ends otherwise (a service that fails, Ctrl-C, SIGTERM), the started ones are stopped."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> dict[str, str]:
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop(TOKEN_ENV, None)  # local services talk plaintext on loopback, without a token
        self._logdir = self._logdir or tempfile.TemporaryDirectory(prefix="illusion-services-")
        for number, spec in enumerate(self.specs):  # one log each (replicas share a kind)
            log = Path(self._logdir.name) / f"{number}-{spec.kind}.log"
            process = subprocess.Popen(
                spec.command(), stdout=subprocess.PIPE, stderr=log.open("w"), text=True,
                env=env, start_new_session=True,
            )
            child = _Child(spec, process, log)
            threading.Thread(target=child.read_stdout, daemon=True).start()
            self.children.append(child)
            logger.info("starting local %s (pid %d)", spec.kind, process.pid)

        deadline = time.monotonic() + self.startup_timeout
        for child in self.children:
            # Set by the ready line, or when the child's output closes (it exited).
            timed_out = not child.ready.wait(max(0.0, deadline - time.monotonic()))
            if child.address is None:
                if not timed_out:
                    try:  # its log is complete once it has exited
                        child.process.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                self.stop()
                if timed_out:
                    compiles = child.spec.compile and child.spec.kind != "encoder"
                    raise LocalServiceError(
                        f"local {child.spec.kind} did not start within "
                        f"{self.startup_timeout:.0f} s"
                        + ("; it compiles its UNet at start-up, which takes longer on a host of "
                           "few CPU cores: run without --compile" if compiles else "")
                        + " (a first run downloads the models: give it longer with "
                          "--startup-timeout)"
                    )
                raise LocalServiceError(
                    f"local {child.spec.kind} service failed to start: {child.last_error()}"
                )
        addresses: dict[str, list[str]] = {}
        for child in self.children:
            addresses.setdefault(child.spec.kind, []).append(child.address)  # type: ignore
        return {kind: ",".join(found) for kind, found in addresses.items()}

    def exited(self, kind: str) -> str | None:
        """Why the local ``kind`` service cannot answer any more, once every process of that
        kind (all its replicas) has exited; else None. For ``CascadeClient(gone=...)``."""
        children = [child for child in self.children if child.spec.kind == kind]
        codes = [child.process.poll() for child in children]
        if not children or any(code is None for code in codes):
            return None
        child = children[-1]
        signal_name = ""
        if codes[-1] < 0:
            try:
                signal_name = f", {signal.Signals(-codes[-1]).name}"
            except ValueError:  # a real-time signal has no name
                signal_name = f", signal {-codes[-1]}"
        return (f"the local {kind} service exited (code {codes[-1]}{signal_name}): "
                f"{child.last_error()}")

    def stop(self, grace: float = 10.0) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        end = time.monotonic() + grace
        for child in self.children:
            try:
                child.process.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
        self.children.clear()

    def __enter__(self) -> dict[str, str]:
        try:
            return self.start()
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._logdir is not None:
            self._logdir.cleanup()
            self._logdir = None
