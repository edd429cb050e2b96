"""The UNet rewrites that `--compile` applies compute what diffusers' modules compute."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import STAGE2_DIR
from torch import nn

from illusions.inductor_rewrites import (
    ChannelStatsGroupNorm,
    apply_inductor_rewrites,
    channel_stats_group_norm,
)
from illusions.models import load_unet_stage


def _inputs(shape: tuple[int, ...], offset: float, seed: int) -> torch.Tensor:
    """Random activations whose channels sit far from zero (mean ≫ spread), which a group
    variance computed as E[x²] - E[x]² would lose to cancellation."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(1, shape[1], *([1] * (len(shape) - 2)), generator=g) * offset
    return torch.randn(*shape, generator=g) * 0.5 + means


@pytest.mark.parametrize("shape,groups", [((3, 64, 17, 9), 32), ((2, 12, 40), 3),
                                          ((1, 8, 4, 5, 6), 2)])
@pytest.mark.parametrize("affine", [True, False])
def test_channel_stats_group_norm_matches_group_norm_in_float64(shape, groups, affine):
    x = _inputs(shape, offset=300.0, seed=len(shape) + groups).double()
    weight = torch.randn(shape[1], dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], dtype=torch.float64) if affine else None
    expected = F.group_norm(x, groups, weight, bias, 1e-5)
    got = channel_stats_group_norm(x.float(), groups, None if weight is None else weight.float(),
                                   None if bias is None else bias.float(), 1e-5)
    assert got.dtype == torch.float32
    # Statistics in fp32 over channels offset by hundreds: still a few fp32 ulps of the inputs.
    assert (got.double() - expected).abs().max().item() < 2e-3
    ours = (got.double() - expected).norm() / expected.norm()
    fp32 = [None if t is None else t.float() for t in (weight, bias)]
    theirs = (F.group_norm(x.float(), groups, *fp32, 1e-5).double() - expected).norm() \
        / expected.norm()
    assert ours < max(4 * theirs, 1e-6)  # as close as PyTorch's own fp32 group norm, roughly


def test_channel_stats_group_norm_in_fp16_and_channels_last_rounds_like_group_norm():
    x = _inputs((2, 64, 16, 16), offset=3.0, seed=1).half()
    weight, bias = torch.randn(64).half(), torch.randn(64).half()
    expected = F.group_norm(x.double(), 32, weight.double(), bias.double(), 1e-6)
    for layout in (torch.contiguous_format, torch.channels_last):
        got = channel_stats_group_norm(x.contiguous(memory_format=layout), 32, weight, bias, 1e-6)
        assert got.dtype == torch.float16
        # fp16 output: within one rounding of fp16 at the outputs' magnitude.
        tol = expected.abs().max().item() * 2**-10
        assert (got.double() - expected).abs().max().item() <= tol


def test_channel_stats_group_norm_names_a_bad_group_count():
    with pytest.raises(ValueError, match="10 channels do not split into 4 groups"):
        channel_stats_group_norm(torch.randn(1, 10, 4, 4), 4, None, None, 1e-5)


def _unet_call(stage, seed: int = 0) -> tuple[torch.Tensor, tuple]:
    unet = stage.unet
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    x = torch.randn(2, unet.config.in_channels, size, size, generator=g)
    emb = torch.randn(2, 77, int(unet.config.encoder_hid_dim or unet.config.cross_attention_dim),
                      generator=g)
    args = (x, torch.tensor([500, 20]), emb, torch.tensor([50, 10]))
    return stage.predict(*args), args


def test_rewrites_keep_the_unet_and_its_output_and_undo_exactly():
    stage = load_unet_stage(str(STAGE2_DIR), 2)
    before, args = _unet_call(stage)
    state = {k: v.clone() for k, v in stage.unet.state_dict().items()}
    counts = apply_inductor_rewrites(stage.unet)
    group_norms = [m for m in stage.unet.modules() if isinstance(m, nn.GroupNorm)]
    assert counts["group_norms"] == len(group_norms) > 0
    assert all(type(m) is ChannelStatsGroupNorm for m in group_norms)
    assert counts["resnet_blocks"] > 0
    after_state = stage.unet.state_dict()
    assert after_state.keys() == state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in state.items())
    rewritten = stage.predict(*args)
    assert not torch.equal(rewritten, before)  # another computation, ...
    assert torch.allclose(rewritten, before, rtol=0, atol=5e-5)  # ... the same function
    assert apply_inductor_rewrites(stage.unet) == {"group_norms": 0, "resnet_blocks": 0}
    assert apply_inductor_rewrites(stage.unet, enabled=False) == counts
    assert all(type(m) is nn.GroupNorm for m in group_norms)
    assert torch.equal(stage.predict(*args), before)


def test_compiled_rewrites_pin_layouts_for_inductor_and_keep_the_output():
    """Under torch.compile the rewritten UNet hands inductor its layout pins (the scale/shift
    buffers of every group norm, each resnet block's input and output) and computes the same."""
    stage = load_unet_stage(str(STAGE2_DIR), 2)
    eager, args = _unet_call(stage, seed=3)
    pins: list[int] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        pins.append(sum(node.target is torch.ops.prims.inductor_force_stride_order.default
                        or node.target is torch.ops.prims.inductor_force_stride_order
                        for node in gm.graph.nodes))
        return gm.forward

    torch._dynamo.reset()
    try:
        stage.compile(backend=backend)
        compiled = stage.predict(*args)
    finally:
        torch._dynamo.reset()
    counts = apply_inductor_rewrites(stage.unet, enabled=False)  # already rewritten: undo counts
    assert counts["group_norms"] > 0
    assert sum(pins) == 2 * counts["group_norms"] + 2 * counts["resnet_blocks"]
    assert torch.allclose(compiled, eager, rtol=0, atol=5e-5)
