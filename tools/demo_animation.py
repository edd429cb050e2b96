"""Make the README's animation, ``docs/images/animation-demo.gif``, from a drawn picture.

No model is involved: the picture is a hand-drawn "visual anagram" (a 6 that reads 9 upside down)
so that the GIF shows how ``illusion animate`` moves between views, captions included, on a
picture whose meaning is plain.  Run ``python tools/demo_animation.py [OUT.gif]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from illusions.views import build_views
from orchestrator.animation import AnimateConfig, animation_frames, write_gif
from orchestrator.output import font

SIZE = 256
VIEWS = ["identity", "rotate_180", "jigsaw"]
PROMPTS = ["the number 6", "the number 9", "a jigsaw puzzle of the same picture"]


def picture(size: int = SIZE) -> torch.Tensor:
    """A big digit 6 on a two-tone tiled background: ``(3, size, size)`` in [-1, 1]."""
    image = Image.new("RGB", (size, size), (238, 214, 160))
    draw = ImageDraw.Draw(image)
    tile = size // 8
    for row in range(8):
        for col in range(8):
            if (row + col) % 2:
                draw.rectangle([col * tile, row * tile, (col + 1) * tile - 1, (row + 1) * tile - 1],
                               fill=(222, 190, 128))
    face = font(int(size * 0.8))
    left, top, right, bottom = draw.textbbox((0, 0), "6", font=face)
    draw.text(((size - (right - left)) / 2 - left, (size - (bottom - top)) / 2 - top), "6",
              fill=(40, 70, 160), font=face)
    pixels = np.asarray(image, dtype=np.float32).copy()
    return torch.from_numpy(pixels).permute(2, 0, 1) / 127.5 - 1


def main(out: Path) -> None:
    config = AnimateConfig(fps=20, hold=1.2, transition=0.7)
    views = build_views(VIEWS)  # the default view seed, 0, as `illusion generate` uses
    frames, repeats = animation_frames(picture(), views, PROMPTS, config.spec())
    write_gif(out, frames, repeats, config.fps)
    print(f"{out}: {len(frames)} frames, {out.stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("docs/images/animation-demo.gif"))
