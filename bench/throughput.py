"""Throughput at real model sizes: images per minute for many samples, the share of the GPU's dense
fp16 peak the UNet work reaches, and how stage 2 scales over replicas (one per GPU).

In one run on one machine (random weights from the real configs in bench/model-configs, fp16):

1. **baseline**: the reference sampler in this process, one sample at a time (bench.run's
   baseline); its images per minute are 60 s over its seconds per illusion;
2. **one GPU**: the three real services on cuda:0 (local mode's processes) and the orchestrator's
   own ``generate`` writing ``--samples`` illusions, with ``--batch`` samples in flight per stage
   (the stage services admit them together and share their UNet calls);
3. **stage-2 replicas** (with two GPUs or more): stage 1 on cuda:0, stage-2 replicas on cuda:1..k
   behind one round_robin target, k = each of ``--replicas``; end to end through ``generate``, and
   stage 2 alone (the same stage-1 images sent to k replicas at once) for the scaling figure.
   With ``--share-gpu0`` the replicas are on cuda:0..k-1 instead, the first beside stage 1 and
   the encoder, so k replicas use k GPUs (for cascades whose stage 2 is most of the work).

Every run is preceded by an untimed one of the same shape (CUDA graphs are captured per row
count). UNet FLOPs per row are counted once per model by ``torch.utils.flop_counter`` on the meta
device; achieved FLOP/s are UNet FLOPs over wall time, reported against the GPU's dense fp16 peak
(datasheet) and against an fp16 matmul measured on this GPU. Usage::

    python -m bench.throughput --cascade M/M --views 2 --samples 16 --batch 16 \\
        --replicas 1 2 3 --out throughput.json
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from anagram.v1 import anagram_pb2 as pb
from bench.run import CASCADES, CONFIGS, ENCODER, VIEW_SETS, environment, run_baseline
from illusions.sampling import SamplingParams
from orchestrator.client import CascadeClient
from orchestrator.local import LocalServices, LocalServiceSpec
from orchestrator.pipeline import GenerateConfig, generate
from services.common import codec

logger = logging.getLogger("bench.throughput")

# Dense (no sparsity) fp16/bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets (SXM).
DENSE_FP16_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.05}


def dense_fp16_peak_tflops(gpu_name: str) -> float | None:
    """The datasheet's dense fp16 peak of a GPU named like ``NVIDIA H100 80GB HBM3``, if known."""
    for key, peak in DENSE_FP16_PEAK_TFLOPS.items():
        if key in gpu_name.upper():
            return peak
    return None


@torch.no_grad()
def unet_flops_per_row(directory: str | Path, stage_number: int) -> int:
    """FLOPs of one UNet row (one view, one CFG half) at the model's sample size.

    Counted by ``FlopCounterMode`` (2 per multiply-add of matmuls, convolutions and attention) on
    a copy of the UNet built from its config on the meta device: no weights, no memory, no GPU.
    """
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    config = UNet2DConditionModel.load_config(str(directory), subfolder="unet")
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    size, channels = unet.config.sample_size, unet.config.in_channels
    dim = int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim)
    meta = {"device": "meta"}
    labels = torch.zeros(1, dtype=torch.long, **meta) if stage_number == 2 else None
    counter = FlopCounterMode(display=False)
    with counter:
        unet(torch.zeros(1, channels, size, size, **meta), torch.zeros(1, **meta),
             encoder_hidden_states=torch.zeros(1, 77, dim, **meta), class_labels=labels)
    return int(counter.get_total_flops())


def matmul_tflops(device: str = "cuda:0", n: int = 8192, iters: int = 10) -> float:
    """fp16 n x n x n matmul rate on this GPU: what dense tensor-core work reaches here."""
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
        a @ b
    torch.cuda.synchronize(device)
    return 2 * n**3 * iters / (time.perf_counter() - start) / 1e12


def scaling_efficiency(throughput: dict[int, float]) -> dict[int, float]:
    """Throughput with k replicas over k times the throughput with one (1.0: linear)."""
    one = throughput[min(throughput)] / min(throughput)
    return {k: value / (k * one) for k, value in throughput.items()}


class TimedClient(CascadeClient):
    """A client that notes when each stage call starts and ends (``calls``: stage, start, end)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[str, float, float]] = []

    def _sample(self, name: str, *args: Any) -> tuple[torch.Tensor, torch.Tensor]:
        start = time.perf_counter()
        try:
            return super()._sample(name, *args)
        finally:
            self.calls.append((name, start, time.perf_counter()))


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for start, end in sorted(intervals):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def timeline(calls: list[tuple[str, float, float]], origin: float) -> dict[str, float]:
    """When each stage had calls in flight, in seconds from ``origin``: first start, last end,
    time with at least one call in flight, and the time both stages had calls in flight."""
    out: dict[str, float] = {}
    spans = {}
    for stage in ("stage1", "stage2"):
        spans[stage] = _union([(s, e) for name, s, e in calls if name == stage])
        if spans[stage]:
            out[f"{stage}_first_start_s"] = spans[stage][0][0] - origin
            out[f"{stage}_last_end_s"] = spans[stage][-1][1] - origin
            out[f"{stage}_in_flight_s"] = sum(e - s for s, e in spans[stage])
    out["both_in_flight_s"] = sum(
        max(0.0, min(e1, e2) - max(s1, s2))
        for s1, e1 in spans["stage1"] for s2, e2 in spans["stage2"])
    return out


class StepClock:
    """When the steps of many stage calls were reported done (a service reports a step once the
    GPU has finished it), to tell where a stage's time goes: before its first step is done, between
    steps, and after its last step (the results' return)."""

    def __init__(self) -> None:
        self.origin = time.perf_counter()
        self.reports: list[list[tuple[float, int, int]]] = []  # per call: (seconds, step, total)

    def progress(self) -> Callable[[int, int], None]:
        """A progress callback for one more call."""
        mine: list[tuple[float, int, int]] = []
        self.reports.append(mine)
        return lambda step, total: mine.append((time.perf_counter() - self.origin, step, total))

    def summary(self, wall: float) -> dict[str, float]:
        """Seconds from the start: the first call's first step done, the last call's last step
        done, the time after it (``wall`` is the run's), and the median time between two steps of
        one call."""
        firsts = [calls[0][0] for calls in self.reports if calls]
        lasts = [calls[-1][0] for calls in self.reports if calls and calls[-1][1] == calls[-1][2]]
        gaps = sorted(b[0] - a[0] for calls in self.reports for a, b in pairwise(calls))
        if not firsts or not lasts or not gaps:
            return {}
        last = max(lasts)
        return {"first_step_done_s": min(firsts), "last_step_done_s": last,
                "after_last_step_s": wall - last, "median_step_interval_s": gaps[len(gaps) // 2]}


class Throughput:
    """Runs the timed work against services already started; keeps the figures in ``report``."""

    def __init__(self, cascade: str, n_views: int, samples: int, steps: int, guidance: float,
                 workdir: Path) -> None:
        self.samples = samples
        self.workdir = workdir
        self.views = VIEW_SETS[n_views]
        self.params = SamplingParams(steps, guidance)
        s1_dir, s2_dir = (CONFIGS / name for name in CASCADES[cascade])
        rows = steps * 2 * n_views  # rows of UNet work per sample and stage
        self.flops = {1: rows * unet_flops_per_row(s1_dir, 1),
                      2: rows * unet_flops_per_row(s2_dir, 2)}  # per sample
        self._runs = 0
        self.stage2_images: list[torch.Tensor] = []  # the first stage-2-alone run's pictures

    def _config(self) -> GenerateConfig:
        self._runs += 1
        return GenerateConfig(
            prompts=tuple(f"prompt number {k}" for k in range(len(self.views))),
            views=tuple(self.views), save_dir=self.workdir, name=f"run{self._runs}",
            num_samples=self.samples, params=self.params,
        )

    def generate(self, client: TimedClient, batch: int, parallel: int, gpus: int,
                 peak: float) -> dict[str, Any]:
        """``generate`` of all samples, once untimed and once timed."""
        generate(self._config(), client, progress=False, stage1_workers=batch,
                 stage2_workers=parallel)
        client.calls.clear()
        start = time.perf_counter()
        written = generate(self._config(), client, progress=False, stage1_workers=batch,
                           stage2_workers=parallel)
        wall = time.perf_counter() - start
        assert len(written) == self.samples
        tflops = self.samples * (self.flops[1] + self.flops[2]) / wall / 1e12
        return {"batch": batch, "parallel": parallel, "gpus": gpus, "wall_s": wall,
                "images_per_min": 60 * self.samples / wall, "unet_tflops": tflops,
                "fraction_of_peak": tflops / (gpus * peak)} | timeline(client.calls, start)

    def stage1_only(self, client: CascadeClient, embeds: pb.Tensor, negative: pb.Tensor,
                    peak: float) -> tuple[dict[str, Any], list[pb.Stage2Request]]:
        """Stage 1 of every sample at once, untimed and timed; its figures and the stage-2
        requests it makes."""
        self.stage1_outputs(client, embeds, negative)
        clock = StepClock()
        requests = self.stage1_outputs(client, embeds, negative, clock)
        wall = time.perf_counter() - clock.origin
        tflops = len(requests) * self.flops[1] / wall / 1e12
        return {"wall_s": wall, "images_per_min": 60 * len(requests) / wall,
                "unet_tflops": tflops, "fraction_of_peak": tflops / peak,
                "steps": clock.summary(wall)}, requests

    def stage1_outputs(self, client: CascadeClient, embeds: pb.Tensor, negative: pb.Tensor,
                       clock: StepClock | None = None) -> list[pb.Stage2Request]:
        """Stage-2 requests for every sample (stage 1 run once, all samples at once)."""
        def one(seed: int) -> pb.Stage2Request:
            params = self._params(seed)
            request = pb.Stage1Request(prompt_embeds=embeds, negative_prompt_embeds=negative,
                                       views=self._specs(), params=params)
            image, state = client.stage1(request, clock.progress() if clock else None)
            return pb.Stage2Request(image=codec.encode(image), prompt_embeds=embeds,
                                    negative_prompt_embeds=negative, views=self._specs(),
                                    params=params, rng_state=codec.encode(state))

        with ThreadPoolExecutor(self.samples) as pool:
            return list(pool.map(one, range(self.samples)))

    def stage2_only(self, client: CascadeClient, requests: list[pb.Stage2Request], replicas: int,
                    peak: float) -> dict[str, Any]:
        """All stage-2 requests at once to ``replicas`` replicas, once untimed and once timed."""
        images: list[torch.Tensor] = []

        def run() -> tuple[float, StepClock]:
            clock = StepClock()
            with ThreadPoolExecutor(len(requests)) as pool:
                images[:] = [image for image, _ in pool.map(
                    lambda request: client.stage2(request, clock.progress()), requests)]
            return time.perf_counter() - clock.origin, clock

        run()
        wall, clock = run()
        tflops = len(requests) * self.flops[2] / wall / 1e12
        # Every setup must make the same pictures: compared with the first one measured.
        self.stage2_images = self.stage2_images or list(images)
        diff = max((a - b).abs().max().item()
                   for a, b in zip(images, self.stage2_images, strict=True))
        return {"replicas": replicas, "wall_s": wall,
                "images_per_min": 60 * len(requests) / wall, "unet_tflops": tflops,
                "fraction_of_peak": tflops / (replicas * peak), "max_abs_diff_vs_first": diff,
                "steps": clock.summary(wall)}

    def _params(self, seed: int) -> pb.SamplingParams:
        return pb.SamplingParams(num_inference_steps=self.params.num_inference_steps,
                                 guidance_scale=self.params.guidance_scale, reduction="mean",
                                 noise_level=50, seed=seed)

    def _specs(self) -> list[pb.ViewSpec]:
        return [pb.ViewSpec(name=name) for name in self.views]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascade", default="M/M", choices=CASCADES)
    parser.add_argument("--views", type=int, default=2, choices=VIEW_SETS)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--batch", type=int, nargs="+", default=[16],
                        help="samples in flight per stage on one GPU (each value is one run)")
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 3],
                        help="stage-2 replica counts, one GPU each (needs that many GPUs + 1); "
                             "none: one GPU only")
    parser.add_argument("--replica-batch", type=int, nargs="+", default=[0],
                        help="stage-1 calls in flight in the replica runs (default: all samples); "
                             "fewer start stage 2 sooner, e.g. 8 with --stage1-max-batch 32. "
                             "Several values: each is one set of replica runs")
    parser.add_argument("--share-gpu0", action="store_true",
                        help="stage-2 replicas on cuda:0..k-1 (the first beside stage 1) instead "
                             "of cuda:1..k")
    parser.add_argument("--skip-one-gpu", action="store_true",
                        help="replica runs only: no stage-2 service on cuda:0 and no one-GPU "
                             "runs (stage 1 alone still runs, for stage 2's requests)")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--stage1-max-batch", type=int, default=0)
    parser.add_argument("--stage2-max-batch", type=int, default=16,
                        help="rows per stage-2 UNet call (bounds activation memory)")
    parser.add_argument("--compile", action="store_true",
                        help="stage services torch.compile their UNets")
    parser.add_argument("--fixed-batch", action="store_true",
                        help="stage services pad every UNet call to their max batch (one shape; "
                             "needs --stage1-max-batch)")
    parser.add_argument("--batch-multiple", type=int, nargs=2, default=[0, 0], metavar="N",
                        help="with --fixed-batch: stage 1's and stage 2's calls padded only to "
                             "the next multiple of N rows (0: to the max batch), e.g. 8 4")
    parser.add_argument("--encoder-device", default="cuda:0")
    parser.add_argument("--encoder-dtype", default="float16")
    parser.add_argument("--baseline-repeats", type=int, default=2)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-stages-alone", action="store_true",
                        help="without replica runs: only the end-to-end runs on one GPU, not "
                             "each stage timed alone")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense fp16 peak of one GPU (default: from the GPU's name)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.fixed_batch and args.stage1_max_batch < 1:
        parser.error("--fixed-batch needs --stage1-max-batch N (e.g. 2 x views x samples)")
    if any(args.batch_multiple) and not args.fixed_batch:
        parser.error("--batch-multiple sets how far --fixed-batch pads a call: add --fixed-batch")
    if args.skip_one_gpu and (args.share_gpu0 or not args.replicas):
        parser.error("--skip-one-gpu leaves cuda:0 to stage 1 in replica runs: not with "
                     "--share-gpu0, and give --replicas")
    args.replica_batch = list(dict.fromkeys(args.replica_batch))  # each value once
    env = environment()
    peak = args.peak_tflops or dense_fp16_peak_tflops(env["gpu"] or "")
    if peak is None:
        raise SystemExit(f"unknown dense fp16 peak of {env['gpu']!r}: pass --peak-tflops")
    gpus = torch.cuda.device_count()
    first = 0 if args.share_gpu0 else 1  # the first stage-2 replica's GPU
    replicas = sorted(k for k in set(args.replicas) if 1 <= k <= gpus - first)
    if args.skip_one_gpu and not replicas:
        raise SystemExit(f"--skip-one-gpu: none of --replicas {args.replicas} fits on {gpus} "
                         "GPU(s) beside stage 1's")
    report: dict[str, Any] = {"environment": env, "settings": vars(args) | {"out": str(args.out)},
                              "dense_fp16_peak_tflops": peak,
                              "matmul_fp16_tflops": matmul_tflops()}

    def save() -> None:
        logger.info("%s", json.dumps({k: v for k, v in report.items() if k != "environment"}))
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))

    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        bench = Throughput(args.cascade, args.views, args.samples, args.steps, args.guidance,
                           Path(tmp))
        report["unet_tflop_per_sample"] = {f"stage{k}": v / 1e12 for k, v in bench.flops.items()}
        if not args.skip_baseline:
            base = run_baseline(args.cascade, args.views, args.steps, args.guidance,
                                torch.float16, args.baseline_repeats)
            tflops = (bench.flops[1] + bench.flops[2]) / base["end_to_end_s"] / 1e12
            report["baseline"] = base | {"images_per_min": 60 / base["end_to_end_s"],
                                         "unet_tflops": tflops,
                                         "fraction_of_peak": tflops / peak}
            save()
            torch.cuda.empty_cache()

        s1_dir, s2_dir = (str(CONFIGS / name) for name in CASCADES[args.cascade])
        most = max(args.batch + [args.samples])

        def unet_spec(kind: str, model: str, device: str, max_batch: int) -> LocalServiceSpec:
            return LocalServiceSpec(kind, model, device, "float16", random_weights=True,
                                    max_batch=max_batch, max_concurrent=most,
                                    compile=args.compile, fixed_batch=args.fixed_batch,
                                    batch_multiple=args.batch_multiple[kind == "stage2"])

        specs = [LocalServiceSpec("encoder", str(ENCODER), args.encoder_device,
                                  args.encoder_dtype, random_weights=True),
                 unet_spec("stage1", s1_dir, "cuda:0", args.stage1_max_batch)]
        last = first + max(replicas, default=0) - 1  # GPU of the last replica
        stage2_devices = [f"cuda:{g}" for g in range(max(last, 0) + 1)
                          if g or not args.skip_one_gpu]
        specs += [unet_spec("stage2", s2_dir, d, args.stage2_max_batch) for d in stage2_devices]
        local = LocalServices(specs)
        with local as addresses:
            by_device = {c.spec.device: c.address for c in local.children
                         if c.spec.kind == "stage2"}

            def client(stage2: str) -> TimedClient:
                return TimedClient(addresses["encoder"], addresses["stage1"], stage2,
                                   timeout=1800)

            one_gpu_runs = "cuda:0" in by_device  # not with --skip-one-gpu
            with client(by_device[stage2_devices[0]]) as one_gpu:
                one_gpu.check()
                if one_gpu_runs:
                    report["one_gpu"] = []
                    for b in args.batch:
                        report["one_gpu"].append(bench.generate(one_gpu, b, b, 1, peak))
                        save()
                if not (args.skip_stages_alone and not replicas):
                    embeds, negative = (codec.encode(t) for t in one_gpu.encode(list(bench.views)))
                    report["stage1_only"], requests = bench.stage1_only(one_gpu, embeds, negative,
                                                                        peak)
                    if one_gpu_runs:
                        report["stage2_only_one_gpu"] = bench.stage2_only(one_gpu, requests, 1, peak)
                        # The cascade's UNet work on that one GPU with each stage running alone (no
                        # time shared between the two processes, no pipeline filling or draining):
                        # FLOPs of both stages over the sum of the two stages' times.
                        busy = (report["stage1_only"]["wall_s"]
                                + report["stage2_only_one_gpu"]["wall_s"])
                        tflops = args.samples * (bench.flops[1] + bench.flops[2]) / busy / 1e12
                        report["cascade_stages_alone"] = {"wall_s": busy, "unet_tflops": tflops,
                                                          "fraction_of_peak": tflops / peak}
                save()
            report["replicas"], report["stage2_only"] = [], []
            for k in replicas:
                target = ",".join(by_device[f"cuda:{g}"] for g in range(first, first + k))
                with client(target) as several:
                    several.check()
                    report["stage2_only"].append(bench.stage2_only(several, requests, k, peak))
                    for group in args.replica_batch:
                        report["replicas"].append(
                            bench.generate(several, group or args.samples, args.samples,
                                           k + first, peak)
                            | {"replicas": k, "replica_batch": group,
                               "share_gpu0": args.share_gpu0})
                save()
            if report["stage2_only"]:
                report["stage2_scaling"] = scaling_efficiency(
                    {r["replicas"]: r["images_per_min"] for r in report["stage2_only"]})
                scaling = {group: scaling_efficiency(
                    {r["replicas"]: r["images_per_min"] for r in report["replicas"]
                     if r["replica_batch"] == group}) for group in args.replica_batch}
                # One --replica-batch: the scaling itself, as before; several: one per value.
                report["end_to_end_scaling"] = (scaling[args.replica_batch[0]]
                                                if len(scaling) == 1 else scaling)
    if "baseline" in report:
        for run in report.get("one_gpu", []):
            run["vs_baseline"] = run["images_per_min"] / report["baseline"]["images_per_min"]
    save()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
