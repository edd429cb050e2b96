"""Our DDPM step with the noise passed in equals diffusers' DDPMScheduler.step bit for bit, and the
noise stream draws the same numbers, leaving the generator in the same state."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR
from diffusers import DDPMScheduler

from illusions import scheduling


@pytest.mark.parametrize("directory", [STAGE1_DIR, STAGE2_DIR], ids=["stage1", "stage2"])
@pytest.mark.parametrize("steps", [1, 6, 30])
def test_step_and_noise_stream_match_diffusers(directory, steps):
    ours = DDPMScheduler.from_pretrained(str(directory), subfolder="scheduler")
    theirs = copy.deepcopy(ours)
    assert scheduling.supports(ours)
    ours.set_timesteps(steps, device="cpu")
    theirs.set_timesteps(steps, device="cpu")
    size = 16
    g_ours, g_theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    noise = scheduling.NoiseStream(g_ours, torch.device("cpu"))
    data = torch.Generator().manual_seed(1)
    x_ours = x_theirs = torch.randn(1, 3, size, size, generator=data)
    for i, t in enumerate(ours.timesteps):
        model_output = torch.randn(1, 6, size, size, generator=data) * 2
        variance_noise = noise.draw((1, 3, size, size), torch.float32) if t > 0 else None
        x_ours = scheduling.ddpm_step(ours, model_output, t, x_ours, variance_noise)
        x_theirs = theirs.step(model_output, t, x_theirs, generator=g_theirs,
                               return_dict=False)[0]
        assert torch.equal(x_ours, x_theirs), f"step {i} (t={int(t)}) differs"
    assert torch.equal(g_ours.get_state(), g_theirs.get_state())


def test_unsupported_configuration_is_detected():
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    assert not scheduling.supports(scheduler)
