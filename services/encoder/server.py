"""The T5 text-encoder service (CPU by default): prompts -> prompt embeddings + null embedding."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from illusions.models import ModelLoadError
from illusions.sampling import InvalidInputError, SamplingCancelled
from illusions.text import TextEncoder
from services.common import codec
from services.common.errors import rpc_errors
from services.common.server import Admission, ModelHandle, ServerConfig, serve

MAX_PROMPTS = 16
MAX_PROMPT_CHARS = 2000  # T5 keeps 77 tokens; anything this long is a mistake


class EncoderServicer(pb_grpc.EncoderServicer):
    def __init__(self, model: ModelHandle[TextEncoder], admission: Admission) -> None:
        self.model = model
        self.admission = admission

    @rpc_errors
    def Encode(self, request: pb.EncodeRequest, context: grpc.ServicerContext  # noqa: N802
               ) -> pb.EncodeResponse:
        encoder = self.model.answering(context)
        prompts = list(request.prompts)
        if not prompts:
            raise InvalidInputError("prompts is empty: give one prompt per view")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidInputError(f"{len(prompts)} prompts is too many: use at most {MAX_PROMPTS}")
        for i, prompt in enumerate(prompts):
            if len(prompt) > MAX_PROMPT_CHARS:
                raise InvalidInputError(
                    f"prompts[{i}] has {len(prompt)} characters: keep prompts under "
                    f"{MAX_PROMPT_CHARS} (only the first 77 tokens count)"
                )
        with self.admission.slot(context.is_active):
            # One forward pass is the encoder's whole work: skip it if the client gave up while
            # the call waited for the model (cancelled, or its deadline passed).
            if not context.is_active():
                raise SamplingCancelled("cancelled before encoding")
            prompt_embeds, negative = encoder.encode(prompts)
        return pb.EncodeResponse(prompt_embeds=codec.encode(prompt_embeds),
                                 negative_prompt_embeds=codec.encode(negative))

    @rpc_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext  # noqa: N802
                 ) -> pb.ModelInfo:
        return self.model.describe()


def main(config: ServerConfig, stop: threading.Event | None = None,
         ready_line: Callable[[str], None] | None = None) -> None:
    handle: ModelHandle[TextEncoder] = ModelHandle("encoder")
    servicer = EncoderServicer(handle, Admission(config.max_concurrent, config.max_queue))

    def load() -> pb.ModelInfo:
        encoder = TextEncoder.from_pretrained(
            config.model, device=config.device, dtype=config.dtype, quantize=config.quantize,
            random_weights=config.random_weights,
        )
        try:
            encoder.encode(["warm-up"])
        except RuntimeError as exc:  # e.g. bitsandbytes 4-bit on the CPU, for some layer widths
            hint = (f"--quantize {config.quantize} may not work for this model on "
                    f"{config.device}: try 8bit, int8 or none" if config.quantize != "none"
                    else "check the model files")
            raise ModelLoadError(f"the T5 text encoder from {config.model} loaded but could not "
                                 f"encode a prompt ({exc}): {hint}") from exc
        info = pb.ModelInfo(
            service="encoder", model=config.model, device=str(encoder.device),
            dtype=str(encoder.dtype).removeprefix("torch."), quantize=config.quantize,
            embed_dim=encoder.hidden_size, random_weights=config.random_weights,
        )
        handle.set(encoder, info)
        return info

    serve(config, lambda server: pb_grpc.add_EncoderServicer_to_server(servicer, server), load,
          ready_line=ready_line, stop=stop)
