"""The IF-II service: 64 -> 256 multi-view super-resolution, continuing stage 1's generator."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from illusions.models import UNetStage
from illusions.sampling import InvalidInputError, check_stage_2_inputs, stage_2_job
from services.common.errors import rpc_errors
from services.common.server import Admission, ModelHandle, ServerConfig, serve, stream_with_progress
from services.common.stage import (
    LazyRunner,
    embeds_from_request,
    generator_from_request,
    load_stage,
    model_info,
    optional_image,
    params_from_proto,
    sample_result,
    views_from_specs,
)


class Stage2Servicer(pb_grpc.Stage2Servicer):
    def __init__(self, model: ModelHandle[UNetStage], admission: Admission) -> None:
        self.model = model
        self.admission = admission
        self.runner = LazyRunner("stage2", admission.max_running)

    @rpc_errors
    def Sample(self, request: pb.Stage2Request, context: grpc.ServicerContext):  # noqa: N802
        stage = self.model.answering(context)
        image = optional_image(request.image, "image")
        if image is None:
            raise InvalidInputError("image is missing: send the stage-1 output (1, 3, H, H)")
        prompt_embeds, negative = embeds_from_request(request)
        views = views_from_specs(request.views)
        params = params_from_proto(request.params)
        ref_image = optional_image(request.ref_image, "ref_image")
        generator = generator_from_request(request)
        # Before the request waits for its turn: a request that cannot run is told so at once.
        check_stage_2_inputs(stage, image, prompt_embeds, negative, views, params, ref_image)

        def work(progress, should_stop) -> pb.SampleResult:
            job = stage_2_job(stage, image, prompt_embeds, negative, views, generator, params,
                              ref_image=ref_image, callback=progress, should_stop=should_stop)
            return sample_result(self.runner(stage).run(job), generator, "stage2",
                                 {"image": image, "prompt_embeds": prompt_embeds,
                                  "negative_prompt_embeds": negative, "ref_image": ref_image})

        with self.admission.slot(context.is_active):
            yield from stream_with_progress(work, context)

    @rpc_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext  # noqa: N802
                 ) -> pb.ModelInfo:
        return self.model.describe()


def main(config: ServerConfig, stop: threading.Event | None = None,
         ready_line: Callable[[str], None] | None = None) -> None:
    handle: ModelHandle[UNetStage] = ModelHandle("stage2")
    servicer = Stage2Servicer(handle, Admission(config.max_concurrent, config.max_queue))

    def load() -> pb.ModelInfo:
        stage = load_stage(config, 2)
        handle.set(stage, model_info(config, stage))
        return handle.info

    serve(config, lambda server: pb_grpc.add_Stage2Servicer_to_server(servicer, server), load,
          ready_line=ready_line, stop=stop)
