"""The parts of the two UNet services that are the same: unpacking requests, loading, warm-up."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Sequence

import torch

from anagram.v1 import anagram_pb2 as pb
from illusions.batching import BatchRunner
from illusions.models import UNetStage, load_unet_stage
from illusions.sampling import (
    InvalidInputError,
    SamplingParams,
    generator_from_state,
    new_generator,
    sample_stage_1,
    sample_stage_2,
)
from illusions.text import MAX_LENGTH
from illusions.views import MAX_VIEWS, View, build_views
from services.common import codec
from services.common.server import ServerConfig

logger = logging.getLogger(__name__)

# An image field's height and width. Stage 2 takes the stage-1 output (64 px) and a reference image
# is resized to the stage's size (the `illusion` client sends it at that size); larger images only
# cost memory, copied before the request waits for its turn.
MAX_IMAGE_SIDE = 1024
MAX_EMBED_DIM = 8192  # widest prompt embeddings taken (T5-XXL's are 4096); bounds the copy as above
RNG_STATE_BYTES = torch.Generator().get_state().numel()  # a CPU generator's state (5056 bytes)


def views_from_specs(specs: Sequence[pb.ViewSpec]) -> list[View]:
    """Rebuild the run's views. Every spec carries the run's view seed."""
    if not specs:
        raise InvalidInputError("views is empty: give at least one view (identity for plain IF)")
    if len(specs) > MAX_VIEWS:
        raise InvalidInputError(f"{len(specs)} views is too many: use at most {MAX_VIEWS}")
    seeds = {spec.seed for spec in specs}
    if len(seeds) != 1:
        raise InvalidInputError(
            f"views carry different seeds {sorted(seeds)}: every view of a run uses the run's "
            "view seed"
        )
    return build_views([s.name for s in specs], [list(s.args) for s in specs],
                       view_seed=seeds.pop())


def params_from_proto(params: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale,
        reduction=params.reduction or "mean",
        noise_level=params.noise_level,
    )


def embeds_from_request(request: pb.Stage1Request | pb.Stage2Request
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    limit = MAX_VIEWS * MAX_LENGTH * MAX_EMBED_DIM
    for name, message in (("prompt_embeds", request.prompt_embeds),
                          ("negative_prompt_embeds", request.negative_prompt_embeds)):
        if math.prod(message.shape) > limit:
            raise InvalidInputError(
                f"{name} has shape {list(message.shape)}, more values than {MAX_VIEWS} prompts "
                f"of {MAX_LENGTH} tokens {MAX_EMBED_DIM} wide: send the encoder's embeddings, one "
                "prompt per view")
    prompt = codec.decode(request.prompt_embeds, "prompt_embeds")
    negative = codec.decode(request.negative_prompt_embeds, "negative_prompt_embeds")
    for name, tensor in (("prompt_embeds", prompt), ("negative_prompt_embeds", negative)):
        if not tensor.is_floating_point():
            raise InvalidInputError(f"{name} has dtype {tensor.dtype}: send float embeddings")
    return prompt, negative


def optional_image(message: pb.Tensor, field: str) -> torch.Tensor | None:
    if not codec.is_set(message):
        return None
    shape = list(message.shape)
    if len(shape) not in (3, 4) or math.prod(shape[:-2]) > 3:
        # Checked before the data is copied: one RGB image is all any field takes.
        raise InvalidInputError(f"{field} has shape {shape}: send one RGB image, (1, 3, H, W)")
    if len(message.shape) >= 2 and max(message.shape[-2:]) > MAX_IMAGE_SIDE:
        height, width = message.shape[-2:]
        raise InvalidInputError(
            f"{field} is {height} x {width} pixels, more than {MAX_IMAGE_SIDE} a side: send the "
            "stage-1 output as stage 2's image, and a reference image resized to the stage's "
            "sample size (Describe gives it)")
    image = codec.decode(message, field)
    if not image.is_floating_point():
        raise InvalidInputError(f"{field} has dtype {image.dtype}: send a float image in [-1, 1]")
    return image


def generator_from_request(request: pb.Stage2Request) -> torch.Generator:
    """The generator stage 1 handed over in ``rng_state``, or a new one from the seed."""
    message = request.rng_state
    if not codec.is_set(message):
        return new_generator(request.params.seed)
    if message.dtype != "uint8" or list(message.shape) != [RNG_STATE_BYTES]:
        raise InvalidInputError(
            f"rng_state has dtype {message.dtype!r} and shape {list(message.shape)}: send the "
            f"uint8 state of {RNG_STATE_BYTES} values stage 1 returned, unchanged (or none, to "
            "start from the seed)")
    return generator_from_state(codec.decode(message, "rng_state"))


def sample_result(image: torch.Tensor, generator: torch.Generator, service: str,
                  inputs: dict[str, torch.Tensor | None]) -> pb.SampleResult:
    """The image as float32 and the generator's state, for the next stage. An image with NaN or
    infinite values is refused, with the magnitudes of the request's ``inputs``: finite inputs far
    beyond what an encoder or a stage makes (1e30, say) overflow inside the UNet."""
    if not torch.isfinite(image).all():
        sizes = ", ".join(f"{name} up to |x| = {tensor.abs().max().item():.3g}"
                          for name, tensor in inputs.items() if tensor is not None)
        raise InvalidInputError(
            f"{service} made an image with NaN or infinite values from this request ({sizes}): "
            "its inputs are beyond what the model handles; send the encoder's embeddings"
            + (" and the stage-1 output" if service == "stage2" else ""))
    return pb.SampleResult(image=codec.encode(image.float()),
                           rng_state=codec.encode(generator.get_state()))


def model_info(config: ServerConfig, stage: UNetStage) -> pb.ModelInfo:
    unet = stage.unet.config
    return pb.ModelInfo(
        service=config.service, model=config.model, device=str(stage.device),
        dtype=str(stage.dtype).removeprefix("torch."), quantize=config.quantize,
        sample_size=int(unet.sample_size),
        embed_dim=int(unet.encoder_hid_dim or unet.cross_attention_dim),
        random_weights=config.random_weights,
    )


def load_stage(config: ServerConfig, stage_number: int) -> UNetStage:
    """Load the UNet of ``config`` and run one tiny denoising step so the first call is warm."""
    stage = load_unet_stage(
        config.model, stage_number, device=config.device, dtype=config.dtype,
        quantize=config.quantize, random_weights=config.random_weights,
    )
    stage.max_batch = config.max_batch
    stage.fixed_batch = config.fixed_batch
    stage.batch_multiple = config.batch_multiple
    # Compile before the warm-up, whose first UNet call compiles for every row count (the rows
    # are a symbol of the compiled code), so the service is warm when it reports SERVING.
    if config.compile:
        stage.compile()
        logger.info("stage %d compiles its UNet in its warm-up (one to two minutes for the "
                    "full-size models)", stage_number)
    if config.cuda_graphs and stage.enable_cuda_graphs():
        logger.info("stage %d replays its UNet calls from CUDA graphs", stage_number)
    dim = int(stage.unet.config.encoder_hid_dim or stage.unet.config.cross_attention_dim)
    zeros = torch.zeros(1, MAX_LENGTH, dim)
    views = build_views(["identity"])
    params = SamplingParams(num_inference_steps=1, guidance_scale=1.0)
    generator = torch.Generator().manual_seed(0)
    if stage_number == 1:
        sample_stage_1(stage, zeros, zeros, views, generator, params)
    else:
        image = torch.zeros(1, 3, stage.sample_size // 4, stage.sample_size // 4)
        sample_stage_2(stage, image, zeros, zeros, views, generator, params)
    if stage.fixed_batch:
        sizes = stage.call_sizes()
        logger.info("stage %d warms up its UNet calls of %s rows", stage_number,
                    ", ".join(map(str, sizes)))
        stage.warm_up_call_sizes(MAX_LENGTH)
    logger.info("stage %d warmed up", stage_number)
    return stage


class LazyRunner:
    """The thread that runs a stage's UNet (requests admitted together share its calls), started
    by the first request that needs it: ``runner(stage).run(job)``."""

    def __init__(self, name: str, max_jobs: int = 0) -> None:
        self.name = name
        self.max_jobs = max_jobs  # the service's --max-concurrent: no wait for more jobs than that
        self._runner: BatchRunner | None = None
        self._lock = threading.Lock()

    def __call__(self, stage: UNetStage) -> BatchRunner:
        with self._lock:
            if self._runner is None:
                self._runner = BatchRunner(stage, self.name, max_jobs=self.max_jobs)
            return self._runner
