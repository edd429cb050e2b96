"""The ``illusion`` command: ``generate``, ``serve``, ``animate`` and ``views``.

Errors a user can make end in one line ``error: ...`` and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from illusions.models import (
    DEFAULT_ENCODER_MODEL,
    DEFAULT_STAGE1_MODEL,
    DEFAULT_STAGE2_MODEL,
    QUANTIZE_CHOICES,
    ModelLoadError,
    parse_device,
    parse_dtype,
)
from illusions.sampling import REDUCTIONS, InvalidInputError, SamplingParams
from illusions.views import VIEWS, ViewError
from services.common.security import (
    TOKEN_ENV,
    ClientSecurity,
    ServerSecurity,
    add_client_options,
    add_server_options,
    check_ca,
    check_key_pair,
    read_pem,
    read_token,
)

if TYPE_CHECKING:
    from orchestrator.local import LocalServiceSpec

logger = logging.getLogger("illusion")

EXIT_USAGE = 2
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130
DEFAULT_MODELS = {
    "encoder": DEFAULT_ENCODER_MODEL,
    "stage1": DEFAULT_STAGE1_MODEL,
    "stage2": DEFAULT_STAGE2_MODEL,
}

MAX_TIMEOUT_S = 1e6  # about 11.6 days: longer is a mistake, or meant as "no deadline"


def _split_view_args(values: Sequence[str] | None) -> tuple[tuple[str, ...], ...]:
    """``--view-args "" "4" "num_patches=4,..."``: one string per view, comma-separated values."""
    if not values:
        return ()
    return tuple(tuple(a.strip() for a in v.split(",") if a.strip()) for v in values)


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stage1-model", default=DEFAULT_STAGE1_MODEL, metavar="ID|DIR",
                        help=f"IF-I model, Hub id or local directory (default {DEFAULT_STAGE1_MODEL})")
    parser.add_argument("--stage2-model", default=DEFAULT_STAGE2_MODEL, metavar="ID|DIR",
                        help=f"IF-II model (default {DEFAULT_STAGE2_MODEL})")
    parser.add_argument("--encoder-model", default=None, metavar="ID|DIR",
                        help="model whose text_encoder/ and tokenizer/ to use (default: the "
                             "stage-1 model)")
    parser.add_argument("--device", default="auto",
                        help="device of the UNet services: cpu, cuda or cuda:N (default: cuda "
                             "when there is a GPU, else cpu)")
    parser.add_argument("--encoder-device", default="cpu",
                        help="device of the T5 encoder (default cpu: it runs well there)")
    parser.add_argument("--dtype", default="auto",
                        help="float16, bfloat16 or float32 for the UNets (default: float16 on "
                             "GPU, float32 on CPU)")
    parser.add_argument("--encoder-dtype", default="float32",
                        help="dtype of the T5 encoder (default float32; bfloat16 halves memory)")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="UNet weights in 8 or 4 bits: 8bit or 4bit with bitsandbytes (CUDA), "
                             "int8 with optimum-quanto")
    parser.add_argument("--encoder-quantize", default="none", choices=QUANTIZE_CHOICES,
                        help="load T5 in 8 or 4 bits (choices as --quantize)")
    parser.add_argument("--random-weights", action="store_true",
                        help="models are config directories: random weights (benchmarks)")
    parser.add_argument("--max-batch", type=int, nargs="+", default=[0], metavar="N",
                        help="most rows per UNet call in the local services (2 per view): one "
                             "number for both stages, or two (stage 1, stage 2); smaller bounds "
                             "GPU memory. 0: all at once")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="illusion",
        description="Visual anagrams with the DeepFloyd IF cascade, as three gRPC services.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make illusions (starts local services unless "
                                          "addresses are given)")
    gen.add_argument("--prompts", nargs="+", required=True, help="one prompt per view")
    gen.add_argument("--views", nargs="+", required=True,
                     help="view names, one per prompt (see `illusion views`)")
    gen.add_argument("--view-args", nargs="+", default=None, metavar="A",
                     help="one string per view with its arguments, comma-separated, "
                          "positional or key=value ('' for defaults), e.g. '' 'num_patches=4'")
    gen.add_argument("--view-seed", type=int, default=0,
                     help="seed of the permutation views (default 0)")
    gen.add_argument("--style", default="", help='prepended to each prompt, e.g. "an oil '
                                                 'painting of"')
    gen.add_argument("--name", default="", help="run name (default: from views and prompts)")
    gen.add_argument("--save-dir", type=Path, default=Path("results"))
    gen.add_argument("--num-samples", type=int, default=1,
                     help="samples use seeds seed .. seed+K-1")
    gen.add_argument("--seed", type=int, default=0)
    defaults = SamplingParams()
    gen.add_argument("--num-inference-steps", type=int, default=defaults.num_inference_steps)
    gen.add_argument("--guidance-scale", type=float, default=defaults.guidance_scale)
    gen.add_argument("--reduction", default=defaults.reduction, choices=REDUCTIONS)
    gen.add_argument("--noise-level", type=int, default=defaults.noise_level,
                     help="noise added to the 64px image before stage 2 (default 50)")
    gen.add_argument("--ref-image", type=Path, default=None, metavar="PATH",
                     help="inverse problem: this image supplies the first view's component")
    gen.add_argument("--save-tensors", action="store_true",
                     help="also save float32 stage_1/stage_2 outputs to tensors.safetensors")
    gen.add_argument("--encoder", default=None, metavar="HOST:PORT",
                     help="address of a running encoder service")
    gen.add_argument("--stage1", default=None, metavar="HOST:PORT",
                     help="stage-1 service(s): host:port[,host:port] or dns:///name:port")
    gen.add_argument("--stage2", default=None, metavar="TARGET",
                     help="stage-2 service(s): host:port[,host:port] or dns:///name:port")
    gen.add_argument("--batch", type=int, default=1, metavar="N",
                     help="samples sent to each stage at once; a service started with "
                          "--max-concurrent N (local mode starts them so) runs them through "
                          "shared UNet calls. Default 1")
    gen.add_argument("--parallel", type=int, default=0, metavar="N",
                     help="stage-2 calls in flight while stage 1 works on later samples "
                          "(0, the default: as many as --batch, or one per stage-2 replica if "
                          "there are more replicas)")
    gen.add_argument("--stage2-devices", nargs="+", default=None, metavar="DEV",
                     help="local mode: one stage-2 replica per device, e.g. cuda:1 cuda:2 "
                          "(default: one on --device); samples are spread over them")
    gen.add_argument("--compile", action="store_true",
                     help="local mode: the stage services torch.compile their UNets at start-up "
                          "(one to two minutes per stage before the first sample, then up to "
                          "~2x faster UNet calls on a GPU; pays off over many samples)")
    gen.add_argument("--fixed-batch", action="store_true",
                     help="local mode: every UNet call of each stage service runs one row count "
                          "(its --max-batch, or 2 x views x --batch when that is 0; short calls "
                          "are padded): one CUDA graph, captured at start-up")
    gen.add_argument("--batch-multiple", type=int, nargs="+", default=[0], metavar="N",
                     help="local mode, with --fixed-batch: pad each UNet call only to the next "
                          "multiple of N rows (one number for both stages, or two), so a call "
                          "that is not full costs less; each multiple below --max-batch is one "
                          "more CUDA graph to capture at start-up (--max-batch 16, N 8: 8 and "
                          "16). E.g. 0 4 for 2 views (one sample's rows in stage 2). 0: pad to "
                          "--max-batch")
    gen.add_argument("--timeout", type=float, default=3600.0,
                     help="deadline of each service call in seconds (default 3600)")
    gen.add_argument("--retry-timeout", type=float, default=120.0, metavar="S",
                     help="how long to wait for a lost service (or a busy one) before giving up "
                          "(default 120); calls lost with a replica are tried again")
    gen.add_argument("--startup-timeout", type=float, default=900.0, metavar="S",
                     help="local mode: how long each service may take to start, downloading its "
                          "model on a first run and compiling with --compile (default 900)")
    gen.add_argument("--overwrite", action="store_true",
                     help="the run folder holds a different run: delete its samples and start "
                          "afresh (without it, that is an error; the same command resumes, with "
                          "or without it)")
    add_client_options(gen, f"send the bearer token in this file (or set {TOKEN_ENV})")
    gen.add_argument("--no-progress", action="store_true", help="no progress bars")
    gen.add_argument("--animate", action="store_true",
                     help="also write each sample's animation (as `illusion animate` does)")
    _add_model_options(gen)

    srv = sub.add_parser("serve", help="run one service")
    srv.add_argument("service", choices=("encoder", "stage1", "stage2"))
    srv.add_argument("--model", default=None, metavar="ID|DIR",
                     help="Hub id or local directory (default: the DeepFloyd M models)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to bind (default loopback; 0.0.0.0 exposes it)")
    srv.add_argument("--port", type=int, default=0, help="port (0: pick a free one)")
    srv.add_argument("--device", default="cpu")
    srv.add_argument("--dtype", default="auto",
                     help="float16, bfloat16 or float32 (default: float16 on GPU, else float32)")
    srv.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                     help="8bit or 4bit weights with bitsandbytes (CUDA), int8 with optimum-quanto")
    srv.add_argument("--random-weights", action="store_true",
                     help="--model is a config directory: build the model with random weights")
    srv.add_argument("--no-cuda-graphs", action="store_true",
                     help="run UNet calls eagerly instead of replaying CUDA graphs (GPU only)")
    srv.add_argument("--compile", action="store_true",
                     help="torch.compile the UNet: faster calls (fused kernels), after one to "
                          "two minutes of compiling at start-up (once, for every row count); "
                          "fp16 rounding differs slightly from the default kernels")
    srv.add_argument("--max-batch", type=int, default=0, metavar="N",
                     help="most rows per UNet call (2 per view); smaller bounds GPU memory. "
                          "0: all at once")
    srv.add_argument("--fixed-batch", action="store_true",
                     help="every UNet call runs exactly --max-batch rows, short ones padded: one "
                          "CUDA graph for any mix of requests (with --max-concurrent)")
    srv.add_argument("--batch-multiple", type=int, default=0, metavar="N",
                     help="with --fixed-batch: pad each call only to the next multiple of N rows "
                          "(capped at --max-batch): a call that is not full costs less, at one "
                          "CUDA graph per row count, all captured at start-up. 0: pad to "
                          "--max-batch")
    srv.add_argument("--max-concurrent", type=int, default=1, metavar="N",
                     help="requests sampled at once; a stage service runs them through shared "
                          "UNet calls, step by step (more throughput, more GPU memory unless "
                          "--max-batch bounds the rows). Default 1")
    srv.add_argument("--max-queue", type=int, default=8,
                     help="calls that may wait; more are refused with RESOURCE_EXHAUSTED")
    add_server_options(srv, f"every call must carry this bearer token (or set {TOKEN_ENV}); "
                            "health checks stay open")
    srv.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)

    ani = sub.add_parser("animate", help="GIF (and MP4) of a result turning from view to view")
    ani.add_argument("result", type=Path, metavar="RESULT_DIR",
                     help="a run folder SAVE_DIR/NAME (all its samples) or one sample folder NNNN")
    ani.add_argument("--size", type=int, default=None,
                     help="animate sample_SIZE.png (default: the largest, e.g. 256)")
    ani.add_argument("--fps", type=int, default=20, help="frames per second (default 20)")
    ani.add_argument("--hold", type=float, default=1.5,
                     help="seconds each view stays on screen (default 1.5)")
    ani.add_argument("--transition", type=float, default=1.0,
                     help="seconds of each move to or from a view (default 1.0)")
    ani.add_argument("--video", default="auto", choices=("auto", "mp4", "none"),
                     help="MP4 besides the GIF: auto = when a video encoder is installed "
                          "(pip install 'illusion-relay[video]')")

    sub.add_parser("views", help="list the views and their arguments")
    return parser


def _resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return str(parse_device("cuda")) if torch.cuda.is_available() else "cpu"
    return str(parse_device(name))


def _resolve_dtype(name: str, device: str) -> str:
    if name == "auto":
        return "float16" if device.startswith("cuda") else "float32"
    return str(parse_dtype(name)).removeprefix("torch.")


def cmd_views() -> int:
    width = max(len(name) for name in VIEWS)
    for name, info in VIEWS.items():
        print(f"{name:<{width}}  {info.description}")
        for arg in info.args:
            print(f"{'':<{width}}    {arg.name}={arg.default!r} ({arg.type.__name__}): {arg.help}")
    return 0


def server_security(args: argparse.Namespace) -> ServerSecurity:
    """TLS files and the token of ``illusion serve``, read here at the edge."""
    security = _server_security(args)
    if security.tls:
        check_key_pair(args.tls_cert, args.tls_key)
    if security.client_ca is not None:
        check_ca(args.tls_client_ca, "--tls-client-ca")
    return security


def _server_security(args: argparse.Namespace) -> ServerSecurity:
    return ServerSecurity(
        cert=read_pem(args.tls_cert, "--tls-cert"),
        key=read_pem(args.tls_key, "--tls-key"),
        client_ca=read_pem(args.tls_client_ca, "--tls-client-ca"),
        token=read_token(args.token_file, dict(os.environ)),
    )


def client_security(args: argparse.Namespace) -> ClientSecurity:
    """TLS files and the token of ``illusion generate`` with remote services."""
    security = _client_security(args)
    if security.ca is not None:
        check_ca(args.tls_ca, "--tls-ca")
    if security.cert is not None:
        check_key_pair(args.tls_cert, args.tls_key)
    return security


def _client_security(args: argparse.Namespace) -> ClientSecurity:
    return ClientSecurity(
        ca=read_pem(args.tls_ca, "--tls-ca"),
        cert=read_pem(args.tls_cert, "--tls-cert"),
        key=read_pem(args.tls_key, "--tls-key"),
        token=read_token(args.token_file, dict(os.environ)),
        server_name=args.tls_server_name,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from services.common.server import ServerConfig, configure_logging

    security = server_security(args)  # a missing or unreadable file: one line, before anything
    if args.service == "encoder":
        unet_only = [flag for flag, given in (
            ("--compile", args.compile), ("--no-cuda-graphs", args.no_cuda_graphs),
            ("--max-batch", args.max_batch != 0), ("--fixed-batch", args.fixed_batch),
            ("--batch-multiple", args.batch_multiple != 0)) if given]
        if unet_only:
            raise InvalidInputError(f"{', '.join(unet_only)} only apply to the UNet services "
                                    "(serve stage1|stage2): leave them out for the encoder")
    if args.fixed_batch and args.max_batch < 1:
        raise InvalidInputError("--fixed-batch pads every UNet call to --max-batch rows: give "
                                "--max-batch N too (e.g. 16)")
    _check_batch_multiple([args.batch_multiple], args.fixed_batch, per_stage=False)
    device = _resolve_device(args.device)
    config = ServerConfig(
        service=args.service,
        model=args.model or DEFAULT_MODELS[args.service],
        host=args.host,
        port=args.port,
        device=device,
        dtype=_resolve_dtype(args.dtype, device),
        quantize=args.quantize,
        random_weights=args.random_weights,
        cuda_graphs=not args.no_cuda_graphs,
        compile=args.compile,
        max_batch=args.max_batch,
        fixed_batch=args.fixed_batch,
        batch_multiple=args.batch_multiple,
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        parent_pid=args.parent_pid,
        security=security,
    )  # settings that cannot work are refused here, before the service logs anything
    configure_logging()
    # Before CUDA starts: segments that grow in place keep the CUDA graphs' memory pools compact
    # (docs/benchmarks.md: the int8 IF-I-XL process 8.3 -> 6.3 GiB). A setting of the user's wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    if args.service == "encoder":
        from services.encoder.server import main
    elif args.service == "stage1":
        from services.stage1.server import main
    else:
        from services.stage2.server import main
    main(config)
    return 0


def cmd_animate(args: argparse.Namespace) -> int:
    from orchestrator.animation import AnimateConfig, animate_result

    config = AnimateConfig(size=args.size, fps=args.fps, hold=args.hold,
                           transition=args.transition, video=args.video)
    for path in animate_result(args.result, config):
        print(path)
    return 0


def _check_batch_multiple(values: list[int], fixed_batch: bool, per_stage: bool = True) -> None:
    """--batch-multiple: one or two numbers (local mode; serve: one), none negative, and only
    with padding."""
    given = " ".join(map(str, values))
    if len(values) > 2 or min(values) < 0:
        what = ("one number for both stages or two (stage 1, stage 2), each" if per_stage
                else "one number,")
        raise InvalidInputError(f"--batch-multiple {given}: give {what} 0 (pad to --max-batch) "
                                "or more")
    if any(values) and not fixed_batch:
        raise InvalidInputError(f"--batch-multiple {given} sets how far --fixed-batch pads a "
                                "UNet call: add --fixed-batch (and --max-batch N)")


def _warn_padding(stage: str, cap: int, multiple: int, fill: int, source: str) -> None:
    """Warn when --fixed-batch pads the fullest step of a stage (``fill`` rows: all its requests
    in flight, in calls of at most ``cap`` rows) to at least a third more rows than it holds:
    padding costs as much as real rows."""
    from illusions.models import padded_rows

    full, rest = divmod(fill, cap)
    padded = full * cap + (padded_rows(rest, cap, multiple) if rest else 0)
    if padded * 3 >= fill * 4:
        logger.warning(
            "--fixed-batch pads %s's calls to %d rows in all, but %s fill at most %d: %.0f %% of "
            "the rows are padding, as slow as real rows. Give that stage a --max-batch that %d "
            "fills, send more samples at once (--batch, --parallel), or give --batch-multiple",
            stage, padded, source, fill, 100 * (1 - fill / padded), fill)


def local_specs(args: argparse.Namespace) -> list[LocalServiceSpec]:
    """The services local mode starts for ``generate``'s arguments: the encoder, stage 1 and one
    stage 2 per ``--stage2-devices`` entry (one on ``--device`` by default)."""
    from orchestrator.local import LocalServiceSpec

    device = _resolve_device(args.device)
    dtype = _resolve_dtype(args.dtype, device)
    if len(args.max_batch) > 2 or min(args.max_batch) < 0:
        raise InvalidInputError(
            f"--max-batch {' '.join(map(str, args.max_batch))}: give one number for both stages "
            "or two (stage 1, stage 2), each 0 (all rows at once) or more"
        )
    # --fixed-batch pads every call to one row count: --max-batch, else all rows of a batch.
    all_rows = 2 * len(args.views) * args.batch if args.fixed_batch else 0
    stage1_rows, stage2_rows = (n or all_rows for n in (args.max_batch * 2)[:2])
    _check_batch_multiple(args.batch_multiple, args.fixed_batch)
    stage1_multiple, stage2_multiple = (args.batch_multiple * 2)[:2]
    unet_options = {"compile": args.compile, "fixed_batch": args.fixed_batch}
    stage2_devices = [str(parse_device(name)) for name in args.stage2_devices or [device]]
    # --parallel stage-2 calls are spread over the replicas: each replica runs its share at once
    # (the stage-2 calls of several stage-1 groups), not only one --batch.
    stage2_concurrent = max(args.batch, -(-args.parallel // len(stage2_devices)))
    if args.fixed_batch:
        views = len(args.views)
        _warn_padding("stage-1", stage1_rows, stage1_multiple, 2 * views * args.batch,
                      f"--batch {args.batch} with {views} views")
        _warn_padding("stage-2", stage2_rows, stage2_multiple, 2 * views * stage2_concurrent,
                      f"{stage2_concurrent} sample{'s' * (stage2_concurrent > 1)} in flight a "
                      f"replica with {views} views")
    return [
        LocalServiceSpec("encoder", args.encoder_model or args.stage1_model,
                         str(parse_device(args.encoder_device)),
                         _resolve_dtype(args.encoder_dtype, args.encoder_device),
                         args.encoder_quantize, args.random_weights),
        LocalServiceSpec("stage1", args.stage1_model, device, dtype, args.quantize,
                         args.random_weights, stage1_rows, args.batch, **unet_options,
                         batch_multiple=stage1_multiple),
    ] + [
        LocalServiceSpec("stage2", args.stage2_model, d, _resolve_dtype(args.dtype, d),
                         args.quantize, args.random_weights, stage2_rows, stage2_concurrent,
                         **unet_options, batch_multiple=stage2_multiple)
        for d in stage2_devices
    ]


def local_models(specs: Sequence[LocalServiceSpec]) -> dict[str, dict[str, Any]] | None:
    """The models local mode's services will report, as a run's metadata names them (what
    ``finished_run`` compares); None when stage-2 replicas differ (one in float16, one in
    float32, say): which one a run's metadata names is then chance, and only the services can
    tell."""
    identities = {(spec.kind, spec.model, spec.dtype, spec.quantize, spec.random_weights)
                  for spec in specs}
    if len(identities) != 3:
        return None
    return {kind: {"model": model, "dtype": dtype, "quantize": quantize,
                   "random_weights": random_weights}
            for kind, model, dtype, quantize, random_weights in identities}


# generate's options that configure the services local mode starts, and where each is set for a
# remote service instead.
LOCAL_ONLY_OPTIONS = {
    "stage1_model": "stage1 --model", "stage2_model": "stage2 --model",
    "encoder_model": "encoder --model", "device": "stage1|stage2 --device",
    "encoder_device": "encoder --device", "dtype": "stage1|stage2 --dtype",
    "encoder_dtype": "encoder --dtype", "quantize": "stage1|stage2 --quantize",
    "encoder_quantize": "encoder --quantize", "random_weights": "... --random-weights",
    "max_batch": "stage1|stage2 --max-batch", "compile": "... --compile",
    "fixed_batch": "... --fixed-batch", "batch_multiple": "... --batch-multiple",
}


def _refuse_local_options(args: argparse.Namespace) -> None:
    """Remote mode: a local-mode option given would be ignored, so it is refused instead."""
    defaults = build_parser().parse_args(["generate", "--prompts", "p", "--views", "identity"])
    for dest, where in LOCAL_ONLY_OPTIONS.items():
        if getattr(args, dest) != getattr(defaults, dest):
            flag = "--" + dest.replace("_", "-")
            raise InvalidInputError(
                f"{flag} applies to local mode; remote services are set up where they start: "
                f"`illusion serve {where}` instead"
            )


def replica_count(target: str) -> int:
    """How many stage-2 replicas ``--stage2`` names: the addresses of a list, or those a
    ``dns:///name:port`` resolves to now (a headless service's pods; 1 if it does not resolve),
    so that ``--parallel``'s default keeps each busy."""
    if target.startswith("dns:"):
        host, _, port = target.split("/")[-1].rpartition(":")
        try:
            found = socket.getaddrinfo(host.strip("[]") or target, int(port) if port.isdigit()
                                       else None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            return 1
        return max(1, len({info[4][:2] for info in found}))
    if "://" in target:
        return 1
    return max(1, len([a for a in target.split(",") if a.strip()]))


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.client import CascadeClient
    from orchestrator.local import LocalServices
    from orchestrator.pipeline import GenerateConfig, check_config, finished_run, generate, locked_run_dir

    config = GenerateConfig(
        prompts=tuple(args.prompts),
        views=tuple(args.views),
        view_args=_split_view_args(args.view_args),
        view_seed=args.view_seed,
        style=args.style,
        name=args.name,
        save_dir=args.save_dir,
        num_samples=args.num_samples,
        seed=args.seed,
        params=SamplingParams(
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            reduction=args.reduction,
            noise_level=args.noise_level,
        ),
        ref_image=args.ref_image,
        save_tensors=args.save_tensors,
        overwrite=args.overwrite,
    )
    if args.parallel < 0:
        raise InvalidInputError(f"--parallel {args.parallel}: use 1 or more (0: automatic)")
    if args.batch < 1:
        raise InvalidInputError(f"--batch {args.batch}: use 1 or more")
    # gRPC's deadlines overflow far beyond this: a call with a deadline of 1e10 s failed at once.
    if not 0 < args.timeout <= MAX_TIMEOUT_S:
        raise InvalidInputError(f"--timeout {args.timeout:g}: use more than 0 seconds and at most "
                                f"{MAX_TIMEOUT_S:g} (the deadline of each service call)")
    if not 0 < args.startup_timeout <= MAX_TIMEOUT_S:
        raise InvalidInputError(f"--startup-timeout {args.startup_timeout:g}: use more than 0 "
                                f"seconds and at most {MAX_TIMEOUT_S:g}")
    if not 0 <= args.retry_timeout <= MAX_TIMEOUT_S:
        raise InvalidInputError(f"--retry-timeout {args.retry_timeout:g}: use 0 .. "
                                f"{MAX_TIMEOUT_S:g} seconds")
    check_config(config)  # fail fast, before any service starts
    progress = not args.no_progress and sys.stderr.isatty()

    remote = [args.encoder, args.stage1, args.stage2]
    if any(remote):
        if not all(remote):
            raise InvalidInputError(
                "give all three of --encoder, --stage1 and --stage2, or none for local mode"
            )
        if args.stage2_devices:
            raise InvalidInputError(
                "--stage2-devices starts local replicas; with remote services list their "
                "addresses in --stage2 instead"
            )
        _refuse_local_options(args)
        security = client_security(args)
        with CascadeClient(args.encoder, args.stage1, args.stage2, timeout=args.timeout,
                           retry_timeout=args.retry_timeout, security=security) as client:
            client.check()
            replicas = replica_count(args.stage2)
            written = generate(config, client, progress=progress, stage1_workers=args.batch,
                               stage2_workers=args.parallel or max(args.batch, replicas))
    else:
        given = [flag for flag, value in (("--tls-ca", args.tls_ca), ("--tls-cert", args.tls_cert),
                                          ("--tls-key", args.tls_key),
                                          ("--tls-server-name", args.tls_server_name),
                                          ("--token-file", args.token_file)) if value]
        if given:
            raise InvalidInputError(
                f"{', '.join(given)} only apply to remote services (--encoder/--stage1/--stage2): "
                "local mode talks plaintext on loopback"
            )
        specs = local_specs(args)
        stage2_devices = [spec.device for spec in specs if spec.kind == "stage2"]
        # The run folder is held before the services start, so a second command into it is
        # refused at once; a run whose samples are all made needs no service at all.
        with locked_run_dir(config.run_dir):
            models = local_models(specs)
            written = None if models is None else finished_run(config, models)
            if written is not None:
                logger.warning("%s: %s made already, nothing to do (to make them again, remove "
                               "the folder or pick another --name)", config.run_dir,
                               "its sample is" if len(written) == 1
                               else f"all {len(written)} samples are")
            else:
                logger.info("local mode: starting the encoder, stage-1 and %d stage-2 service(s)",
                            len(stage2_devices))
                services = LocalServices(specs, startup_timeout=args.startup_timeout)
                with services as addresses, CascadeClient(
                    addresses["encoder"], addresses["stage1"], addresses["stage2"],
                    timeout=args.timeout, retry_timeout=args.retry_timeout, gone=services.exited,
                ) as client:
                    client.check()
                    written = generate(config, client, progress=progress,
                                       stage1_workers=args.batch,
                                       stage2_workers=args.parallel or max(args.batch,
                                                                           len(stage2_devices)))
    for folder in written:
        print(folder)
    if args.animate:
        from orchestrator.animation import animate_result

        for folder in written:
            for path in animate_result(folder):
                print(path)
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from orchestrator.client import ServiceError
    from orchestrator.local import LocalServiceError

    if args.command in ("generate", "animate"):
        # `docker stop`, a Kubernetes job's end, `kill`: the same clean stop as Ctrl-C (local
        # services stopped, no half-written sample or animation left behind).
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        if args.command == "views":
            return cmd_views()
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "animate":
            return cmd_animate(args)
        return cmd_generate(args)
    except (ViewError, InvalidInputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ModelLoadError, ServiceError, LocalServiceError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        kept = {"generate": "finished samples are kept, unfinished ones were discarded",
                "animate": "finished animations are kept"}.get(args.command, "stopped")
        print(f"error: interrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
