"""Behaviour of the samplers beyond the reference cases: RNG hand-over, callbacks, stopping,
reductions, inverse-problem mode and input checks."""

from __future__ import annotations

import re

import pytest
import torch

from illusions.sampling import (
    InvalidInputError,
    SamplingCancelled,
    SamplingParams,
    generator_from_state,
    new_generator,
    reduce_views,
    sample_stage_1,
    sample_stage_2,
    stage_1_job,
)
from illusions.views import build_views

FAST = SamplingParams(num_inference_steps=3, guidance_scale=3.0)


@pytest.fixture(scope="module")
def embeds(text_encoder):
    return text_encoder.encode(["a waterfall", "a deer"])


def test_stage2_continues_stage1_generator_through_saved_state(stage1, stage2, embeds):
    views = build_views(["identity", "flip"])
    gen = new_generator(11)
    image = sample_stage_1(stage1, *embeds, views, gen, FAST)
    state = gen.get_state()
    direct = sample_stage_2(stage2, image, *embeds, views, gen, FAST)
    # A second process restores the state: same picture.
    restored = sample_stage_2(stage2, image, *embeds, views, generator_from_state(state), FAST)
    torch.testing.assert_close(direct, restored, atol=0, rtol=0)
    # A fresh generator instead of the continued one gives a different picture.
    other = sample_stage_2(stage2, image, *embeds, views, new_generator(11), FAST)
    assert (other - direct).abs().max() > 1e-2


def test_same_seed_same_picture_and_different_seed_differs(stage1, embeds):
    views = build_views(["identity", "rotate_cw"])
    a = sample_stage_1(stage1, *embeds, views, new_generator(3), FAST)
    b = sample_stage_1(stage1, *embeds, views, new_generator(3), FAST)
    c = sample_stage_1(stage1, *embeds, views, new_generator(4), FAST)
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2
    assert a.shape == (1, 3, stage1.sample_size, stage1.sample_size)


def test_progress_callback_and_stop(stage1, embeds):
    views = build_views(["identity", "flip"])
    steps = []
    sample_stage_1(stage1, *embeds, views, new_generator(0), FAST,
                   callback=lambda i, n: steps.append((i, n)))
    assert steps == [(1, 3), (2, 3), (3, 3)]

    calls = []

    def stop_after_two() -> bool:
        calls.append(1)
        return len(calls) > 2

    done = []
    with pytest.raises(SamplingCancelled):
        sample_stage_1(stage1, *embeds, views, new_generator(0), FAST,
                       callback=lambda i, n: done.append(i), should_stop=stop_after_two)
    assert done == [1, 2]  # stopped between steps, within one step of the request


def test_single_view_and_many_views(stage1, text_encoder):
    one = text_encoder.encode(["a duck"])
    image = sample_stage_1(stage1, *one, build_views(["identity"]), new_generator(0), FAST)
    assert torch.isfinite(image).all()
    four = text_encoder.encode(["a", "b", "c", "d"])
    views = build_views(["identity", "rotate_cw", "rotate_180", "rotate_ccw"])
    image4 = sample_stage_1(stage1, *four, views, new_generator(0), FAST)
    assert image4.shape == image.shape and torch.isfinite(image4).all()


def test_reductions():
    pred = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(1, 2, 3, 4, 4)
    var = torch.ones(1, 2, 3, 4, 4)
    torch.testing.assert_close(reduce_views(pred, var, "mean", 0)[:, :3], pred.mean(1))
    torch.testing.assert_close(reduce_views(pred, var, "sum", 0)[:, :3], pred.sum(1))
    torch.testing.assert_close(reduce_views(pred, var * 2, "sum", 0)[:, 3:], var[:, 0] * 2)
    torch.testing.assert_close(reduce_views(pred, var, "alternate", 3)[:, :3], pred[:, 1])
    with pytest.raises(InvalidInputError, match="reduction"):
        reduce_views(pred, var, "max", 0)


def test_alternate_differs_from_mean(stage1, embeds):
    views = build_views(["identity", "flip"])
    mean = sample_stage_1(stage1, *embeds, views, new_generator(0), FAST)
    alt = sample_stage_1(stage1, *embeds, views, new_generator(0),
                         SamplingParams(3, 3.0, "alternate"))
    assert (mean - alt).abs().max() > 1e-3


def test_inverse_problem_mode_uses_reference_low_frequencies(stage1, text_encoder):
    embeds = text_encoder.encode(["an old man", "a campfire"])
    views = build_views(["low_pass", "high_pass"])
    params = SamplingParams(4, 3.0, "sum")
    ref = torch.zeros(3, 100, 80)
    ref[0] = 1.0  # a red image, not square and not 64 px: resized
    with_ref = sample_stage_1(stage1, *embeds, views, new_generator(0), params, ref_image=ref)
    without = sample_stage_1(stage1, *embeds, views, new_generator(0), params)
    assert torch.isfinite(with_ref).all()
    assert (with_ref - without).abs().max() > 1e-2
    with pytest.raises(InvalidInputError, match="exactly 2 views"):
        three = text_encoder.encode(["a", "b", "c"])
        sample_stage_1(stage1, *three, build_views(["low_pass", "high_pass", "identity"]),
                       new_generator(0), params, ref_image=ref)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        (SamplingParams(num_inference_steps=0), "num_inference_steps"),
        (SamplingParams(num_inference_steps=5000), "num_inference_steps"),
        (SamplingParams(guidance_scale=float("nan")), "guidance_scale"),
        (SamplingParams(reduction="median"), "reduction"),
        (SamplingParams(noise_level=1000), "noise_level"),
        (SamplingParams(noise_level=-1), "noise_level"),
    ],
)
def test_bad_params_are_named(stage1, embeds, params, match):
    with pytest.raises(InvalidInputError, match=match):
        sample_stage_1(stage1, *embeds, build_views(["identity", "flip"]), new_generator(0),
                       params)


def test_bad_embeddings_are_named(stage1, embeds):
    prompt, negative = embeds
    views = build_views(["identity", "flip"])
    with pytest.raises(InvalidInputError, match="one prompt per view"):
        sample_stage_1(stage1, prompt[:1], negative, views, new_generator(0), FAST)
    with pytest.raises(InvalidInputError, match="width"):
        sample_stage_1(stage1, prompt[..., :16], negative[..., :16], views, new_generator(0),
                       FAST)
    bad = prompt.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="prompt_embeds contains NaN"):
        sample_stage_1(stage1, bad, negative, views, new_generator(0), FAST)
    for value in (float("inf"), float("-inf")):
        bad = negative.clone()
        bad[0, 3, 1] = value
        with pytest.raises(InvalidInputError,
                           match="negative_prompt_embeds contains NaN or infinite values"):
            sample_stage_1(stage1, prompt, bad, views, new_generator(0), FAST)
    # Other token counts than T5's 77 would not stack with other requests' rows in a shared call.
    for tokens in (0, 10, 78):
        with pytest.raises(InvalidInputError, match=f"{tokens} tokens a prompt but IF's UNets take 77"):
            sample_stage_1(stage1, prompt[:, :1].expand(-1, tokens, -1),
                           negative[:, :1].expand(-1, tokens, -1), views, new_generator(0), FAST)


def test_values_beyond_the_unets_dtype_are_named(embeds):
    """float32 values that a half-precision UNet would turn into infinities."""
    from conftest import STAGE1_DIR

    from illusions.models import load_unet_stage

    half = load_unet_stage(str(STAGE1_DIR), 1, dtype=torch.float16)
    prompt, negative = embeds
    for value in (1e6, -2e6):  # the largest magnitude, whichever its sign
        big = prompt.clone()
        big[0, 5, 3] = value
        message = f"prompt_embeds holds {abs(value):.3g}, beyond what the UNet's float16 can hold"
        with pytest.raises(InvalidInputError, match=re.escape(message)):
            sample_stage_1(half, big, negative, build_views(["identity", "flip"]),
                           new_generator(0), FAST)


def test_stage2_rejects_bad_image(stage2, embeds):
    views = build_views(["identity", "flip"])
    with pytest.raises(InvalidInputError, match="image"):
        sample_stage_2(stage2, torch.zeros(1, 4, 64, 64), *embeds, views, new_generator(0), FAST)
    with pytest.raises(InvalidInputError, match="image is empty"):
        sample_stage_2(stage2, torch.zeros(1, 3, 0, 0), *embeds, views, new_generator(0), FAST)
    with pytest.raises(InvalidInputError, match="ref_image is empty"):
        sample_stage_2(stage2, torch.zeros(1, 3, 64, 64), *embeds, views, new_generator(0), FAST,
                       ref_image=torch.zeros(3, 0, 0))


def test_bad_rng_state():
    with pytest.raises(InvalidInputError, match="rng_state"):
        generator_from_state(torch.zeros(7, dtype=torch.uint8))
    state = torch.Generator().manual_seed(3).get_state()
    # Any other dtype is refused, not cast: 0.7 more, or 256 more, would be another state.
    for other in (state.float() + 0.7, state.long() + 256):
        with pytest.raises(InvalidInputError, match="rng_state has dtype torch.(float32|int64): "
                                                    "pass the uint8 state stage 1 returned"):
            generator_from_state(other)
    assert torch.equal(generator_from_state(state).get_state(), state)


def test_views_in_chunks_agree_with_one_batch(stage1, text_encoder):
    """max_batch bounds the rows per UNet call; only float rounding may change."""
    embeds = text_encoder.encode(["a", "b", "c"])
    views = build_views(["identity", "rotate_cw", "rotate_180"])
    calls = []
    original = stage1.unet.forward

    def counting(sample, *args, **kwargs):
        calls.append(sample.shape[0])
        return original(sample, *args, **kwargs)

    whole = sample_stage_1(stage1, *embeds, views, new_generator(2), FAST)
    try:
        stage1.max_batch = 4
        stage1.unet.forward = counting
        chunked = sample_stage_1(stage1, *embeds, views, new_generator(2), FAST)
    finally:
        stage1.max_batch = 0
        del stage1.unet.forward
    assert calls == [4, 2] * FAST.num_inference_steps  # 6 rows: chunks of 4 and 2
    assert (whole - chunked).abs().max() <= 1e-4


def test_a_job_leaves_the_stages_scheduler_as_it_was(stage1, embeds):
    """Each job sets its step count on its own copy of the stage's scheduler (one scheduler serves
    every job of a service): the stage's keeps its timesteps, and jobs of 3 and 5 steps made one
    after the other each take their own schedule, interleaved."""
    import copy

    scheduler = stage1.scheduler
    timesteps, steps = scheduler.timesteps.clone(), scheduler.num_inference_steps
    views = build_views(["identity", "flip"])
    jobs = {n: stage_1_job(stage1, *embeds, views, new_generator(n), SamplingParams(n, 3.0))
            for n in (3, 5)}
    calls = {n: next(job) for n, job in jobs.items()}
    taken: dict[int, list[int]] = {n: [] for n in jobs}
    while calls:
        for n in list(calls):
            taken[n].append(int(calls[n].timestep))
            try:
                calls[n] = jobs[n].send(torch.zeros(calls[n].rows, 6, 64, 64))
            except StopIteration:
                del calls[n]
    for n in jobs:
        fresh = copy.deepcopy(scheduler)
        fresh.set_timesteps(n)
        assert taken[n] == fresh.timesteps.tolist()
    assert torch.equal(scheduler.timesteps, timesteps)
    assert scheduler.num_inference_steps == steps
