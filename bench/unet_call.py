"""Time one UNet call (CFG batch 2V, or ``--rows N``) per stage under several execution modes, to
choose the fast path: eager, channels_last, CUDA-graph replay, cuDNN autotuning, torch.compile
(default, and the variants in ``COMPILE_VARIANTS``).
Random weights, real configs. Each mode's share of the GPU's dense fp16 peak is reported too.

    python -m bench.unet_call --cascade M/M --views 2 --modes eager channels_last graph compile
    python -m bench.unet_call --stages 2 --rows 16 --modes graph compile compile_channels_last \
        compile_max_autotune        # a batched stage-2 service's calls
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
import torch._inductor.config

from bench.run import CASCADES, CONFIGS, environment
from bench.throughput import dense_fp16_peak_tflops, unet_flops_per_row
from illusions.inductor_rewrites import apply_inductor_rewrites
from illusions.models import load_unet_stage

# torch.compile variants: mode, channels_last weights, inductor options while compiling, and
# whether the UNet gets illusions.inductor_rewrites first. `serve --compile` compiles as
# compile_rewrites_deterministic does; plain `compile` is torch.compile's default.
COMPILE_VARIANTS: dict[str, tuple[str, bool, dict[str, Any], bool]] = {
    "compile_channels_last": ("default", True, {}, False),
    # Triton's autotuned convolution and matmul templates against cuDNN/cuBLAS.
    "compile_max_autotune": ("max-autotune-no-cudagraphs", False, {}, False),
    # Convolutions in NCHW (inductor otherwise moves them to channels_last, and the group norms
    # around them read across channels).
    "compile_nchw": ("default", False, {"layout_optimization": False}, False),
    # Block sizes of the fused elementwise and group-norm kernels tuned by benchmarking them.
    "compile_coordinate_descent": ("default", False, {"coordinate_descent_tuning": True}, False),
    "compile_autotune_pointwise": ("default", False, {"max_autotune_pointwise": True}, False),
    # Weights folded in as constants (their layout converted once), inference only.
    "compile_freezing": ("default", False, {"freezing": True}, False),
    "compile_aggressive_fusion": ("default", False, {"aggressive_fusion": True}, False),
    # Inductor's deterministic mode: no on-device benchmarking that can change the rounding, so
    # every process compiles the same kernels.
    "compile_deterministic": ("default", False, {"deterministic": True}, False),
    "compile_rewrites": ("default", False, {}, True),
    "compile_rewrites_deterministic": ("default", False, {"deterministic": True}, True),
}


def _time(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters * 1000


def _graph(fn, x: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    """Capture ``fn(static_input)`` as a CUDA graph; time its replay and compare its output."""
    static_in = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_in)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(static_in)
    ms = _time(graph.replay)
    graph.replay()
    torch.cuda.synchronize()
    return ms, (static_out - reference).abs().max().item()


def measure(stage_no: int, directory: str, rows: int, modes: list[str]) -> dict[str, Any]:
    stage = load_unet_stage(directory, stage_no, device="cuda", dtype=torch.float16,
                            random_weights=True)
    unet = stage.unet
    size = stage.sample_size
    channels = unet.config.in_channels
    dim = int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim)
    x = torch.randn(rows, channels, size, size, device="cuda", dtype=torch.float16)
    emb = torch.randn(rows, 77, dim, device="cuda", dtype=torch.float16)
    t = torch.tensor(500, device="cuda")
    labels = torch.full((rows,), 50, device="cuda") if stage_no == 2 else None

    def call(model, inp):
        return model(inp, t, encoder_hidden_states=emb, class_labels=labels, return_dict=False)[0]

    out: dict[str, Any] = {}
    with torch.no_grad():
        reference = call(unet, x)
        if "eager" in modes:
            out["eager_ms"] = _time(lambda: call(unet, x))
        if "graph" in modes:
            out["graph_ms"], out["graph_max_diff"] = _graph(lambda inp: call(unet, inp), x,
                                                            reference)
        if "channels_last" in modes:
            unet.to(memory_format=torch.channels_last)
            xc = x.contiguous(memory_format=torch.channels_last)
            out["channels_last_ms"] = _time(lambda: call(unet, xc))
            out["channels_last_max_diff"] = (call(unet, xc) - reference).abs().max().item()
            if "graph" in modes:
                out["graph_channels_last_ms"], _ = _graph(lambda inp: call(unet, inp), xc,
                                                          reference)
            unet.to(memory_format=torch.contiguous_format)
        if "cudnn_benchmark" in modes:
            # cuDNN picks each convolution's fastest algorithm by trying them (other rounding).
            torch.backends.cudnn.benchmark = True
            out["cudnn_benchmark_ms"] = _time(lambda: call(unet, x))
            out["cudnn_benchmark_max_diff"] = (call(unet, x) - reference).abs().max().item()
            out["graph_cudnn_benchmark_ms"], _ = _graph(lambda inp: call(unet, inp), x, reference)
            torch.backends.cudnn.benchmark = False
        if "compile" in modes:
            compiled = torch.compile(unet)
            t0 = time.perf_counter()
            call(compiled, x)
            out["compile_s"] = time.perf_counter() - t0
            out["compile_ms"] = _time(lambda: call(compiled, x))
            out["compile_max_diff"] = (call(compiled, x) - reference).abs().max().item()
            out["compile_graph_ms"], _ = _graph(lambda inp: call(compiled, inp), x, reference)
        for name, (mode, channels_last, inductor, rewrites) in COMPILE_VARIANTS.items():
            if name not in modes:
                continue
            torch._dynamo.reset()
            apply_inductor_rewrites(unet, rewrites)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            unet.to(memory_format=fmt)
            xin = x.contiguous(memory_format=fmt)
            with torch._inductor.config.patch(inductor):
                compiled = torch.compile(unet, mode=mode)
                t0 = time.perf_counter()
                call(compiled, xin)
                out[f"{name}_s"] = time.perf_counter() - t0
                out[f"{name}_max_diff"] = (call(compiled, xin) - reference).abs().max().item()
                out[f"{name}_graph_ms"], _ = _graph(lambda inp, c=compiled: call(c, inp), xin,
                                                    reference)
            unet.to(memory_format=torch.contiguous_format)
            apply_inductor_rewrites(unet, False)
    out["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    # Share of the dense fp16 peak of each timing (UNet FLOPs of the call over its time).
    tflop = rows * unet_flops_per_row(directory, stage_no) / 1e12
    peak = dense_fp16_peak_tflops(torch.cuda.get_device_name())
    out["tflop_per_call"] = tflop
    if peak:
        for key in [k for k in out if k.endswith("_ms")]:
            out[key.removesuffix("_ms") + "_fraction_of_peak"] = tflop / (out[key] / 1e3) / peak
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cascade", default="M/M", choices=CASCADES)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--rows", type=int, default=0, help="rows per call (default 2 x views)")
    parser.add_argument("--modes", nargs="+", default=["eager", "channels_last", "graph"])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    args = parser.parse_args()
    dirs = {k: str(CONFIGS / name) for k, name in zip((1, 2), CASCADES[args.cascade], strict=True)}
    report: dict[str, Any] = {"environment": environment(), "cascade": args.cascade,
                              "views": args.views, "rows": args.rows or 2 * args.views}
    for number in args.stages:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        report[f"stage{number}"] = measure(number, dirs[number], args.rows or 2 * args.views,
                                           args.modes)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
