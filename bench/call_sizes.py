"""Start-up and call times of a compiled stage whose calls come in several sizes, as a service
started with ``--compile --fixed-batch --max-batch N --batch-multiple M`` makes them: the time
to compile and capture every size (what start-up waits for), each size's replayed call time and
share of the dense fp16 peak, and whether one sample's rows give the same output in calls of
different sizes. Random weights, real configs, one GPU.

    python -m bench.call_sizes --stage 2 --max-batch 16 --batch-multiple 4
    python -m bench.call_sizes --stage 2 --max-batch 16 --batch-multiple 4 --dynamic-batch

With ``--dynamic-batch`` the row count is one symbol of one compiled UNet, as ``--compile``
compiles it; without it each size compiles on its own (``UNetStage.compile(dynamic_batch=False)``,
what ``--compile`` did before).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import torch

from bench.run import CASCADES, CONFIGS, environment
from bench.throughput import dense_fp16_peak_tflops, unet_flops_per_row
from bench.unet_call import _time
from illusions.models import load_unet_stage
from illusions.text import MAX_LENGTH


def measure(args: argparse.Namespace) -> dict[str, Any]:
    directory = str(CONFIGS / CASCADES[args.cascade][args.stage - 1])
    stage = load_unet_stage(directory, args.stage, device="cuda", dtype=torch.float16,
                            random_weights=True)
    stage.max_batch, stage.fixed_batch, stage.batch_multiple = (args.max_batch, True,
                                                                args.batch_multiple)
    config = stage.unet.config
    dim = int(config.encoder_hid_dim or config.cross_attention_dim)
    generator = torch.Generator(device="cuda").manual_seed(0)

    def inputs(rows: int) -> tuple[torch.Tensor, ...]:
        size = (rows, config.in_channels, stage.sample_size, stage.sample_size)
        sample = torch.randn(size, generator=generator, device="cuda", dtype=torch.float16)
        embeds = torch.randn(rows, MAX_LENGTH, dim, generator=generator, device="cuda",
                             dtype=torch.float16)
        t = torch.full((rows,), 500, device="cuda")
        labels = torch.full((rows,), 50, device="cuda") if args.stage == 2 else None
        return sample, t, embeds, labels

    sizes = stage.call_sizes()
    full = inputs(max(sizes))
    first = sizes[0]  # the rows every size's call is given first (the rest is other rows)
    with torch.no_grad():
        stage.enable_cuda_graphs()
        eager = stage.predict(*(None if x is None else x[:first] for x in full))
        stage.compile(dynamic_batch=args.dynamic_batch)
        start = time.perf_counter()
        stage.warm_up_call_sizes(MAX_LENGTH)
        torch.cuda.synchronize()
        report: dict[str, Any] = {"sizes": sizes, "warm_up_s": time.perf_counter() - start,
                                  "calls": {}}
        tflop_per_row = unet_flops_per_row(directory, args.stage) / 1e12
        peak = dense_fp16_peak_tflops(torch.cuda.get_device_name())
        reference = None
        for rows in sizes:
            call = tuple(None if x is None else x[:rows] for x in full)
            ms = _time(lambda c=call: stage.predict(*c), args.iters)
            out = stage.predict(*call)[:first]
            reference = out if reference is None else reference
            report["calls"][str(rows)] = {
                "ms": ms,
                "fraction_of_peak": rows * tflop_per_row / (ms / 1e3) / peak if peak else None,
                "max_diff_vs_eager": (out - eager).abs().max().item(),
                f"max_diff_vs_{first}_rows": (out - reference).abs().max().item(),
            }
    report["dynamo_stats"] = dict(torch._dynamo.utils.counters["stats"])  # unique_graphs: compiles
    report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascade", default="M/M", choices=CASCADES)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-multiple", type=int, default=4)
    parser.add_argument("--dynamic-batch", action="store_true",
                        help="compile the row count as a symbol (one compile for every size)")
    parser.add_argument("--iters", type=int, default=20, help="replays timed per size")
    args = parser.parse_args()
    report = {"command": "python -m bench.call_sizes " + " ".join(sys.argv[1:]),
              "environment": environment(), **measure(args)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
