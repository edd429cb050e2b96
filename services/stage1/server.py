"""The IF-I service: 64x64 multi-view sampling. Returns the image and the generator state."""

from __future__ import annotations

import threading
from collections.abc import Callable

import grpc

from anagram.v1 import anagram_pb2 as pb
from anagram.v1 import anagram_pb2_grpc as pb_grpc
from illusions.models import UNetStage
from illusions.sampling import check_stage_1_inputs, new_generator, stage_1_job
from services.common.errors import rpc_errors
from services.common.server import Admission, ModelHandle, ServerConfig, serve, stream_with_progress
from services.common.stage import (
    LazyRunner,
    embeds_from_request,
    load_stage,
    model_info,
    optional_image,
    params_from_proto,
    sample_result,
    views_from_specs,
)


class Stage1Servicer(pb_grpc.Stage1Servicer):
    def __init__(self, model: ModelHandle[UNetStage], admission: Admission) -> None:
        self.model = model
        self.admission = admission
        self.runner = LazyRunner("stage1", admission.max_running)

    @rpc_errors
    def Sample(self, request: pb.Stage1Request, context: grpc.ServicerContext):  # noqa: N802
        stage = self.model.answering(context)
        prompt_embeds, negative = embeds_from_request(request)
        views = views_from_specs(request.views)
        params = params_from_proto(request.params)
        ref_image = optional_image(request.ref_image, "ref_image")
        generator = new_generator(request.params.seed)
        # Before the request waits for its turn: a request that cannot run is told so at once.
        check_stage_1_inputs(stage, prompt_embeds, negative, views, params, ref_image)

        def work(progress, should_stop) -> pb.SampleResult:
            job = stage_1_job(stage, prompt_embeds, negative, views, generator, params,
                              ref_image=ref_image, callback=progress, should_stop=should_stop)
            return sample_result(self.runner(stage).run(job), generator, "stage1",
                                 {"prompt_embeds": prompt_embeds,
                                  "negative_prompt_embeds": negative, "ref_image": ref_image})

        with self.admission.slot(context.is_active):
            yield from stream_with_progress(work, context)

    @rpc_errors
    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext  # noqa: N802
                 ) -> pb.ModelInfo:
        return self.model.describe()


def main(config: ServerConfig, stop: threading.Event | None = None,
         ready_line: Callable[[str], None] | None = None) -> None:
    handle: ModelHandle[UNetStage] = ModelHandle("stage1")
    servicer = Stage1Servicer(handle, Admission(config.max_concurrent, config.max_queue))

    def load() -> pb.ModelInfo:
        stage = load_stage(config, 1)
        handle.set(stage, model_info(config, stage))
        return handle.info

    serve(config, lambda server: pb_grpc.add_Stage1Servicer_to_server(servicer, server), load,
          ready_line=ready_line, stop=stop)
