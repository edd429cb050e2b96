"""GPU memory of one service's model, per option: weights (fp16, int8, bitsandbytes), views
in chunks (``max_batch``), CUDA graphs; and the image difference each option costs.

Each case runs in a fresh process, loaded through the services' own code (``load_stage`` /
``TextEncoder.from_pretrained``, random weights from the real configs, the same seed, so every
case of one model holds the same weights) and then measured as a service is from SERVING on:

- torch's peak allocated and reserved bytes;
- the whole process as nvidia-smi sees it (CUDA context, cuBLAS/cuDNN workspaces included),
  sampled every 0.1 s, and right after CUDA's initialisation (the context alone);
- the stage's time (30 steps, after one warm-up call that captures the CUDA graph);
- max and mean |Δ| of the output against the fp16 case of the same model and views.

A case is ``SERVICE/MODEL/QUANTIZE/VIEWS[/MAX_BATCH[/graph|eager]]``, e.g.
``stage2/IF-II-M/int8/4/2``;
SERVICE is encoder, stage1 or stage2; MODEL a folder of bench/model-configs/DeepFloyd without
``-v1.0`` (or T5-XXL); QUANTIZE none, int8, 8bit or 4bit. Usage::

    python -m bench.memory --cases stage1/IF-I-XL/none/2 stage1/IF-I-XL/int8/2 --out mem.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.run import CONFIGS, ENCODER, VIEW_SETS, GpuMemorySampler, environment

logger = logging.getLogger("bench.memory")
GiB = 2**30


@dataclass(frozen=True)
class Case:
    service: str  # encoder | stage1 | stage2
    model: str  # IF-I-M, IF-I-XL, IF-II-M, IF-II-L, T5-XXL
    quantize: str
    views: int
    max_batch: int = 0
    mode: str = "graph"  # graph: UNet calls replayed from CUDA graphs (the default); eager

    @classmethod
    def parse(cls, text: str) -> Case:
        parts = text.split("/")
        if len(parts) not in (4, 5, 6) or parts[5:] not in ([], ["graph"], ["eager"]):
            raise SystemExit(
                f"bad case {text!r}: use SERVICE/MODEL/QUANTIZE/VIEWS[/MAX_BATCH[/graph|eager]]"
            )
        return cls(parts[0], parts[1], parts[2], int(parts[3]), int(parts[4]) if parts[4:] else 0,
                   *parts[5:])

    @property
    def name(self) -> str:
        return "/".join(str(v) for v in asdict(self).values())

    @property
    def reference(self) -> Case:
        """The fp16 case this one is compared with."""
        return Case(self.service, self.model, "none", self.views)

    @property
    def directory(self) -> str:
        return str(ENCODER if self.service == "encoder" else CONFIGS / f"{self.model}-v1.0")


def _own_smi_mib() -> int:
    out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
    for line in out.strip().splitlines():
        pid, mib = (int(x) for x in line.split(","))
        if pid == os.getpid():
            return mib
    return 0


def _child(case: Case, steps: int, output: Path) -> dict[str, Any]:
    """Runs in the fresh process: load, reset the peaks (as a service does at SERVING), sample."""
    from illusions.sampling import SamplingParams, sample_stage_1, sample_stage_2
    from illusions.text import TextEncoder
    from illusions.views import build_views
    from services.common.server import ServerConfig
    from services.common.stage import load_stage

    torch.zeros(1, device="cuda")
    result: dict[str, Any] = {"pid": os.getpid(), "context_only_smi_gib": _own_smi_mib() / 1024}
    t0 = time.perf_counter()
    if case.service == "encoder":
        encoder = TextEncoder.from_pretrained(case.directory, device="cuda", dtype="float16",
                                              quantize=case.quantize, random_weights=True)
        encoder.encode(["warm-up"])
    else:
        config = ServerConfig(case.service, case.directory, device="cuda", dtype="float16",
                              quantize=case.quantize, random_weights=True,
                              max_batch=case.max_batch, cuda_graphs=case.mode == "graph")
        stage = load_stage(config, 1 if case.service == "stage1" else 2)
    result["load_s"] = time.perf_counter() - t0
    torch.cuda.synchronize()
    result["load_peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    result["weights_gib"] = torch.cuda.memory_allocated() / GiB
    result["after_load_smi_gib"] = _own_smi_mib() / 1024
    sampler = GpuMemorySampler(0.05)  # this process, from "SERVING" on
    sampler.__enter__()

    g = torch.Generator().manual_seed(0)
    prompts = [f"prompt number {k}" for k in range(case.views)]
    times = []
    for _ in range(2):  # the first call captures the CUDA graph for this batch
        torch.cuda.synchronize()
        t = time.perf_counter()
        if case.service == "encoder":
            out, _ = encoder.encode(prompts)
        else:
            dim = int(stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim)
            prompt = torch.randn(case.views, 77, dim, generator=g)
            negative = torch.randn(1, 77, dim, generator=g)
            views = build_views(VIEW_SETS[case.views])
            params = SamplingParams(num_inference_steps=steps, guidance_scale=10.0)
            if case.service == "stage1":
                out = sample_stage_1(stage, prompt, negative, views, torch.Generator().manual_seed(1),
                                     params)
            else:
                image = torch.rand(1, 3, stage.sample_size // 4, stage.sample_size // 4,
                                   generator=g) * 2 - 1
                out = sample_stage_2(stage, image, prompt, negative, views,
                                     torch.Generator().manual_seed(1), params)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        g.manual_seed(0)
    result["first_call_s"], result["call_s"] = times
    result["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
    result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
    sampler.__exit__()
    result["peak_smi_gib"] = sampler.peaks.get(os.getpid(), 0) / 1024
    if case.service != "encoder" and stage.graphed is not None:
        graphs = stage.graphed._graphs.values()
        result["cuda_graphs"] = f"{sum(g is not None for g in graphs)} of {len(graphs)} captured"
    if case.service != "encoder":
        # One UNet call on fixed inputs: the quantization error of the noise prediction itself
        # (a whole image at guidance 10 with random weights amplifies any rounding chaotically).
        size, channels = stage.sample_size, int(stage.unet.config.in_channels)
        x = torch.randn(2, channels, size, size, generator=g).to("cuda", torch.float16)
        e = torch.randn(2, 77, dim, generator=g).to("cuda", torch.float16)
        labels = None if case.service == "stage1" else torch.full((2,), 50, device="cuda")
        with torch.no_grad():
            call = stage.unet(x, torch.tensor(500, device="cuda"), encoder_hidden_states=e,
                              class_labels=labels, return_dict=False)[0]
        torch.save(call.float().cpu(), output.with_suffix(".call.pt"))
    torch.save(out.float().cpu(), output)
    return result


def run_case(case: Case, steps: int, outputs: Path, alloc_conf: str) -> dict[str, Any]:
    """Run ``case`` in a fresh process while sampling its nvidia-smi figure."""
    output = outputs / (case.name.replace("/", "_") + ".pt")
    env = dict(os.environ)
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    if alloc_conf:
        env["PYTORCH_CUDA_ALLOC_CONF"] = alloc_conf
    with tempfile.NamedTemporaryFile(suffix=".json") as report, GpuMemorySampler(0.1) as sampler:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", case.name, "--steps", str(steps),
             "--child-output", str(output), "--child-report", report.name],
            capture_output=True, text=True, env=env,
        )
        if proc.returncode != 0:
            logger.error("%s failed:\n%s", case.name, proc.stderr[-3000:])
            return {"case": case.name, "error": proc.stderr.strip().splitlines()[-1:]}
        result = json.loads(Path(report.name).read_text())
    # The whole life of the process, loading included.
    result["lifetime_peak_smi_gib"] = sampler.peaks.get(result["pid"], 0) / 1024
    result["output"] = str(output)
    return {"case": case.name} | result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=[])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--alloc-conf", default="expandable_segments:True",
                        help="PYTORCH_CUDA_ALLOC_CONF for the cases (default: what `illusion serve` "
                             "sets; '' for PyTorch's own default)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child-report", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING if args.child else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    if args.child:
        result = _child(Case.parse(args.child), args.steps, args.child_output)
        args.child_report.write_text(json.dumps(result))
        return

    cases = [Case.parse(text) for text in args.cases]
    outputs = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    results: dict[str, dict[str, Any]] = {}
    report: dict[str, Any] = {"environment": environment(),
                              "settings": {"steps": args.steps, "alloc_conf": args.alloc_conf},
                              "results": []}
    for case in cases:
        entry = run_case(case, args.steps, outputs, args.alloc_conf)
        reference = results.get(case.reference.name)
        if reference and "output" in entry and "output" in reference and case != case.reference:
            a, b = torch.load(reference["output"]), torch.load(entry["output"])
            entry["max_abs_diff_vs_fp16"] = (a - b).abs().max().item()
            entry["mean_abs_diff_vs_fp16"] = (a - b).abs().mean().item()
            call = Path(entry["output"]).with_suffix(".call.pt")
            if call.exists():
                a = torch.load(Path(reference["output"]).with_suffix(".call.pt"))
                b = torch.load(call)
                entry["unet_call_rel_error_vs_fp16"] = ((a - b).norm() / a.norm()).item()
        results[case.name] = entry
        logger.info("%s", json.dumps(entry))
        report["results"].append({k: v for k, v in entry.items() if k != "output"})
        if args.out:
            args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
