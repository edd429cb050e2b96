"""CUDA-graph replay of the UNet call.

At IF's batch sizes (2 x views rows) the IF-I UNet is launch-bound: eager PyTorch spends more time
issuing its ~1,500 kernels than the GPU spends running them (H200, IF-I-M, 2 views: 29.7 ms eager,
10.9 ms replayed; see docs/benchmarks.md). A CUDA graph records the kernels of one call once and
replays them with a single launch. The replayed kernels are the eager ones, so the result is
bit-identical to the eager call.

One graph is captured per input signature (batch, sample shape, dtype, embedding shape, whether
class labels are given); inputs are copied into the graph's static buffers before each replay and
the output is copied out after it. All graphs of one UNet share one memory pool.

The UNet's device need not be the calling thread's current CUDA device (a stage service on
``cuda:1`` calls it from request and runner threads whose current device is ``cuda:0``): capture
and replay run with the UNet's device made current and on a stream of that device. Without that,
the capture stream belonged to the current device: in the tests the capture then failed (and the
UNet ran eager), and a stage service on ``cuda:1`` answered requests while its GPU stayed idle.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch

logger = logging.getLogger(__name__)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    sample: torch.Tensor
    timestep: torch.Tensor
    embeds: torch.Tensor
    class_labels: torch.Tensor | None
    out: torch.Tensor


class GraphedUNet:
    """Calls ``unet(sample, t, encoder_hidden_states, class_labels)`` through captured CUDA graphs.

    Falls back to the eager call (and stays there for that signature) if capture fails, e.g. for
    a bitsandbytes-quantized UNet whose kernels do host-side work.
    """

    def __init__(self, unet: Any, warmup: int = 2) -> None:
        self.unet = unet
        self.warmup = warmup
        self._graphs: dict[tuple, _Captured | None] = {}
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = threading.Lock()

    def _eager(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
               class_labels: torch.Tensor | None) -> torch.Tensor:
        return self.unet(sample, timestep, encoder_hidden_states=embeds,
                         class_labels=class_labels, return_dict=False)[0]

    def _capture(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                 class_labels: torch.Tensor | None) -> _Captured:
        static = _Captured(
            graph=torch.cuda.CUDAGraph(),
            sample=sample.clone(),
            timestep=timestep.clone(),
            embeds=embeds.clone(),
            class_labels=None if class_labels is None else class_labels.clone(),
            out=sample,  # replaced below
        )
        # Warm up on a side stream (lazy initialisation must not happen during capture).
        device = sample.device
        stream = torch.cuda.Stream(device=device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(self.warmup):
                self._eager(static.sample, static.timestep, static.embeds, static.class_labels)
        torch.cuda.current_stream(device).wait_stream(stream)
        # The warm-up's activations are cached by the allocator outside the graphs' pool: give
        # them back before the capture allocates its own, or the process peaks at both.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        # thread_local: a stage service prepares requests (host-to-device copies, allocations)
        # on its handler threads while this thread captures; the default "global" mode would
        # make those calls fail. They run on other streams and do not enter the graph.
        # The capture stream must be on the UNet's device (torch.cuda.graph's default one is on
        # whichever device was current when it was first made).
        with torch.cuda.graph(static.graph, pool=self._pool, stream=torch.cuda.Stream(device),
                              capture_error_mode="thread_local"):
            static.out = self._eager(static.sample, static.timestep, static.embeds,
                                     static.class_labels)
        return static

    @torch.no_grad()
    def __call__(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                 class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Same as the eager UNet call: (B, C, H, W) -> (B, out_channels, H, W) (a fresh tensor)."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor(timestep, device=sample.device)
        timestep = timestep.to(sample.device)
        key = (tuple(sample.shape), sample.dtype, tuple(embeds.shape), embeds.dtype,
               None if class_labels is None else tuple(class_labels.shape), tuple(timestep.shape))
        with self._lock, torch.cuda.device(sample.device):
            if key not in self._graphs:
                try:
                    self._graphs[key] = self._capture(sample, timestep, embeds, class_labels)
                    logger.info("captured a CUDA graph of the UNet for %s", key)
                except Exception as exc:  # noqa: BLE001 - eager is always a correct fallback
                    logger.warning("CUDA graph capture failed (%s); running eager", exc)
                    torch.cuda.synchronize(sample.device)
                    self._graphs[key] = None
            captured = self._graphs[key]
            if captured is None:
                return self._eager(sample, timestep, embeds, class_labels)
            captured.sample.copy_(sample)
            captured.timestep.copy_(timestep)
            captured.embeds.copy_(embeds)
            if captured.class_labels is not None and class_labels is not None:
                captured.class_labels.copy_(class_labels)
            captured.graph.replay()
            return captured.out.clone()
