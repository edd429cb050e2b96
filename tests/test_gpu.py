"""GPU-only checks (skipped on machines without CUDA, such as CI; run them on a GPU machine with
``python -m pytest tests/test_gpu.py``): CUDA-graph replay and the batched runner on a GPU that is
not the calling thread's current device, as a stage service on ``cuda:1`` runs them; one compile
for every call size; a job's start and steps never waiting for the GPU; and a job on another GPU
than the thread's running at most a step ahead of its device."""

from __future__ import annotations

import threading

import pytest
import torch
from conftest import STAGE1_DIR, STAGE2_DIR

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _last_gpu() -> torch.device:
    return torch.device(f"cuda:{torch.cuda.device_count() - 1}")


def _inputs(stage, seed: int):
    generator = torch.Generator().manual_seed(seed)
    config, rows = stage.unet.config, 4
    x = torch.randn(rows, config.in_channels, config.sample_size, config.sample_size,
                    generator=generator)
    embeds = torch.randn(rows, 77, config.encoder_hid_dim, generator=generator)
    labels = torch.full((rows,), 50) if stage.image_noising_scheduler is not None else None
    to = {"device": stage.device, "dtype": stage.dtype}
    return (x.to(**to), torch.tensor([900, 900, 500, 500], device=stage.device),
            embeds.to(**to), None if labels is None else labels.to(stage.device))


@pytest.mark.parametrize("other_thread", [False, True], ids=["main-thread", "other-thread"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("number", [1, 2], ids=["stage1", "stage2"])
def test_graph_replay_on_a_gpu_other_than_the_current_one(number, dtype, other_thread):
    """Replayed calls with new inputs equal the eager UNet on the last GPU while the calling
    thread's current device is cuda:0 (with several GPUs; with one, the same path on cuda:0)."""
    from illusions.models import load_unet_stage

    directory = STAGE1_DIR if number == 1 else STAGE2_DIR
    stage = load_unet_stage(str(directory), number, device=_last_gpu(), dtype=dtype)
    assert stage.enable_cuda_graphs()
    got, want = [], []

    def calls() -> None:
        torch.cuda.set_device(0)
        for seed in range(3):  # the first call captures, the others replay
            x, t, embeds, labels = _inputs(stage, seed)
            with torch.no_grad():
                want.append(stage.unet(x, t, encoder_hidden_states=embeds,
                                       class_labels=labels, return_dict=False)[0])
            got.append(stage.predict(x, t, embeds, labels))

    if other_thread:
        thread = threading.Thread(target=calls)
        thread.start()
        thread.join()
    else:
        calls()
    assert len(got) == 3
    captured = list(stage.graphed._graphs.values())
    assert len(captured) == 1 and captured[0] is not None  # replayed, not the eager fallback
    for a, b in zip(got, want, strict=True):
        assert a.device == stage.device
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)
    assert not torch.equal(got[1], got[2])  # not one stale output


def test_batch_runner_on_a_gpu_other_than_the_current_one(text_encoder):
    """A stage-1 job through the batch runner (with CUDA graphs) on the last GPU equals the same
    job on the CPU."""
    from illusions.batching import BatchRunner
    from illusions.models import load_unet_stage
    from illusions.sampling import SamplingParams, stage_1_job
    from illusions.views import build_views

    views = build_views(["identity", "flip"])
    embeds, negative = text_encoder.encode(["a", "b"])
    params = SamplingParams(num_inference_steps=4, guidance_scale=7.0)
    results = {}
    for device in (torch.device("cpu"), _last_gpu()):
        stage = load_unet_stage(str(STAGE1_DIR), 1, device=device)
        if device.type == "cuda":
            stage.enable_cuda_graphs()
        runner = BatchRunner(stage)
        try:
            job = stage_1_job(stage, embeds.to(device), negative.to(device), views,
                              torch.Generator().manual_seed(3), params)
            results[device.type] = runner.run(job).cpu()
        finally:
            runner.close()
    # cuDNN convolutions use TF32 by default: close, not equal (a stale replay is off by ~1).
    torch.testing.assert_close(results["cuda"], results["cpu"], atol=2e-2, rtol=0)


@pytest.mark.parametrize("fixed", [True, False], ids=["fixed-batch", "any-rows"])
def test_compiled_stage_compiles_once_for_every_call_size(fixed):
    """A stage compiled as ``serve --compile --fixed-batch --max-batch 8 --batch-multiple 2``
    compiles (inductor, Triton kernels) once for its four call sizes, replays each size from its
    own CUDA graph, and gives the eager UNet's output within fp16 rounding for every size; so
    does a stage without ``--fixed-batch``, for calls of 2 to 8 rows and a timestep given once
    for all rows (as a sample alone gives it) or one a row (as shared calls do)."""
    from illusions.models import load_unet_stage

    stage = load_unet_stage(str(STAGE2_DIR), 2, device="cuda", dtype="float16")
    stage.max_batch, stage.fixed_batch, stage.batch_multiple = 8 * fixed, fixed, 2
    assert stage.enable_cuda_graphs()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    try:
        stage.compile()
        if fixed:
            stage.warm_up_call_sizes(77)
        x, t, embeds, labels = (torch.cat([v, v]) for v in _inputs(stage, 0))  # 8 rows
        for rows, once in ((2, False), (4, True), (6, False), (8, False), (4, False)):
            step = t[0] if once else t[:rows]  # one timestep for all rows, or one a row
            with torch.no_grad():
                want = stage.unet(x[:rows], step, encoder_hidden_states=embeds[:rows],
                                  class_labels=labels[:rows], return_dict=False)[0]
                got = stage.predict(x[:rows], step, embeds[:rows], labels[:rows])
            torch.testing.assert_close(got, want, atol=2e-2, rtol=0)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
        assert sorted(key[0][0] for key, graph in stage.graphed._graphs.items()
                      if graph is not None) == [2, 4, 6, 8]
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize(("names", "reduction", "with_ref"), [
    (["identity", "jigsaw"], "mean", False),
    (["low_pass", "high_pass"], "sum", True),
    (["motion", "motion_res"], "sum", False),
], ids=["jigsaw", "hybrid-with-reference", "motion"])
@pytest.mark.parametrize("number", [1, 2], ids=["stage1", "stage2"])
def test_a_jobs_steps_queue_their_work_without_waiting_for_the_gpu(number, names, reduction,
                                                                  with_ref, text_encoder):
    """A job's start and steps (views, guidance, the DDPM step, its noise, the next step's
    inputs), which a service runs in the thread that runs the UNet, queue work on the GPU and
    never wait for it: a blocking copy to the GPU, or a read of a GPU value, would wait for the
    UNet call running there, and that thread could not queue the next one ahead (CUDA's sync
    debug mode makes any such wait an error; copies made when the job is made, in a request's
    thread, are not checked). The second job on the same views is the one checked, as a
    service's later requests are: the views' device tables (a permutation, a blur kernel) are
    made once."""
    from illusions.models import load_unet_stage
    from illusions.sampling import SamplingParams, stage_1_job, stage_2_job
    from illusions.views import build_views

    directory = STAGE1_DIR if number == 1 else STAGE2_DIR
    stage = load_unet_stage(str(directory), number, device="cuda", dtype="float16")
    views = build_views(names)
    embeds, negative = text_encoder.encode(["a", "b"])
    params = SamplingParams(num_inference_steps=4, guidance_scale=7.0, reduction=reduction)
    ref = torch.rand(3, 40, 40) * 2 - 1 if with_ref else None
    size, channels = stage.sample_size, stage.unet.config.out_channels
    gpu_generator = torch.Generator("cuda").manual_seed(0)

    def steps(seed: int, checked: bool) -> None:
        generator = torch.Generator().manual_seed(seed)
        if number == 1:
            job = stage_1_job(stage, embeds, negative, views, generator, params, ref_image=ref)
        else:
            job = stage_2_job(stage, torch.rand(1, 3, 16, 16) * 2 - 1, embeds, negative, views,
                              generator, params, ref_image=ref)
        rows = 2 * len(views)  # its inputs and timesteps were copied to the GPU when it was made
        out = [torch.randn(rows, channels, size, size, device="cuda", dtype=torch.float16,
                           generator=gpu_generator) for _ in range(2)]
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error" if checked else "default")
        try:
            call = next(job)  # where a service's runner starts a job that joins the others
            for unet_out in out:  # two steps: the second reports the first done
                call = job.send(unet_out)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert call.rows == rows and call.sample.device.type == "cuda"

    steps(0, checked=False)
    steps(1, checked=True)


@pytest.mark.parametrize("runner", [True, False], ids=["batch-runner", "thread-on-gpu-0"])
def test_a_job_on_another_gpu_runs_at_most_one_step_ahead_of_it(runner, text_encoder):
    """A stage-2 job on the last GPU, run by a BatchRunner or alone in a new thread (whose
    current device is cuda:0), with every UNet call made slow on the device (a sleep kernel
    queued after it): the host waits for the job's own device, not another GPU, so the pinned
    noise buffers it refills are sent before they come round again, and the picture equals the
    same job with every call waited for. (Before, the step events were recorded on the thread's
    current GPU: for a stage on ``cuda:1`` the host ran ahead without bound.) With one GPU it
    checks only that the host waits for the device."""
    from illusions.batching import BatchRunner
    from illusions.models import load_unet_stage
    from illusions.sampling import SamplingParams, run_job, stage_2_job
    from illusions.views import build_views

    device = _last_gpu()
    stage = load_unet_stage(str(STAGE2_DIR), 2, device=device, dtype="float16")
    views = build_views(["identity", "flip"])
    embeds, negative = text_encoder.encode(["a", "b"])
    params = SamplingParams(num_inference_steps=8, guidance_scale=7.0)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    predict = stage.predict

    def run(slow_device: bool) -> torch.Tensor:
        def slow_predict(*args, **kwargs):
            out = predict(*args, **kwargs)
            if slow_device:
                with torch.cuda.device(device):
                    torch.cuda._sleep(100_000_000)  # tens of ms of the device's time
            else:
                torch.cuda.synchronize(device)
            return out

        stage.predict = slow_predict
        try:
            job = stage_2_job(stage, image, embeds, negative, views,
                              torch.Generator().manual_seed(5), params)
            if runner:
                batch_runner = BatchRunner(stage)
                try:
                    return batch_runner.run(job).float().cpu()
                finally:
                    batch_runner.close()
            result: list[torch.Tensor] = []
            thread = threading.Thread(target=lambda: result.append(run_job(stage, job)))
            thread.start()
            thread.join()
            return result[0].float().cpu()
        finally:
            stage.predict = predict

    torch.testing.assert_close(run(slow_device=True), run(slow_device=False), atol=1e-3, rtol=0)
