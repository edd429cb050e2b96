"""``illusion animate``: a GIF (and an MP4) of each sample turning from view to view.

The views, their arguments and seed, and the prompts are read back from the run's
``metadata.json`` (as ``orchestrator.pipeline`` writes it), so an animation shows exactly the views
the sample was made with.  Frames come from :mod:`illusions.animate`; this module adds the
captions (each view's name and prompt, fading from one to the next) and writes the files:

* ``NNNN/sample_{S}.gif`` always (Pillow; a held pose is one frame with a long duration);
* ``NNNN/sample_{S}.mp4`` when a video encoder is installed (``pip install
  'illusion-relay[video]'``: imageio with its ffmpeg binary), every frame at a constant rate.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from illusions import animate
from illusions.views import View, build_views
from orchestrator.output import INK, MUTED, font, line_height, sample_sizes, to_pil, wrap_text

logger = logging.getLogger(__name__)

VIDEO_CHOICES = ("auto", "mp4", "none")
VIDEO_HINT = "pip install 'illusion-relay[video]'"
MIN_FRAME = 384  # frames of small images are enlarged (nearest) to at least this side
BLOCK = 16  # frame sides are padded to a multiple of this (H.264 macroblocks)


class ResultError(ValueError):
    """The folder is not a result of ``illusion generate``; the message says what to give."""


MAX_SECONDS = 10.0  # --hold and --transition: longer makes a GIF of thousands of frames
MAX_FRAMES = 1000  # distinct frames of one animation: each is held in memory until written


@dataclass(frozen=True)
class AnimateConfig:
    """One ``illusion animate`` run (the parts that do not depend on the result)."""

    size: int | None = None  # which sample_{size}.png to animate; None: the largest there is
    fps: int = 20
    hold: float = 1.5  # seconds each view's pose stays on screen
    transition: float = 1.0  # seconds of each leg (a view leaving or reaching its pose)
    video: str = "auto"  # mp4 too: "auto" when an encoder is installed, "mp4" always, "none" never

    def validate(self) -> None:
        if not 1 <= self.fps <= 100:
            raise ValueError(f"--fps {self.fps}: use 1 .. 100 frames per second")
        for flag, seconds in (("--hold", self.hold), ("--transition", self.transition)):
            if not 0 < seconds <= MAX_SECONDS:
                raise ValueError(f"{flag} {seconds}: use seconds > 0, at most {MAX_SECONDS:g}")
        if self.video not in VIDEO_CHOICES:
            raise ValueError(f"--video {self.video!r}: use one of {', '.join(VIDEO_CHOICES)}")
        if self.video == "mp4" and not video_available():
            raise ValueError(f"--video mp4 needs a video encoder: {VIDEO_HINT}")

    def spec(self) -> animate.AnimationSpec:
        return animate.AnimationSpec(hold=max(1, round(self.hold * self.fps)),
                                     transition=max(1, round(self.transition * self.fps)))


def video_available() -> bool:
    """Whether MP4s can be written (imageio and imageio-ffmpeg are installed)."""
    return all(importlib.util.find_spec(name) is not None for name in ("imageio", "imageio_ffmpeg"))


# --------------------------------------------------------------------------------------------
# Reading a result back
# --------------------------------------------------------------------------------------------


def find_samples(result: Path) -> tuple[Path, list[Path]]:
    """The run folder and the sample folders to animate.

    ``result`` is a run folder ``SAVE_DIR/NAME`` (every finished sample ``NNNN/`` in it) or one
    sample folder.  Raises ResultError when it is neither.
    """
    result = Path(result)
    usage = ("give a run folder SAVE_DIR/NAME written by `illusion generate` (it holds "
             "metadata.json and sample folders 0000/, 0001/ ...) or one of its sample folders")
    if not result.is_dir():
        raise ResultError(f"{result} is not a folder: {usage}")
    if (result / "metadata.json").is_file():
        folders = sorted(p for p in result.iterdir() if p.is_dir() and re.fullmatch(r"\d{4,}", p.name))
        samples = [p for p in folders if sample_sizes(p)]
        for folder in sorted(set(folders) - set(samples)):  # made or emptied by hand
            logger.warning("%s has no sample_S.png image: skipped", folder)
        if not samples:
            raise ResultError(f"{result} has no finished samples yet (no NNNN/ folder with its "
                              "images)")
        return result, samples
    if (result.parent / "metadata.json").is_file() and re.fullmatch(r"\d{4,}", result.name):
        return result.parent, [result]
    raise ResultError(f"{result} is not a result: no metadata.json in it or its parent; {usage}")


def load_metadata(run_dir: Path) -> dict[str, Any]:
    """``run_dir/metadata.json`` as written by ``orchestrator.pipeline``; checked for the parts used."""
    path = Path(run_dir) / "metadata.json"
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ResultError(f"{path} is not readable JSON ({exc}); is this a result folder?") from None
    if not isinstance(meta, dict):
        raise ResultError(f"{path} is not a metadata object; is this a result folder?")
    views, prompts = meta.get("views"), meta.get("prompts")
    if not isinstance(views, list) or not views or not all(
            isinstance(v, dict) and isinstance(v.get("name"), str) for v in views):
        raise ResultError(f"{path} has no list of views ({{'name', 'args', 'seed'}} each)")
    if not isinstance(prompts, list) or len(prompts) != len(views):
        raise ResultError(f"{path} needs one prompt per view under 'prompts'")
    return meta


def views_from_metadata(meta: dict[str, Any]) -> list[View]:
    """Rebuild the views of a run, with their arguments and view seed, as the services did."""
    entries = meta["views"]
    seeds = {int(entry.get("seed", 0)) for entry in entries}
    if len(seeds) != 1:
        raise ResultError(f"views of one run share one view seed, metadata has {sorted(seeds)}")
    return build_views([entry["name"] for entry in entries],
                       [list(entry.get("args") or []) for entry in entries], view_seed=seeds.pop())


def load_image(path: Path) -> torch.Tensor:
    """An RGB image file -> ``(3, H, W)`` float32 in [-1, 1]."""
    with Image.open(path) as picture:
        pixels = np.asarray(picture.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(pixels.copy()).permute(2, 0, 1) / 127.5 - 1


# --------------------------------------------------------------------------------------------
# Frames with captions
# --------------------------------------------------------------------------------------------


def _fade(colour: tuple[int, int, int], opacity: float) -> tuple[int, int, int]:
    """``colour`` blended into the white background: opacity 0 is white, 1 the colour."""
    return tuple(round(255 + (c - 255) * opacity) for c in colour)  # type: ignore[return-value]


def animation_frames(image: torch.Tensor, views: Sequence[View], prompts: Sequence[str],
                     spec: animate.AnimationSpec) -> tuple[list[Image.Image], list[int]]:
    """Every distinct frame of the animation, with captions, and how long each stays.

    Args:
        image: ``(3, S, S)`` float image in [-1, 1].
        views: the views of the illusion, in order; ``prompts``: one per view.
        spec: hold and transition lengths in frame periods.
    Returns:
        ``(frames, repeats)``: RGB images of one size (the canvas, enlarged by an integer factor
        to at least ``MIN_FRAME`` for small images, above a caption band, padded to multiples of
        ``BLOCK``) and the number of frame periods each is shown.  The caption is the current
        view's name and prompt; between two poses the old one fades out and the new one in.
    """
    if len(prompts) != len(views):
        raise ValueError(f"{len(prompts)} prompts for {len(views)} views: give one per view")
    steps = animate.timeline(views, spec)
    side = animate.canvas_size(image.shape[-1])
    k = max(1, -(-MIN_FRAME // side))
    width = side * k
    face = font(max(12, width // 24))
    pad, step = max(4, width // 48), line_height(face)
    captions = [[(view.name, MUTED)] + [(line, INK) for line in wrap_text(prompt, face, width - 2 * pad)]
                for view, prompt in zip(views, prompts, strict=True)]
    band = 2 * pad + step * max(len(lines) for lines in captions)
    full_w = -(-width // BLOCK) * BLOCK
    full_h = -(-(width + band) // BLOCK) * BLOCK
    left = (full_w - width) // 2

    frames: list[Image.Image] = []
    for s in steps:
        canvas = to_pil(animate.render(views, image, s))
        if k > 1:
            canvas = canvas.resize((width, width), Image.Resampling.NEAREST)
        out = Image.new("RGB", (full_w, full_h), "white")
        out.paste(canvas, (left, 0))
        draw = ImageDraw.Draw(out)
        # First half of a transition: the old caption fades out; second half: the new one fades in.
        who, opacity = (s.source, 1 - 2 * s.progress) if s.progress < 0.5 else (s.target, 2 * s.progress - 1)
        for j, (text, colour) in enumerate(captions[who]):
            top = width + pad + j * step
            draw.text((left + pad, top), text, fill=_fade(colour, opacity), font=face)
        frames.append(out)
    return frames, [s.repeat for s in steps]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _partial(path: Path) -> Path:
    """Hidden temporary name beside ``path``, same suffix (encoders pick the format from it)."""
    return path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")


# GIF frame delays are whole hundredths of a second, and browsers show a delay under 2 of them as
# 10: a frame is never given less.
MIN_GIF_DELAY_CS = 2


def gif_timing(repeats: Sequence[int], fps: int) -> tuple[list[int], list[int]]:
    """The frames a GIF keeps and their delays in ms, for frame ``i`` shown ``repeats[i] / fps``
    seconds: each frame starts at its time rounded to a hundredth of a second (so the rounding
    does not add up over the loop). Above 50 fps some transition frames would get less than
    ``MIN_GIF_DELAY_CS``: those are left out, their time going to the frame before them; a frame
    of that length or more (a view's pose, held) is always kept."""
    starts = [round(100 * t / fps) for t in itertools.accumulate(repeats, initial=0)]
    keep: list[int] = []
    for i in range(len(repeats)):
        if keep and starts[i] - starts[keep[-1]] < MIN_GIF_DELAY_CS:
            # The frame kept last would be too short: one long enough itself takes its place.
            if starts[i + 1] - starts[i] >= MIN_GIF_DELAY_CS:
                keep[-1] = i
            continue
        keep.append(i)
    while len(keep) > 1 and starts[-1] - starts[keep[-1]] < MIN_GIF_DELAY_CS:
        keep.pop()
    bounds = [0, *(starts[i] for i in keep[1:]), starts[-1]]  # the first frame starts the loop
    return keep, [10 * (end - start) for start, end in itertools.pairwise(bounds)]


def write_gif(path: Path, frames: Sequence[Image.Image], repeats: Sequence[int], fps: int) -> Path:
    """Looping GIF, frame ``i`` shown ``repeats[i] / fps`` seconds (:func:`gif_timing`); written
    atomically."""
    path = Path(path)
    tmp = _partial(path)
    keep, delays = gif_timing(repeats, fps)
    shown = [frames[i] for i in keep]
    try:
        shown[0].save(tmp, format="GIF", save_all=True, append_images=shown[1:], loop=0,
                      duration=delays, disposal=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_mp4(path: Path, frames: Sequence[Image.Image], repeats: Sequence[int], fps: int) -> Path:
    """H.264 MP4 at ``fps``, frame ``i`` repeated ``repeats[i]`` times; written atomically.

    Needs the ``video`` extra (imageio with imageio-ffmpeg).
    """
    import imageio.v2 as imageio

    path = Path(path)
    tmp = _partial(path)
    try:
        with imageio.get_writer(tmp, format="FFMPEG", fps=fps, codec="libx264", quality=7,
                                pixelformat="yuv420p", macro_block_size=BLOCK,
                                ffmpeg_log_level="error") as writer:
            for picture, repeat in zip(frames, repeats, strict=True):
                pixels = np.asarray(picture)
                for _ in range(repeat):
                    writer.append_data(pixels)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def animate_sample(sample: Path, views: Sequence[View], prompts: Sequence[str],
                   config: AnimateConfig) -> list[Path]:
    """Write ``sample_{S}.gif`` (and ``.mp4``) for one sample folder; returns the files."""
    sample = Path(sample)
    sizes = sample_sizes(sample)
    if not sizes:
        raise ResultError(f"{sample} has no sample_S.png image to animate")
    size = config.size if config.size is not None else sizes[-1]
    if size not in sizes:
        raise ResultError(f"{sample} has no sample_{size}.png; --size can be "
                          f"{', '.join(map(str, sizes))}")
    image = load_image(sample / f"sample_{size}.png")
    frames, repeats = animation_frames(image, views, prompts, config.spec())
    written = [write_gif(sample / f"sample_{size}.gif", frames, repeats, config.fps)]
    if config.video == "mp4" or (config.video == "auto" and video_available()):
        written.append(write_mp4(sample / f"sample_{size}.mp4", frames, repeats, config.fps))
    elif config.video == "auto":
        logger.warning("no video encoder installed, wrote the GIF only (for MP4s: %s)", VIDEO_HINT)
    for path in written:
        logger.info("wrote %s", path)
    return written


def animate_result(result: Path, config: AnimateConfig | None = None) -> list[Path]:
    """Animate a run folder's samples (or one sample folder); returns the files written."""
    config = config or AnimateConfig()
    config.validate()
    run_dir, samples = find_samples(result)
    meta = load_metadata(run_dir)
    views = views_from_metadata(meta)
    frames = len(animate.timeline(views, config.spec()))
    if frames > MAX_FRAMES:
        # A held pose is one frame however long; the transitions make the frames.
        raise ValueError(f"--transition {config.transition:g} at --fps {config.fps} makes {frames} "
                         f"frames for {len(views)} views, more than {MAX_FRAMES} (each is held in "
                         "memory until the GIF is written): lower --transition or --fps")
    written: list[Path] = []
    for sample in samples:
        written += animate_sample(sample, views, [str(p) for p in meta["prompts"]], config)
    return written
