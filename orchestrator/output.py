"""Writing results: PNGs, the sheet of views, tensors and metadata, all written atomically.

A sample's files are written into a hidden ``.NNNN.partial`` folder that is renamed to ``NNNN``
only once everything is there, so an interrupted run never leaves a half-written sample.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

from illusions.views import View


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) float image in [-1, 1] -> 8-bit RGB PIL image."""
    if image.ndim == 4:
        image = image[0]
    pixels = (image.detach().float().cpu() / 2 + 0.5).mul(255).add(0.5).clamp(0, 255)
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy())


# Text on sheets and animations: Pillow's built-in font (FreeType, no system fonts needed).
INK = (20, 20, 20)  # prompts
MUTED = (110, 110, 110)  # view names
MIN_TILE = 256  # sheet tiles of smaller images are enlarged (nearest) to at least this side


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (bundled with Pillow >= 10.1)."""
    return ImageFont.load_default(size=size)


def wrap_text(text: str, face: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide.

    A word wider than ``width`` on its own is cut at characters.  Empty text gives no lines.
    """
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if face.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = word
        while face.getlength(line) > width and len(line) > 1:
            cut = len(line) - 1
            while cut > 1 and face.getlength(line[:cut]) > width:
                cut -= 1
            lines.append(line[:cut])
            line = line[cut:]
    if line:
        lines.append(line)
    return lines


def line_height(face: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    """Distance between baselines of two lines of ``face``."""
    ascent, descent = face.getmetrics()
    return int((ascent + descent) * 1.15) + 1


def views_sheet(image: torch.Tensor, views: Sequence[View],
                prompts: Sequence[str] | None = None) -> Image.Image:
    """The illusion as seen through each view, side by side, each under a label.

    Args:
        image: ``(1, 3, H, W)`` float image in [-1, 1].
        views: the views, in order.
        prompts: one per view (shown under the view's name), or None for names only.
    Returns:
        RGB image ``(band + k*H, V * k*W)``: a white label band on top (view name, then the
        prompt wrapped to the tile's width), the views below; images narrower than ``MIN_TILE``
        are enlarged by the integer factor ``k`` with nearest-neighbour, so pixels stay pixels.
    """
    if prompts is not None and len(prompts) != len(views):
        raise ValueError(f"{len(prompts)} prompts for {len(views)} views: give one per view")
    seen = [to_pil(view.display(image[0].float().cpu())) for view in views]
    width, height = seen[0].size
    k = max(1, -(-MIN_TILE // width))
    if k > 1:
        seen = [pic.resize((width * k, height * k), Image.Resampling.NEAREST) for pic in seen]
        width, height = width * k, height * k
    face = font(max(11, width // 18))
    pad = max(4, width // 32)
    step = line_height(face)
    labels = [
        [(view.name, MUTED)] + [(line, INK) for line in
                                wrap_text(prompts[i] if prompts else "", face, width - 2 * pad)]
        for i, view in enumerate(views)
    ]
    band = 2 * pad + step * max(len(lines) for lines in labels)
    sheet = Image.new("RGB", (width * len(seen), band + height), "white")
    draw = ImageDraw.Draw(sheet)
    for i, picture in enumerate(seen):
        sheet.paste(picture, (i * width, band))
        for j, (text, colour) in enumerate(labels[i]):
            draw.text((i * width + pad, pad + j * step), text, fill=colour, font=face)
    return sheet


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's (its entries') writes to disk. Some file systems (network,
    FUSE) cannot sync a folder: that is skipped, as a folder's sync only hardens a rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if not (path.is_dir() and exc.errno in (errno.EINVAL, errno.ENOTSUP, errno.EBADF)):
            raise
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o644)  # readable like the images beside it (mkstemp makes it 0600)
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())  # the new file's bytes are on disk before it replaces the old
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself


def sample_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / f"{seed:04d}"


def write_sample(run_dir: Path, seed: int, views: Sequence[View],
                 images: dict[int, torch.Tensor], save_tensors: bool,
                 prompts: Sequence[str] | None = None) -> Path:
    """Write one finished sample (``images``: size -> (1,3,S,S) float32) into ``run_dir/NNNN``.

    ``prompts`` (one per view) label the sheets of views.
    """
    return publish_sample(stage_sample(run_dir, seed, views, images, save_tensors, prompts),
                          run_dir, seed)


SAMPLE_PNG = re.compile(r"sample_(\d+)\.png")  # a sample's image at size S: sample_{S}.png


def sample_sizes(sample: Path) -> list[int]:
    """Sizes ``S`` of the ``sample_{S}.png`` images in a sample folder, ascending."""
    found = (SAMPLE_PNG.fullmatch(p.name) for p in Path(sample).iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def stage_sample(run_dir: Path, seed: int, views: Sequence[View],
                 images: dict[int, torch.Tensor], save_tensors: bool,
                 prompts: Sequence[str] | None = None) -> Path:
    """Write a sample's files into its hidden ``.NNNN.partial`` folder (see ``write_sample``)
    and return that folder; :func:`publish_sample` moves it into place. Several samples can be
    staged at once (PNG encoding runs outside the GIL)."""
    partial = run_dir / f".{seed:04d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for size, image in sorted(images.items()):
            to_pil(image).save(partial / f"sample_{size}.png")
            views_sheet(image, views, prompts).save(partial / f"sample_{size}.views.png")
        if save_tensors:
            names = {0: "stage_1", 1: "stage_2"}
            tensors = {names[i]: image.float().contiguous()
                       for i, (_, image) in enumerate(sorted(images.items()))}
            save_file(tensors, str(partial / "tensors.safetensors"))
            # safetensors writes its file 0600; give it the images' mode (the user's umask).
            png = next(partial.glob("sample_*.png"))
            os.chmod(partial / "tensors.safetensors", png.stat().st_mode & 0o777)
        # On disk before publish_sample's rename makes the folder a finished sample: a machine
        # that dies just after it leaves a whole sample, not one with empty files.
        for path in partial.iterdir():
            fsync_path(path)
        fsync_path(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return partial


def publish_sample(partial: Path, run_dir: Path, seed: int) -> Path:
    """Move a staged sample to ``run_dir/NNNN`` in one rename. Where that folder is there already
    (a sample made again, e.g. for its tensors), each staged file replaces its namesake in one
    rename and the folder's other files (animations, a user's notes) stay."""
    final = sample_dir(run_dir, seed)
    try:
        if final.is_dir() and not final.is_symlink():
            for path in sorted(partial.iterdir()):
                os.replace(path, final / path.name)
            partial.rmdir()
            fsync_path(final)
        else:
            if final.exists() or final.is_symlink():
                final.unlink()
            os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    fsync_path(run_dir)  # the rename itself
    return final

