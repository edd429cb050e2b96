"""The whole job: encode once, then per sample stage 1 -> stage 2 -> files.

Runs against a :class:`CascadeClient`, whether the services were started locally or are remote.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm import tqdm

from anagram.v1 import anagram_pb2 as pb
from illusions.sampling import InvalidInputError, SamplingParams
from illusions.text import style_prompts
from illusions.views import View, build_views
from orchestrator.client import CascadeClient
from orchestrator.output import sample_dir, write_json_atomic, write_sample
from services.common import codec

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerateConfig:
    """One ``illusion generate`` run (everything but where the services are)."""

    prompts: tuple[str, ...]
    views: tuple[str, ...]
    view_args: tuple[tuple[str, ...], ...] = ()  # per view; empty: defaults
    view_seed: int = 0
    style: str = ""
    name: str = ""
    save_dir: Path = Path("results")
    num_samples: int = 1
    seed: int = 0
    params: SamplingParams = field(default_factory=SamplingParams)
    ref_image: Path | None = None
    save_tensors: bool = False

    @property
    def run_dir(self) -> Path:
        return Path(self.save_dir) / self.run_name

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        return ".".join([*self.views, *(p.split()[-1] for p in self.prompts)])[:120]


def check_config(config: GenerateConfig) -> list[View]:
    """Validate everything that can be checked without a model; return the views.

    Raises ViewError / InvalidInputError with a sentence naming the problem and the fix.
    """
    if not config.prompts:
        raise InvalidInputError("no prompts: give one prompt per view with --prompts")
    if len(config.prompts) != len(config.views):
        raise InvalidInputError(
            f"{len(config.prompts)} prompts for {len(config.views)} views: give exactly one "
            "prompt per view (--prompts P1 P2 ... --views V1 V2 ...)"
        )
    if config.view_args and len(config.view_args) != len(config.views):
        raise InvalidInputError(
            f"{len(config.view_args)} --view-args for {len(config.views)} views: give one per "
            "view, '' for a view's defaults"
        )
    if config.num_samples < 1:
        raise InvalidInputError(f"--num-samples {config.num_samples}: use 1 or more")
    if not 0 <= config.seed < 2**63 - config.num_samples:
        raise InvalidInputError(f"--seed {config.seed} is out of range: use 0 .. 2**63-1")
    config.params.validate()
    if config.ref_image is not None and not Path(config.ref_image).is_file():
        raise InvalidInputError(f"--ref-image {config.ref_image} does not exist: give an image file")
    return build_views(config.views, config.view_args or None, view_seed=config.view_seed)


def load_ref_image(path: Path) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [-1, 1]."""
    try:
        with Image.open(path) as picture:
            rgb = picture.convert("RGB")
    except OSError as exc:
        raise InvalidInputError(f"--ref-image {path} is not a readable image: {exc}") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = pixels.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1


def _metadata(config: GenerateConfig, prompts: list[str], models: dict[str, pb.ModelInfo],
              done: list[int]) -> dict[str, Any]:
    params = asdict(config.params)
    return {
        "prompts": prompts,
        "raw_prompts": list(config.prompts),
        "style": config.style,
        "views": [
            {"name": name, "args": list(config.view_args[k]) if config.view_args else [],
             "seed": config.view_seed}
            for k, name in enumerate(config.views)
        ],
        "seed": config.seed,
        "num_samples": config.num_samples,
        "sampling": params,
        "ref_image": str(config.ref_image) if config.ref_image else None,
        "models": {
            name: {"model": info.model, "device": info.device, "dtype": info.dtype,
                   "quantize": info.quantize, "random_weights": info.random_weights}
            for name, info in models.items()
        },
        "samples_done": sorted(done),
        "software": {"torch": torch.__version__, "python": platform.python_version()},
    }


def _bar(desc: str, enabled: bool) -> tuple[tqdm, Callable[[int, int], None]]:
    bar = tqdm(desc=desc, total=None, leave=False, disable=not enabled, unit="step")

    def update(step: int, total: int) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    return bar, update


def generate(config: GenerateConfig, client: CascadeClient, progress: bool = True) -> list[Path]:
    """Run the job; returns the sample folders written. Files appear only for finished samples."""
    views = check_config(config)
    ref_image = load_ref_image(config.ref_image) if config.ref_image else None
    prompts = style_prompts(config.prompts, config.style)
    models = client.describe()
    run_dir = config.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    done: list[int] = []
    write_json_atomic(run_dir / "metadata.json", _metadata(config, prompts, models, done))

    # Embeddings once per run, reused by every sample.
    prompt_embeds, negative = client.encode(prompts)
    embeds = codec.encode(prompt_embeds)
    negative_embeds = codec.encode(negative)
    specs = [
        pb.ViewSpec(name=name, args=list(config.view_args[k]) if config.view_args else [],
                    seed=config.view_seed)
        for k, name in enumerate(config.views)
    ]
    ref_message = codec.encode(ref_image) if ref_image is not None else pb.Tensor()
    written: list[Path] = []
    for i in range(config.num_samples):
        seed = config.seed + i
        params = pb.SamplingParams(
            num_inference_steps=config.params.num_inference_steps,
            guidance_scale=config.params.guidance_scale,
            reduction=config.params.reduction,
            noise_level=config.params.noise_level,
            seed=seed,
        )
        started = time.perf_counter()
        bar, update = _bar(f"sample {seed:04d} stage 1", progress)
        with bar:
            image64, state = client.stage1(
                pb.Stage1Request(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                                 views=specs, params=params, ref_image=ref_message),
                update,
            )
        bar, update = _bar(f"sample {seed:04d} stage 2", progress)
        with bar:
            image256, _ = client.stage2(
                pb.Stage2Request(image=codec.encode(image64), prompt_embeds=embeds,
                                 negative_prompt_embeds=negative_embeds, views=specs,
                                 params=params, rng_state=codec.encode(state),
                                 ref_image=ref_message),
                update,
            )
        images = {image64.shape[-1]: image64, image256.shape[-1]: image256}
        written.append(write_sample(run_dir, seed, views, images, config.save_tensors, prompts))
        done.append(seed)
        write_json_atomic(run_dir / "metadata.json", _metadata(config, prompts, models, done))
        logger.info("sample %04d done in %.1f s -> %s", seed, time.perf_counter() - started,
                    sample_dir(run_dir, seed))
    return written
