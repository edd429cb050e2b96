"""Loading the three models of the cascade: the T5 text encoder, the IF-I UNet and the IF-II UNet.

Every loader takes a Hub id (``DeepFloyd/IF-I-M-v1.0``) or a local directory in Hub layout
(``unet/``, ``scheduler/``, ``text_encoder/``, ``tokenizer/``, ``image_noising_scheduler/``), an
explicit dtype and device, and optionally 8-bit / 4-bit weights: ``8bit``/``4bit`` with
bitsandbytes (its Linear layers, CUDA only) or ``int8`` with optimum-quanto (weight-only,
Linear *and* convolution layers, any device; most of a UNet's weights are convolutions). With
``random_weights=True`` only the configs are read and the weights are random: full-size models
for benchmarks, built from a directory of configs.

Whatever goes wrong while loading becomes one :class:`ModelLoadError` whose message is a sentence a
user can act on (log in, accept a license, fix a path), never a traceback from the Hub client.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

logger = logging.getLogger(__name__)
# diffusers and transformers import bitsandbytes whenever it is installed; on CPUs with AVX-512
# BF16 it then warns at every start that an optional faster CPU 4-bit kernel needs `pip install
# kernels`. Without it bitsandbytes uses its own CPU code, and nothing here quantizes unless asked:
# the line only alarms, so it is dropped.
logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "kernels-community" not in record.getMessage())

DEFAULT_STAGE1_MODEL = "DeepFloyd/IF-I-M-v1.0"
DEFAULT_STAGE2_MODEL = "DeepFloyd/IF-II-M-v1.0"
# The T5 encoder and its tokenizer live in the stage-1 repo's text_encoder/ and tokenizer/.
DEFAULT_ENCODER_MODEL = DEFAULT_STAGE1_MODEL

Quantize = Literal["none", "8bit", "4bit", "int8"]
QUANTIZE_CHOICES: tuple[str, ...] = ("none", "8bit", "4bit", "int8")
BNB_CHOICES = ("8bit", "4bit")  # bitsandbytes: Linear layers, quantized while loading, CUDA only
# optimum-quanto: Linear and Conv2d weights, any device. (Its int4 weights crashed on an H200 with
# an illegal memory access, docs/benchmarks.md: not offered.)
QUANTO_CHOICES = ("int8",)
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says why and what to do about it."""


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float16"`` / ``"fp16"`` / ... -> ``torch.float16``; raises ValueError naming the choices."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown dtype {name!r}: use one of float32, float16, bfloat16"
        ) from None


def parse_device(name: str) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"`` -> torch.device, checking that the device exists.
    ``"cuda"`` is the first GPU, ``cuda:0``: a device with its index (``torch.cuda.set_device``
    refuses one without)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but this machine has no CUDA GPU: use cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {name!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} GPU(s): use cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
            )
        if device.index is None:
            device = torch.device("cuda", 0)
    return device


# --------------------------------------------------------------------------------------------
# Errors from the Hub, as sentences


def _hub_url(source: str) -> str:
    return f"https://huggingface.co/{source}"


def _exception_chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]


def explain_load_error(source: str, what: str, exc: BaseException) -> ModelLoadError:
    """Turn whatever the Hub client / from_pretrained raised into one actionable sentence."""
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    chain = list(_exception_chain(exc))
    text = " ".join(str(e) for e in chain)
    if any(isinstance(e, GatedRepoError) for e in chain) or "gated repo" in text.lower():
        return ModelLoadError(
            f"{source} is a gated model: accept its license at {_hub_url(source)} with your "
            "Hugging Face account, then log in here with `hf auth login` (or set HF_TOKEN)."
        )
    if any(isinstance(e, RepositoryNotFoundError) for e in chain):
        return ModelLoadError(
            f"{source} is not a local directory and no model of that name is on the Hugging Face "
            "Hub (or it is private and you are not logged in): check the name, or pass a local "
            "directory in Hub layout."
        )
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}
    if any(isinstance(e, LocalEntryNotFoundError) for e in chain) or (
        offline and "offline" in text.lower()
    ):
        return ModelLoadError(
            f"{source} ({what}) is not in the local Hugging Face cache and the Hub cannot be "
            "reached (HF_HUB_OFFLINE is set or there is no network): download it once with network "
            "access, or pass a local directory in Hub layout."
        )
    return ModelLoadError(f"could not load the {what} from {source}: {exc}")


def _is_local(source: str) -> bool:
    return Path(source).expanduser().exists()


def _check_source(source: str) -> None:
    """A path-like source that does not exist is a typo, not a Hub id: say so plainly."""
    looks_like_path = source.startswith((".", "/", "~")) or source.count("/") > 1
    if looks_like_path and not _is_local(source):
        raise ModelLoadError(
            f"model directory {source} does not exist: pass an existing directory in Hub layout "
            "(unet/, scheduler/, ...) or a Hub id such as DeepFloyd/IF-I-M-v1.0."
        )


def _choose_variant(source: str, subfolder: str, dtype: torch.dtype) -> str | None:
    """Use the ``fp16`` weight files when they exist and the model runs in half precision.

    For float32 the full-precision files are preferred (they are what the fp16 files were made
    from); a local directory that only has fp16 files still loads, upcast.
    """
    if not _is_local(source):
        return "fp16" if dtype in (torch.float16, torch.bfloat16) else None
    folder = Path(source).expanduser() / subfolder
    has_fp16 = any(".fp16." in p.name for p in folder.glob("*")) if folder.is_dir() else False
    has_full = (
        any(p.suffix in {".safetensors", ".bin"} and ".fp16." not in p.name for p in folder.glob("*"))
        if folder.is_dir()
        else False
    )
    if has_fp16 and (dtype != torch.float32 or not has_full):
        return "fp16"
    return None


def _from_pretrained(cls: Any, source: str, subfolder: str, dtype: torch.dtype, what: str,
                     **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with variant selection, and errors turned into sentences."""
    _check_source(source)
    if _is_local(source) and not (Path(source).expanduser() / subfolder).is_dir():
        raise ModelLoadError(
            f"{source} has no {subfolder}/ folder for the {what}: pass a model directory in Hub "
            f"layout (with {subfolder}/), e.g. a download of DeepFloyd/IF-I-M-v1.0"
        )
    variant = _choose_variant(source, subfolder, dtype)
    try:
        try:
            return cls.from_pretrained(
                source, subfolder=subfolder, variant=variant, torch_dtype=dtype, **kwargs
            )
        except (OSError, ValueError) as exc:
            # A Hub repo without fp16 files: fall back to the full-precision ones.
            if variant is None or "variant" not in str(exc).lower() and "fp16" not in str(exc):
                raise
            logger.info("%s has no fp16 variant of %s; loading the default weights", source, what)
            return cls.from_pretrained(source, subfolder=subfolder, torch_dtype=dtype, **kwargs)
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - every loader failure becomes one sentence
        raise explain_load_error(source, what, exc) from exc


def _bnb_config(library: Literal["diffusers", "transformers"], quantize: str,
                dtype: torch.dtype) -> Any | None:
    _check_quantize(quantize)
    if quantize not in BNB_CHOICES:
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            f"--quantize {quantize} needs bitsandbytes: pip install 'illusion-relay[quantization]'"
        ) from None
    if library == "diffusers":
        from diffusers import BitsAndBytesConfig
    else:
        from transformers import BitsAndBytesConfig
    if quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )


def _check_quantize(quantize: str) -> None:
    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"unknown quantize {quantize!r}: use one of {', '.join(QUANTIZE_CHOICES)}")


def quantize_weights(module: torch.nn.Module, quantize: str,
                     device: torch.device | str = "cpu") -> torch.nn.Module:
    """Replace the weights of every Linear and Conv2d layer of ``module`` by int8 ones.

    Weight-only (optimum-quanto): each layer keeps int8 weights with one scale per output
    channel and computes in the module's dtype, dequantizing the weight it needs on the fly.
    ``module`` may sit on the CPU: each layer moves to ``device`` and is quantized there, one at a
    time, so the GPU never holds more than the quantized model and one full-precision layer.
    Returns the module, on ``device``.
    """
    try:
        from optimum import quanto
        from optimum.quanto.nn import QModuleMixin
    except ImportError:
        raise ModelLoadError(
            f"--quantize {quantize} needs optimum-quanto: pip install 'illusion-relay[quantization]'"
        ) from None
    quanto.quantize(module, weights={"int8": quanto.qint8}[quantize])
    for layer in module.modules():
        if isinstance(layer, QModuleMixin):
            layer.to(device)
            layer.freeze()
    return module.to(device)


def _requantized(model: Any, cls: Any, dtype: torch.dtype, **kwargs: Any) -> Any:
    """Random weights in 8/4 bits: bitsandbytes quantizes while loading, so save and reload."""
    with tempfile.TemporaryDirectory(prefix="illusion-random-") as tmp:
        model.save_pretrained(tmp)
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return cls.from_pretrained(tmp, torch_dtype=dtype, **kwargs)


@contextmanager
def _random_init(dtype: torch.dtype, device: torch.device, seed: int = 0) -> Iterator[None]:
    """Build random-weight models on ``device``, directly in ``dtype``, from a fixed seed.

    The same config on the same kind of device gives the same weights in every process, so a
    benchmark's baseline, its services and its quantized variants run one model. (Built on the
    GPU: initialising a 4.7B-parameter T5 on the CPU takes minutes.) The RNGs are left as they
    were.
    """
    previous = torch.get_default_dtype()
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            yield
        finally:
            torch.set_default_dtype(previous)


def _place(module: torch.nn.Module, device: torch.device, quantized: bool) -> torch.nn.Module:
    # bitsandbytes puts quantized weights where they belong while loading; moving them breaks them.
    if not quantized:
        module = module.to(device)
    return module.eval().requires_grad_(False)


# --------------------------------------------------------------------------------------------
# The three components


def padded_rows(rows: int, max_batch: int, multiple: int = 0) -> int:
    """The rows a padded UNet call of ``rows`` real rows (at most ``max_batch``) runs:
    ``max_batch``, or with ``multiple`` the next multiple of it, capped at ``max_batch``."""
    if not multiple:
        return max_batch
    return min(max_batch, -(-rows // multiple) * multiple)


def call_sizes(max_batch: int, multiple: int = 0) -> list[int]:
    """Every row count padded calls run, smallest first: ``max_batch`` alone, or the multiples of
    ``multiple`` below it and then ``max_batch``."""
    return sorted({padded_rows(rows, max_batch, multiple) for rows in range(1, max_batch + 1)})


@dataclass
class UNetStage:
    """A UNet with its schedulers: what one sampling stage needs.

    ``image_noising_scheduler`` is set for stage 2 only (it noises the upscaled stage-1 image).
    """

    unet: Any  # diffusers.UNet2DConditionModel
    scheduler: Any  # diffusers.DDPMScheduler
    image_noising_scheduler: Any | None
    device: torch.device
    dtype: torch.dtype
    source: str
    graphed: Any | None = None  # illusions.fast.GraphedUNet once CUDA graphs are enabled
    compiled: Any | None = None  # torch.compile'd UNet once compile() was called
    max_batch: int = 0  # most rows per UNet call (0: all 2 x views rows at once)
    fixed_batch: bool = False  # every UNet call runs exactly max_batch rows (short ones padded)
    batch_multiple: int = 0  # with fixed_batch: pad to the next multiple of this (0: max_batch)

    @property
    def sample_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def forward(self) -> Any:
        """The UNet as sampling calls it: the compiled one once compile() was called."""
        return self.unet if self.compiled is None else self.compiled

    def predict(self, sample: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor,
                class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """UNet output (B, 6, H, W) for (B, C, H, W) rows, replayed from a CUDA graph if enabled.

        ``timestep`` is one for all rows (0-d) or one per row (B,), as samples batched together
        are at different steps.

        With ``max_batch`` set, the rows go through the UNet in chunks of at most that many, which
        bounds activation memory (the results differ from one big batch only by float rounding).
        With ``fixed_batch`` too, a shorter chunk is padded to ``max_batch`` rows (copies of its
        last row, whose outputs are dropped) and the timestep given per row, so every call has one
        shape: one CUDA graph, one compiled kernel set, whatever mix of requests shares the call.
        With ``batch_multiple`` as well, it is padded only to the next multiple of that many rows
        (see :meth:`call_sizes`): a few shapes, and a call costs about what its rows need.
        """
        step = self.max_batch or sample.shape[0]
        padded = self.fixed_batch and self.max_batch
        if (padded or self.compiled is not None) and not (torch.is_tensor(timestep)
                                                          and timestep.ndim):
            # One timestep a row, as shared calls give it: padding needs rows to copy, and a
            # compiled UNet then has one variant for calls alone and shared.
            timestep = torch.as_tensor(timestep, device=sample.device).expand(sample.shape[0])
            timestep = timestep.contiguous()
        outputs = []
        for start in range(0, sample.shape[0], step):
            rows = slice(start, start + step)
            labels = None if class_labels is None else class_labels[rows]
            t = timestep[rows] if torch.is_tensor(timestep) and timestep.ndim else timestep
            call = self._padded if padded else self._call
            outputs.append(call(sample[rows], t, embeds[rows], labels))
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def _call(self, sample: torch.Tensor, timestep: Any, embeds: torch.Tensor,
              labels: torch.Tensor | None) -> torch.Tensor:
        """One UNet call: replayed from a CUDA graph if enabled, else the (compiled) UNet."""
        if self.graphed is not None:
            return self.graphed(sample, timestep, embeds, labels)
        return self.forward(sample, timestep, encoder_hidden_states=embeds, class_labels=labels,
                            return_dict=False)[0]

    def padded_rows(self, rows: int) -> int:
        """The rows a UNet call of ``rows`` rows (at most ``max_batch``) runs: with ``fixed_batch``
        see :func:`padded_rows`; else ``rows`` itself."""
        if not (self.fixed_batch and self.max_batch):
            return rows
        return padded_rows(rows, self.max_batch, self.batch_multiple)

    def call_sizes(self) -> list[int]:
        """Every row count a UNet call runs with ``fixed_batch`` (:func:`call_sizes`; none
        without it). Each is one CUDA graph; a service makes them all at start-up."""
        if not (self.fixed_batch and self.max_batch):
            return []
        return call_sizes(self.max_batch, self.batch_multiple)

    def warm_up_call_sizes(self, tokens: int) -> None:
        """Make one UNet call of each of :meth:`call_sizes`, from zeros shaped and typed as
        sampling's calls are (``tokens`` embeddings a row), so each size is compiled and
        captured before the first request needs it (with :meth:`compile`'s default, the first
        call compiles for them all)."""
        config = self.unet.config
        dim = int(config.encoder_hid_dim or config.cross_attention_dim)
        on = {"device": self.device}
        for rows in self.call_sizes():
            size = (rows, config.in_channels, self.sample_size, self.sample_size)
            labels = (None if self.image_noising_scheduler is None
                      else torch.zeros(rows, dtype=torch.long, **on))
            with torch.no_grad():
                self.predict(torch.zeros(size, dtype=self.dtype, **on),
                             torch.zeros(rows, dtype=torch.long, **on),
                             torch.zeros(rows, tokens, dim, dtype=self.dtype, **on), labels)

    def _padded(self, sample: torch.Tensor, timestep: Any, embeds: torch.Tensor,
                labels: torch.Tensor | None) -> torch.Tensor:
        """One UNet call of :meth:`padded_rows` rows for ``sample``'s rows (at most
        ``max_batch``)."""
        real = sample.shape[0]
        size = self.padded_rows(real)
        timestep = torch.as_tensor(timestep, device=sample.device)  # one a row (predict)

        def pad(x: torch.Tensor) -> torch.Tensor:  # contiguous too: one layout, one compile
            extra = size - real
            return (x.contiguous() if extra == 0
                    else torch.cat([x, x[-1:].expand(extra, *x.shape[1:])]))

        labels = None if labels is None else pad(labels)
        return self._call(pad(sample), pad(timestep), pad(embeds), labels)[:real]

    def enable_cuda_graphs(self) -> bool:
        """Replay UNet calls from CUDA graphs (bit-identical, far fewer launches). CUDA only."""
        if self.device.type != "cuda":
            return False
        from illusions.fast import GraphedUNet

        self.graphed = GraphedUNet(self.forward)
        return True

    def compile(self, mode: str = "default", backend: str = "inductor",
                rewrites: bool = True, dynamic_batch: bool = True) -> None:
        """Run the UNet through ``torch.compile`` (fused kernels; inside the CUDA graphs when they
        are enabled). The first call compiles, which takes one to two minutes for the full-size
        UNets.

        With ``rewrites`` the UNet's group norms, resnet blocks, upsamplers, GELUs and thin
        convolutions are first rewritten into forms inductor compiles better
        (:mod:`illusions.inductor_rewrites`: IF-II-M 73.5 → 61.6 ms a call of 16 rows on an
        H200). In the default ``mode`` inductor also runs in its deterministic mode, which tunes
        no kernel by timing it: every process compiles the same kernels, so compiled replicas
        give one picture for one seed (bit-identical across processes, measured; about 1 %
        slower). Results differ from eager by fp16 rounding (≤ 6.8e-3 a call on IF-II-M), so the
        default path stays eager kernels.

        With ``dynamic_batch`` (the default) the row count is a symbol of the compiled code: one
        compile serves every row count, and a new row count costs only its CUDA graph. Measured on
        an H200 (IF-II-M, calls of 4, 8, 12 and 16 rows): the same speed as compiling each row
        count on its own, in one compile instead of four. (A backend that must tell row counts
        apart guards on them and compiles again: PyTorch's CPU convolutions at 16 rows.)
        Without it each row count compiles on its first call."""
        if rewrites:
            from illusions.inductor_rewrites import apply_inductor_rewrites

            apply_inductor_rewrites(self.unet)
        # dynamic=False: nothing but the rows (dynamic_batch) is compiled as a symbol.
        if not dynamic_batch:
            # Each call size compiles on its own; dynamo's limit of shapes per function (8 by
            # default) would send the further sizes back to eager. Keep the default's room for
            # other variants beside them.
            limit = len(self.call_sizes()) + 7
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit,
                                                       limit)
        if backend == "inductor" and mode == "default":
            compiled = torch.compile(self.unet, backend=backend, dynamic=False,
                                     options={"deterministic": True})
        else:
            compiled = torch.compile(self.unet, mode=mode, backend=backend, dynamic=False)
        self.compiled = _BatchDynamic(compiled) if dynamic_batch else compiled
        if self.graphed is not None:  # graphs captured so far ran the eager UNet: start afresh
            self.enable_cuda_graphs()


class _BatchDynamic:
    """A compiled UNet whose inputs' first dimension (the rows) dynamo treats as a symbol."""

    def __init__(self, compiled: Any) -> None:
        self.compiled = compiled

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any,
                 encoder_hidden_states: torch.Tensor | None = None,
                 class_labels: torch.Tensor | None = None, **kwargs: Any) -> Any:
        for x in (sample, timestep, encoder_hidden_states, class_labels):
            if torch.is_tensor(x) and x.ndim:
                # "maybe": a backend that must split row counts (CPU convolutions at 16 rows)
                # guards on them and compiles again, rather than failing.
                torch._dynamo.maybe_mark_dynamic(x, 0)
        return self.compiled(sample, timestep, *args, encoder_hidden_states=encoder_hidden_states,
                             class_labels=class_labels, **kwargs)


def _load_scheduler(source: str, subfolder: str, random_weights: bool) -> Any:
    from diffusers import DDPMScheduler

    if random_weights:
        # Config directories hold JSON only; read them straight from disk.
        config = DDPMScheduler.load_config(str(Path(source) / subfolder))
        return DDPMScheduler.from_config(config)
    _check_source(source)
    try:
        return DDPMScheduler.from_pretrained(source, subfolder=subfolder)
    except Exception as exc:  # noqa: BLE001
        raise explain_load_error(source, f"{subfolder} config", exc) from exc


def load_unet_stage(
    source: str,
    stage: Literal[1, 2],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    quantize: str = "none",
    random_weights: bool = False,
) -> UNetStage:
    """Load the IF-I (``stage=1``) or IF-II (``stage=2``) UNet and its schedulers.

    With ``random_weights`` the UNet is built from ``source/unet/config.json`` with random weights
    (same FLOPs and memory as the real model), built on ``device`` in ``dtype`` from a fixed seed
    (the same weights in every process).
    """
    from diffusers import UNet2DConditionModel

    device = torch.device(device)
    dtype = parse_dtype(dtype)
    quant = _bnb_config("diffusers", quantize, dtype)
    kwargs: dict[str, Any] = {}
    if quant is not None:
        if device.type != "cuda":
            raise ModelLoadError(
                f"--quantize {quantize} for the stage-{stage} UNet needs a CUDA GPU (diffusers "
                "quantizes UNets with bitsandbytes on the GPU only): use --device cuda, or "
                "--quantize int8 (optimum-quanto, any device) on this machine"
            )
        kwargs = {"quantization_config": quant, "device_map": {"": str(device)}}
    if random_weights:
        if not (Path(source) / "unet" / "config.json").is_file():
            raise ModelLoadError(
                f"--random-weights needs a directory with unet/config.json; {source} has none"
            )
        config = UNet2DConditionModel.load_config(str(Path(source) / "unet"))
        with _random_init(dtype, device):
            unet = UNet2DConditionModel.from_config(config)
        if quant is not None:
            unet = _requantized(unet, UNet2DConditionModel, dtype, **kwargs)
    else:
        unet = _from_pretrained(
            UNet2DConditionModel, source, "unet", dtype, f"stage-{stage} UNet", **kwargs
        )
    if quantize in QUANTO_CHOICES:
        unet = quantize_weights(unet, quantize, device)
    unet = _place(unet, device, quant is not None)

    expected_in = 3 if stage == 1 else 6
    if unet.config.in_channels != expected_in:
        raise ModelLoadError(
            f"{source} has a UNet with {unet.config.in_channels} input channels, but a stage-{stage} "
            f"UNet takes {expected_in}: pass an IF-{'I' if stage == 1 else 'II'} model here"
        )
    scheduler = _load_scheduler(source, "scheduler", random_weights)
    noising = (
        _load_scheduler(source, "image_noising_scheduler", random_weights) if stage == 2 else None
    )
    logger.info("loaded stage-%d UNet from %s (%s, %s, quantize=%s)", stage, source, device,
                dtype, quantize)
    return UNetStage(unet, scheduler, noising, device, dtype, source)


def load_text_encoder_parts(
    source: str,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    quantize: str = "none",
    random_weights: bool = False,
) -> tuple[Any, Any]:
    """Load the T5 encoder (``text_encoder/``) and its tokenizer (``tokenizer/``).

    Returns ``(tokenizer, text_encoder)``. With ``random_weights`` the encoder is built from
    ``source/text_encoder/config.json``; the tokenizer is loaded when ``source/tokenizer`` exists,
    else ``None`` (benchmarks then tokenize without one, see :mod:`illusions.text`).
    """
    from transformers import AutoTokenizer, T5Config, T5EncoderModel

    device = torch.device(device)
    dtype = parse_dtype(dtype)
    quant = _bnb_config("transformers", quantize, dtype)
    tokenizer = None
    if random_weights:
        config_dir = Path(source) / "text_encoder"
        if not (config_dir / "config.json").is_file():
            raise ModelLoadError(
                f"--random-weights needs a directory with text_encoder/config.json; {source} has none"
            )
        config = T5Config.from_pretrained(str(config_dir))
        with _random_init(dtype, device):
            encoder = T5EncoderModel(config)
        if quant is not None:
            encoder = _requantized(encoder, T5EncoderModel, dtype, quantization_config=quant,
                                   device_map={"": str(device)})
        if (Path(source) / "tokenizer").is_dir():
            tokenizer = AutoTokenizer.from_pretrained(str(Path(source) / "tokenizer"))
    else:
        kwargs: dict[str, Any] = {}
        if quant is not None:
            kwargs["quantization_config"] = quant
            kwargs["device_map"] = {"": str(device)}
        encoder = _from_pretrained(T5EncoderModel, source, "text_encoder", dtype, "T5 text encoder",
                                   **kwargs)
        _check_source(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer")
        except Exception as exc:  # noqa: BLE001
            raise explain_load_error(source, "T5 tokenizer", exc) from exc
    if quantize in QUANTO_CHOICES:
        encoder = quantize_weights(encoder, quantize, device)
    encoder = _place(encoder, device, quant is not None)
    logger.info("loaded T5 text encoder from %s (%s, %s, quantize=%s)", source, device, dtype,
                quantize)
    return tokenizer, encoder
