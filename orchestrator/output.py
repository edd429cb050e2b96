"""Writing results: PNGs, the sheet of views, tensors and metadata, all written atomically.

A sample's files are written into a hidden ``.NNNN.partial`` folder that is renamed to ``NNNN``
only once everything is there, so an interrupted run never leaves a half-written sample.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors.torch import save_file

from illusions.views import View


def to_pil(image: torch.Tensor) -> Image.Image:
    """(1, 3, H, W) or (3, H, W) float image in [-1, 1] -> 8-bit RGB PIL image."""
    if image.ndim == 4:
        image = image[0]
    pixels = (image.detach().float().cpu() / 2 + 0.5).mul(255).add(0.5).clamp(0, 255)
    return Image.fromarray(pixels.to(torch.uint8).permute(1, 2, 0).numpy())


def views_sheet(image: torch.Tensor, views: Sequence[View]) -> Image.Image:
    """The illusion as seen through each view, side by side: one (H, V*W) RGB image."""
    seen = [to_pil(view.display(image[0].float().cpu())) for view in views]
    width, height = seen[0].size
    sheet = Image.new("RGB", (width * len(seen), height))
    for k, picture in enumerate(seen):
        sheet.paste(picture, (k * width, 0))
    return sheet


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2)
        handle.write("\n")
    os.replace(tmp, path)


def sample_dir(run_dir: Path, seed: int) -> Path:
    return run_dir / f"{seed:04d}"


def write_sample(run_dir: Path, seed: int, views: Sequence[View],
                 images: dict[int, torch.Tensor], save_tensors: bool) -> Path:
    """Write one finished sample (``images``: size -> (1,3,S,S) float32) into ``run_dir/NNNN``."""
    final = sample_dir(run_dir, seed)
    partial = run_dir / f".{seed:04d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for size, image in sorted(images.items()):
            to_pil(image).save(partial / f"sample_{size}.png")
            views_sheet(image, views).save(partial / f"sample_{size}.views.png")
        if save_tensors:
            names = {0: "stage_1", 1: "stage_2"}
            tensors = {names[i]: image.float().contiguous()
                       for i, (_, image) in enumerate(sorted(images.items()))}
            save_file(tensors, str(partial / "tensors.safetensors"))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return final

