"""Multi-view denoising for both stages of the IF cascade (Geng, Park & Owens, *Visual Anagrams*).

At every step the current noisy image is shown to the UNet through each view, with the view's own
prompt; the noise estimates are mapped back through each view's inverse and combined (``mean``,
``sum`` for factorized views, or ``alternate``), and one DDPM step is taken on the combined
estimate. With one view and the identity this is plain IF sampling.

RNG contract (see docs): one CPU ``torch.Generator`` per sample. Stage 1 draws the initial noise,
then the scheduler's variance noise at every step; it returns the generator's state with its image.
Stage 2 restores that state and draws its initial noise, the noise added to the upscaled stage-1
image, then its per-step variance noise. Noise is drawn on the CPU and moved to the device, so CPU
and GPU runs draw the same numbers.
"""

from __future__ import annotations

import copy
import logging
import math
from collections import deque
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from illusions import scheduling
from illusions.models import UNetStage
from illusions.text import MAX_LENGTH
from illusions.views import View

logger = logging.getLogger(__name__)

REDUCTIONS: tuple[str, ...] = ("mean", "sum", "alternate")

ProgressCallback = Callable[[int, int], None]  # (steps done, total steps)
StopCheck = Callable[[], bool]


class InvalidInputError(ValueError):
    """A sampling input is out of range; the message names the field and the fix."""


class SamplingCancelled(RuntimeError):
    """``should_stop`` returned True between two denoising steps."""


@dataclass(frozen=True)
class SamplingParams:
    """Parameters shared by both stages (the reference uses the same values for both)."""

    num_inference_steps: int = 30
    guidance_scale: float = 10.0
    reduction: str = "mean"  # "mean" | "sum" (factorized views) | "alternate"
    noise_level: int = 50  # stage 2 only: timestep at which the upscaled 64px image is noised

    def validate(self, num_train_timesteps: int = 1000, as_flags: bool = False) -> None:
        """Raise InvalidInputError for a parameter out of range, named as a keyword
        (``num_inference_steps=0``) or, with ``as_flags``, as the CLI's flag
        (``--num-inference-steps 0``)."""

        def given(field: str, value: object) -> str:
            return f"--{field.replace('_', '-')} {value}" if as_flags else f"{field}={value!r}"

        if not 1 <= self.num_inference_steps <= num_train_timesteps:
            raise InvalidInputError(
                f"{given('num_inference_steps', self.num_inference_steps)} is out of range: use "
                f"1 .. {num_train_timesteps} (30 is a good start)"
            )
        if not math.isfinite(self.guidance_scale) or not 0 <= self.guidance_scale <= 100:
            raise InvalidInputError(
                f"{given('guidance_scale', self.guidance_scale)} is out of range: use 0 .. 100 "
                "(10 is usual)"
            )
        if self.reduction not in REDUCTIONS:
            raise InvalidInputError(
                f"{given('reduction', self.reduction)} is unknown: use one of "
                f"{', '.join(REDUCTIONS)} (sum for factorized views such as low_pass/high_pass)"
            )
        if not 0 <= self.noise_level < num_train_timesteps:
            raise InvalidInputError(
                f"{given('noise_level', self.noise_level)} is out of range: use 0 .. "
                f"{num_train_timesteps - 1} (50 is the reference's default)"
            )


def new_generator(seed: int) -> torch.Generator:
    """The per-sample CPU generator of the RNG contract (sample i of a run: ``seed + i``)."""
    if not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed={seed} is out of range: use 0 .. 2**63-1")
    return torch.Generator(device="cpu").manual_seed(seed)


def generator_from_state(state: torch.Tensor) -> torch.Generator:
    """Rebuild the CPU generator that stage 1 handed over (``generator.get_state()``)."""
    if state.dtype != torch.uint8:
        # A cast would truncate or wrap the values into some other generator's state.
        raise InvalidInputError(f"rng_state has dtype {state.dtype}: pass the uint8 state stage 1 "
                                "returned, unchanged")
    generator = torch.Generator(device="cpu")
    try:
        generator.set_state(state.cpu())
    except (RuntimeError, TypeError) as exc:
        raise InvalidInputError(
            f"rng_state is not a CPU generator state ({exc}): pass the state stage 1 returned"
        ) from None
    return generator


# --------------------------------------------------------------------------------------------
# Views, applied to a stack (one view per row)


def apply_views(views: Sequence[View], image: torch.Tensor) -> torch.Tensor:
    """(C, H, W) image -> (V, C, H, W): row k is ``views[k].view(image)``."""
    return torch.stack([v.view(image) for v in views])


def invert_views(views: Sequence[View], preds: torch.Tensor) -> torch.Tensor:
    """(B, V, 6, H, W) UNet outputs, row k seen through view k -> each mapped back by its inverse."""
    return torch.stack([v.inverse_view(preds[:, k]) for k, v in enumerate(views)], dim=1)


def reduce_views(pred: torch.Tensor, variance: torch.Tensor, reduction: str,
                 step: int) -> torch.Tensor:
    """Combine per-view estimates (B, V, 3, H, W) into one (B, 6, H, W) model output.

    ``sum`` adds the noise estimates (factorized diffusion: each view owns one component) but
    averages the variances, as the reference does.
    """
    if reduction == "mean":
        pred, variance = pred.mean(1), variance.mean(1)
    elif reduction == "sum":
        pred, variance = pred.sum(1), variance.mean(1)
    elif reduction == "alternate":
        k = step % pred.shape[1]
        pred, variance = pred[:, k], variance[:, k]
    else:
        raise InvalidInputError(f"reduction={reduction!r} is unknown: use {', '.join(REDUCTIONS)}")
    return torch.cat([pred, variance], dim=1)


# --------------------------------------------------------------------------------------------
# Checks at the library boundary


def _check_embeds(stage: UNetStage, prompt_embeds: torch.Tensor,
                  negative_prompt_embeds: torch.Tensor, views: Sequence[View]) -> None:
    if len(views) < 1:
        raise InvalidInputError("views is empty: give at least one view (identity for plain IF)")
    if prompt_embeds.ndim != 3:
        raise InvalidInputError(
            f"prompt_embeds has shape {tuple(prompt_embeds.shape)}: expected (views, tokens, dim)"
        )
    if prompt_embeds.shape[0] != len(views):
        raise InvalidInputError(
            f"{prompt_embeds.shape[0]} prompts for {len(views)} views: give one prompt per view"
        )
    if prompt_embeds.shape[1] != MAX_LENGTH:
        raise InvalidInputError(
            f"prompt_embeds have {prompt_embeds.shape[1]} tokens a prompt but IF's UNets take "
            f"{MAX_LENGTH} (T5's output padded to {MAX_LENGTH} tokens): encode the prompts with "
            "the cascade's text encoder"
        )
    dim = stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim
    if prompt_embeds.shape[-1] != dim:
        raise InvalidInputError(
            f"prompt_embeds have width {prompt_embeds.shape[-1]} but the {stage.source} UNet takes "
            f"{dim}: encode the prompts with the text encoder that belongs to this model"
        )
    if negative_prompt_embeds.ndim != 3 or negative_prompt_embeds.shape[0] not in (
        1, len(views)
    ) or negative_prompt_embeds.shape[1:] != prompt_embeds.shape[1:]:
        raise InvalidInputError(
            f"negative_prompt_embeds has shape {tuple(negative_prompt_embeds.shape)}: expected "
            f"(1 or {len(views)}, {prompt_embeds.shape[1]}, {prompt_embeds.shape[2]})"
        )
    for name, t in (("prompt_embeds", prompt_embeds),
                    ("negative_prompt_embeds", negative_prompt_embeds)):
        _check_values(name, t, stage.dtype, "re-encode the prompts")


def _check_values(name: str, t: torch.Tensor, dtype: torch.dtype, fix: str) -> float:
    """``t`` is finite, and stays finite in ``dtype`` (the UNet's); returns its largest
    magnitude."""
    if t.numel() == 0:
        raise InvalidInputError(f"{name} is empty (shape {tuple(t.shape)}): {fix}")
    # One pass (a request's embeddings are checked on the CPU before its job joins the others):
    # NaN carries through both extremes, and an infinity is one of them.
    low, high = (float(v) for v in torch.aminmax(t))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InvalidInputError(f"{name} contains NaN or infinite values: {fix}")
    largest = max(high, -low)  # 0.0, not -0.0, for zeros
    if dtype.is_floating_point and largest > torch.finfo(dtype).max:
        raise InvalidInputError(
            f"{name} holds {largest:.3g}, beyond what the UNet's {str(dtype).removeprefix('torch.')} "
            f"can hold ({torch.finfo(dtype).max:.3g}): {fix}"
        )
    return largest


def _cfg_embeds(stage: UNetStage, prompt_embeds: torch.Tensor,
                negative_prompt_embeds: torch.Tensor) -> torch.Tensor:
    """[neg_0 .. neg_{V-1}, pos_0 .. pos_{V-1}] on the UNet's device and dtype: (2V, T, D)."""
    views = prompt_embeds.shape[0]
    negative = negative_prompt_embeds.expand(views, -1, -1)
    return torch.cat([negative, prompt_embeds]).to(device=stage.device, dtype=stage.dtype)


REF_IMAGE_SLACK = 1e-3  # rounding beyond [-1, 1] that a reference image may carry


def _rgb(ref_image: torch.Tensor) -> torch.Tensor:
    return ref_image[0] if ref_image.ndim == 4 and ref_image.shape[0] == 1 else ref_image


def _check_reference(ref_image: torch.Tensor | None, views: Sequence[View],
                     dtype: torch.dtype) -> None:
    """A reference image is (3, H, W) or (1, 3, H, W) in [-1, 1], for two views."""
    if ref_image is None:
        return
    if len(views) != 2:
        raise InvalidInputError(
            f"ref_image needs exactly 2 views (the reference supplies the first component, the "
            f"prompt the second), got {len(views)}"
        )
    ref_image = _rgb(ref_image)
    if ref_image.ndim != 3 or ref_image.shape[0] != 3:
        raise InvalidInputError(
            f"ref_image has shape {tuple(ref_image.shape)}: expected an RGB image (3, H, W)"
        )
    largest = _check_values("ref_image", ref_image, dtype,
                            "pass an RGB image with values in [-1, 1]")
    if largest > 1 + REF_IMAGE_SLACK:
        raise InvalidInputError(f"ref_image holds values up to {largest:.3g} in magnitude: pass "
                                "an RGB image with values in [-1, 1]")


def _prepare_reference(ref_image: torch.Tensor | None, size: int,
                       like: torch.Tensor) -> torch.Tensor | None:
    """A checked reference image (:func:`_check_reference`) -> (3, size, size) for the
    inverse-problem mode."""
    if ref_image is None:
        return None
    return resize_reference(_rgb(ref_image), size).to(device=like.device, dtype=like.dtype)


def resize_reference(ref_image: torch.Tensor, size: int) -> torch.Tensor:
    """(3, H, W) -> (3, size, size) float32, as a stage resizes a reference image (antialiased
    bilinear); unchanged at that size already."""
    ref = ref_image.to(torch.float32)[None]
    if ref.shape[-2:] != (size, size):
        ref = F.interpolate(ref, size=(size, size), mode="bilinear", antialias=True,
                            align_corners=False)
    return ref[0]


# --------------------------------------------------------------------------------------------
# The denoising loop, shared by both stages


@dataclass
class UNetCall:
    """The UNet work of one sample's denoising step, as a job yields it.

    ``sample`` (2V, C, H, W) rows (negative prompts, then positive), ``timestep`` 0-d, ``embeds``
    (2V, T, D), ``class_labels`` (2V,) or None. The job is sent back the UNet output for these rows,
    (2V, 2C', H, W).
    """

    sample: torch.Tensor
    timestep: torch.Tensor
    embeds: torch.Tensor
    class_labels: torch.Tensor | None

    @property
    def rows(self) -> int:
        return int(self.sample.shape[0])


# A sample's whole denoising loop as a coroutine: it yields one UNetCall per step, is sent the
# UNet's output for it, and returns the final image. Several jobs can then share UNet calls.
DenoiseJob = Generator[UNetCall, torch.Tensor, torch.Tensor]


def run_job(stage: UNetStage, job: DenoiseJob) -> torch.Tensor:
    """Run one job alone: each step's rows in one UNet call (or ``stage.max_batch`` chunks)."""
    with torch.no_grad():
        call = next(job)
        while True:
            out = stage.predict(call.sample, call.timestep, call.embeds, call.class_labels)
            try:
                call = job.send(out)
            except StopIteration as done:
                return done.value


class SharedSteps:
    """Jobs advancing together through shared UNet calls, each row with its own sample's
    timestep, so jobs may join at any step and need not have the same number of steps. Each job
    keeps its own generator; its result equals :func:`run_job`'s up to the float rounding of a
    larger batch (and exactly, while it runs alone). Not thread-safe: one thread drives it.

    Each :meth:`step` is one UNet call of at most ``stage.max_batch`` rows (all pending rows when
    it is 0), filled from the jobs that have waited longest; a job's rows may be split between
    two calls, and the job moves on when all of them are done. So every call is full while
    enough rows are pending, whenever jobs arrived: with ``--fixed-batch`` a call costs the same
    however few of its rows are real (up to the next ``--batch-multiple``), and a service whose
    requests arrive in groups would otherwise run half-empty calls for each group's stragglers.
    No job waits more than one round of the pending rows between two of its steps.
    """

    def __init__(self, stage: UNetStage) -> None:
        self.stage = stage
        self._jobs: dict[int, DenoiseJob] = {}
        # The jobs' current calls, oldest first (a job's next call goes to the end).
        self._pending: dict[int, UNetCall] = {}
        self._done_rows: dict[int, list[torch.Tensor]] = {}  # outputs of a call's first rows
        self._dones: dict[int, Callable[[torch.Tensor | BaseException], None]] = {}
        self._next_key = 0
        self.unet_calls = 0  # shared UNet calls made
        self.job_steps = 0  # steps taken, summed over jobs

    def __len__(self) -> int:
        return len(self._pending)

    def pending_rows(self) -> int:
        """Rows waiting for a UNet call, over all jobs."""
        return sum(call.rows - sum(out.shape[0] for out in self._done_rows.get(key, ()))
                   for key, call in self._pending.items())

    def add(self, job: DenoiseJob, done: Callable[[torch.Tensor | BaseException], None]) -> None:
        """Start ``job`` (runs it up to its first UNet call); ``done`` gets its image or exception."""
        key, self._next_key = self._next_key, self._next_key + 1
        self._jobs[key] = job
        self._dones[key] = done
        with torch.no_grad():
            self._advance(key, None)

    def _advance(self, key: int, out: torch.Tensor | None) -> None:
        job = self._jobs[key]
        try:
            self._pending[key] = next(job) if out is None else job.send(out)
            return
        except StopIteration as finished:
            result: torch.Tensor | BaseException = finished.value
        except Exception as exc:  # noqa: BLE001 - one job's failure is that job's result
            result = exc
        del self._jobs[key]
        self._dones.pop(key)(result)

    def fail_all(self, error: BaseException) -> None:
        """End every job with ``error``."""
        for key in list(self._jobs):
            self._fail(key, error)

    def _fail(self, key: int, error: BaseException) -> None:
        self._jobs.pop(key).close()
        self._pending.pop(key, None)
        self._done_rows.pop(key, None)
        self._dones.pop(key)(error)

    def _predict(self, parts: list[tuple[int, UNetCall, slice]]) -> Sequence[torch.Tensor]:
        """The UNet's output for ``parts``' rows in one call, split back into the parts."""
        if len(parts) == 1 and parts[0][2] == slice(0, parts[0][1].rows):
            c = parts[0][1]  # one whole call alone: exactly the call run_job makes
            return [self.stage.predict(c.sample, c.timestep, c.embeds, c.class_labels)]
        sample = torch.cat([c.sample[r] for _, c, r in parts])
        timestep = torch.cat([c.timestep.reshape(-1).expand(c.rows)[r] for _, c, r in parts])
        embeds = torch.cat([c.embeds[r] for _, c, r in parts])
        labels = (None if parts[0][1].class_labels is None
                  else torch.cat([c.class_labels[r] for _, c, r in parts]))
        return self.stage.predict(sample, timestep, embeds, labels).split(
            [r.stop - r.start for _, _, r in parts])

    def step(self) -> None:
        """One UNet call for the rows that have waited longest, and every job whose call is then
        complete on to its next call (or its end)."""
        if not self._pending:
            return
        room = self.stage.max_batch or sum(c.rows for c in self._pending.values())
        parts: list[tuple[int, UNetCall, slice]] = []  # (job, its call, the rows taken)
        for key, call in self._pending.items():
            start = sum(out.shape[0] for out in self._done_rows.get(key, ()))
            rows = slice(start, start + min(call.rows - start, room))
            parts.append((key, call, rows))
            room -= rows.stop - rows.start
            if room == 0:
                break
        self.unet_calls += 1
        with torch.no_grad():
            try:
                outs = self._predict(parts)
            except Exception as exc:  # noqa: BLE001 - it fails only the jobs whose rows fail
                if len(parts) == 1:
                    self._fail(parts[0][0], exc)
                    return
                # Each job's rows alone, so that one job's fault (or a call too large for the
                # device) ends that job only, and the others go on with the same outputs.
                logger.warning("a shared UNet call of %d jobs failed (%s): running each alone",
                               len(parts), exc)
                outs, kept = [], []
                for part in parts:
                    try:
                        outs.append(self._predict([part])[0])
                        kept.append(part)
                    except Exception as alone:  # noqa: BLE001
                        self._fail(part[0], alone)
                parts = kept
            for (key, call, rows), out in zip(parts, outs, strict=True):
                if rows.stop < call.rows:  # the rest of this call's rows go first next time
                    self._done_rows.setdefault(key, []).append(out)
                    continue
                earlier = self._done_rows.pop(key, [])
                del self._pending[key]  # its next call joins the end of the queue
                self.job_steps += 1
                self._advance(key, torch.cat([*earlier, out]) if earlier else out)


def run_batched(stage: UNetStage, jobs: Sequence[DenoiseJob]) -> list[torch.Tensor | BaseException]:
    """Run several jobs together through shared UNet calls (see :class:`SharedSteps`).

    Returns one entry per job: its image, or the exception it raised (e.g. SamplingCancelled),
    which ends that job only.
    """
    results: list[torch.Tensor | BaseException | None] = [None] * len(jobs)
    shared = SharedSteps(stage)
    for k, job in enumerate(jobs):
        shared.add(job, lambda result, k=k: results.__setitem__(k, result))
    while len(shared):
        shared.step()
    return results  # type: ignore[return-value]


def _denoise(
    stage: UNetStage,
    noisy: torch.Tensor,  # (1, 3, H, W) x_T
    embeds: torch.Tensor,  # (2V, T, D) [negative..., positive...]
    views: Sequence[View],
    params: SamplingParams,
    generator: torch.Generator,
    condition: torch.Tensor | None,  # (1, 3, H, W) noised upscaled image (stage 2)
    class_labels: torch.Tensor | None,  # (2V,) noise level (stage 2)
    ref: torch.Tensor | None,  # (3, H, W) reference image (inverse problems)
    callback: ProgressCallback | None,
    should_stop: StopCheck | None,
) -> DenoiseJob:
    # A private scheduler (set_timesteps sets its timesteps; a service runs many jobs at once),
    # with its timesteps on the CPU so that its scalar bookkeeping never waits for the GPU. Our
    # DDPM step only reads the scheduler, and set_timesteps only rebinds attributes, so a shallow
    # copy will do (a deep copy took a millisecond a job); diffusers' own steps for other
    # configurations may keep state, so they get a deep copy.
    ours = scheduling.supports(stage.scheduler)
    scheduler = (copy.copy if ours else copy.deepcopy)(stage.scheduler)
    scheduler.set_timesteps(params.num_inference_steps, device="cpu")
    timesteps = scheduler.timesteps
    unet_timesteps = timesteps.to(stage.device)  # one copy; the UNet reads them on its device
    channels = noisy.shape[1]
    on_gpu = stage.device.type == "cuda"

    # Our DDPM step takes its noise as an argument: the loop draws it in diffusers' order, after
    # queueing the UNet call, and sends it to the device without blocking. Configurations our step
    # does not cover fall back to diffusers' step, which draws (and blocks) inside.
    noise = scheduling.NoiseStream(generator, stage.device) if ours else None

    # All of the above runs when the job is made, in the caller's thread (a service's request
    # thread), and the steps below in the thread that runs the UNet: the blocking copy of the
    # timesteps would have that thread wait for the running UNet call whenever a job joins.

    def steps(noisy: torch.Tensor) -> DenoiseJob:
        pending: deque[tuple[int, torch.cuda.Event]] = deque()

        def report(done: int) -> None:
            if callback is not None:
                callback(done, len(timesteps))

        for i, t in enumerate(timesteps):
            if should_stop is not None and should_stop():
                raise SamplingCancelled(f"stopped before step {i + 1} of {len(timesteps)}")

            # 1. Inverse problems: the first component comes from the noised reference image.
            if ref is not None:
                alpha = scheduler.alphas_cumprod[t]  # CPU scalar
                if noise is not None:
                    ref_noise = noise.draw(tuple(ref.shape), ref.dtype)
                else:
                    ref_noise = scheduling.randn_tensor(ref.shape, generator=generator,
                                                        device=ref.device, dtype=ref.dtype)
                ref_noisy = alpha.sqrt() * ref + (1 - alpha).sqrt() * ref_noise
                noisy = (views[0].inverse_view(ref_noisy) + views[1].inverse_view(noisy[0]))[None]

            # 2. Show the image through every view; duplicate for classifier-free guidance.
            model_input = noisy if condition is None else torch.cat([noisy, condition], dim=1)
            viewed = apply_views(views, model_input[0])  # (V, C, H, W)
            model_input = scheduler.scale_model_input(torch.cat([viewed, viewed]), t)

            # 3. One UNet call for all views, negative and positive prompts.
            out = yield UNetCall(model_input, unet_timesteps[i], embeds, class_labels)  # (2V, 6, H, W)

            # 4. Map each estimate back through its view's inverse, then guide.
            out = invert_views(views, out.unflatten(0, (2, len(views))))  # (2, V, 6, H, W)
            eps_uncond = out[0, :, :channels]
            eps_text, variance = out[1, :, :channels], out[1, :, channels:]
            eps = eps_uncond + params.guidance_scale * (eps_text - eps_uncond)  # (V, 3, H, W)

            # 5. Combine the views and take one DDPM step (learned-range variance).
            model_output = reduce_views(eps[None], variance[None], params.reduction, i)
            if noise is not None:
                variance_noise = noise.draw(tuple(noisy.shape), noisy.dtype) if t > 0 else None
                noisy = scheduling.ddpm_step(scheduler, model_output, t, noisy, variance_noise)
            else:
                noisy = scheduler.step(model_output, t, noisy, generator=generator,
                                       return_dict=False)[0]

            # 6. Progress. On a GPU the host runs at most one step ahead of the device: a step is
            # reported when it has finished, and a stop request takes effect within one step.
            if on_gpu:
                event = torch.cuda.Event()
                # On the stage's device: the thread's current device may be another GPU.
                event.record(torch.cuda.current_stream(stage.device))
                pending.append((i + 1, event))
                while len(pending) > 1:
                    done, finished = pending.popleft()
                    finished.synchronize()
                    report(done)
            else:
                report(i + 1)
        for done, finished in pending:
            finished.synchronize()
            report(done)
        return noisy

    return steps(noisy)


def _initial_noise(stage: UNetStage, channels: int, generator: torch.Generator) -> torch.Tensor:
    """x_T: (1, channels, S, S) drawn on the CPU generator, scaled for the scheduler."""
    size = stage.sample_size
    noise = scheduling.randn_tensor((1, channels, size, size), generator=generator,
                                    device=stage.device, dtype=stage.dtype)
    return noise * stage.scheduler.init_noise_sigma


@torch.no_grad()
def stage_1_job(
    stage: UNetStage,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    views: Sequence[View],
    generator: torch.Generator,
    params: SamplingParams = SamplingParams(),
    *,
    ref_image: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> DenoiseJob:
    """A job that samples a multi-view illusion at the IF-I resolution (run it with
    :func:`run_job`, or with others through :func:`run_batched`). Inputs are checked, and x_T drawn,
    when the job is made.

    Args:
        prompt_embeds: (V, 77, D), one prompt per view, in view order.
        negative_prompt_embeds: (1, 77, D) null-prompt embedding (or one per view).
        views: V views; ``views[k]`` is seen with prompt k.
        generator: CPU generator; advanced in place (its state then goes to stage 2).
        ref_image: optional (3, H, W) image in [-1, 1] supplying the first component.

    Returns:
        (1, 3, S, S) image in the UNet's dtype, S = ``unet.config.sample_size``, roughly in [-1, 1].
    """
    check_stage_1_inputs(stage, prompt_embeds, negative_prompt_embeds, views, params, ref_image)
    embeds = _cfg_embeds(stage, prompt_embeds, negative_prompt_embeds)
    size = stage.sample_size
    noisy = _initial_noise(stage, stage.unet.config.in_channels, generator)
    ref = _prepare_reference(ref_image, size, noisy)
    return _denoise(stage, noisy, embeds, views, params, generator, None, None, ref, callback,
                    should_stop)


def check_stage_1_inputs(stage: UNetStage, prompt_embeds: torch.Tensor,
                         negative_prompt_embeds: torch.Tensor, views: Sequence[View],
                         params: SamplingParams, ref_image: torch.Tensor | None = None) -> None:
    """Raise InvalidInputError for inputs :func:`stage_1_job` would refuse, without making the
    job: a service checks a request before it waits for its turn."""
    params.validate(stage.scheduler.config.num_train_timesteps)
    _check_embeds(stage, prompt_embeds, negative_prompt_embeds, views)
    _check_reference(ref_image, views, stage.dtype)


def sample_stage_1(stage: UNetStage, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Sample one stage-1 illusion (arguments and result as :func:`stage_1_job`)."""
    return run_job(stage, stage_1_job(stage, *args, **kwargs))


@torch.no_grad()
def stage_2_job(
    stage: UNetStage,
    image: torch.Tensor,
    prompt_embeds: torch.Tensor,
    negative_prompt_embeds: torch.Tensor,
    views: Sequence[View],
    generator: torch.Generator,
    params: SamplingParams = SamplingParams(),
    *,
    ref_image: torch.Tensor | None = None,
    callback: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> DenoiseJob:
    """A job that super-resolves a stage-1 illusion to the IF-II resolution, through the same
    views (run as :func:`stage_1_job`'s). Inputs are checked, and the noise drawn, when it is made.

    Args:
        image: (1, 3, s, s) stage-1 output (any s; upscaled bilinearly to the UNet's size).
        generator: the stage-1 generator, continued (see :func:`generator_from_state`).
        Other arguments as :func:`sample_stage_1`; ``params.noise_level`` sets how much noise is
        added to the upscaled image.

    Returns:
        (1, 3, S, S) image in the UNet's dtype, S = ``unet.config.sample_size``.
    """
    check_stage_2_inputs(stage, image, prompt_embeds, negative_prompt_embeds, views, params,
                         ref_image)
    embeds = _cfg_embeds(stage, prompt_embeds, negative_prompt_embeds)
    size = stage.sample_size

    # 1. x_T, then the upscaled conditioning image noised at `noise_level` (same generator).
    noisy = _initial_noise(stage, stage.unet.config.in_channels // 2, generator)
    image = image.to(device=stage.device, dtype=stage.dtype)
    upscaled = F.interpolate(image, (size, size), mode="bilinear", align_corners=True)
    noise_level = torch.tensor([params.noise_level], device=stage.device)
    noise = scheduling.randn_tensor(upscaled.shape, generator=generator, device=stage.device,
                                    dtype=upscaled.dtype)
    upscaled = stage.image_noising_scheduler.add_noise(upscaled, noise, timesteps=noise_level)
    class_labels = noise_level.expand(embeds.shape[0])  # one label per UNet row

    ref = _prepare_reference(ref_image, size, noisy)
    return _denoise(stage, noisy, embeds, views, params, generator, upscaled, class_labels, ref,
                    callback, should_stop)


def check_stage_2_inputs(stage: UNetStage, image: torch.Tensor, prompt_embeds: torch.Tensor,
                         negative_prompt_embeds: torch.Tensor, views: Sequence[View],
                         params: SamplingParams, ref_image: torch.Tensor | None = None) -> None:
    """Raise InvalidInputError for inputs :func:`stage_2_job` would refuse, without making the
    job (see :func:`check_stage_1_inputs`)."""
    if stage.image_noising_scheduler is None:
        raise InvalidInputError(f"{stage.source} has no image_noising_scheduler: not an IF-II model")
    params.validate(stage.scheduler.config.num_train_timesteps)
    _check_embeds(stage, prompt_embeds, negative_prompt_embeds, views)
    if image.ndim != 4 or image.shape[:2] != (1, 3) or image.shape[2] != image.shape[3]:
        raise InvalidInputError(
            f"image has shape {tuple(image.shape)}: expected the stage-1 output (1, 3, H, H)"
        )
    _check_values("image", image, stage.dtype, "pass the stage-1 output")
    _check_reference(ref_image, views, stage.dtype)


def sample_stage_2(stage: UNetStage, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Super-resolve one stage-1 illusion (arguments and result as :func:`stage_2_job`)."""
    return run_job(stage, stage_2_job(stage, *args, **kwargs))
