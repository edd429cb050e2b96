"""The whole job: encode once, then per sample stage 1 -> stage 2 -> files, pipelined.

Runs against a :class:`CascadeClient`, whether the services were started locally or are remote.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

from anagram.v1 import anagram_pb2 as pb
from illusions.sampling import InvalidInputError, SamplingParams, resize_reference
from illusions.text import style_prompts
from illusions.views import MAX_VIEWS, VIEWS, View, ViewError, build_views, parse_view_args
from orchestrator.client import CascadeClient
from orchestrator.output import (
    publish_sample,
    sample_dir,
    sample_sizes,
    stage_sample,
    write_json_atomic,
)
from services.common import codec

logger = logging.getLogger(__name__)


MAX_SAMPLES = 1_000_000  # samples of one run


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
    overwrite: bool = False  # the run folder holds another run: replace it instead of refusing

    @property
    def run_dir(self) -> Path:
        return Path(self.save_dir) / self.run_name

    @property
    def seeds(self) -> list[int]:
        """Sample i of the run uses seed ``seed + i``."""
        return [self.seed + i for i in range(self.num_samples)]

    @property
    def run_name(self) -> str:
        """``--name``, else the views and each prompt's last word (``flip.rabbit.duck``), with
        anything but letters, digits, ``_``, ``.`` and ``-`` replaced by ``_`` so the name stays
        one folder (a prompt ending in "AC/DC" makes no sub-folder)."""
        if self.name:
            return self.name
        words = [_folder_safe(p.split()[-1]) if p.split() else "blank" for p in self.prompts]
        # At most 120 characters and 200 bytes: file systems take 255 bytes a name, and
        # letters of other scripts take 2-4 bytes each.
        name = ".".join([*self.views, *words])[:120]
        return name.encode()[:200].decode(errors="ignore")


MAX_NAME_BYTES = 255  # a folder name, on the usual file systems


def _folder_safe(word: str) -> str:
    return re.sub(r"[^\w.-]", "_", word)


def check_run_name(name: str) -> None:
    """``--name`` is one folder inside ``--save-dir``: no separators, not ``.`` or ``..``."""
    if not name:
        return
    if name in (".", "..") or any(sep in name for sep in ("/", "\\", "\0")):
        raise InvalidInputError(
            f"--name {name!r}: give one folder name, without '/' and not '.' or '..' (the run "
            "goes into --save-dir/NAME; choose where with --save-dir)"
        )
    if len(name.encode()) > MAX_NAME_BYTES:
        raise InvalidInputError(f"--name is {len(name.encode())} bytes long: give a name of at most "
                                f"{MAX_NAME_BYTES} bytes (one folder name)")


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
    if len(config.views) > MAX_VIEWS:
        raise InvalidInputError(f"{len(config.views)} views: use at most {MAX_VIEWS}")
    if not 1 <= config.num_samples <= MAX_SAMPLES:
        raise InvalidInputError(f"--num-samples {config.num_samples}: use 1 .. {MAX_SAMPLES:,} "
                                "(a larger job: several runs with other --seed values)")
    last_seed = 2**63 - config.num_samples  # sample i has seed --seed + i, at most 2**63-1
    if not 0 <= config.seed <= last_seed:
        raise InvalidInputError(f"--seed {config.seed} is out of range: use 0 .. {last_seed} "
                                f"with --num-samples {config.num_samples} (sample i has seed "
                                "--seed + i, at most 2**63-1)")
    if not -(2**63) <= config.view_seed < 2**63:
        raise InvalidInputError(f"--view-seed {config.view_seed} is out of range: use "
                                "-2**63 .. 2**63-1")
    if config.ref_image is not None and len(config.views) != 2:
        raise InvalidInputError(
            f"--ref-image needs exactly 2 views (the image supplies the first view's component, "
            f"the prompt the second), got {len(config.views)}: give two --views and --prompts")
    config.params.validate(as_flags=True)
    if config.ref_image is not None and not Path(config.ref_image).is_file():
        what = "is a folder" if Path(config.ref_image).is_dir() else "does not exist"
        raise InvalidInputError(f"--ref-image {config.ref_image} {what}: give an image file")
    views = build_views(config.views, config.view_args or None, view_seed=config.view_seed)
    check_run_name(config.name)
    for folder, flag in ((config.save_dir, "--save-dir"), (config.run_dir, "--name")):
        if folder.is_symlink() and not folder.exists():
            raise InvalidInputError(f"{flag}: {folder} is a link to nothing: give a folder for "
                                    "the results")
        if folder.exists() and not folder.is_dir():
            raise InvalidInputError(f"{flag}: {folder} is a file, not a folder: give a folder for "
                                    "the results")
    if not config.overwrite:
        check_run_dir(config, _metadata(config, style_prompts(config.prompts, config.style), None,
                                        []))
    return views


# ----------------------------------------------------------------------------- resuming a run

SAMPLE_DIR = re.compile(r"\d{4,}")
PARTIAL_DIR = re.compile(r"\.\d{4,}\.partial")


class RunMismatchError(InvalidInputError):
    """The run folder holds the results of a different command."""


def job_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What two commands must share to write into one run folder: the same prompts, views,
    sampling parameters, reference image and models give the same picture for the same seed.

    Seeds and the number of samples may differ (sample ``seed`` is the same picture either way),
    and so may where the models run.
    """
    models = meta.get("models")
    return {
        "prompts": meta.get("prompts"),
        "views": _canonical_views(meta.get("views")),
        "sampling": meta.get("sampling"),
        "ref_image": meta.get("ref_image_sha256", meta.get("ref_image")),
        "models": None if models is None else {
            name: {key: info.get(key) for key in ("model", "dtype", "quantize", "random_weights")}
            for name, info in models.items()
        },
    }


def _canonical_views(views: Any) -> Any:
    """Views as the sampler sees them: every argument by name, defaults filled in, so "8",
    "grid=8" and no argument at all (its default 8) are one jigsaw view."""
    try:
        return [{"name": view["name"], "seed": view.get("seed", 0),
                 "args": {**{arg.name: arg.default for arg in VIEWS[view["name"]].args},
                          **parse_view_args(view["name"], list(view.get("args") or []))}}
                for view in views]
    except (KeyError, TypeError, ViewError):  # not ours, or a view this version lacks
        return views


def finished_samples(run_dir: Path, save_tensors: bool) -> list[int]:
    """Seeds whose folder ``NNNN`` is complete: folders appear only once complete, but one made
    or emptied by hand is not, so a folder also needs both stages' images (and with
    ``save_tensors`` its tensors)."""
    if not run_dir.is_dir():
        return []
    return sorted(
        int(entry.name) for entry in run_dir.iterdir()
        if entry.is_dir() and SAMPLE_DIR.fullmatch(entry.name)
        and len(sample_sizes(entry)) >= 2
        and (not save_tensors or (entry / "tensors.safetensors").is_file())
    )


def read_metadata(run_dir: Path) -> dict[str, Any]:
    """A run folder's ``metadata.json``; OSError or ValueError when it cannot be read as a JSON
    object."""
    meta = json.loads((run_dir / "metadata.json").read_text())
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


def check_run_dir(config: GenerateConfig, meta: dict[str, Any]) -> None:
    """Refuse to mix two different runs in one folder.

    ``meta`` is this command's metadata; with ``models`` None (before the services answered) the
    models are not compared yet.
    """
    run_dir = config.run_dir
    path = run_dir / "metadata.json"
    fix = f"pick another --name, remove {run_dir}, or pass --overwrite to replace its samples"
    has_samples = run_dir.is_dir() and any(SAMPLE_DIR.fullmatch(p.name) for p in run_dir.iterdir())
    if not path.is_file():
        if has_samples:
            raise RunMismatchError(f"{run_dir} holds samples but no metadata.json, so they may be "
                                   f"from another command: {fix}")
        return
    if not has_samples:
        return  # a run that ended before its first sample (e.g. refused): nothing to mix with
    try:
        old = read_metadata(run_dir)
    except (OSError, ValueError) as exc:
        raise RunMismatchError(f"{path} cannot be read ({exc}): {fix}") from None
    mine, theirs = job_identity(meta), job_identity(old)
    if mine["models"] is None:
        mine.pop("models")
        theirs.pop("models")
    differ = [key for key in mine if mine[key] != theirs.get(key)]
    if differ:
        raise RunMismatchError(
            f"{run_dir} holds another run (it differs from this command in its "
            f"{', '.join(differ)}): "
            f"{fix}. Rerunning the same command resumes a run."
        )


def clear_run_dir(run_dir: Path) -> None:
    """``--overwrite``: remove the samples and metadata of an earlier run (nothing else; samples
    this run is staging stay). Called when the first new sample is ready, so a run that fails
    before it leaves the earlier one whole."""
    if not run_dir.is_dir():
        return
    for entry in run_dir.iterdir():
        if entry.is_dir() and SAMPLE_DIR.fullmatch(entry.name):
            shutil.rmtree(entry)
    (run_dir / "metadata.json").unlink(missing_ok=True)


class RunBusyError(InvalidInputError):
    """Another process is writing into the run folder."""


_held_lock = threading.Lock()
_held: dict[Path, tuple[int, int]] = {}  # run folders held: (holding thread, times held)


def _busy(run_dir: Path) -> RunBusyError:
    return RunBusyError(
        f"another `illusion generate` is writing into {run_dir}: wait for it to finish (running "
        "the same command then resumes it), or pick another --name"
    )


@contextmanager
def locked_run_dir(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` (created if need be): a second ``generate`` into the same folder, in
    another process or another thread, which would replace the first one's half-written
    samples, gets :class:`RunBusyError` instead. The lock (``flock`` on ``run_dir/.lock``) goes
    with the process, however it ends. The thread that holds the folder may hold it again
    (local mode holds it while its services start, and ``generate`` again inside). Folders
    this call created and left empty are removed again."""
    key, me = run_dir.resolve(), threading.get_ident()
    with _held_lock:
        holder, times = _held.get(key, (me, 0))
        if holder != me:
            raise _busy(run_dir)
        if times:
            _held[key] = (me, times + 1)
    if times:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] = (me, _held[key][1] - 1)
        return
    created = [d for d in (run_dir, *run_dir.parents) if not d.exists()]  # deepest first
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInputError(f"cannot make the run folder {run_dir} ({exc.strerror or exc}): "
                                "give --save-dir a folder you can write to") from None
    lock_path = run_dir / ".lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # The holder before us may have removed the folder it made (below) after we opened
            # its lock file: then ours is a lock on nothing.
            if os.fstat(handle.fileno()).st_ino != os.stat(lock_path).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            raise _busy(run_dir) from None
        with _held_lock:
            if key in _held:  # another thread got here first
                raise _busy(run_dir)
            _held[key] = (me, 1)
        try:
            yield
        finally:
            with _held_lock:
                del _held[key]
            if created and [p.name for p in run_dir.iterdir()] == [".lock"]:
                lock_path.unlink()  # while still held: no other process got in
                try:
                    for folder in created:  # with the folders above it that it made
                        folder.rmdir()
                except OSError:  # not empty: another process has just made its lock there
                    pass


def finished_run(config: GenerateConfig, models: dict[str, dict[str, Any]]) -> list[Path] | None:
    """The sample folders of ``config``'s run if every one of its samples is already in its
    folder, made by the same command with these ``models`` (``{"encoder": {"model": ...,
    "dtype": ..., "quantize": ..., "random_weights": ...}, "stage1": ..., "stage2": ...}``, as
    :func:`job_identity` compares them); else None. Local mode then starts no service at all."""
    try:
        old = read_metadata(config.run_dir)
    except (OSError, ValueError):
        return None
    mine = _metadata(config, style_prompts(config.prompts, config.style), None, [])
    mine["models"] = models
    if job_identity(mine) != job_identity(old):
        return None
    if not set(config.seeds) <= set(finished_samples(config.run_dir, config.save_tensors)):
        return None
    return [sample_dir(config.run_dir, seed) for seed in config.seeds]


def _rgb_picture(picture: Image.Image) -> Image.Image:
    """8-bit RGB, as the image is seen: turned by its EXIF orientation, and 16-bit grey (PNG;
    Pillow's "I;16", or "I" with values above 255) scaled to 8 bits first, which Pillow's own
    conversion clips at 255 (all but the darkest white)."""
    try:
        picture = ImageOps.exif_transpose(picture)
    except Exception as exc:  # noqa: BLE001 - a malformed EXIF block: the pixels as stored
        logger.warning("--ref-image: its EXIF orientation cannot be read (%s); using it as stored",
                       exc)
    if picture.mode.startswith("I;16") or picture.mode == "I":
        grey = np.asarray(picture, dtype=np.float64)
        if picture.mode != "I" or grey.max(initial=0) > 255:
            grey = grey / 257
        picture = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    return picture.convert("RGB")


def load_ref_image(path: Path) -> torch.Tensor:
    """An image file -> (3, H, W) float32 in [-1, 1]."""
    try:
        with Image.open(path) as picture:
            rgb = _rgb_picture(picture)
    except Image.DecompressionBombError as exc:
        raise InvalidInputError(f"--ref-image {path} is too large to open safely ({exc}): scale "
                                "it down; it is used at 64 and 256 pixels") from None
    except (OSError, ValueError) as exc:
        raise InvalidInputError(f"--ref-image {path} is not a readable image: {exc}") from None
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
    pixels = pixels.reshape(rgb.height, rgb.width, 3).permute(2, 0, 1)
    return pixels.float() / 127.5 - 1


def _sha256(path: Path | None) -> str | None:
    if path is None or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _metadata(config: GenerateConfig, prompts: list[str], models: dict[str, pb.ModelInfo] | None,
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
        "ref_image_sha256": _sha256(config.ref_image),
        "models": None if models is None else {
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


def generate(config: GenerateConfig, client: CascadeClient, progress: bool = True,
             stage1_workers: int = 1, stage2_workers: int = 1) -> list[Path]:
    """Run the job; returns the folders of this command's samples. Files appear only for finished
    samples. Up to ``stage1_workers`` stage-1 and ``stage2_workers`` stage-2 calls are in flight
    at once (stage 1 of later samples overlaps stage 2 of earlier ones).

    Resuming: if the run folder holds the same run (the same command, or one that differs only
    in ``--seed``/``--num-samples``), finished samples are kept and skipped and the rest are made;
    a different run there is an error unless ``config.overwrite``. ``metadata.json`` lists every
    finished sample in ``samples_done``.
    """
    views = check_config(config)
    ref_image = load_ref_image(config.ref_image) if config.ref_image else None
    with locked_run_dir(config.run_dir):
        return _generate(config, client, views, ref_image, progress, stage1_workers,
                         stage2_workers)


def _generate(config: GenerateConfig, client: CascadeClient, views: list[View],
              ref_image: torch.Tensor | None, progress: bool, stage1_workers: int,
              stage2_workers: int) -> list[Path]:
    prompts = style_prompts(config.prompts, config.style)
    models = client.describe()
    run_dir = config.run_dir
    # --overwrite: another run's samples and metadata go when the first new sample is ready
    # (publish below), so a run that fails before it leaves the earlier one whole. The same run
    # resumes, with or without it: its finished samples are this command's pictures already.
    to_clear = False
    try:
        check_run_dir(config, _metadata(config, prompts, models, []))
    except RunMismatchError:
        if not config.overwrite:
            raise
        to_clear = True
    run_dir.mkdir(parents=True, exist_ok=True)
    done = [] if to_clear else finished_samples(run_dir, config.save_tensors)
    seeds = config.seeds
    finished = set(done)
    todo = [seed for seed in seeds if seed not in finished]
    if len(todo) < len(seeds):
        logger.info("resuming %s: %d of %d samples already done", run_dir,
                    len(seeds) - len(todo), len(seeds))
    if not to_clear:
        write_json_atomic(run_dir / "metadata.json", _metadata(config, prompts, models, done))
    if not todo:
        return [sample_dir(run_dir, seed) for seed in seeds]

    # Embeddings once per run, reused by every sample.
    prompt_embeds, negative = client.encode(prompts)
    embeds = codec.encode(prompt_embeds)
    negative_embeds = codec.encode(negative)
    specs = [
        pb.ViewSpec(name=name, args=list(config.view_args[k]) if config.view_args else [],
                    seed=config.view_seed)
        for k, name in enumerate(config.views)
    ]
    # The reference at each stage's size, as the stage would resize it (the same function):
    # a camera photo would not fit in a message, and the pictures stay the same.
    ref_messages = {stage: pb.Tensor() for stage in ("stage1", "stage2")}
    if ref_image is not None:
        for stage in ref_messages:
            info = models.get(stage)
            if info is not None and info.sample_size:
                ref_messages[stage] = codec.encode(resize_reference(ref_image, info.sample_size))
            else:  # a service that does not say its size: it resizes the image itself
                ref_messages[stage] = codec.encode(ref_image)
    # Samples' files are staged in parallel (outside the lock: PNG encoding releases the GIL);
    # one at a time, under the lock, a staged sample is moved into place and recorded in `done`
    # and metadata.json. `writing` counts samples being staged, so that generate returns only
    # once none is left half-written.
    lock = threading.Condition()
    writing = 0

    def params_for(seed: int) -> pb.SamplingParams:
        return pb.SamplingParams(
            num_inference_steps=config.params.num_inference_steps,
            guidance_scale=config.params.guidance_scale,
            reduction=config.params.reduction,
            noise_level=config.params.noise_level,
            seed=seed,
        )

    stage1_slots = threading.Semaphore(max(1, stage1_workers))
    stage2_slots = threading.Semaphore(max(1, stage2_workers))
    failed = threading.Event()  # no new call starts
    closed = threading.Event()  # no new sample is written

    def one_sample(seed: int) -> None:
        """Stage 1, stage 2 and the files of one sample (on a worker thread)."""
        nonlocal done, writing, to_clear
        with stage1_slots:
            if failed.is_set():
                return
            started = time.perf_counter()
            bar, update = _bar(f"sample {seed:04d} stage 1", progress)
            with bar:
                image64, state = client.stage1(
                    pb.Stage1Request(prompt_embeds=embeds, negative_prompt_embeds=negative_embeds,
                                     views=specs, params=params_for(seed),
                                     ref_image=ref_messages["stage1"]),
                    update,
                )
        with stage2_slots:
            if failed.is_set():
                return
            bar, update = _bar(f"sample {seed:04d} stage 2", progress)
            with bar:
                image256, _ = client.stage2(
                    pb.Stage2Request(image=codec.encode(image64), prompt_embeds=embeds,
                                     negative_prompt_embeds=negative_embeds, views=specs,
                                     params=params_for(seed), rng_state=codec.encode(state),
                                     ref_image=ref_messages["stage2"]),
                    update,
                )
        images = {image64.shape[-1]: image64, image256.shape[-1]: image256}
        with lock:
            if closed.is_set():  # generate is returning (an error elsewhere, or Ctrl-C)
                return
            writing += 1
        try:
            partial = stage_sample(run_dir, seed, views, images, config.save_tensors, prompts)
            with lock:
                if to_clear:
                    clear_run_dir(run_dir)
                    to_clear = False
                publish_sample(partial, run_dir, seed)
                done = sorted({*done, seed})
                write_json_atomic(run_dir / "metadata.json",
                                  _metadata(config, prompts, models, done))
        finally:
            with lock:
                writing -= 1
                lock.notify_all()
        logger.info("sample %04d done in %.1f s -> %s", seed, time.perf_counter() - started,
                    sample_dir(run_dir, seed))

    # Pipelined: up to `stage1_workers` stage-1 calls and `stage2_workers` stage-2 calls are in
    # flight at once, so stage 1 of the next samples runs while stage 2 works on earlier ones; one
    # stage-2 call per replica keeps them all busy, and calls sent together to a service started
    # with --max-concurrent share its UNet calls. Each sample depends only on its seed, so the
    # order of the calls changes no picture. Samples start in seed order.
    workers = max(1, stage1_workers) + max(1, stage2_workers)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sample")
    try:
        pending = {pool.submit(one_sample, seed) for seed in todo}
        while pending:
            # Timed, so that a Ctrl-C is acted on within 0.5 s however the platform's blocking
            # waits treat signals. (Whether an untimed wait ever missed one is not established:
            # the hang that led here was SIGINT ignored by a job started in the background.)
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for future in finished:
                try:
                    future.result()
                except BaseException:
                    failed.set()  # a failed sample stops the run: no new call starts
                    raise
    finally:
        # On an error or Ctrl-C: samples being written are finished, samples not started are
        # dropped, calls in flight end with the client's channels and their samples are not written.
        failed.set()
        with lock:
            closed.set()
            lock.wait_for(lambda: writing == 0)
        pool.shutdown(wait=False, cancel_futures=True)
    return [sample_dir(run_dir, seed) for seed in seeds]
