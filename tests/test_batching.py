"""Several samples sharing UNet calls step by step: each keeps its own generator, and the batched
result equals the sample run alone (up to the float rounding of a larger batch)."""

from __future__ import annotations

import time

import pytest
import torch

from illusions.sampling import (
    SamplingCancelled,
    SamplingParams,
    new_generator,
    run_batched,
    run_job,
    stage_1_job,
    stage_2_job,
)
from illusions.views import build_views

TOLERANCE = 1e-4  # fp32 on the CPU; the fidelity contract allows 1e-3


@pytest.fixture(scope="module")
def prompts(text_encoder):
    two, negative = text_encoder.encode(["a waterfall", "a deer"])
    three, _ = text_encoder.encode(["an owl", "a cat", "a teapot"])
    return two, three, negative


def _stage_1_jobs(stage1, prompts, stop_after: int | None = None):
    """Three samples that differ in seed, views, step count and guidance."""
    two, three, negative = prompts
    calls = {"n": 0}

    def stop() -> bool:
        calls["n"] += 1
        return stop_after is not None and calls["n"] > stop_after

    return [
        stage_1_job(stage1, two, negative, build_views(["identity", "flip"]), new_generator(1),
                    SamplingParams(num_inference_steps=5, guidance_scale=3.0)),
        stage_1_job(stage1, three, negative, build_views(["identity", "rotate_cw", "negate"]),
                    new_generator(2), SamplingParams(num_inference_steps=3, guidance_scale=2.0),
                    should_stop=stop),
        stage_1_job(stage1, two, negative, build_views(["identity", "jigsaw"]), new_generator(3),
                    SamplingParams(num_inference_steps=4, guidance_scale=3.0, reduction="alternate")),
    ]


@pytest.fixture(scope="module")
def alone(stage1, prompts):
    """The three stage-1 samples, each run alone."""
    return [run_job(stage1, job) for job in _stage_1_jobs(stage1, prompts)]


def test_stage_1_batched_equals_alone(stage1, prompts, alone):
    batched = run_batched(stage1, _stage_1_jobs(stage1, prompts))
    for a, b in zip(alone, batched, strict=True):
        assert isinstance(b, torch.Tensor)
        assert (a - b).abs().max() <= TOLERANCE
    # Different seeds, views and steps really are different pictures.
    assert (alone[0] - alone[2]).abs().max() > 0.1


def test_stage_1_batched_in_chunks(stage1, prompts, alone):
    """A bound on rows per UNet call (max_batch) splits the shared batch, not the result."""
    stage1.max_batch = 3
    try:
        batched = run_batched(stage1, _stage_1_jobs(stage1, prompts))
    finally:
        stage1.max_batch = 0
    for a, b in zip(alone, batched, strict=True):
        assert (a - b).abs().max() <= TOLERANCE


def test_fixed_batch_pads_every_call_to_one_shape(stage1, prompts, alone):
    """--fixed-batch: jobs of 4 and 6 rows that end at different steps share calls; every UNet
    call has exactly max_batch rows, the last one's padded, and the padding changes no result."""
    seen: list[tuple[int, ...]] = []
    hook = stage1.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((args[0].shape[0], args[1].shape[0])),
        with_kwargs=True)
    stage1.max_batch, stage1.fixed_batch = 4, True
    try:
        batched = run_batched(stage1, _stage_1_jobs(stage1, prompts))
        single = run_job(stage1, _stage_1_jobs(stage1, prompts)[0])  # alone: 0-d timestep
    finally:
        stage1.max_batch, stage1.fixed_batch = 0, False
        hook.remove()
    assert len(seen) > 5 and set(seen) == {(4, 4)}, seen
    for a, b in zip(alone, batched, strict=True):
        assert (a - b).abs().max() <= TOLERANCE
    assert (single - alone[0]).abs().max() <= TOLERANCE


def test_call_sizes_are_the_multiples_up_to_max_batch(stage1):
    """--batch-multiple: a call is padded to the next multiple (capped at max_batch); without it,
    or without --fixed-batch, the sizes are as before."""
    sizes = {}
    try:
        for fixed, most, multiple in ((True, 16, 4), (True, 10, 4), (True, 16, 0),
                                      (True, 16, 32), (False, 16, 4)):
            stage1.fixed_batch, stage1.max_batch, stage1.batch_multiple = fixed, most, multiple
            sizes[fixed, most, multiple] = (stage1.call_sizes(),
                                            [stage1.padded_rows(n) for n in (1, 4, 5, 9, 10)])
    finally:
        stage1.fixed_batch, stage1.max_batch, stage1.batch_multiple = False, 0, 0
    assert sizes == {
        (True, 16, 4): ([4, 8, 12, 16], [4, 4, 8, 12, 12]),
        (True, 10, 4): ([4, 8, 10], [4, 4, 8, 10, 10]),
        (True, 16, 0): ([16], [16] * 5),
        (True, 16, 32): ([16], [16] * 5),
        (False, 16, 4): ([], [1, 4, 5, 9, 10]),
    }


def test_batch_multiple_pads_short_calls_less(stage1, prompts, alone):
    """--fixed-batch --max-batch 8 with --batch-multiple 2 and 4: jobs of 4, 6 and 4 rows (54 in
    all) share calls of at most 8 rows; a call of fewer rows runs only up to the next multiple,
    not 8. No result changes."""
    seen: dict[int, list[int]] = {4: [], 2: []}
    multiple = 4
    hook = stage1.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen[multiple].append(args[0].shape[0]), with_kwargs=True)
    stage1.max_batch, stage1.fixed_batch = 8, True
    try:
        for multiple in seen:
            stage1.batch_multiple = multiple
            batched = run_batched(stage1, _stage_1_jobs(stage1, prompts))
            for a, b in zip(alone, batched, strict=True):
                assert (a - b).abs().max() <= TOLERANCE
    finally:
        stage1.max_batch, stage1.fixed_batch, stage1.batch_multiple = 0, False, 0
        hook.remove()
    # Multiples of 2: each call runs its real rows (calls hold whole steps of jobs of 4 and 6
    # rows, so some hold 6); multiples of 4: the 6-row calls run 8, and nothing else changes.
    assert sum(seen[2]) == 54 and 6 in seen[2] and set(seen[2]) <= {2, 4, 6, 8}, seen
    assert seen[4] == [4 * -(-rows // 4) for rows in seen[2]], seen


def test_every_call_is_full_while_enough_rows_wait(stage1, prompts, monkeypatch):
    """Jobs of 4, 6 and 4 rows (5, 3 and 4 steps: 54 rows in all) with at most 4 rows a call:
    a job's rows may be split between two calls, so 13 calls are full and only the last, when
    2 rows are left, is not: 14 calls, where stepping every job each round takes 15, 3 of them
    part-empty."""
    from illusions.sampling import SharedSteps

    real_rows: list[int] = []
    predict = stage1.predict
    monkeypatch.setattr(stage1, "predict",
                        lambda sample, *a, **k: real_rows.append(sample.shape[0])
                        or predict(sample, *a, **k))
    stage1.max_batch = 4
    try:
        shared = SharedSteps(stage1)
        results: list = [None] * 3
        for k, job in enumerate(_stage_1_jobs(stage1, prompts)):
            shared.add(job, lambda result, k=k: results.__setitem__(k, result))
        while len(shared):
            shared.step()
    finally:
        stage1.max_batch = 0
    assert real_rows == [4] * 13 + [2]
    assert shared.unet_calls == 14 and shared.job_steps == 5 + 3 + 4
    assert all(isinstance(r, torch.Tensor) for r in results)


def test_a_job_split_between_calls_equals_the_job_alone(stage1, prompts):
    """One job of 6 rows with at most 4 a call: its rows go through two calls (4 + 2), as
    run_job's own chunking does, and the picture is the same."""
    job = _stage_1_jobs(stage1, prompts)[1]
    again = _stage_1_jobs(stage1, prompts)[1]
    stage1.max_batch = 4
    try:
        shared = run_batched(stage1, [job])[0]
        alone = run_job(stage1, again)
    finally:
        stage1.max_batch = 0
    assert torch.allclose(shared, alone, rtol=0, atol=1e-6)


def test_stage_2_batched_equals_alone(stage2, prompts):
    two, three, negative = prompts
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def jobs():
        return [
            stage_2_job(stage2, image, two, negative, build_views(["identity", "flip"]),
                        new_generator(1), SamplingParams(num_inference_steps=4, guidance_scale=3.0,
                                                         noise_level=50)),
            stage_2_job(stage2, -image, three, negative,
                        build_views(["identity", "rotate_180", "flip"]), new_generator(2),
                        SamplingParams(num_inference_steps=3, guidance_scale=2.0, noise_level=100)),
        ]

    alone = [run_job(stage2, job) for job in jobs()]
    batched = run_batched(stage2, jobs())
    for a, b in zip(alone, batched, strict=True):
        assert isinstance(b, torch.Tensor)
        assert (a - b).abs().max() <= TOLERANCE


def test_a_cancelled_job_ends_alone(stage1, prompts, alone):
    batched = run_batched(stage1, _stage_1_jobs(stage1, prompts, stop_after=1))
    assert isinstance(batched[1], SamplingCancelled)
    for k in (0, 2):
        assert (alone[k] - batched[k]).abs().max() <= TOLERANCE


def _with_embeds(job, change):
    """``job`` with every UNet call's embeddings changed by ``change``."""
    from dataclasses import replace

    out = None
    try:
        while True:
            call = job.send(out) if out is not None else next(job)
            out = yield replace(call, embeds=change(call.embeds))
    except StopIteration as done:
        return done.value


def test_a_job_whose_rows_fail_ends_alone(stage1, prompts, alone):
    """A shared call that fails is run again job by job: the job whose rows fail gets the error,
    the others go on unchanged."""
    jobs = _stage_1_jobs(stage1, prompts)
    jobs[1] = _with_embeds(jobs[1], lambda e: e[..., :-1])  # too narrow for the UNet
    batched = run_batched(stage1, jobs)
    assert isinstance(batched[1], RuntimeError)
    for k in (0, 2):
        assert (alone[k] - batched[k]).abs().max() <= TOLERANCE


def test_a_job_that_cannot_share_a_call_runs_alone(stage1, prompts, alone):
    """Rows that cannot be stacked with the others' (other token counts) run in their own call."""
    jobs = _stage_1_jobs(stage1, prompts)
    jobs[1] = _with_embeds(jobs[1], lambda e: e[:, :10])
    batched = run_batched(stage1, jobs)
    shorter = run_job(stage1, _with_embeds(_stage_1_jobs(stage1, prompts)[1], lambda e: e[:, :10]))
    assert (batched[1] - shorter).abs().max() <= TOLERANCE
    for k in (0, 2):
        assert (alone[k] - batched[k]).abs().max() <= TOLERANCE


def test_runner_shares_calls_between_callers(stage1, prompts, alone):
    """Jobs submitted from other threads join the running ones at their next step."""
    from illusions.batching import BatchRunner

    runner = BatchRunner(stage1, "test")
    try:
        futures = [runner.submit(job) for job in _stage_1_jobs(stage1, prompts)]
        results = [f.result(timeout=120) for f in futures]
    finally:
        runner.close()
    for a, b in zip(alone, results, strict=True):
        assert (a - b).abs().max() <= TOLERANCE
    assert runner.shared.job_steps == 5 + 3 + 4
    assert runner.shared.unet_calls < runner.shared.job_steps


@pytest.mark.parametrize("quiet_s", [2.0, 0.0])
def test_runner_gathers_jobs_that_arrive_together(stage1, prompts, quiet_s):
    """Jobs arriving within the quiet period of each other share the first call: three jobs of
    4 steps, arriving more than a call's time apart, take 4 calls. Without the wait the first
    arrival starts alone and the others join calls later (up to 12 calls)."""
    from illusions.batching import BatchRunner

    two, _, negative = prompts
    runner = BatchRunner(stage1, "test", quiet_s=quiet_s, max_gather_s=30.0)
    try:
        futures = []
        for seed in range(3):
            futures.append(runner.submit(stage_1_job(
                stage1, two, negative, build_views(["identity", "flip"]), new_generator(seed),
                SamplingParams(num_inference_steps=4, guidance_scale=3.0))))
            time.sleep(0.5)  # longer than one call of the tiny UNet
        for future in futures:
            future.result(timeout=120)
    finally:
        runner.close()
    if quiet_s:
        assert runner.shared.unet_calls == 4
    else:
        assert runner.shared.unet_calls > 4


@pytest.mark.parametrize("bound", ["max_jobs", "max_batch"])
def test_runner_does_not_wait_for_jobs_that_cannot_join(stage1, prompts, alone, bound,
                                                       monkeypatch):
    """With one job admitted at a time (a service's --max-concurrent 1), or a first job that
    fills a call, the runner does not wait: a quiet period of a minute would time out here."""
    from illusions.batching import BatchRunner

    if bound == "max_batch":
        monkeypatch.setattr(stage1, "max_batch", 4)  # the first job's 2 views x 2 prompts
    runner = BatchRunner(stage1, "test", max_jobs=1 if bound == "max_jobs" else 0, quiet_s=60.0,
                         max_gather_s=60.0)
    try:
        result = runner.submit(_stage_1_jobs(stage1, prompts)[0]).result(timeout=30)
    finally:
        runner.close()
    assert runner.shared.unet_calls == 5
    assert (result - alone[0]).abs().max() <= TOLERANCE


def test_runner_reports_a_job_error_to_its_caller(stage1, prompts):
    from illusions.batching import BatchRunner

    runner = BatchRunner(stage1, "test")
    try:
        jobs = _stage_1_jobs(stage1, prompts, stop_after=1)
        futures = [runner.submit(job) for job in jobs]
        with pytest.raises(SamplingCancelled):
            futures[1].result(timeout=120)
        assert isinstance(futures[0].result(timeout=120), torch.Tensor)
    finally:
        runner.close()


def test_concurrent_requests_to_a_stage_service_share_calls_and_match_alone():
    """Three clients at once on a stage-1 service with --max-concurrent 3: every client gets the
    picture (and generator state) it gets when it is the only one."""
    import threading

    from conftest import STAGE1_DIR
    from test_services import running

    from anagram.v1 import anagram_pb2 as pb
    from orchestrator.client import CascadeClient
    from services.common import codec

    g = torch.Generator().manual_seed(0)
    names = [["identity", "flip"], ["identity", "rotate_cw", "negate"], ["identity", "rotate_180"]]
    requests = [
        pb.Stage1Request(
            prompt_embeds=codec.encode(torch.randn(len(views), 77, 32, generator=g)),
            negative_prompt_embeds=codec.encode(torch.randn(1, 77, 32, generator=g)),
            views=[pb.ViewSpec(name=name) for name in views],
            params=pb.SamplingParams(num_inference_steps=4 + k, guidance_scale=3, seed=k),
        )
        for k, views in enumerate(names)
    ]
    with running("stage1", str(STAGE1_DIR), max_concurrent=3) as address, \
            CascadeClient(address, address, address, timeout=120) as client:
        alone = [client.stage1(request) for request in requests]
        together: list = [None] * len(requests)
        start = threading.Barrier(len(requests))

        def call(k: int) -> None:
            start.wait()
            together[k] = client.stage1(requests[k])

        threads = [threading.Thread(target=call, args=(k,)) for k in range(len(requests))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    for (image, state), result in zip(alone, together, strict=True):
        assert result is not None
        assert (image - result[0]).abs().max() <= TOLERANCE
        assert torch.equal(state, result[1])


@pytest.mark.parametrize(("stage_number", "fixed", "multiple", "first"),
                         [(2, True, 2, 2), (1, False, 0, 2)])
def test_compiled_service_compiles_once_at_start_up(monkeypatch, prompts, stage_number, fixed,
                                                    multiple, first):
    """serve --compile compiles its UNet once, during load_stage's warm-up, with the rows a
    symbol: with --fixed-batch --max-batch 4 --batch-multiple 2 its first call is of 2 rows
    (then 4 rows only capture), without --fixed-batch the warm-up's 2 rows. Requests of 2, 4
    and 6 rows, alone and sharing calls, then compile nothing more: the warm-up's inputs have the
    dtypes and shapes sampling gives (stage 2: its noise-level class labels too), and a timestep
    a row as shared calls have. Each row count compiled on its own (``dynamic_batch=False``)
    raises dynamo's recompile limit when there are more sizes than it allows. (A backend that
    records what dynamo hands it stands in for inductor, which would take minutes here.)"""
    from conftest import STAGE1_DIR, STAGE2_DIR

    from illusions.models import UNetStage
    from illusions.sampling import run_batched
    from services.common.server import ServerConfig
    from services.common.stage import load_stage

    traced: list[tuple[int, bool]] = []  # each graph's first rows, and whether they are a symbol

    def recording_backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        values = [node.meta.get("example_value") for node in gm.graph.find_nodes(op="placeholder")]
        rows = next(v.shape[0] for v in values if torch.is_tensor(v) and v.ndim == 4)
        traced.append((next(x.shape[0] for x in example_inputs if torch.is_tensor(x) and x.ndim == 4),
                       isinstance(rows, torch.SymInt)))
        return gm.forward

    compile_with = UNetStage.compile
    monkeypatch.setattr(UNetStage, "compile",
                        lambda self, **kw: compile_with(self, **kw, backend=recording_backend))
    torch._dynamo.reset()
    try:
        # dynamo's own patching (monkeypatch's undo loses the setting from dynamo's config module).
        with torch._dynamo.config.patch(recompile_limit=8):
            model = STAGE1_DIR if stage_number == 1 else STAGE2_DIR
            config = ServerConfig(service=f"stage{stage_number}", model=str(model),
                                  compile=True, fixed_batch=fixed, max_batch=4 * fixed,
                                  batch_multiple=multiple)
            stage = load_stage(config, stage_number)
            assert traced == [(first, True)]
            two, three, negative = prompts
            params = SamplingParams(num_inference_steps=2, guidance_scale=3.0)
            image = torch.zeros(1, 3, 16, 16)

            def job(embeds: torch.Tensor, names: list[str], seed: int = 0) -> object:
                views = build_views(names)
                return (stage_1_job(stage, embeds, negative, views, new_generator(seed), params)
                        if stage_number == 1 else
                        stage_2_job(stage, image, embeds, negative, views, new_generator(seed),
                                    params))

            for embeds, names in ((two[:1], ["identity"]), (two, ["identity", "flip"]),
                                  (three, ["identity", "flip", "rotate_cw"])):
                run_job(stage, job(embeds, names))
            run_batched(stage, [job(two, ["identity", "flip"], seed) for seed in (1, 2)])
            assert traced == [(first, True)]
            stage.max_batch, stage.fixed_batch, stage.batch_multiple = 20, True, 2  # 10 sizes
            stage.compile()
            assert torch._dynamo.config.recompile_limit == 8
            stage.compile(dynamic_batch=False)
            assert torch._dynamo.config.recompile_limit == 17
        assert torch._dynamo.config.recompile_limit == 8
    finally:
        torch._dynamo.reset()
