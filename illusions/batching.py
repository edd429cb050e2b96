"""Samples from several callers sharing UNet calls, step by step.

A :class:`BatchRunner` owns one stage's UNet in one thread. Callers (a service's request threads)
hand it a denoising job and wait; between two UNet calls the runner lets new jobs join, then runs
one call of at most ``max_batch`` rows for the jobs that have waited longest
(:class:`illusions.sampling.SharedSteps`), so calls stay full while enough rows wait. Each job
keeps its own generator, so what a caller gets equals the sample run alone, up to the float
rounding of a larger batch, and exactly while it runs alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future

import torch

from illusions.models import UNetStage
from illusions.sampling import DenoiseJob, SharedSteps

logger = logging.getLogger(__name__)


# How long a runner that has just taken new jobs waits for more before its next UNet call: a
# client sending a group of samples at once (``generate --batch N``) has them arrive over some
# milliseconds. Without the wait the first arrival ran a call of its own, padded to the full row
# count with ``--fixed-batch``, and the rest followed one call later: a whole call more, and the
# group's samples out of step until the end (one more call there).
GATHER_QUIET_S = 0.05  # wait until no job has arrived for this long ...
GATHER_MAX_S = 0.5  # ... but no longer than this in all


class BatchRunner:
    """Runs the jobs of many threads through shared UNet calls (one thread owns the UNet).

    Whenever jobs arrive, the runner gathers those that follow within ``quiet_s`` of each other
    (at most ``max_gather_s`` in all) before its next call, unless that call is full already or
    ``max_jobs`` jobs are running (a service admits at most that many requests at once; 1: no
    wait at all). Without arrivals it never waits.
    """

    def __init__(self, stage: UNetStage, name: str = "unet", max_jobs: int = 0,
                 quiet_s: float = GATHER_QUIET_S, max_gather_s: float = GATHER_MAX_S) -> None:
        self.stage = stage
        self.shared = SharedSteps(stage)  # driven by the runner's thread only
        self.max_jobs = max_jobs  # 0: no bound known
        self.quiet_s = quiet_s
        self.max_gather_s = max_gather_s
        self._inbox: queue.SimpleQueue[tuple[DenoiseJob, Future] | None] = queue.SimpleQueue()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, job: DenoiseJob) -> Future[torch.Tensor]:
        """Queue ``job``; it joins the running ones at their next step."""
        future: Future[torch.Tensor] = Future()
        self._inbox.put((job, future))
        return future

    def run(self, job: DenoiseJob) -> torch.Tensor:
        """Run ``job`` with whatever else is running; returns its image or raises its error."""
        return self.submit(job).result()

    def close(self) -> None:
        """Stop the thread once the jobs it holds are done."""
        self._inbox.put(None)
        self._thread.join()

    def _take(self, block: bool, timeout: float | None = None) -> bool:
        """Move one job from the inbox into the shared steps; False if there was none."""
        try:
            item = self._inbox.get(block=block, timeout=timeout)
        except queue.Empty:
            return False
        if item is None:
            self._closing = True
            return False
        job, future = item
        self.shared.add(job, _resolver(future))
        return True

    def _gathered(self) -> bool:
        """No reason to wait for more jobs before the next call."""
        shared, cap = self.shared, self.stage.max_batch
        return (self._closing or (self.max_jobs > 0 and len(shared) >= self.max_jobs)
                or (cap > 0 and shared.pending_rows() >= cap))

    def _loop(self) -> None:
        if self.stage.device.type == "cuda" and self.stage.device.index is not None:
            # Threads start on cuda:0: without this, a stage on another GPU would create a CUDA
            # context on GPU 0 and queue any work that names no device there.
            torch.cuda.set_device(self.stage.device)
        shared = self.shared
        while not (self._closing and not len(shared)):
            # New jobs join between two steps; with nothing to do, wait for one.
            arrived = False
            while self._take(block=not len(shared) and not self._closing):
                arrived = True
            if arrived and self.quiet_s > 0:
                deadline = time.monotonic() + self.max_gather_s
                while not self._gathered() and (left := deadline - time.monotonic()) > 0:
                    if not self._take(block=True, timeout=min(self.quiet_s, left)):
                        break
            try:
                shared.step()
            except Exception as exc:  # noqa: BLE001 - a UNet call's failure ends only the jobs
                # whose rows fail (SharedSteps.step); anything else leaves no job's state known
                logger.exception("a shared step failed")
                shared.fail_all(exc)


def _resolver(future: Future) -> Callable[[torch.Tensor | BaseException], None]:
    def done(result: torch.Tensor | BaseException) -> None:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    return done
