"""The benchmark's in-process baseline must be the reference algorithm: it reproduces the
reference vectors on the tiny cascade, as the library does."""

from __future__ import annotations

import pytest
from conftest import CASES, TOLERANCE

from bench.baseline import reference_stage_1, reference_stage_2
from illusions.sampling import new_generator
from illusions.views import build_views


@pytest.mark.parametrize("name", ["three_views", "hybrid"])
def test_baseline_reproduces_reference(name, text_encoder, stage1, stage2, reference):
    case = next(c for c in CASES if c["name"] == name)
    prompt_embeds, negative = text_encoder.encode(case["prompts"])
    views = build_views(case["views"])
    generator = new_generator(case["seed"])
    args = (case["steps"], case["guidance_scale"])
    image64 = reference_stage_1(stage1, prompt_embeds, negative, views, generator, *args,
                                reduction=case["reduction"])
    image256 = reference_stage_2(stage2, image64, prompt_embeds, negative, views, generator,
                                 *args, noise_level=case["noise_level"],
                                 reduction=case["reduction"])
    assert (image64 - reference[f"{name}/stage_1"]).abs().max() <= TOLERANCE
    assert (image256 - reference[f"{name}/stage_2"]).abs().max() <= TOLERANCE


def test_cuda_graphs_are_not_enabled_on_cpu(stage1):
    assert stage1.enable_cuda_graphs() is False
    assert stage1.graphed is None


@pytest.mark.parametrize("number", [1, 2])
def test_unet_flops_are_counted_without_weights(number, stage1, stage2):
    """The throughput benchmark counts UNet FLOPs on the meta device (no weights, no GPU): the
    count equals that of a real forward of the same UNet, and grows with the rows. (The real
    forward uses attention's math kernel, whose matmuls the counter sees; the CPU's fused kernel
    goes uncounted, while on the GPU the fused kernels are counted.)"""
    import torch
    from conftest import STAGE1_DIR, STAGE2_DIR
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.throughput import unet_flops_per_row

    stage, directory = (stage1, STAGE1_DIR) if number == 1 else (stage2, STAGE2_DIR)
    unet = stage.unet
    size, dim = unet.config.sample_size, unet.config.encoder_hid_dim
    counted = []
    for rows in (1, 3):
        counter = FlopCounterMode(display=False)
        labels = torch.full((rows,), 50) if number == 2 else None
        with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            unet(torch.zeros(rows, unet.config.in_channels, size, size), torch.tensor(500),
                 encoder_hidden_states=torch.zeros(rows, 77, dim), class_labels=labels)
        counted.append(counter.get_total_flops())
    assert counted[1] == 3 * counted[0] > 0
    assert unet_flops_per_row(directory, number) == counted[0]


def test_dense_peak_and_scaling():
    from bench.throughput import dense_fp16_peak_tflops, scaling_efficiency

    assert dense_fp16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert dense_fp16_peak_tflops("NVIDIA H200") == 989.4
    assert dense_fp16_peak_tflops("Some Other GPU") is None
    efficiency = scaling_efficiency({1: 10.0, 2: 19.0, 3: 24.0})
    assert efficiency == pytest.approx({1: 1.0, 2: 0.95, 3: 0.8})


def test_timeline_of_stage_calls():
    """The throughput run's timeline: overlapping calls of one stage count once, and the time
    both stages had calls in flight is the overlap of the two unions."""
    from bench.throughput import timeline

    calls = [("stage1", 10.0, 14.0), ("stage1", 11.0, 15.0), ("stage2", 14.5, 20.0),
             ("stage2", 16.0, 21.0), ("stage2", 22.0, 23.0)]
    got = timeline(calls, origin=10.0)
    assert got == pytest.approx({
        "stage1_first_start_s": 0.0, "stage1_last_end_s": 5.0, "stage1_in_flight_s": 5.0,
        "stage2_first_start_s": 4.5, "stage2_last_end_s": 13.0, "stage2_in_flight_s": 7.5,
        "both_in_flight_s": 0.5})
    assert timeline([], origin=0.0) == {"both_in_flight_s": 0.0}


def test_step_clock_tells_where_a_stage_run_spends_its_time():
    """The stage-alone runs time each call's step reports: when the first step was done, when the
    last call's last step was, what came after it, and the median time between two steps."""
    from bench.throughput import StepClock

    clock = StepClock()
    one, two = clock.progress(), clock.progress()
    clock.progress()  # a call that reported nothing (it failed) does not count
    for step in (1, 2, 3):
        clock.reports[0].append((0.5 + 0.1 * step, step, 3))  # done at 0.6, 0.7, 0.8
        clock.reports[1].append((0.55 + 0.3 * step, step, 3))  # done at 0.85, 1.15, 1.45
    assert clock.summary(wall=2.0) == pytest.approx({
        "first_step_done_s": 0.6, "last_step_done_s": 1.45, "after_last_step_s": 0.55,
        "median_step_interval_s": 0.3})  # intervals 0.1, 0.1, 0.3, 0.3
    one(4, 5)  # a live callback records its call's steps, timed from the clock's start
    assert clock.reports[0][-1][1:] == (4, 5) and 0 <= clock.reports[0][-1][0] < 60
    assert two is not one and StepClock().summary(wall=1.0) == {}
