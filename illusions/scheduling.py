"""A DDPM step that takes its variance noise as an argument, so that a denoising loop on a GPU never
waits for the host.

``DDPMScheduler.step`` draws its noise from the CPU generator inside the step and copies it to the
device, which blocks until the GPU has finished all queued work; with the scheduler's timesteps on
the device, ``previous_timestep`` and ``t > 0`` block as well. Here the scheduler's timesteps stay on
the CPU, every noise tensor the loop will need is drawn up front in exactly the order the step-wise
draws would have made (same generator, same shapes, same dtypes: the same numbers and the same
final generator state), and each is copied to the device from pinned memory without blocking.

:func:`ddpm_step` is ``DDPMScheduler.step`` with the noise passed in: the same operations in the same
order (a CPU test checks bit equality with diffusers for both IF scheduler configurations).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

# Configurations this step reproduces exactly; anything else uses diffusers' own step.
SUPPORTED_VARIANCE = ("learned_range", "fixed_small")


def supports(scheduler: Any) -> bool:
    """Whether :func:`ddpm_step` reproduces ``scheduler.step`` for this configuration."""
    config = scheduler.config
    return (type(scheduler).__name__ == "DDPMScheduler"
            and config.prediction_type == "epsilon"
            and config.variance_type in SUPPORTED_VARIANCE)


def ddpm_step(scheduler: Any, model_output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor,
              variance_noise: torch.Tensor | None) -> torch.Tensor:
    """x_t -> x_{t-1} (DDPM, Ho et al. 2020, eq. 7), with ``variance_noise`` given (None at t=0).

    ``t`` is a CPU timestep of ``scheduler.timesteps`` (set on the CPU). ``model_output`` is
    (B, 2C, H, W) for learned-range variance (noise ++ variance interpolation) or (B, C, H, W).
    """
    prev_t = scheduler.previous_timestep(t)
    channels = sample.shape[1]
    predicted_variance = None
    if model_output.shape[1] == channels * 2 and scheduler.variance_type == "learned_range":
        model_output, predicted_variance = torch.split(model_output, channels, dim=1)

    # 1. alphas and betas of this step (CPU scalars)
    alpha_prod_t = scheduler.alphas_cumprod[t]
    alpha_prod_t_prev = scheduler.alphas_cumprod[prev_t] if prev_t >= 0 else scheduler.one
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t

    # 2. predicted x_0 from the noise estimate (eq. 15), thresholded or clipped
    pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if scheduler.config.thresholding:
        pred_original_sample = scheduler._threshold_sample(pred_original_sample)
    elif scheduler.config.clip_sample:
        limit = scheduler.config.clip_sample_range
        pred_original_sample = pred_original_sample.clamp(-limit, limit)

    # 3. mean of the posterior q(x_{t-1} | x_t, x_0) (eq. 7)
    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = (pred_original_sample_coeff * pred_original_sample
                        + current_sample_coeff * sample)

    # 4. add the variance
    if t > 0:
        assert variance_noise is not None, "variance_noise is needed for every step but t=0"
        variance = scheduler._get_variance(t, predicted_variance=predicted_variance)
        if scheduler.variance_type == "learned_range":
            variance = torch.exp(0.5 * variance) * variance_noise
        else:
            variance = (variance ** 0.5) * variance_noise
        pred_prev_sample = pred_prev_sample + variance
    return pred_prev_sample


@dataclass
class NoisePlan:
    """Every noise tensor a denoising loop draws, drawn up front in the loop's order.

    ``reference[i]`` (inverse-problem mode) and ``variance[i]`` (None where t == 0) are pinned CPU
    tensors; :meth:`take` copies one to the device without blocking.
    """

    reference: list[torch.Tensor | None]
    variance: list[torch.Tensor | None]

    @classmethod
    def draw(cls, generator: torch.Generator, timesteps: torch.Tensor,
             variance_shape: tuple[int, ...], dtype: torch.dtype,
             reference_shape: tuple[int, ...] | None = None,
             reference_dtype: torch.dtype | None = None, pin: bool = False) -> NoisePlan:
        reference: list[torch.Tensor | None] = []
        variance: list[torch.Tensor | None] = []
        for t in timesteps:
            # Same order as the step-wise loop: the reference image's noise, then the step's.
            if reference_shape is not None:
                reference.append(_pinned(randn_tensor(reference_shape, generator=generator,
                                                      device="cpu", dtype=reference_dtype), pin))
            else:
                reference.append(None)
            if t > 0:
                variance.append(_pinned(randn_tensor(variance_shape, generator=generator,
                                                     device="cpu", dtype=dtype), pin))
            else:
                variance.append(None)
        return cls(reference, variance)

    @staticmethod
    def take(noise: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        if noise is None:
            return None
        return noise.to(device, non_blocking=noise.is_pinned())


def _pinned(tensor: torch.Tensor, pin: bool) -> torch.Tensor:
    return tensor.pin_memory() if pin else tensor
