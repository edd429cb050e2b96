"""The in-process baseline: the reference sampler's algorithm, the way the reference runs it.

Eager PyTorch, one sample at a time, views applied and inverted in Python loops one image at a
time (the uncond and cond halves in separate loops), the scheduler stepped per step — the structure
of ``visual_anagrams/samplers.py``, written here in our own words, so that the benchmark compares
our services with what a user of the research code gets on the same GPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor

from illusions.models import UNetStage
from illusions.views import View


def _guided(views: Sequence[View], out: torch.Tensor, channels: int, guidance: float,
            reduction: str, step: int) -> torch.Tensor:
    uncond, text = out.chunk(2)
    uncond = torch.stack([view.inverse_view(p) for p, view in zip(uncond, views, strict=True)])
    text = torch.stack([view.inverse_view(p) for p, view in zip(text, views, strict=True)])
    uncond_eps = uncond[:, :channels]
    text_eps, variance = text[:, :channels], text[:, channels:]
    eps = uncond_eps + guidance * (text_eps - uncond_eps)
    if reduction == "mean":
        eps, variance = eps.mean(0, keepdim=True), variance.mean(0, keepdim=True)
    elif reduction == "sum":
        eps, variance = eps.sum(0, keepdim=True), variance.mean(0, keepdim=True)
    else:
        k = step % len(views)
        eps, variance = eps[k : k + 1], variance[k : k + 1]
    return torch.cat([eps, variance], dim=1)


@torch.no_grad()
def reference_stage_1(stage: UNetStage, prompt_embeds: torch.Tensor, negative: torch.Tensor,
                      views: Sequence[View], generator: torch.Generator, steps: int,
                      guidance: float, reduction: str = "mean") -> torch.Tensor:
    """(1, 3, 64, 64) from (V, 77, D) embeddings, as the reference's sample_stage_1."""
    embeds = torch.cat([negative.expand_as(prompt_embeds), prompt_embeds]).to(stage.device,
                                                                             stage.dtype)
    scheduler = stage.scheduler
    scheduler.set_timesteps(steps, device=stage.device)
    size = stage.sample_size
    x = randn_tensor((1, 3, size, size), generator=generator, device=stage.device,
                     dtype=stage.dtype)
    for i, t in enumerate(scheduler.timesteps):
        viewed = torch.stack([view.view(x[0]) for view in views])
        model_input = scheduler.scale_model_input(torch.cat([viewed] * 2), t)
        out = stage.unet(model_input, t, encoder_hidden_states=embeds, return_dict=False)[0]
        model_output = _guided(views, out, 3, guidance, reduction, i)
        x = scheduler.step(model_output, t, x, generator=generator, return_dict=False)[0]
    return x


@torch.no_grad()
def reference_stage_2(stage: UNetStage, image: torch.Tensor, prompt_embeds: torch.Tensor,
                      negative: torch.Tensor, views: Sequence[View], generator: torch.Generator,
                      steps: int, guidance: float, noise_level: int = 50,
                      reduction: str = "mean") -> torch.Tensor:
    """(1, 3, 256, 256) from the stage-1 image, as the reference's sample_stage_2."""
    embeds = torch.cat([negative.expand_as(prompt_embeds), prompt_embeds]).to(stage.device,
                                                                             stage.dtype)
    scheduler = stage.scheduler
    scheduler.set_timesteps(steps, device=stage.device)
    size = stage.sample_size
    x = randn_tensor((1, 3, size, size), generator=generator, device=stage.device,
                     dtype=stage.dtype)
    image = image.to(stage.device, stage.dtype)
    upscaled = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)
    level = torch.tensor([noise_level], device=stage.device)
    noise = randn_tensor(upscaled.shape, generator=generator, device=stage.device,
                         dtype=upscaled.dtype)
    upscaled = stage.image_noising_scheduler.add_noise(upscaled, noise, timesteps=level)
    labels = torch.cat([level] * len(views) * 2)
    for i, t in enumerate(scheduler.timesteps):
        model_input = torch.cat([x, upscaled], dim=1)
        viewed = torch.stack([view.view(model_input[0]) for view in views])
        model_input = scheduler.scale_model_input(torch.cat([viewed] * 2), t)
        out = stage.unet(model_input, t, encoder_hidden_states=embeds, class_labels=labels,
                         return_dict=False)[0]
        model_output = _guided(views, out, 3, guidance, reduction, i)
        x = scheduler.step(model_output, t, x, generator=generator, return_dict=False)[0]
    return x
