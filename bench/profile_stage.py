"""Where a fast-path denoising loop spends its time: wall time of the set-up pieces and a
torch.profiler table of one stage's loop (random weights, real configs, CUDA graphs on).

    python -m bench.profile_stage --cascade M/M --stage 2 --views 2
    python -m bench.profile_stage --cascade M/M --stage 1 --samples 16   # jobs sharing calls
    python -m bench.profile_stage --cascade M/M --stage 2 --samples 4 --compile
    python -m bench.profile_stage --cascade M/M --stage 2 --samples 16 --compile \
        --max-batch 16 --fixed-batch --batch-multiple 4        # as the throughput runs' services

With ``--samples N`` the loop is N jobs sharing each UNet call (``run_batched``, as a service
started with ``--max-concurrent N`` runs them), and the UNet calls timed back to back have the
N jobs' rows. It also prints when the loop's UNet calls were queued by the host: the time before
the first (making the jobs, their first steps), the median interval, and what follows the last
(its GPU time, the jobs' last steps, the results), against the calls' own time back to back.
"""

from __future__ import annotations

import argparse
import time
from itertools import pairwise

import torch
from torch.profiler import ProfilerActivity, profile

from bench.run import CASCADES, CONFIGS, VIEW_SETS, _embeds
from illusions import scheduling
from illusions.models import load_unet_stage
from illusions.sampling import (
    SamplingParams,
    run_batched,
    sample_stage_1,
    sample_stage_2,
    stage_1_job,
    stage_2_job,
)
from illusions.views import build_views


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cascade", default="M/M", choices=CASCADES)
    parser.add_argument("--stage", type=int, default=2, choices=(1, 2))
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--samples", type=int, default=1, help="jobs sharing each UNet call")
    parser.add_argument("--rows", type=int, default=25,
                        help="rows of each profiler table (0: no profile)")
    parser.add_argument("--name-width", type=int, default=55,
                        help="characters of each kernel name (inductor's fused kernels need ~120 "
                             "to be found in TORCH_LOGS=output_code's listing)")
    parser.add_argument("--max-batch", type=int, default=0, help="rows per UNet call at most")
    parser.add_argument("--fixed-batch", action="store_true",
                        help="pad every call to --max-batch rows (or --batch-multiple)")
    parser.add_argument("--batch-multiple", type=int, default=0)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the UNet first, as `illusion serve --compile` does")
    args = parser.parse_args()
    directory = str(CONFIGS / CASCADES[args.cascade][args.stage - 1])
    stage = load_unet_stage(directory, args.stage, device="cuda", dtype=torch.float16,
                            random_weights=True)
    stage.max_batch, stage.fixed_batch = args.max_batch, args.fixed_batch
    stage.batch_multiple = args.batch_multiple
    stage.enable_cuda_graphs()
    if args.compile:
        stage.compile()  # compiles on the first call of each row count (the warm-up loops)
    queued: list[float] = []  # host times at which the loop's calls were queued
    predict = stage.predict

    def timed_predict(*call_args: object) -> torch.Tensor:
        queued.append(time.perf_counter())
        return predict(*call_args)

    views = build_views(VIEW_SETS[args.views])
    dim = int(stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim)
    prompt, negative = _embeds(args.views, dim, torch.float16)
    params = SamplingParams(args.steps, 10.0)
    image = torch.zeros(1, 3, 64, 64)

    def run() -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        if args.samples > 1:
            make = stage_1_job if args.stage == 1 else (
                lambda st, *a: stage_2_job(st, image, *a))
            jobs = [make(stage, prompt, negative, views, torch.Generator().manual_seed(k),
                         params) for k in range(args.samples)]
            return run_batched(stage, jobs)[0]
        if args.stage == 1:
            return sample_stage_1(stage, prompt, negative, views, generator, params)
        return sample_stage_2(stage, image, prompt, negative, views, generator, params)

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    stage.predict = timed_predict  # type: ignore[method-assign]
    t0 = time.perf_counter()
    run()
    torch.cuda.synchronize()
    end = time.perf_counter()
    stage.predict = predict  # type: ignore[method-assign]
    gaps = sorted(b - a for a, b in pairwise(queued))
    median = gaps[len(gaps) // 2] if gaps else float("nan")  # one call: no interval
    print(f"one loop ({args.samples} sample(s)): {(end - t0) * 1000:.1f} ms, {len(queued)} "
          f"UNet calls queued: the first at {(queued[0] - t0) * 1000:.1f} ms, then every "
          f"{median * 1000:.2f} ms (median), the loop done "
          f"{(end - queued[-1]) * 1000:.1f} ms after the last")

    size = stage.sample_size
    stream = scheduling.NoiseStream(torch.Generator().manual_seed(0), stage.device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stream.draw((1, 3, size, size), torch.float16)
    torch.cuda.synchronize()
    print(f"{args.steps} noise draws: {(time.perf_counter() - t0) * 1000:.1f} ms")

    rows = 2 * args.views * args.samples  # one step's, in calls of --max-batch rows at most
    x = torch.randn(rows, stage.unet.config.in_channels, size, size, device="cuda",
                    dtype=torch.float16)
    emb = torch.cat([negative.expand_as(prompt), prompt]).cuda().repeat(args.samples, 1, 1)
    labels = torch.full((rows,), 50, device="cuda") if args.stage == 2 else None
    t = (torch.tensor(500, device="cuda") if args.samples == 1
         else torch.full((rows,), 500, device="cuda"))
    for _ in range(3):
        stage.predict(x, t, emb, labels)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stage.predict(x, t, emb, labels)
    torch.cuda.synchronize()
    print(f"{args.steps} steps' replayed UNet calls of {rows} rows back to back: "
          f"{(time.perf_counter() - t0) * 1000:.1f} ms")

    if not args.rows:
        return
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    for key in ("cuda_time_total", "self_cpu_time_total"):
        print(prof.key_averages().table(sort_by=key, row_limit=args.rows,
                                        max_name_column_width=args.name_width))


if __name__ == "__main__":
    main()
