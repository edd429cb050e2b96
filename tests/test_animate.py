"""Animations (illusions.animate, orchestrator.animation), labelled sheets and `illusion animate`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from illusions import animate
from illusions.animate import (
    AnimationSpec,
    canvas_size,
    frame,
    margin,
    place,
    render,
    timeline,
    zoom_scale,
)
from illusions.sampling import SamplingParams
from illusions.views import VIEWS, View, ViewError, build_view, build_views
from orchestrator import animation, cli
from orchestrator.animation import AnimateConfig, animation_frames, gif_timing, write_gif
from orchestrator.output import to_pil, views_sheet, wrap_text, write_json_atomic, write_sample
from orchestrator.pipeline import GenerateConfig, _metadata, check_config

ZOOMING = ["low_pass", "triple_low_pass", "triple_medium_pass"]
STATIC = ["identity", "high_pass", "triple_high_pass", "color", "motion_res", "scale"]
MOVING = [name for name in VIEWS if name not in STATIC]
_VIEWS: dict[str, View] = {}


def view(name: str) -> View:
    if name not in _VIEWS:
        _VIEWS[name] = build_view(name, seed=3)
    return _VIEWS[name]


def noise(size: int) -> torch.Tensor:
    """(3, S, S) random image in [-1, 1]."""
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(size)) * 2 - 1


def blocks(size: int, cells: int = 8) -> torch.Tensor:
    """(3, S, S) image of cells x cells coloured squares, values exactly representable in 8 bits."""
    levels = torch.randint(0, 6, (3, cells, cells), generator=torch.Generator().manual_seed(7)) * 51
    image = levels.repeat_interleave(size // cells, 1).repeat_interleave(size // cells, 2)
    return image.float() / 127.5 - 1


def centre(canvas: torch.Tensor, size: int) -> torch.Tensor:
    m = margin(size)
    return canvas[:, m : m + size, m : m + size]


def ring_is_background(canvas: torch.Tensor, size: int) -> bool:
    inner = torch.zeros(canvas.shape[-2:], dtype=torch.bool)
    m = margin(size)
    inner[m : m + size, m : m + size] = True
    return bool((canvas[:, ~inner] == animate.BACKGROUND).all())


# ------------------------------------------------------------------------------------------
# Frames of every view


def test_every_view_is_animated():
    for name in VIEWS:
        assert animate.is_animated(view(name)), name
    assert [n for n in VIEWS if animate.is_static(view(n))] == STATIC


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("name", list(VIEWS))
def test_first_frame_is_the_image_last_frame_is_the_view(name: str, size: int):
    v, image = view(name), noise(size)
    first, last = frame(v, image, 0.0), frame(v, image, 1.0)
    side = canvas_size(size)
    assert first.shape == last.shape == (3, side, side)
    assert torch.equal(first, place(image))
    assert torch.equal(centre(first, size), image) and ring_is_background(first, size)
    if name in ZOOMING:
        # The image shrinks to zoom_scale of its side, centred: a hybrid seen from afar.
        small = round(size * zoom_scale(v))
        assert small < size
        expected = F.interpolate(image[None], size=(small, small), mode="bilinear",
                                 antialias=True, align_corners=False)[0]
        assert torch.allclose(last, place(expected, size), atol=1e-6)
    else:
        seen = v.display(image)
        assert (centre(last, size) - seen).abs().max() <= 1e-5
        assert ring_is_background(last, size)
    middle = frame(v, image, 0.4)
    if name in STATIC:
        assert torch.equal(middle, first)
    else:
        # Half-way is neither end: the picture really moves.
        assert (middle - first).abs().mean() > 1e-2 and (middle - last).abs().mean() > 1e-2


def test_last_frame_at_1024():
    v, image = view("jigsaw"), noise(1024)
    last = frame(v, image, 1.0)
    assert last.shape == (3, 1536, 1536)
    assert (centre(last, 1024) - v.display(image)).abs().max() <= 1e-5
    assert ring_is_background(last, 1024)


@pytest.mark.parametrize("name", ["jigsaw", "square_hinge", "rotate_cw", "inner_circle"])
def test_turning_pieces_keep_their_pixels(name: str):
    # Mid-way, turned pieces are resampled, but they stay made of the image's own colours.
    image = blocks(64)
    moving = frame(view(name), image, 0.5)
    painted = moving[:, (moving != animate.BACKGROUND).any(0)]
    assert painted.shape[1] > 0.5 * 64 * 64
    assert painted.min() >= image.min() - 1e-6 and painted.max() <= image.max() + 1e-6


@pytest.mark.parametrize("name", ["patch_permute", "pixel_permute"])
def test_travelling_patches_are_exact_copies(name: str):
    # Patches move by whole pixels: every painted canvas pixel is some image pixel, unchanged.
    image = noise(64)
    moving = frame(view(name), image, 0.5)
    painted = moving.reshape(3, -1).T[(moving != animate.BACKGROUND).any(0).reshape(-1)]
    originals = {tuple(p) for p in image.reshape(3, -1).T.tolist()}
    assert len(painted) > 1000 and all(tuple(p) in originals for p in painted.tolist())


def test_rotation_turns_the_right_way():
    # A red dot at the top middle: 45 degrees clockwise moves it to the right, counter-clockwise
    # to the left (the canvas background is white, the rest of the image black).
    size = 64
    image = torch.full((3, size, size), -1.0)
    image[0, 2:6, 30:34] = 1.0
    middle = (canvas_size(size) - 1) / 2
    for name, right in (("rotate_cw", True), ("rotate_ccw", False)):
        mid = frame(view(name), image, 0.5)
        ys, xs = torch.nonzero((mid[0] > 0.5) & (mid[1] < 0), as_tuple=True)
        assert len(xs) > 4 and (ys.float().mean() < middle)
        assert (xs.float().mean() > middle + 10) == right and (xs.float().mean() < middle - 10) != right


def test_zoom_shrinks_steadily():
    v, image = view("low_pass"), noise(256)
    widths = []
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        painted = (frame(v, image, t) != animate.BACKGROUND).any(0).any(0)
        widths.append(int(painted.sum()))
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 5
    assert widths[-1] == 256 * zoom_scale(v) == 64


def test_frame_rejects_bad_input():
    with pytest.raises(ViewError, match=r"\(3, S, S\)"):
        frame(view("flip"), torch.zeros(1, 3, 64, 64), 0.5)
    with pytest.raises(ViewError, match="square"):
        frame(view("flip"), torch.zeros(3, 64, 32), 0.5)


# ------------------------------------------------------------------------------------------
# Timeline


def test_timeline_cycles_through_the_views():
    spec = AnimationSpec(hold=7, transition=4)
    views = build_views(["identity", "flip", "rotate_cw"])
    steps = timeline(views, spec)
    # identity (hold) -> flip in (4) -> flip (hold) -> flip out (4), identity, rotate in (4)
    # -> rotate (hold) -> rotate out (4) -> back to the start
    assert len(steps) == 3 + 4 + (4 + 1 + 4) + 4
    holds = [s for s in steps if s.repeat > 1]
    assert [(s.view, s.t, s.repeat) for s in holds] == [(0, 1.0, 7), (1, 1.0, 7), (2, 1.0, 7)]
    assert steps[0] == holds[0]
    assert sum(s.repeat for s in steps) == 3 * 7 + 17
    middle = steps[1 + 4 + 1 + 4]  # the identity between flip going back and rotate_cw coming
    assert (middle.view, middle.t, middle.source, middle.target) == (1, 0.0, 1, 2)
    flip_in = [s.t for s in steps[1:5]]
    assert flip_in == sorted(flip_in) and 0 < flip_in[0] and flip_in[-1] < 1


def test_timeline_skips_still_legs_and_handles_one_view():
    spec = AnimationSpec(hold=5, transition=3)
    hybrid = timeline(build_views(["low_pass", "high_pass"]), spec)
    # low_pass (small) zooms back in over 3 frames; high_pass stands still at full size.
    assert [s.view for s in hybrid] == [0, 0, 0, 0, 1, 0, 0, 0]
    assert len(timeline(build_views(["flip"]), spec)) == 1
    # Triple hybrid: low (1/4) zooms straight to medium (1/2), medium to high (full size, still),
    # high back to low: one leg of 3 frames each.
    triple = build_views(["triple_low_pass", "triple_medium_pass", "triple_high_pass"])
    steps = timeline(triple, spec)
    assert len(steps) == 3 + 3 * 3
    image = noise(256)
    widths = [int((render(triple, image, s) != animate.BACKGROUND).any(0).any(0).sum())
              for s in steps[:5]]
    assert widths[0] == 64 and widths[4] == 128 and widths == sorted(widths)
    assert all(64 < w < 128 for w in widths[1:4])
    with pytest.raises(ValueError):
        AnimationSpec(hold=0)


# ------------------------------------------------------------------------------------------
# Captioned frames and files


def test_animation_frames_start_with_the_image_and_carry_captions():
    image = blocks(64)
    views = build_views(["identity", "flip"])
    frames, repeats = animation_frames(image, views, ["a waterfall", "a deer"], AnimationSpec(4, 2))
    assert repeats == [4, 1, 1, 4, 1, 1]
    width = canvas_size(64) * 4  # 96 enlarged 4x to reach 384
    assert {f.size for f in frames} == {frames[0].size} and frames[0].size[0] == width
    first = np.asarray(frames[0])
    m = margin(64) * 4
    inside = first[m : m + 256, m : m + 256]
    expected = np.asarray(to_pil(image).resize((256, 256), Image.Resampling.NEAREST))
    assert np.array_equal(inside, expected)
    band = first[width:]
    assert band.shape[0] >= 20 and (band < 128).any()  # dark caption text under the canvas
    # The held flip frame shows the flipped image and a different caption.
    flipped = np.asarray(frames[3])
    assert np.array_equal(flipped[m : m + 256, m : m + 256], expected[::-1])
    assert not np.array_equal(flipped[width:], band)


@pytest.fixture(scope="module")
def frames_and_repeats():
    views = build_views(["identity", "rotate_cw"])
    return animation_frames(blocks(64), views, ["a duck", "a rabbit"], AnimationSpec(6, 3))


def test_gif_opens_with_the_expected_frames(tmp_path: Path, frames_and_repeats):
    frames, repeats = frames_and_repeats
    path = write_gif(tmp_path / "a.gif", frames, repeats, fps=20)
    with Image.open(path) as gif:
        assert gif.n_frames == len(frames) == 2 + 2 * 3
        durations = []
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            if i == 0:
                first = np.asarray(gif.convert("RGB")).astype(int)
        assert gif.info.get("loop") == 0
    assert durations == [50 * r for r in repeats]
    assert np.abs(first - np.asarray(frames[0]).astype(int)).mean() < 2
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


@pytest.mark.parametrize("fps", [20, 30, 60, 100])
def test_gif_delays_keep_the_loop_length_and_no_frame_is_under_20_ms(tmp_path, fps):
    """GIF delays are hundredths of a second, and browsers slow a delay under 2 of them to 10
    (at --fps 60 every transition frame got 10 ms: ten times too slow). The loop keeps its length
    to the hundredth, every frame shown gets at least 20 ms, and only frames too short for that
    are left out (none up to 50 fps)."""
    repeats = [12, 1, 1, 1, 1, 1, 1, 1, 12, 1, 1, 1, 1, 1, 1, 1]
    frames = [Image.new("RGB", (8, 8), (16 * i, 0, 0)) for i in range(len(repeats))]
    path = write_gif(tmp_path / "a.gif", frames, repeats, fps=fps)
    with Image.open(path) as gif:
        delays = []
        for i in range(gif.n_frames):
            gif.seek(i)
            delays.append(gif.info["duration"])
    assert sum(delays) == 10 * round(100 * sum(repeats) / fps)
    assert min(delays) >= 20 and all(d % 10 == 0 for d in delays)
    if fps <= 50:
        assert len(delays) == len(frames)
    assert len(delays) >= len(frames) // 2  # at most every other frame of a transition left out
    # Every pose (a frame held 12 frames' time) is shown, with its whole time at least.
    keep, timing = gif_timing(repeats, fps)
    assert 0 in keep and 8 in keep and timing == delays
    assert timing[keep.index(8)] >= 10 * round(100 * 12 / fps) - 10


def test_mp4_opens_with_the_expected_frames(tmp_path: Path, frames_and_repeats):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio
    import imageio_ffmpeg

    frames, repeats = frames_and_repeats
    path = animation.write_mp4(tmp_path / "a.mp4", frames, repeats, fps=20)
    count, seconds = imageio_ffmpeg.count_frames_and_secs(str(path))
    assert count == sum(repeats) == 2 * 6 + 2 * 3
    assert seconds == pytest.approx(count / 20, abs=0.06)
    with imageio.get_reader(path) as reader:
        first = reader.get_data(0).astype(int)
    assert first.shape == np.asarray(frames[0]).shape
    assert np.abs(first - np.asarray(frames[0]).astype(int)).mean() < 6  # lossy H.264


# ------------------------------------------------------------------------------------------
# Labelled sheets


def test_wrap_text_fits_the_width():
    face = animation.font(14)
    text = "an oil painting of a waterfall in the mountains at dawn"
    lines = wrap_text(text, face, 100)
    assert len(lines) > 2 and " ".join(lines) == text
    assert all(face.getlength(line) <= 100 for line in lines)
    assert all(face.getlength(line) <= 40 for line in wrap_text("supercalifragilistic", face, 40))
    assert wrap_text("", face, 100) == []


@pytest.mark.parametrize("size", [64, 256])
def test_sheet_has_labels_and_every_view(size: int):
    image = blocks(size)[None]
    views = build_views(["identity", "flip", "jigsaw"])
    short = views_sheet(image, views, ["a", "b", "c"])
    sheet = views_sheet(image, views, ["a waterfall", "a deer seen from very far away in a forest",
                                      "c"])
    k = 4 if size == 64 else 1
    tile = size * k
    band = sheet.height - tile
    assert sheet.width == 3 * tile and band > 0
    assert band > short.height - tile  # the long prompt wraps onto more lines
    pixels = np.asarray(sheet)
    for i, v in enumerate(views):
        label = pixels[:band, i * tile : (i + 1) * tile]
        assert (label < 128).any()  # text in every column's label
        picture = pixels[band:, i * tile : (i + 1) * tile][::k, ::k]
        assert np.array_equal(picture, np.asarray(to_pil(v.display(image[0]))))
    with pytest.raises(ValueError, match="one per view"):
        views_sheet(image, views, ["a"])


# ------------------------------------------------------------------------------------------
# `illusion animate` and `illusion generate --animate`


def make_result(save_dir: Path, views=("identity", "rotate_cw"), view_args=(),
                prompts=("a duck", "a rabbit"), view_seed: int = 0, samples=(0,)) -> Path:
    """A run folder as `illusion generate` writes it, with blocks instead of a model's images."""
    config = GenerateConfig(prompts=tuple(prompts), views=tuple(views), view_args=tuple(view_args),
                            view_seed=view_seed, name="run", save_dir=save_dir,
                            num_samples=len(samples))
    built = check_config(config)
    for seed in samples:
        images = {64: blocks(64)[None], 256: blocks(256)[None]}
        write_sample(config.run_dir, seed, built, images, save_tensors=False, prompts=prompts)
    write_json_atomic(config.run_dir / "metadata.json",
                      _metadata(config, list(prompts), {}, list(samples)))
    return config.run_dir


def test_views_rebuilt_from_metadata_match(tmp_path: Path):
    run = make_result(tmp_path, views=("identity", "patch_permute", "jigsaw"),
                      view_args=((), ("4",), ("grid=2",)), prompts=("a", "b", "c"), view_seed=5)
    meta = animation.load_metadata(run)
    rebuilt = animation.views_from_metadata(meta)
    expected = build_views(["identity", "patch_permute", "jigsaw"], [[], ["4"], ["grid=2"]],
                           view_seed=5)
    image = noise(64)
    for a, b in zip(rebuilt, expected, strict=True):
        assert torch.equal(a.view(image), b.view(image))
    assert rebuilt[1].num_patches == 4 and rebuilt[2].grid == 2


def test_cli_animate_writes_gif_and_mp4(tmp_path: Path, capsys):
    run = make_result(tmp_path, samples=(0, 1))
    code = cli.main(["animate", str(run), "--fps", "10", "--hold", "0.5", "--transition", "0.3"])
    assert code == 0
    printed = capsys.readouterr().out.split()
    gifs = [run / "0000" / "sample_256.gif", run / "0001" / "sample_256.gif"]
    for gif in gifs:
        assert str(gif) in printed
        with Image.open(gif) as picture:
            # hold 5 periods, transition 3 frames: 2 poses + 2 legs of 3
            assert picture.n_frames == 2 + 2 * 3
            assert picture.size[0] == canvas_size(256)
    if animation.video_available():
        import imageio_ffmpeg

        mp4 = run / "0000" / "sample_256.mp4"
        assert str(mp4) in printed
        assert imageio_ffmpeg.count_frames_and_secs(str(mp4))[0] == 2 * 5 + 2 * 3

    # One sample folder, the 64px image, GIF only.
    code = cli.main(["animate", str(run / "0001"), "--size", "64", "--video", "none",
                     "--hold", "0.1", "--transition", "0.1"])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(run / "0001" / "sample_64.gif")]
    assert not (run / "0001" / "sample_64.mp4").exists()


@pytest.mark.parametrize("make, needle", [
    (lambda tmp: tmp, "is not a result: no metadata.json"),
    (lambda tmp: tmp / "missing", "is not a folder"),
    (lambda tmp: (tmp / "metadata.json").write_text("{}") and tmp, "has no finished samples"),
])
def test_cli_animate_says_what_is_wrong(tmp_path: Path, capsys, make, needle: str):
    assert cli.main(["animate", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1


def test_cli_animate_bad_size_and_metadata(tmp_path: Path, capsys):
    run = make_result(tmp_path)
    assert cli.main(["animate", str(run), "--size", "128"]) == 2
    assert "--size can be 64, 256" in capsys.readouterr().err
    meta = json.loads((run / "metadata.json").read_text())
    meta["prompts"] = meta["prompts"][:1]
    (run / "metadata.json").write_text(json.dumps(meta))
    assert cli.main(["animate", str(run)]) == 2
    assert "one prompt per view" in capsys.readouterr().err


def test_cli_animate_skips_a_sample_folder_without_images(tmp_path: Path, capsys, caplog):
    run = make_result(tmp_path, samples=(0, 2))
    (run / "0001").mkdir()  # made (or emptied) by hand
    code = cli.main(["animate", str(run), "--video", "none", "--hold", "0.1",
                     "--transition", "0.1"])
    assert code == 0
    assert capsys.readouterr().out.split() == [str(run / "0000" / "sample_256.gif"),
                                               str(run / "0002" / "sample_256.gif")]
    assert "0001 has no sample_S.png image: skipped" in caplog.text


@pytest.mark.parametrize(("flag", "value"), [("--hold", "inf"), ("--transition", "nan"),
                                             ("--transition", "11")])
def test_cli_animate_refuses_endless_timings(tmp_path: Path, capsys, flag: str, value: str):
    run = make_result(tmp_path)
    assert cli.main(["animate", str(run), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {flag} ") and "at most 10" in err and err.count("\n") == 1


def test_cli_animate_refuses_too_many_frames_before_drawing_any(tmp_path: Path, capsys,
                                                                 monkeypatch):
    run = make_result(tmp_path, views=("identity", "rotate_cw", "flip", "rotate_180"),
                      prompts=("a", "b", "c", "d"))
    drawn: list[int] = []
    monkeypatch.setattr(animation.animate, "render", lambda *a: drawn.append(1))
    # 4 views: 4 poses and 2 * 10 s * 100 fps + 1 frames a change of view (identity: one leg)
    assert cli.main(["animate", str(run), "--transition", "10", "--fps", "100"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --transition 10 at --fps 100 makes ") and err.count("\n") == 1
    assert "frames for 4 views, more than 1000" in err and "lower --transition or --fps" in err
    assert not drawn and not list(run.glob("*/*.gif"))
    # a long hold is one frame: allowed
    monkeypatch.undo()
    assert cli.main(["animate", str(run), "--hold", "10", "--transition", "0.1", "--fps", "20",
                     "--video", "none"]) == 0


def test_ctrl_c_in_animate_says_what_is_kept(tmp_path: Path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(animation, "animate_result", interrupted)
    assert cli.main(["animate", str(make_result(tmp_path))]) == 130
    assert capsys.readouterr().err == "error: interrupted; finished animations are kept\n"


class FakeClient:
    """Stands in for the three services: fixed images, the real pipeline around them."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> FakeClient:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def check(self) -> None:
        pass

    def describe(self) -> dict:
        return {}

    def encode(self, prompts):
        return torch.zeros(len(prompts), 77, 8), torch.zeros(1, 77, 8)

    def stage1(self, request, progress):
        return blocks(64)[None], torch.zeros(8, dtype=torch.uint8)

    def stage2(self, request, progress):
        return blocks(256)[None], None


def test_cli_generate_animate(tmp_path: Path, capsys, monkeypatch):
    import orchestrator.client

    monkeypatch.setattr(orchestrator.client, "CascadeClient", FakeClient)
    code = cli.main(["generate", "--prompts", "a duck", "a rabbit", "--views", "identity", "flip",
                     "--encoder", "a:1", "--stage1", "b:1", "--stage2", "c:1", "--no-progress",
                     "--save-dir", str(tmp_path), "--name", "run", "--animate"])
    assert code == 0, capsys.readouterr().err
    sample = tmp_path / "run" / "0000"
    printed = capsys.readouterr().out.split()
    assert printed[0] == str(sample) and str(sample / "sample_256.gif") in printed
    spec = AnimateConfig().spec()
    with Image.open(sample / "sample_256.gif") as gif:
        assert gif.n_frames == 2 + 2 * spec.transition
    meta = json.loads((tmp_path / "run" / "metadata.json").read_text())
    assert meta["sampling"]["num_inference_steps"] == SamplingParams().num_inference_steps
