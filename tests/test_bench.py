"""The benchmark's in-process baseline must be the reference algorithm: it reproduces the
reference vectors on the tiny cascade, as the library does."""

from __future__ import annotations

import pytest
from conftest import CASES, TOLERANCE

from bench.baseline import reference_stage_1, reference_stage_2
from illusions.sampling import new_generator
from illusions.views import build_views


@pytest.mark.parametrize("name", ["three_views", "hybrid"])
def test_baseline_reproduces_reference(name, text_encoder, stage1, stage2, reference):
    case = next(c for c in CASES if c["name"] == name)
    prompt_embeds, negative = text_encoder.encode(case["prompts"])
    views = build_views(case["views"])
    generator = new_generator(case["seed"])
    args = (case["steps"], case["guidance_scale"])
    image64 = reference_stage_1(stage1, prompt_embeds, negative, views, generator, *args,
                                reduction=case["reduction"])
    image256 = reference_stage_2(stage2, image64, prompt_embeds, negative, views, generator,
                                 *args, noise_level=case["noise_level"],
                                 reduction=case["reduction"])
    assert (image64 - reference[f"{name}/stage_1"]).abs().max() <= TOLERANCE
    assert (image256 - reference[f"{name}/stage_2"]).abs().max() <= TOLERANCE


def test_cuda_graphs_are_not_enabled_on_cpu(stage1):
    assert stage1.enable_cuda_graphs() is False
    assert stage1.graphed is None
