"""Same seed, same picture: the library reproduces the reference implementation's outputs."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, TOLERANCE

from illusions.sampling import SamplingParams, new_generator, sample_stage_1, sample_stage_2
from illusions.views import build_views


def params_of(case: dict) -> SamplingParams:
    return SamplingParams(case["steps"], case["guidance_scale"], case["reduction"],
                          case["noise_level"])


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_prompt_embeds_match_reference(case, text_encoder, reference):
    prompt_embeds, negative = text_encoder.encode(case["prompts"])
    expected = reference[f"{case['name']}/prompt_embeds"]
    assert prompt_embeds.shape == expected.shape
    torch.testing.assert_close(prompt_embeds, expected, atol=1e-5, rtol=0)
    # The negative is the empty prompt, encoded the same way.
    torch.testing.assert_close(negative, text_encoder.embed([""]), atol=0, rtol=0)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_both_stages_match_reference(case, text_encoder, stage1, stage2, reference):
    prompt_embeds, negative = text_encoder.encode(case["prompts"])
    views = build_views(case["views"], case.get("view_args"), view_seed=case.get("view_seed", 0))
    generator = new_generator(case["seed"])
    image64 = sample_stage_1(stage1, prompt_embeds, negative, views, generator, params_of(case))
    image256 = sample_stage_2(stage2, image64, prompt_embeds, negative, views, generator,
                              params_of(case))
    d1 = (image64 - reference[f"{case['name']}/stage_1"]).abs().max().item()
    d2 = (image256 - reference[f"{case['name']}/stage_2"]).abs().max().item()
    assert d1 <= TOLERANCE, f"stage 1 differs from the reference by {d1}"
    assert d2 <= TOLERANCE, f"stage 2 differs from the reference by {d2}"
