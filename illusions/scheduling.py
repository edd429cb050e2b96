"""A DDPM step that takes its variance noise as an argument, so that a denoising loop on a GPU never
waits for the host.

``DDPMScheduler.step`` draws its noise from the CPU generator inside the step and copies it to the
device, which blocks until the GPU has finished all queued work; with the scheduler's timesteps on
the device, ``previous_timestep`` and ``t > 0`` block as well. Here the scheduler's timesteps stay on
the CPU, and the loop draws each noise tensor itself, in the order the step-wise draws would have
made (same generator, shapes and dtypes: the same numbers and the same final generator state), and
copies it to the device from pinned memory without blocking (:class:`NoiseStream`).

:func:`ddpm_step` is ``DDPMScheduler.step`` with the noise passed in: the same operations in the same
order (a CPU test checks bit equality with diffusers for both IF scheduler configurations).
"""

from __future__ import annotations

from typing import Any

import torch

# Configurations this step reproduces exactly; anything else uses diffusers' own step.
SUPPORTED_VARIANCE = ("learned_range", "fixed_small")


def randn_tensor(*args: Any, **kwargs: Any) -> torch.Tensor:
    """diffusers' ``randn_tensor`` (the reference draws its noise with it), imported at the first
    draw: importing diffusers takes about two seconds (it loads ``torch._dynamo``), which the
    ``illusion`` client and the encoder service, which draw no noise, need not wait for."""
    from diffusers.utils.torch_utils import randn_tensor as draw

    return draw(*args, **kwargs)


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


class NoiseStream:
    """Draws the loop's noise from the CPU generator, in the loop's order, as the loop goes.

    A draw is made right after the step's UNet call has been queued, so the CPU's sampling (about
    7 ms for a 256x256 fp16 draw) overlaps the GPU's work instead of delaying it. On a GPU each
    draw is copied into one of a few pinned buffers and sent to the device without blocking; the
    loop runs at most one step ahead, so a buffer is free again before it comes round.
    """

    RING = 3  # buffers per (shape, dtype): > the loop's run-ahead + 1

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.generator = generator
        self.device = device
        self.pin = device.type == "cuda"
        self._rings: dict[tuple, list[torch.Tensor]] = {}
        self._count: dict[tuple, int] = {}

    def draw(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Standard normal noise of ``shape`` on the device, as ``randn_tensor`` would draw it."""
        noise = randn_tensor(shape, generator=self.generator, device="cpu", dtype=dtype)
        if not self.pin:
            return noise.to(self.device)
        key = (tuple(shape), dtype)
        ring = self._rings.get(key)
        if ring is None:
            ring = [torch.empty(shape, dtype=dtype, pin_memory=True) for _ in range(self.RING)]
            self._rings[key] = ring
        index = self._count.get(key, 0)
        self._count[key] = index + 1
        buffer = ring[index % self.RING]
        buffer.copy_(noise)
        return buffer.to(self.device, non_blocking=True)
