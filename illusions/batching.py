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
from collections.abc import Callable
from concurrent.futures import Future

import torch

from illusions.models import UNetStage
from illusions.sampling import DenoiseJob, SharedSteps

logger = logging.getLogger(__name__)


class BatchRunner:
    """Runs the jobs of many threads through shared UNet calls (one thread owns the UNet)."""

    def __init__(self, stage: UNetStage, name: str = "unet") -> None:
        self.stage = stage
        self.shared = SharedSteps(stage)  # driven by the runner's thread only
        self._inbox: queue.SimpleQueue[tuple[DenoiseJob, Future] | None] = queue.SimpleQueue()
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

    def _loop(self) -> None:
        shared = self.shared
        closing = False
        while not (closing and not len(shared)):
            # New jobs join between two steps; with nothing to do, wait for one.
            while True:
                try:
                    item = self._inbox.get(block=not len(shared) and not closing)
                except queue.Empty:
                    break
                if item is None:
                    closing = True
                    continue
                job, future = item
                shared.add(job, _resolver(future))
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
