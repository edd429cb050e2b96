"""GPU benchmark at real model sizes (random weights from the real configs in bench/model-configs).

For each cascade (M/M: IF-I-M + IF-II-M, XL/L: IF-I-XL + IF-II-L) and each view count it measures,
in one run on one machine:

1. the in-process baseline (bench/baseline.py: the reference sampler's structure, eager);
2. the same work through the three real services started by local mode (``--random-weights``):
   per-stage and end-to-end latency, wire bytes, serialization time, and the peak GPU memory of
   each service process (torch's peak reserved, and nvidia-smi's per-process figure sampled);

and prints one JSON document (``--out`` writes it too). Usage::

    python -m bench.run --cascades M/M XL/L --views 2 4 --steps 30 --guidance 10 --out res.json
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import torch

from anagram.v1 import anagram_pb2 as pb
from bench.baseline import reference_stage_1, reference_stage_2
from illusions.models import QUANTIZE_CHOICES, load_unet_stage
from illusions.sampling import SamplingParams, sample_stage_1, sample_stage_2
from illusions.views import build_views
from orchestrator.client import CascadeClient
from orchestrator.local import LocalServices, LocalServiceSpec
from services.common import codec

logger = logging.getLogger("bench")

CONFIGS = Path(__file__).parent / "model-configs" / "DeepFloyd"
CASCADES = {
    "M/M": ("IF-I-M-v1.0", "IF-II-M-v1.0"),
    "L/M": ("IF-I-L-v1.0", "IF-II-M-v1.0"),
    "XL/L": ("IF-I-XL-v1.0", "IF-II-L-v1.0"),
}
# IF's T5 is T5-v1.1-XXL in every stage-1 repo; its config sits in text_encoder/.
ENCODER = CONFIGS / "IF-I-XL-v1.0"
VIEW_SETS = {1: ["identity"], 2: ["identity", "flip"], 3: ["identity", "flip", "rotate_cw"],
             4: ["identity", "flip", "rotate_cw", "rotate_ccw"]}
GiB = 2**30


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class GpuMemorySampler:
    """Samples nvidia-smi's per-process memory every ``period`` s; keeps each pid's peak (MiB)."""

    def __init__(self, period: float = 0.2) -> None:
        self.period = period
        self.peaks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                out = subprocess.run(
                    ["nvidia-smi", "--query-compute-apps=pid,used_memory",
                     "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=10,
                ).stdout
            except (OSError, subprocess.TimeoutExpired):
                return
            for line in out.strip().splitlines():
                try:
                    pid, mib = (int(x) for x in line.split(","))
                except ValueError:
                    continue
                self.peaks[pid] = max(self.peaks.get(pid, 0), mib)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def _embeds(views: int, dim: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return (torch.randn(views, 77, dim, generator=g).to(dtype),
            torch.randn(1, 77, dim, generator=g).to(dtype))


def _timed(fn, repeats: int) -> tuple[float, Any]:
    """Median wall time of ``fn(r)`` over ``repeats`` runs after one warm-up; last result."""
    times, result = [], None
    for r in range(repeats + 1):
        _sync()
        t0 = time.perf_counter()
        result = fn(r)
        _sync()
        if r:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _stage_pair(number: int, directory: str, views: list, params: SamplingParams,
                dtype: torch.dtype, repeats: int, image64: torch.Tensor | None
                ) -> tuple[dict[str, Any], torch.Tensor]:
    """One stage: the reference-structured sampler, then the library's with CUDA graphs."""
    stage = load_unet_stage(directory, number, device="cuda", dtype=dtype, random_weights=True)
    dim = int(stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim)
    prompt, negative = _embeds(len(views), dim, dtype)
    steps, guidance = params.num_inference_steps, params.guidance_scale

    def baseline(r: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(r)
        if number == 1:
            return reference_stage_1(stage, prompt, negative, views, generator, steps, guidance)
        return reference_stage_2(stage, image64, prompt, negative, views, generator, steps,
                                 guidance)

    def fast(r: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(r)
        if number == 1:
            return sample_stage_1(stage, prompt, negative, views, generator, params)
        return sample_stage_2(stage, image64, prompt, negative, views, generator, params)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated()
    base_s, base_img = _timed(baseline, repeats)
    peak = torch.cuda.max_memory_allocated()
    stage.enable_cuda_graphs()
    fast_s, fast_img = _timed(fast, repeats)
    result = {
        f"stage{number}_s": base_s,
        f"stage{number}_peak_allocated_gib": peak / GiB,
        f"stage{number}_weights_gib": weights / GiB,
        f"fast_stage{number}_s": fast_s,
        f"fast_stage{number}_max_abs_diff": (fast_img.float() - base_img.float()).abs().max().item(),
    }
    return result, base_img


def run_baseline(cascade: str, n_views: int, steps: int, guidance: float, dtype: torch.dtype,
                 repeats: int) -> dict[str, Any]:
    """In this process, one stage at a time on cuda:0: the reference-structured sampler, then
    the library's sampler with CUDA graphs (the services' fast path without the wire), and the
    image difference between the two (same seeds; stage 2 gets the same 64px image)."""
    s1_dir, s2_dir = (str(CONFIGS / name) for name in CASCADES[cascade])
    views = build_views(VIEW_SETS[n_views])
    params = SamplingParams(steps, guidance)
    first, image64 = _stage_pair(1, s1_dir, views, params, dtype, repeats, None)
    torch.cuda.empty_cache()
    second, _ = _stage_pair(2, s2_dir, views, params, dtype, repeats, image64)
    out = first | second
    out["end_to_end_s"] = out["stage1_s"] + out["stage2_s"]
    out["fast_end_to_end_s"] = out["fast_stage1_s"] + out["fast_stage2_s"]
    return out


def run_services(cascade: str, n_views: int, steps: int, guidance: float, dtype: str,
                 repeats: int, encoder_device: str, encoder_dtype: str,
                 max_batch: int = 0, quantize: str = "none",
                 encoder_quantize: str = "none", stage2_max_batch: int | None = None,
                 stage2_device: str = "auto", compile_unets: bool = False) -> dict[str, Any]:
    """The same work through the three real services (local mode) on this machine's GPU(s).

    ``encoder_device="none"``: no encoder service; random embeddings go to the stage services
    (for figures of the GPU processes when the encoder runs on the CPU, without building T5-XXL's
    random weights on the CPU, which takes minutes)."""
    s1_dir, s2_dir = (str(CONFIGS / name) for name in CASCADES[cascade])
    if stage2_device == "auto":
        stage2_device = "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"
    unet_options: dict[str, Any] = {"quantize": quantize, "random_weights": True,
                                    "compile": compile_unets}
    specs = [
        LocalServiceSpec("stage1", s1_dir, "cuda:0", dtype, max_batch=max_batch, **unet_options),
        LocalServiceSpec("stage2", s2_dir, stage2_device, dtype,
                         max_batch=max_batch if stage2_max_batch is None else stage2_max_batch,
                         **unet_options),
    ]
    with_encoder = encoder_device != "none"
    if with_encoder:
        specs.insert(0, LocalServiceSpec("encoder", str(ENCODER), encoder_device, encoder_dtype,
                                         quantize=encoder_quantize, random_weights=True))
    prompts = [f"prompt number {k}" for k in range(n_views)]
    specs_pb = [pb.ViewSpec(name=name) for name in VIEW_SETS[n_views]]
    local = LocalServices(specs)
    sampler = GpuMemorySampler()  # from SERVING on: loading may peak higher than serving
    # Without an encoder service the client's encoder address is never called: stage 1's stands in.
    with local as addresses, CascadeClient(
        addresses.get("encoder", addresses["stage1"]), addresses["stage1"], addresses["stage2"],
        timeout=1800,
    ) as client, sampler:
        pids = {child.process.pid: child.spec.kind for child in local.children}
        services = [child.spec.kind for child in local.children]
        for kind in services:
            client.services[kind].check(10.0)
        t0 = time.perf_counter()
        if with_encoder:
            prompt_embeds, negative = client.encode(prompts)
        else:
            t5 = json.loads((ENCODER / "text_encoder" / "config.json").read_text())
            prompt_embeds, negative = _embeds(n_views, int(t5["d_model"]), torch.float32)
        encode_s = time.perf_counter() - t0
        rows = []
        for r in range(repeats + 1):
            row: dict[str, float] = {}
            params = pb.SamplingParams(num_inference_steps=steps, guidance_scale=guidance,
                                       reduction="mean", noise_level=50, seed=r)
            t = time.perf_counter()
            embeds, neg = codec.encode(prompt_embeds), codec.encode(negative)
            row["serialize_s"] = time.perf_counter() - t
            request1 = pb.Stage1Request(prompt_embeds=embeds, negative_prompt_embeds=neg,
                                        views=specs_pb, params=params)
            t_start = time.perf_counter()
            image, state = client.stage1(request1)
            t_mid = time.perf_counter()
            t = time.perf_counter()
            request2 = pb.Stage2Request(image=codec.encode(image), prompt_embeds=embeds,
                                        negative_prompt_embeds=neg, views=specs_pb,
                                        params=params, rng_state=codec.encode(state))
            row["serialize_s"] += time.perf_counter() - t
            image256, _ = client.stage2(request2)
            t_end = time.perf_counter()
            row.update(stage1_s=t_mid - t_start, stage2_s=t_end - t_mid,
                       end_to_end_s=t_end - t_start)
            row["wire_bytes"] = (request1.ByteSize() + request2.ByteSize()
                                 + image.numel() * 4 + image256.numel() * 4 + 2 * state.numel())
            t = time.perf_counter()
            codec.decode(codec.encode(image256))  # the result's decode, as the client does it
            row["serialize_s"] += time.perf_counter() - t
            if r:
                rows.append(row)
        info = client.describe(services)
    result = {key: statistics.median(row[key] for row in rows) for key in rows[0]}
    result["encode_s"] = encode_s
    result["peak_reserved_gib"] = {k: v.peak_memory_bytes / GiB for k, v in info.items()}
    result["peak_allocated_gib"] = {k: v.peak_allocated_bytes / GiB for k, v in info.items()}
    # Whole-process figures (CUDA context included), by service.
    result["nvidia_smi_peak_gib"] = {pids.get(pid, str(pid)): mib / 1024
                                     for pid, mib in sampler.peaks.items()}
    return result


def environment() -> dict[str, Any]:
    import diffusers
    import grpc
    import transformers

    props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "gpu": props.name if props else None,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gib": props.total_memory / GiB if props else None,
        "torch": torch.__version__, "cuda": torch.version.cuda, "diffusers": diffusers.__version__,
        "transformers": transformers.__version__, "grpcio": grpc.__version__,
        "python": platform.python_version(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascades", nargs="+", default=["M/M", "XL/L"], choices=CASCADES)
    parser.add_argument("--views", nargs="+", type=int, default=[2, 4], choices=VIEW_SETS)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--guidance", type=float, default=10.0)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--encoder-device", default="cuda:0",
                        help="cuda:N, cpu, or none: random embeddings, no encoder service")
    parser.add_argument("--encoder-dtype", default="float16")
    parser.add_argument("--max-batch", type=int, default=0,
                        help="services: most rows per UNet call (0: all)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="services: UNet weights in 8 or 4 bits (bitsandbytes 8bit/4bit, "
                             "optimum-quanto int8)")
    parser.add_argument("--encoder-quantize", default="none", choices=QUANTIZE_CHOICES)
    parser.add_argument("--stage2-max-batch", type=int, default=None,
                        help="services: rows per stage-2 UNet call (default: --max-batch)")
    parser.add_argument("--stage2-device", default="auto",
                        help="services: stage 2's GPU (default cuda:1 when there are several)")
    parser.add_argument("--compile", action="store_true",
                        help="services: torch.compile the UNets (compiles in the warm-up run)")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--skip-services", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    dtype = getattr(torch, args.dtype)

    report: dict[str, Any] = {"environment": environment(), "settings": vars(args) | {
        "out": str(args.out)}, "results": []}
    for cascade in args.cascades:
        for n_views in args.views:
            entry: dict[str, Any] = {"cascade": cascade, "views": n_views}
            if not args.skip_baseline:
                entry["baseline"] = run_baseline(cascade, n_views, args.steps, args.guidance,
                                                 dtype, args.repeats)
            if not args.skip_services:
                entry["services"] = run_services(cascade, n_views, args.steps, args.guidance,
                                                 args.dtype, args.repeats, args.encoder_device,
                                                 args.encoder_dtype, args.max_batch,
                                                 args.quantize, args.encoder_quantize,
                                                 args.stage2_max_batch, args.stage2_device,
                                                 args.compile)
            if "baseline" in entry and "services" in entry:
                entry["ratio_end_to_end"] = (entry["services"]["end_to_end_s"]
                                             / entry["baseline"]["end_to_end_s"])
                entry["wire_overhead_fraction"] = (entry["services"]["serialize_s"]
                                                   / entry["services"]["end_to_end_s"])
            logger.info("%s", json.dumps(entry))
            report["results"].append(entry)
            if args.out:
                args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
